import pytest
import torch

from zfnet.inspect.layers import layer_table
from zfnet.models.networks import TABLE3_VARIANTS, alexnet, squeezenet1_1, zfnet


def test_zfnet_matches_fig3_shapes():
    t = layer_table(zfnet())
    expect = {"conv1": (96, 110), "pool1": (96, 55), "norm1": (96, 55), "conv2": (256, 26), "pool2": (256, 13),
              "conv3": (384, 13), "conv4": (384, 13), "conv5": (256, 13), "pool5": (256, 6), "fc6": (4096, 1),
              "fc7": (4096, 1), "fc8": (1000, 1)}
    for name, (c, s) in expect.items():
        assert (t[name].channels, t[name].height) == (c, s), name
    assert t.names()[:4] == ["conv1", "relu1", "pool1", "norm1"]  # ZFNet normalizes after pooling
    assert all(m.groups == 1 for m in zfnet().modules() if isinstance(m, torch.nn.Conv2d))


def test_alexnet_layouts_and_groups():
    a = alexnet()
    assert layer_table(a).names()[:4] == ["conv1", "relu1", "norm1", "pool1"]  # LRN before pooling
    assert a.conv1.kernel_size == (11, 11) and a.conv1.stride == (4, 4)
    g = alexnet(groups=2)
    assert (g.conv2.groups, g.conv3.groups, g.conv4.groups, g.conv5.groups) == (2, 1, 2, 2)
    assert g.conv2.weight.shape == (256, 48, 5, 5)
    tv = alexnet(layout="torchvision")
    assert [tv.conv1.out_channels, tv.conv2.out_channels, tv.conv3.out_channels, tv.conv4.out_channels,
            tv.conv5.out_channels] == [64, 192, 384, 256, 256]
    assert tv(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
    assert layer_table(g)["pool5"].height == 6


@pytest.mark.parametrize("name", list(TABLE3_VARIANTS))
def test_table3_variants_run(name):
    m = zfnet(num_classes=10, **TABLE3_VARIANTS[name])
    assert m(torch.zeros(2, 3, 224, 224)).shape == (2, 10)
    kw = TABLE3_VARIANTS[name]
    for n in kw.get("remove", ()):
        assert not hasattr(m, f"conv{n}") and not hasattr(m, f"fc{n}")
    if "fc" in kw:
        assert m.fc6.out_features == kw["fc"]


def test_paper_init():
    m = zfnet(num_classes=10)
    w = m.conv3.weight
    assert abs(w.std().item() - 1e-2) < 1e-3 and m.conv3.bias.abs().max() == 0


def test_squeezenet_names_match_torchvision():
    keys = list(squeezenet1_1().state_dict())
    assert keys[:4] == ["features.0.weight", "features.0.bias", "features.3.squeeze.weight",
                        "features.3.squeeze.bias"]
    assert keys[-2:] == ["classifier.1.weight", "classifier.1.bias"]
