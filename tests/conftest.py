"""Shared fixtures: the real data in ../shared (skipped without it, a failure under CI=true), and the device
that tests taking a `device` run on: $ZFNET_TEST_DEVICE (default cpu; bench/gpu_check.sh sets cuda). Such
tests are marked `device`, so `ZFNET_TEST_DEVICE=cuda pytest -m device` runs exactly them on the GPU."""

import os
from pathlib import Path

import pytest
import torch
from shared_data import SAMPLES, SQUEEZENET_WEIGHTS, need_shared

CHROMIUM = os.environ.get("ZFNET_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

torch.set_num_threads(min(2, os.cpu_count() or 1))
TEST_DEVICE = os.environ.get("ZFNET_TEST_DEVICE", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "device: takes the `device` fixture ($ZFNET_TEST_DEVICE, default cpu)")


def pytest_collection_modifyitems(items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """$ZFNET_TEST_DEVICE as a torch.device; asking for CUDA where there is none fails (never a silent CPU run)."""
    dev = torch.device(TEST_DEVICE)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"ZFNET_TEST_DEVICE={TEST_DEVICE} but torch {torch.__version__} sees no CUDA device")
    return dev


@pytest.fixture(scope="session")
def squeezenet():
    """SqueezeNet 1.1 with the real ImageNet weights, eval mode."""
    from zfnet.models.weights import load_model

    return load_model("squeezenet1_1", str(need_shared(SQUEEZENET_WEIGHTS)))


@pytest.fixture(scope="session")
def imagenet_samples() -> Path:
    return need_shared(SAMPLES)


@pytest.fixture(scope="session")
def browser():
    """Debian's chromium driven by Playwright, for the pages zfnet writes (skipped without either, a failure
    under CI=true)."""
    why = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "playwright is not installed (pip install playwright)"
    if why is None and not Path(CHROMIUM).exists():
        why = f"no chromium at {CHROMIUM} (apt-get install chromium)"
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser test cannot run under CI: {why}")
        pytest.skip(why)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
