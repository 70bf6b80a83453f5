"""zfnet: Zeiler & Fergus (2013), "Visualizing and Understanding Convolutional Networks", for any PyTorch convnet."""

from .errors import ZfnetError
from .layers import Unit, layer_table, parse_unit, run_with_taps, taps
from .models import alexnet, squeezenet1_1, zfnet
from .predict import predict
from .weights import load_model

__all__ = ["ZfnetError", "Unit", "layer_table", "parse_unit", "run_with_taps", "taps", "alexnet",
           "squeezenet1_1", "zfnet", "predict", "load_model"]
