"""The model zoo: real third-party CNNs (torchvision, timm) built with random weights.

These tests need torchvision and timm, which cannot be imported beside the CPU torch wheel of the main test
environment: `make zoo` runs them in their own environment with ZFNET_ZOO=1. Elsewhere they skip; under
ZFNET_ZOO=1 a missing torchvision or timm is a failure, so the zoo never passes by skipping.
"""

import os

import pytest


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    try:
        import timm  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as e:
        if os.environ.get("ZFNET_ZOO") == "1":
            raise pytest.UsageError(f"ZFNET_ZOO=1 but the zoo cannot run: {e}") from None
        skip = pytest.mark.skip(reason=f"model zoo needs torchvision and timm ({e}); run `make zoo`")
        for item in items:
            if str(item.fspath).startswith(here):
                item.add_marker(skip)
