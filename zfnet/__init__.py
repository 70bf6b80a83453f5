"""zfnet: Zeiler & Fergus (2013), "Visualizing and Understanding Convolutional Networks", for any PyTorch convnet.

The names below are the notebook API; each lives in a module named after the paper's noun. Heavy modules
(training, probes, plotting) are imported on first use so that `import zfnet` stays quick.
"""

from importlib import import_module

from .errors import ZfnetError
from .layers import Unit, layer_table, parse_unit, run_with_taps, taps
from .models import alexnet, squeezenet1_1, zfnet
from .weights import load_model

_LAZY = {
    "predict": "predict",  # Sec. 3 top-1 / top-5
    "project": "project",  # Sec. 2.1 deconvnet, guided backprop, saliency
    "mine": "mine",  # dataset-scale top-k activations
    "atlas": "atlas",  # Fig. 2
    "occlusion": "occlusion",  # Fig. 7
    "invariance": "invariance",  # Fig. 5
    "correspondence": "correspondence",  # Table 1
    "TrainConfig": "train",  # Sec. 3 recipe
    "evolution": "evolution",  # Fig. 4
    "diagnose": "diagnose",  # Fig. 6
    "extract_features": "features",  # Sec. 5
    "probe_layers_accuracy": "probes",  # Table 7
    "fewshot_curve": "probes",  # Fig. 9
    "find_overlap": "overlap",  # Sec. 5.2
}

__all__ = ["ZfnetError", "Unit", "alexnet", "layer_table", "load_model", "parse_unit", "run_with_taps",
           "squeezenet1_1", "taps", "zfnet", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'zfnet' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
