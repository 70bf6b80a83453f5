"""zfnet: Zeiler & Fergus (2013), "Visualizing and Understanding Convolutional Networks", for any PyTorch convnet.

The names below are the notebook API; each lives in a module named after the paper's noun. Functions named
like their module (`zfnet.mine`, `zfnet.project`, ...) are imported here: imported lazily, they would be
replaced by their module as soon as anything imported it (Python binds a loaded submodule to its
package's attribute). Heavy modules (training, features, probes) are imported on first use, so that
`import zfnet` stays quick.
"""

from importlib import import_module

from .atlas import atlas  # Fig. 2
from .correspondence import correspondence  # Table 1
from .diagnose import diagnose  # Fig. 6
from .errors import ZfnetError
from .evolution import evolution  # Fig. 4
from .invariance import invariance  # Fig. 5
from .layers import Unit, layer_table, parse_unit, run_with_taps, taps
from .mine import mine  # dataset-scale top-k activations
from .models import alexnet, squeezenet1_1, zfnet
from .occlusion import occlusion  # Fig. 7
from .predict import predict  # Sec. 3 top-1 / top-5
from .project import project  # Sec. 2.1 deconvnet, guided backprop, saliency
from .weights import load_model

_LAZY = {
    "TrainConfig": "train",  # Sec. 3 recipe
    "extract_features": "features",  # Sec. 5
    "probe_layers_accuracy": "probes",  # Table 7
    "fewshot_curve": "probes",  # Fig. 9
    "find_overlap": "overlap",  # Sec. 5.2
}

__all__ = ["ZfnetError", "Unit", "alexnet", "atlas", "correspondence", "diagnose", "evolution", "invariance",
           "layer_table", "load_model", "mine", "occlusion", "parse_unit", "predict", "project", "run_with_taps",
           "squeezenet1_1", "taps", "zfnet", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'zfnet' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
