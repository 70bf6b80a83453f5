"""Shared fixtures: the real data in ../shared (skipped without it, a failure under CI=true)."""

import os
from pathlib import Path

import pytest
import torch
from shared_data import SAMPLES, SQUEEZENET_WEIGHTS, need_shared

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def squeezenet():
    """SqueezeNet 1.1 with the real ImageNet weights, eval mode."""
    from zfnet.models.weights import load_model

    return load_model("squeezenet1_1", str(need_shared(SQUEEZENET_WEIGHTS)))


@pytest.fixture(scope="session")
def imagenet_samples() -> Path:
    return need_shared(SAMPLES)
