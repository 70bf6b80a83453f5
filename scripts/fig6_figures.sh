#!/usr/bin/env bash
# After scripts/fig6_caltech_cpu.sh: Fig. 6 diagnosis of the four runs, Fig. 4 evolution of the two clipped
# runs, the summary table, and the pictures copied to docs/img/fig6-*.png and fig4-*.png.
# Usage: scripts/fig6_figures.sh [RUNS_DIR]
set -euo pipefail
RUNS=${1:-runs/fig6-cpu}
DATA=${DATA:-../shared/data/caltech101}
PY=${PY:-.venv/bin/python}
IMG=${IMG:-docs/img}
mkdir -p "$IMG"
for run in "$RUNS"/*-clip*; do
  name=$(basename "$run")
  nice -n 10 "$PY" -m zfnet diagnose --weights "$run/checkpoint.pth" --data "$DATA" --max-images 600 \
    --out "$run/diagnose" --json > /dev/null
  cp "$run/diagnose/layer1_filters.png" "$IMG/fig6-$name-layer1.png"
  cp "$run/diagnose/layer2_features.png" "$IMG/fig6-$name-layer2.png"
done
for model in zfnet alexnet; do
  run="$RUNS/$model-clip0.1"
  nice -n 10 "$PY" -m zfnet evolution --run "$run" --data "$DATA" --max-images 300 --units 6 \
    --out "$run/evolution" --json > /dev/null
  for layer in relu1 relu2 relu5; do
    cp "$run/evolution/evolution_$layer.png" "$IMG/fig4-$model-evolution-$layer.png"
  done
done
"$PY" scripts/fig6_summary.py "$RUNS"
