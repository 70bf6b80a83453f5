#!/usr/bin/env bash
# The CPU-scale recipe comparison (docs/experiments.md): Zeiler & Fergus's recipe (Sec. 3) against
# Krizhevsky et al.'s (Secs. 3-5), each with and without AlexNet's PCA lighting (Sec. 4.1), trained from
# scratch on Caltech-101 (30 images per class for training, the rest for testing) for the same number of
# epochs, then evaluated in Table 2's form (1 crop / 10 crops, each run and their ensemble).
# Usage: scripts/recipes_caltech_cpu.sh [RUNS_DIR] [EPOCHS]   (the four trainings run in parallel)
set -euo pipefail
RUNS=${1:-runs/recipes-cpu}
EPOCHS=${2:-30}
DATA=${DATA:-../shared/data/caltech101}
PY=${PY:-.venv/bin/python}
# The CPU-scale deviations shared by both recipes (as the Fig. 6 runs): small widths and inputs, batch 32,
# He initialization, no dropout; and for AlexNet's recipe biases 0 (with He weights its biases of 1 killed fc7).
COMMON=(--data "$DATA" --train-per-class 30 --widths 32,64,96,96,64 --fc 256 --resize 72 --crop 64
        --batch-size 32 --epochs "$EPOCHS" --init-std 0 --dropout 0 --epoch-val-crops center --cache yes
        --threads 1 --progress no)
NAMES=(zfnet zfnet-lighting alexnet alexnet-nolighting)
declare -A RUN=(
  [zfnet]="--recipe zfnet"
  [zfnet-lighting]="--recipe zfnet --lighting 0.1"
  [alexnet]="--recipe alexnet --bias-one none"
  [alexnet-nolighting]="--recipe alexnet --bias-one none --lighting 0"
)
for name in "${NAMES[@]}"; do
  out="$RUNS/$name"
  mkdir -p "$out"
  # shellcheck disable=SC2086
  nice -n 10 "$PY" -m zfnet train ${RUN[$name]} --out "$out" "${COMMON[@]}" > "$out/train.log" 2>&1 &
done
wait
W=()
for name in "${NAMES[@]}"; do W+=(--weights "$RUNS/$name/checkpoint.pth"); done
# Table 2 on the held-out images (the same seeded per-class split as training)
nice -n 10 "$PY" -m zfnet evaluate --data "$DATA" --train-per-class 30 "${W[@]}" --out "$RUNS/table2" \
  --threads 1 --progress no > "$RUNS/table2.log" 2>&1
