"""The CS231n tools on the model zoo: filters of the first and a middle conv, every channel's activations at
the default feature layers, a reconstruction step and an L-inf-bounded attack run on every architecture."""

import numpy as np
import pytest
import torch
from PIL import Image
from zoo_models import NAMES, SIZE, build

from zfnet.cs231n.activations import activation_maps
from zfnet.cs231n.filters import filter_pictures
from zfnet.cs231n.fooling import attack
from zfnet.cs231n.inversion import invert
from zfnet.data.images import Preprocess
from zfnet.inspect.layers import feature_layers, layer_table

PRE = Preprocess(resize=SIZE * 8 // 7, size=SIZE)


def _photo():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (SIZE + 20, SIZE + 30, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", NAMES)
def test_cs231n_tools_run_on_the_zoo(name, tmp_path):
    model = build(name)
    table = layer_table(model, SIZE)
    modules = dict(model.named_modules())
    convs = [i.name for i in table if isinstance(modules.get(i.name), torch.nn.Conv2d)]
    middle = convs[len(convs) // 2]
    r = filter_pictures(model, tmp_path / "filters", [convs[0], middle], max_channels=4)
    assert r["layers"][convs[0]]["style"] in ("rgb", "grey", "matrix")
    for info in r["layers"].values():
        assert (tmp_path / "filters" / info["figure"]).is_file()
    feats = feature_layers(model, table)
    picked = list(dict.fromkeys([feats[0], feats[len(feats) // 2], feats[-1]]))
    maps = activation_maps(model, _photo(), picked, preprocess=PRE)
    for n in picked:
        assert maps.maps[n].shape[0] == table[n].channels, n
    rec = invert(model, _photo(), [feats[0]], preprocess=PRE, steps=2)
    assert np.isfinite(rec.reconstructions[0].code_error)
    u = PRE.unnormalize(PRE(_photo()))[None]
    adv, _ = attack(model, u, method="pgd", eps=4 / 255, steps=2, preprocess=PRE)
    assert (adv - u).abs().max() <= 4 / 255 + 1e-6
