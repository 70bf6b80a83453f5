"""zfnet: Zeiler & Fergus (2013), "Visualizing and Understanding Convolutional Networks", for any PyTorch convnet.

The names below are the notebook API. The package is layered, each layer importing only those below it:
core <- data, models <- inspect <- engine, present <- the paper's sections (understanding: Sec. 4,
training: Sec. 3, generalization: Sec. 5) and the CS231n notes (cs231n) <- report <- cli. The training
recipe, feature extraction, the probes and the CS231n tools are imported on first use, so that
`import zfnet` stays quick.
"""

from importlib import import_module

from .core.errors import ZfnetError
from .engine.mine import mine  # dataset-scale top-k activations
from .engine.project import project  # Sec. 2.1 deconvnet, guided backprop, saliency
from .inspect.layers import Unit, layer_table, parse_unit, run_with_taps, taps
from .models.networks import alexnet, squeezenet1_1, zfnet
from .models.predict import predict  # Sec. 3 top-1 / top-5
from .models.weights import load_model
from .training.diagnosis import diagnose  # Fig. 6
from .training.evolution import evolution  # Fig. 4
from .understanding.atlas import atlas  # Fig. 2
from .understanding.correspondence import correspondence  # Table 1
from .understanding.invariance import invariance  # Fig. 5
from .understanding.occlusion import occlusion  # Fig. 7

_LAZY = {  # name -> (module, attribute)
    "TrainConfig": ("training.recipe", "TrainConfig"),  # Sec. 3 recipe
    "train": ("training.recipe", "main"),  # Sec. 3: zfnet.train(zfnet.TrainConfig(...))
    "extract_features": ("engine.features", "extract_features"),  # Sec. 5 probes, t-SNE codes
    "probe_layers_accuracy": ("generalization.probes", "probe_layers_accuracy"),  # Table 7
    "fewshot_curve": ("generalization.probes", "fewshot_curve"),  # Fig. 9
    "find_overlap": ("generalization.overlap", "find_overlap"),  # Sec. 5.2
    "tsne": ("cs231n.codes", "tsne"),  # CS231n: t-SNE of the codes
    "invert": ("cs231n.inversion", "invert"),  # Mahendran & Vedaldi: reconstruction from codes
    "fool": ("cs231n.fooling", "fool"),  # CS231n: adversarial examples, fooling images
}

__all__ = ["ZfnetError", "Unit", "alexnet", "atlas", "correspondence", "diagnose", "evolution", "invariance",
           "layer_table", "load_model", "mine", "occlusion", "parse_unit", "predict", "project", "run_with_taps",
           "squeezenet1_1", "taps", "zfnet", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'zfnet' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
