"""Models the report tests name on the command line (`--model report_models:tiny32`)."""

import torch
from tiny import Tiny


def tiny32():
    """The shared two-conv test model in float32 (what a user's model is)."""
    return Tiny(torch.float32)
