"""The networks: the paper's ZFNet, AlexNet and Table 3 variants and SqueezeNet 1.1 (`networks`); the
registry, weights records and `load_model` (`weights`); top-1 / top-5 prediction (`predict`).

May import zfnet.core and zfnet.data. The names below are the ones notebooks and `--model pkg.mod:factory`
use (`zfnet.models.TABLE3_VARIANTS`, `zfnet.models:zfnet`).
"""

from .networks import (
           ALEXNET_TORCHVISION_KEYS,
           TABLE3_VARIANTS,
           ConvNet,
           ConvNetConfig,
           SqueezeNet,
           alexnet,
           squeezenet1_1,
           zfnet,
)
from .weights import MODELS, WEIGHTS, Weights, load_model, model_meta

__all__ = ["ALEXNET_TORCHVISION_KEYS", "TABLE3_VARIANTS", "ConvNet", "ConvNetConfig", "SqueezeNet", "alexnet",
           "squeezenet1_1", "zfnet", "MODELS", "WEIGHTS", "Weights", "load_model", "model_meta"]
