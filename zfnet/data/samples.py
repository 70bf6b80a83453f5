"""The small public-domain / CC0 sample photos that make every command work with no data of your own."""

from importlib import resources
from pathlib import Path


def sample_dir() -> Path:
    """Folder of the sample photos shipped as package data (see assets/samples/LICENSE.md)."""
    return Path(str(resources.files("zfnet").joinpath("assets/samples")))
