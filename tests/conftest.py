"""Shared fixtures: the real data in ../shared (skipped without it, a failure under CI=true)."""

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SAMPLES = SHARED / "data" / "imagenet-samples"
SQUEEZENET_WEIGHTS = SHARED / "weights" / "squeezenet1_1.pth"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def need_shared(path: Path) -> Path:
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing: CI must run with ../shared beside the checkout")
        pytest.skip(f"needs {path} (the shared data folder beside the checkout)")
    return path


@pytest.fixture(scope="session")
def squeezenet():
    """SqueezeNet 1.1 with the real ImageNet weights, eval mode."""
    from zfnet.models.weights import load_model

    return load_model("squeezenet1_1", str(need_shared(SQUEEZENET_WEIGHTS)))


@pytest.fixture(scope="session")
def imagenet_samples() -> Path:
    return need_shared(SAMPLES)
