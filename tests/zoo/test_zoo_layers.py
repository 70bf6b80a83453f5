"""The layer vocabulary on 20 real architectures: table vs runtime shapes for every module call, default
feature layers through the whole depth, a receptive field for each of them, taps equal to plain hooks."""

import pytest
import torch
from tiny import module_calls
from zoo_models import NAMES, SIZE, build

from zfnet.inspect.layers import feature_layers, layer_table, run_with_taps


class Zoo:
    """One architecture: the model, its layer table and every call's output from plain hooks."""

    def __init__(self, name):
        self.name = name
        self.model = build(name)
        self.table = layer_table(self.model, SIZE)
        torch.manual_seed(1)
        self.x = torch.randn(1, 3, SIZE, SIZE)
        self.ref = module_calls(self.model, self.x)


@pytest.fixture(scope="module", params=NAMES)
def zoo(request):  # module scope: pytest runs every test of one architecture before building the next
    return Zoo(request.param)


# Layers that used to be wrong: squeeze-and-excitation gates, channels-last tensors.
SPECIAL = {
    "tv.efficientnet_b0": lambda t: t["features.6"].gated and t["features.6"].field is None
    and t["features.6"].local_field is not None,
    "tv.mobilenet_v3_small": lambda t: t["features.12"].gated and t["features.12"].local_field is not None,
    "tv.convnext_tiny": lambda t: (t["features.1.0.block.3"].kind, t["features.1.0.block.3"].channels,
                                   t["features.1.0.block.3"].layout) == ("Linear", 384, "HWC"),
}


def test_table_sizes_match_every_call(zoo):
    t, ref = zoo.table, zoo.ref
    assert set(t.names()) == set(ref)
    for info in t:
        shape = tuple(ref[info.name].shape[1:])
        spatial = {"H": info.height, "W": info.width, "L": info.height * info.width}
        assert len(shape) == len(info.layout), (info.name, shape, info.layout)
        assert all(s == spatial[d] for s, d in zip(shape, info.layout) if d in spatial), (info.name, shape)
        assert torch.Size(shape).numel() == info.channels * info.height * info.width, (info.name, shape)
    assert SPECIAL.get(zoo.name, lambda t: True)(t)


EXPECTED = {
    "tv.resnet50": ["relu", "layer1", "layer2", "layer3", "layer4"],
    "tv.efficientnet_b0": [f"features.{i}" for i in range(9)],
    "tv.convnext_tiny": ["features.1", "features.3", "features.5", "features.7"],
    "timm.convnext_atto": [f"stages.{i}" for i in range(4)],
    "tv.alexnet": ["features.1", "features.4", "features.7", "features.9", "features.11"],
    "tv.squeezenet1_0": ["features.1", "features.3", "features.4", "features.5", "features.7", "features.8",
                         "features.9", "features.10", "features.12"],
    "tv.densenet121": ["features.relu0"] + [f"features.denseblock{i}" for i in range(1, 5)],
    "timm.efficientnet_b0": ["bn1"] + [f"blocks.{i}" for i in range(7)] + ["bn2"],
}


def test_default_layers_span_the_depth_and_have_fields(zoo):
    t = zoo.table
    layers = feature_layers(zoo.model, t)
    assert layers == EXPECTED.get(zoo.name, layers)
    assert len(layers) >= 4, layers
    # Depth lives in the convolutions: at least 80 % of those that produce maps run before the last
    # default layer is complete (the classifier's modules after it do not count).
    convs = [i.index for i in t if i.kind == "Conv2d" and i.height * i.width > 1]
    last = t[layers[-1]].index
    assert sum(c < last for c in convs) >= 0.8 * len(convs), (layers[-1], last)
    assert [t[n].index for n in layers] == sorted(t[n].index for n in layers)
    for n in layers:
        info = t[n]
        assert info.height * info.width > 1 and (info.field or info.local_field), n


def test_taps_equal_plain_hook_clones(zoo):
    with torch.no_grad():
        got = run_with_taps(zoo.model, zoo.x, list(zoo.ref), stop=False)
    bad = [n for n in zoo.ref if not torch.equal(got[n], zoo.ref[n])]
    assert not bad, bad[:5]
