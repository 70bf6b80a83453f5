"""Paths to the real data in ../shared, for every test folder.

A module of its own, not conftest: tests/zoo has a conftest too, and `from shared_data import ...` would then
name whichever conftest pytest imported last.
"""

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SAMPLES = SHARED / "data" / "imagenet-samples"
SQUEEZENET_WEIGHTS = SHARED / "weights" / "squeezenet1_1.pth"


def need_shared(path: Path) -> Path:
    """`path`, or a skip without the shared data folder (a failure under CI=true)."""
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing: CI must run with ../shared beside the checkout")
        pytest.skip(f"needs {path} (the shared data folder beside the checkout)")
    return path
