# Two commands set up everything on a fresh machine (only Python needed):
#   make demo   - create .venv if missing, install zfnet, run the main job on built-in defaults (the atlas)
#   make test   - create .venv if missing, install zfnet with dev extras, run the test suite; then the
#                 model zoo (make zoo: its own .venv-zoo with torchvision and timm)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ZOO ?= .venv-zoo
ZBIN := $(ZOO)/bin
OUT ?= out/demo
# Offline machines: point WEIGHTS (or $$ZFNET_WEIGHTS) at a local copy of torchvision's squeezenet1_1 file.
# Without either, the published weights are downloaded once by torch.hub.
WEIGHTS ?= $(or $(ZFNET_WEIGHTS),$(wildcard ../shared/weights/squeezenet1_1.pth),default)

.PHONY: demo test zoo venv dev clean gpu-check

# torch is pinned first: on these CPU-only machines 2.13.0 is a local wheel, while an unpinned torch pulls
# GBs of CUDA packages; elsewhere the fallback takes any torch >= 2.4 from the index.
$(BIN)/zfnet: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q "torch>=2.4"
	$(BIN)/pip install -q -e .
	touch $(BIN)/zfnet

venv: $(BIN)/zfnet

# The atlas browser test drives Debian's chromium with Playwright (no browser download); without chromium
# the test skips, except under CI=true where it fails.
$(VENV)/.dev: $(BIN)/zfnet
	$(BIN)/pip install -q -e ".[dev]"
	test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		chromium) || echo "zfnet: could not install chromium: the browser test will be skipped"
	touch $(VENV)/.dev

dev: $(VENV)/.dev

# The main job: the full Fig. 2 feature atlas (every SqueezeNet feature layer, every unit, top 9) of the 202
# built-in Caltech-101 photos. Progress lines on stderr; the last lines say where to open it.
demo: venv
	$(BIN)/zfnet atlas --model squeezenet1_1 --weights $(WEIGHTS) --k 9 --out $(OUT)

test: dev
	$(BIN)/python -m pytest -q
	$(MAKE) zoo

# The model zoo (tests/zoo: 20 torchvision and timm networks) needs torchvision, which cannot be imported beside
# the CPU torch 2.13.0 of .venv: its own environment, torch first (a CUDA build that runs on CPU; on these
# machines pip takes torch and torchvision from local disk, elsewhere from PyPI), then timm, then zfnet[dev].
# ZFNET_ZOO=1 makes a missing torchvision or timm a failure instead of a skip.
$(ZOO)/.zoo: pyproject.toml
	test -x $(ZBIN)/python || $(PY) -m venv $(ZOO)
	$(ZBIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(ZBIN)/pip install -q timm
	$(ZBIN)/pip install -q -e ".[dev]"
	touch $@

zoo: $(ZOO)/.zoo
	ZFNET_ZOO=1 $(ZBIN)/python -m pytest -q tests/zoo

# The prepared GPU check (docs/benchmarks.md): device tests on CUDA, AMP throughput, torchrun 2 vs 1, the benches
# on the GPU; figures in out/gpu-check/figures.md. It picks its own Python (one with torch: the machine's own on
# a GPU box, whose torch is a CUDA build), so it does not build .venv. `make gpu-check CPU=1`: a CPU dry run.
gpu-check:
	bench/gpu_check.sh $(if $(CPU),--cpu) out/gpu-check

clean:
	rm -rf $(VENV) $(ZOO) out
