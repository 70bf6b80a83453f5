#!/usr/bin/env bash
# The CPU-scale Fig. 6 experiment (docs/experiments.md): ZFNet (7x7/2 conv1) and the AlexNet-style net
# (11x11/4 conv1), each with and without feature scale clipping, trained from scratch with the same
# recipe on Caltech-101 (30 images per class for training, the rest for testing), then diagnosed.
# Usage: scripts/fig6_caltech_cpu.sh [RUNS_DIR] [MINUTES_PER_RUN]   (runs the four trainings in parallel)
set -euo pipefail
RUNS=${1:-runs/fig6-cpu}
MIN=${2:-20}
DATA=${DATA:-../shared/data/caltech101}
PY=${PY:-.venv/bin/python}
COMMON=(--data "$DATA" --train-per-class 30 --widths 32,64,96,96,64 --fc 256 --resize 72 --crop 64
        --batch-size 32 --epochs 40 --init-std 0 --dropout 0 --epoch-val-crops center --cache yes --threads 1
        --budget-minutes "$MIN" --progress no)
for model in zfnet alexnet; do
  for clip in 0.1 0; do
    out="$RUNS/$model-clip$clip"
    mkdir -p "$out"
    nice -n 10 "$PY" -m zfnet train --model "$model" --clip-radius "$clip" --out "$out" "${COMMON[@]}" \
      > "$out/train.log" 2>&1 &
  done
done
wait
