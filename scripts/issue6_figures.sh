#!/usr/bin/env bash
# After scripts/issue6_caltech.sh: Fig. 6 diagnosis of the four runs, Fig. 4 evolution of the two clipped
# runs, the summary table, and the pictures copied to docs/img/issue6-*.png.
# Usage: scripts/issue6_figures.sh [RUNS_DIR]
set -euo pipefail
RUNS=${1:-runs/issue6}
DATA=${DATA:-../shared/data/caltech101}
PY=${PY:-.venv/bin/python}
IMG=${IMG:-docs/img}
mkdir -p "$IMG"
for run in "$RUNS"/*-clip*; do
  name=$(basename "$run")
  nice -n 10 "$PY" -m zfnet diagnose --weights "$run/checkpoint.pth" --data "$DATA" --max-images 600 \
    --out "$run/diagnose" --json > /dev/null
  cp "$run/diagnose/layer1_filters.png" "$IMG/issue6-$name-layer1.png"
  cp "$run/diagnose/layer2_features.png" "$IMG/issue6-$name-layer2.png"
done
for model in zfnet alexnet; do
  run="$RUNS/$model-clip0.1"
  nice -n 10 "$PY" -m zfnet evolution --run "$run" --data "$DATA" --max-images 300 --units 6 \
    --out "$run/evolution" --json > /dev/null
  for layer in relu1 relu2 relu5; do
    cp "$run/evolution/evolution_$layer.png" "$IMG/issue6-$model-evolution-$layer.png"
  done
done
"$PY" scripts/issue6_summary.py "$RUNS"
