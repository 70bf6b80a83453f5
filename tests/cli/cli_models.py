"""Models for CLI tests, loaded as `--model cli_models:tiny` (pytest puts this folder and tests/ on sys.path)."""

import torch
from tiny import Tiny


def tiny(num_classes: int = 4) -> torch.nn.Module:
    """tests/tiny.py's two-conv network in float32 (the dtype images arrive in): milliseconds per image."""
    model = Tiny(torch.float32)
    if num_classes != model.fc.out_features:
        model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    return model


def broken(**kwargs) -> torch.nn.Module:
    """A user factory whose own code fails."""
    raise RuntimeError("CUDA driver too old for this build")
