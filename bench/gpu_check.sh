#!/usr/bin/env bash
# The prepared GPU check (docs/benchmarks.md, "GPU check"): one script, under 10 minutes on one GPU, that runs
# unchanged on a fresh GPU machine and writes its figures to one file for docs/benchmarks.md:
#   1. the tests that take a device (pytest -m device) with ZFNET_TEST_DEVICE=cuda
#   2. training throughput: float32 vs AMP + channels_last (bench/bench_train.py), and a short `zfnet train`
#      of ZFNet at the paper's size on generated images, with the recipe's own img/s
#   3. torchrun, 2 processes vs 1: training weights and mining top-k (bench/dist_check.py; NCCL with two or
#      more GPUs, else gloo on the CPU, said so)
#   4. the projection, occlusion and atlas benches (--quick) on the GPU
# Without a CUDA device (or with --cpu) every step runs on the CPU instead, says so, and uses small sizes:
# a dry run that proves the script works.
#
# Usage: bench/gpu_check.sh [--cpu] [OUT_DIR]      (default OUT_DIR: out/gpu-check; figures: OUT_DIR/figures.md)
# Environment: PYTHON (default: .venv/bin/python if it has torch, else python3), WHEELS (a folder of wheels to
#   install from, offline: e.g. captum for the Captum comparisons), TORCH_WHEEL (a local torch wheel to install
#   when the Python has none; without it pip installs torch from PyPI, whose Linux wheels are CUDA builds).
set -uo pipefail
cd "$(dirname "$0")/.."
FORCE_CPU=0
if [[ "${1:-}" == "--cpu" ]]; then FORCE_CPU=1; shift; fi
OUT=${1:-out/gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
FIG="$OUT/figures.md"
LOG="$OUT/log.txt"
: > "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$(date +%s)

say() { echo "gpu_check: $*" | tee -a "$LOG" >&2; }
fig() { echo "$*" >> "$FIG"; }
elapsed() { echo $(( $(date +%s) - START )); }

# ---- 0. a Python with torch (installed if missing), zfnet from this checkout -------------------------------
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then PYTHON=.venv/bin/python
  else PYTHON=python3; fi
fi
pip_install() {  # from $WHEELS when given (offline), else the index
  if [[ -n "${WHEELS:-}" ]]; then "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" "$@"
  else "$PYTHON" -m pip install -q "$@"; fi
}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  say "no torch in $PYTHON: installing ${TORCH_WHEEL:-torch from the package index}"
  pip_install "${TORCH_WHEEL:-torch}" || { say "could not install torch"; exit 1; }
fi
for mod in numpy PIL matplotlib sklearn tqdm pytest; do
  if ! "$PYTHON" -c "import $mod" 2>/dev/null; then
    pkg=$mod; [[ $mod == PIL ]] && pkg=pillow; [[ $mod == sklearn ]] && pkg=scikit-learn
    say "installing $pkg"; pip_install "$pkg" || { say "could not install $pkg (needed)"; exit 1; }
  fi
done
HAVE_CAPTUM=1
if ! "$PYTHON" -c "import captum" 2>/dev/null; then
  pip_install captum 2>/dev/null || HAVE_CAPTUM=0
fi
read -r TORCH CUDA_BUILD NGPU GPU < <("$PYTHON" - <<'EOF'
import torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(torch.__version__, torch.version.cuda or "none", n, (torch.cuda.get_device_name(0) if n else "-").replace(" ", "_"))
EOF
)
if [[ $FORCE_CPU == 1 ]]; then DEV=cpu; WHY="--cpu given"
elif [[ $NGPU -gt 0 ]]; then DEV=cuda; WHY="$NGPU GPU(s): ${GPU//_/ }"
else DEV=cpu; WHY="no CUDA device seen by torch"; fi
BUILD=$([[ $CUDA_BUILD == none ]] && echo "a CPU build" || echo "a CUDA $CUDA_BUILD build")
say "python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])'), torch $TORCH ($BUILD); $WHY: running on $DEV"
[[ $DEV == cpu ]] && say "CPU dry run: every step runs, at small sizes; the figures are not GPU figures"
QUICK=(); [[ $DEV == cpu ]] && QUICK=(--quick)

: > "$FIG"
fig "### GPU check ($(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
fig ""
fig "Machine: $([[ $NGPU -gt 0 ]] && echo "${GPU//_/ } x $NGPU" || echo 'no GPU'), $(nproc) CPU cores; torch $TORCH ($BUILD); device **$DEV** ($WHY)."
fig "Command: \`bench/gpu_check.sh$([[ $FORCE_CPU == 1 ]] && echo ' --cpu')\`."
fig ""
STATUS=0
step() {  # step NAME command...: run, log, remember failures, never stop the script
  local name=$1; shift
  say "[$(elapsed) s] $name"
  "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  cat "$OUT/$name.txt" >> "$LOG"
  if [[ $rc -ne 0 ]]; then STATUS=1; say "$name FAILED (rc $rc): see $OUT/$name.txt"; tail -5 "$OUT/$name.txt" >&2; fi
  return $rc
}

# ---- 1. the tests that take a device ----------------------------------------------------------------------
if step tests env ZFNET_TEST_DEVICE=$DEV "$PYTHON" -m pytest -q -m device tests -p no:cacheprovider; then :; fi
fig "- tests on $DEV (\`ZFNET_TEST_DEVICE=$DEV pytest -m device\`): $(grep -E '[0-9]+ (passed|failed)' "$OUT/tests.txt" | tail -1)"

# ---- 2. training throughput ---------------------------------------------------------------------------------
if step bench_train "$PYTHON" bench/bench_train.py --device $DEV "${QUICK[@]}"; then
  fig "- training step (\`bench/bench_train.py --device $DEV ${QUICK[*]}\`): $(grep -v '^ratio' "$OUT/bench_train.txt" | grep img/s | paste -sd';' | sed 's/;/; /g'); $(tail -1 "$OUT/bench_train.txt")"
fi
DATA="$OUT/images"
PER=$([[ $DEV == cuda ]] && echo 160 || echo 24)  # images per class (8 classes), 8 of each held out
"$PYTHON" - "$DATA" "$PER" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root = Path(sys.argv[1]); rng = np.random.default_rng(0)
for c in range(8):
    (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(int(sys.argv[2])):
        a = rng.integers(0, 256, (256 + 8 * (i % 4), 300, 3), dtype=np.uint8); a[..., c % 3] //= 2
        Image.fromarray(a).save(root / f"class{c}" / f"{i}.jpg", quality=90)
EOF
if [[ $DEV == cuda ]]; then TR=(--epochs 3 --batch-size 128 --workers 8); else TR=(--epochs 2 --batch-size 32 --widths 16,32,48,48,32 --fc 64 --resize 72 --crop 64 --threads 2); fi
if step train "$PYTHON" -m zfnet train --data "$DATA" --train-per-class $((PER - 8)) --out "$OUT/run" --device $DEV \
     --amp yes --channels-last yes --cache yes --val-crops center --progress no "${TR[@]}"; then
  fig "- \`zfnet train\` (ZFNet$([[ $DEV == cpu ]] && echo ', small'), AMP + channels_last on CUDA, $((8 * PER - 64)) generated training images, decoding cached): $(grep -o 'epoch=[0-9]*\|train_img_per_s=[0-9.]*' "$OUT/train.txt" | paste -d' ' - - | sed 's/epoch=\([0-9]*\) train_img_per_s=\(.*\)/epoch \1 \2 img\/s/' | paste -sd',' | sed 's/,/, /g')"
fi

# ---- 3. torchrun: 2 processes vs 1 ------------------------------------------------------------------------
if step dist_check "$PYTHON" bench/dist_check.py --device $DEV --out "$OUT/dist"; then :; fi
while read -r line; do fig "- $line"; done < <(grep '^dist_check:' "$OUT/dist_check.txt")

# ---- 4. the projection, occlusion and atlas benches --------------------------------------------------------
if [[ $HAVE_CAPTUM == 1 ]]; then
  step bench_project "$PYTHON" bench/bench_project.py --quick --device $DEV && \
    fig "- projections vs Captum (\`bench/bench_project.py --quick --device $DEV\`): $(grep '^all:' "$OUT/bench_project.txt"); $(tail -1 "$OUT/bench_project.txt")"
  step bench_occlusion "$PYTHON" bench/bench_occlusion.py --quick --device $DEV && \
    fig "- occlusion vs Captum (\`bench/bench_occlusion.py --quick --device $DEV\`): $(grep -E '^(zfnet|squeezenet)' "$OUT/bench_occlusion.txt" | awk '{print $1, $3, "ratio", $(NF-3)}' | paste -sd';' | sed 's/;/; /g'); $(tail -1 "$OUT/bench_occlusion.txt")"
else
  say "captum is not installed (put its wheel in \$WHEELS): the projection and occlusion benches, which compare with it, are skipped"
  fig "- projection and occlusion benches: skipped (no captum)"
fi
PHOTOS=../shared/data/imagenet-samples
[[ -d $PHOTOS ]] || PHOTOS="$DATA/class0"
step bench_atlas "$PYTHON" bench/bench_atlas.py --quick --device $DEV --data "$PHOTOS" && \
  fig "- atlas (\`bench/bench_atlas.py --quick --device $DEV\`, $( [[ $PHOTOS == ../shared* ]] && echo 'ImageNet sample photos' || echo 'generated images')): $(grep -E '^(plain forward|atlas:)' "$OUT/bench_atlas.txt" | paste -sd';' | sed 's/;/; /g'); $(tail -1 "$OUT/bench_atlas.txt")"

fig ""
fig "Total $(elapsed) s; $([[ $STATUS == 0 ]] && echo 'every step passed' || echo 'SOME STEPS FAILED (see log.txt)')."
say "[$(elapsed) s] done; figures in $FIG"
cat "$FIG"
exit $STATUS
