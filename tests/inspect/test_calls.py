"""Module calls as layers through every public function: a small torchvision-style ResNet whose blocks call
one ReLU module twice (`layer2.1.relu#2`), and whose blocks and stages (`layer2.1`, `layer2`) are layers."""

import json

import numpy as np
import pytest
import torch
from nets import TinyResNet, TinySE
from tiny import PRE, make_folder

from zfnet.data.images import ImageDataset
from zfnet.engine.features import probe_layers
from zfnet.engine.mine import mine
from zfnet.engine.project import project
from zfnet.inspect.layers import feature_layers, layer_table, run_with_taps
from zfnet.understanding.atlas import atlas
from zfnet.understanding.occlusion import occlusion

CALL, BLOCK, FIRST = "layer2.1.relu#2", "layer2.1", "layer2.1.relu"


def block_output(model, x, name=BLOCK):
    """The reference: the output of a module, from a plain hook on the module itself."""
    got = []
    h = dict(model.named_modules())[name].register_forward_hook(lambda m, a, o: got.append(o.detach().clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    return got[0]


def test_table_and_default_layers():
    model = TinyResNet()
    t = layer_table(model, 32)
    assert feature_layers(model, t) == ["relu", "layer1", "layer2"]
    assert (t[CALL].channels, t[CALL].height, t[CALL].width) == (8, 8, 8)
    assert t[CALL].field == t[BLOCK].field and t[FIRST].field.size_y < t[CALL].field.size_y
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = run_with_taps(model, x, [CALL, FIRST])
    assert torch.equal(out[CALL], block_output(model, x)) and not torch.equal(out[FIRST], out[CALL])


def test_probe_layers_name_the_calls():
    assert probe_layers(TinyResNet()) == ["relu", "layer1", "layer2", "fc"]


def test_project_reaches_the_call():
    model = TinyResNet()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    c, y, xx = np.unravel_index(int(block_output(model, x)[0].argmax()), (8, 8, 8))  # a unit that is on
    got = project(model, x, [f"{CALL}:{c}@{y},{xx}", f"{BLOCK}:{c}@{y},{xx}", f"{FIRST}:{c}@{y},{xx}"],
                  "saliency")[0]
    leaf = x.clone().requires_grad_(True)  # reference: the plain gradient of the block's output
    acts = []
    h = model.layer2[1].register_forward_hook(lambda m, a, o: acts.append(o))
    model(leaf)
    h.remove()
    a = acts[0][0, c, y, xx]
    (g,) = torch.autograd.grad(a, leaf)
    torch.testing.assert_close(got[0], (a.detach() * g)[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], got[0], rtol=0, atol=0)
    assert got[0].abs().max() > 0
    assert not torch.allclose(got[2], got[0])


def test_mine_reaches_the_call(tmp_path):
    model = TinyResNet()
    folder = make_folder(tmp_path / "imgs", n=6)
    ds = ImageDataset.from_folder(folder, PRE)
    res = mine(model, ds, [CALL, "layer1"], k=2, batch_size=4, progress=False)
    maps = torch.stack([block_output(model, ds[i][0][None].double())[0] for i in range(len(ds))])  # (N, C, h, w)
    best = maps.flatten(2).amax(2)  # (N, C)
    for c in range(maps.shape[1]):
        order = sorted(range(len(ds)), key=lambda i: (-float(best[i, c]), i))[:2]
        assert res.layers[CALL]["image"][c].tolist() == order
        np.testing.assert_allclose(res.layers[CALL]["value"][c].numpy(), best[order, c].numpy(), rtol=1e-12)


def test_atlas_files_and_table_entries_survive_the_hash(tmp_path):
    model = TinyResNet()
    folder = make_folder(tmp_path / "imgs", n=5)
    res = atlas(model, folder, tmp_path / "out", [CALL], k=2, batch_size=4, preprocess=PRE, progress=False,
                tile=16)
    meta = json.loads((tmp_path / "out" / "result.json").read_text())
    assert meta["table"][CALL]["name"] == CALL and meta["table"][CALL]["crop_field"] == "exact"
    files = [p.name for p in (tmp_path / "out").rglob("*")]
    assert not [f for f in files if "#" in f] and any(f.startswith("layer2.1.relu-2_") for f in files)
    assert res.mined.layers[CALL]["value"].shape[0] == 8 and len(meta["layers"][CALL]) == 8


def test_atlas_crops_to_the_local_field_past_a_global_gate(tmp_path, capsys):
    model = TinySE()
    atlas(model, make_folder(tmp_path / "imgs", n=4), tmp_path / "out", ["act2"], k=2, batch_size=4,
          preprocess=PRE, progress=False, tile=16)
    meta = json.loads((tmp_path / "out" / "result.json").read_text())
    info = layer_table(model, (PRE.size, PRE.size))["act2"]
    assert info.gated and info.field is None and (info.local_field.size_y, info.local_field.size_x) == (5, 5)
    assert meta["table"]["act2"]["crop_field"] == "local"
    assert meta["tiles"]["act2"]["field"] == [5, 5]
    entries = [e for es in meta["layers"]["act2"].values() for e in es]
    assert entries and all(e["box"] == list(info.window(e["y"], e["x"], local=True)) for e in entries)
    assert any(e["box"][1] - e["box"][0] == 5 for e in entries)  # a unit inside the image: the whole field
    assert "act2: past a global gate" in capsys.readouterr().err


@pytest.mark.parametrize("layer", [CALL, BLOCK])
def test_occlusion_tracks_the_call(layer):
    model = TinyResNet()
    torch.manual_seed(3)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    fast = occlusion(model, x, size=8, stride=8, layer=layer, project_map=False)
    naive = occlusion(model, x, size=8, stride=8, layer=layer, method="naive", project_map=False)
    channel = int(fast.feature_map.split(":")[-1])
    ref = block_output(model, x)[0]
    assert fast.feature_map == f"{layer}:{channel}" and channel == int(ref.flatten(1).amax(1).argmax())
    np.testing.assert_allclose(fast.activity, naive.activity, rtol=1e-9)
    y0, y1, x0, x1 = 8, 16, 0, 8  # one position, recomputed by hand
    xo = x.clone()
    xo[..., y0:y1, x0:x1] = 0.0
    assert np.isclose(fast.activity[1, 0], float(block_output(model, xo)[0, channel].sum()), rtol=1e-9)
