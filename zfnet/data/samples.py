"""Photos shipped with zfnet, so every command works with no data of your own.

* `demo_dir()`: 202 real photos, two of each Caltech-101 class, in class folders (CC-BY-4.0, attribution
  in assets/demo/ATTRIBUTION.md): enough for a top-9 atlas (Fig. 2) that says something about a network.
* `sample_dir()`: four CC0 / public-domain photos (cat, coffee cup, astronaut, rocket) for the commands
  and tests that need one image or a handful (project, occlude, predict).
"""

from importlib import resources
from pathlib import Path

__all__ = ["demo_dir", "sample_dir"]


def demo_dir() -> Path:
    """Folder of the demo photos (one subfolder per Caltech-101 class; see assets/demo/ATTRIBUTION.md)."""
    return Path(str(resources.files("zfnet").joinpath("assets/demo")))


def sample_dir() -> Path:
    """Folder of the four CC0 sample photos (see assets/samples/LICENSE.md)."""
    return Path(str(resources.files("zfnet").joinpath("assets/samples")))
