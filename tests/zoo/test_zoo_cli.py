"""`zfnet atlas` and `zfnet project` on a torchvision model, in process (zfnet.cli.main), as a user runs them:
`--model torchvision.models:resnet18`, random init (`--weights none`) or torchvision's weights by name with a
local file standing in for the download."""

import os
import shutil
import urllib.error

import numpy as np
import pytest
import torch

from zfnet.cli import main
from zfnet.core.results import read_json
from zfnet.data.images import Preprocess, load_image
from zfnet.engine.project import project
from zfnet.inspect.layers import Unit, parse_unit

# Imported at collection (the other zoo files import torchvision only inside tests): without it the main
# suite would fail to collect this file instead of skipping it.
torchvision = pytest.importorskip("torchvision", reason="the model zoo needs torchvision: run `make zoo`")

MODEL = "torchvision.models:resnet18"


@pytest.fixture(scope="module")
def folder(tmp_path_factory, imagenet_samples):
    d = tmp_path_factory.mktemp("photos")
    for p in sorted(imagenet_samples.iterdir())[100:500:100]:  # four photos
        shutil.copy(p, d / p.name)
    return d


def resnet18(seed=0):
    """The network `--weights none` builds after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).eval()


def test_atlas_of_a_torchvision_resnet(folder, tmp_path):
    out = tmp_path / "atlas"
    torch.manual_seed(0)
    layers = ["layer1"]  # 64 units: every unit gets its projections drawn, the costly part
    argv = ["atlas", "--model", MODEL, "--weights", "none", "--data", str(folder), "--layers", ",".join(layers),
            "--k", "2", "--tile", "32", "--batch-size", "4", "--out", str(out), "--device", "cpu", "--json"]
    assert main(argv) == 0
    res = read_json(out / "result.json")
    assert res["model"] == MODEL and list(res["layers"]) == layers
    rules = res["config"]["rules"]
    assert {k["kind"] for k in rules["kinds"]} == {"ReLU", "BatchNorm", "MaxPool"} and rules["unruled"] == []
    assert (out / "index.html").exists()
    pictures = {p.name for p in (out / "units").iterdir()}
    # Each unit's best activation, as mined by the atlas, against brute force: every photo on its own through
    # the same network with the same preprocessing, the layer's output from a module hook.
    model = resnet18()
    maps = {layer: [] for layer in layers}
    hooks = [model.get_submodule(layer).register_forward_hook(lambda m, a, o, n=layer: maps[n].append(o[0].clone()))
             for layer in layers]
    with torch.no_grad():
        for p in sorted(folder.iterdir()):
            model(Preprocess()(load_image(p)).unsqueeze(0))
    for h in hooks:
        h.remove()
    mined = np.load(out / "mine.npz")
    for layer in layers:
        a = torch.stack(maps[layer])  # (N, C, h, w)
        for c in range(a.shape[1]):  # every unit has its projections drawn
            slug = Unit(layer, c).slug
            assert any(n.startswith(slug + "_") or n.startswith(slug + ".") for n in pictures), slug
        best = a.flatten(2).amax(2).amax(0)
        value, image, y, x = (mined[f"{layer}.{key}"][:, 0] for key in ("value", "image", "y", "x"))
        tol = 1e-5 * a.abs().max().item()
        live = best > 0  # a unit that never fires has no best activation to show
        assert live.float().mean() > 0.5, layer
        np.testing.assert_allclose(value[live.numpy()], best[live].numpy(), rtol=0, atol=tol)
        for c in torch.nonzero(live).flatten().tolist():
            assert abs(a[int(image[c]), c, int(y[c]), int(x[c])].item() - value[c]) <= tol, (layer, c)


def test_project_of_a_torchvision_resnet_matches_the_api(folder, tmp_path):
    image = sorted(folder.iterdir())[0]
    out = tmp_path / "proj"
    torch.manual_seed(0)
    assert main(["project", "--model", MODEL, "--weights", "none", str(image), "--unit", "layer3.1:7",
                 "--unit", "layer2.0.relu:3@5,6", "--mode", "guided", "--out", str(out), "--save-npy",
                 "--device", "cpu"]) == 0
    res = read_json(out / "result.json")
    assert [u["unit"] for u in res["units"]] == ["layer3.1:7", "layer2.0.relu:3@5,6"] and res["mode"] == "guided"
    assert {k["kind"]: k["rule"] for k in res["rules"]["kinds"]}["ReLU"].startswith("rectify the signal, keep")
    model = resnet18()
    x = Preprocess()(load_image(image)).unsqueeze(0)
    ref = project(model, x, [parse_unit(u) for u in ["layer3.1:7", "layer2.0.relu:3@5,6"]], "guided")[0]
    for u, r in zip(res["units"], ref):
        np.testing.assert_allclose(np.load(out / u["npy"])[0], r.numpy(), rtol=1e-5, atol=1e-6 * r.abs().max().item())


def test_project_with_torchvision_weights_by_name(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("ZFNET_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    member = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    model = resnet18(seed=1)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(model.state_dict(), cache / os.path.basename(member.url))  # stands in for the download
    image = sorted(folder.iterdir())[1]
    out = tmp_path / "proj"
    assert main(["project", "--model", MODEL, "--weights", "IMAGENET1K_V1", str(image), "--unit", "layer4:11",
                 "--out", str(out), "--save-npy", "--device", "cpu"]) == 0
    res = read_json(out / "result.json")
    assert res["config"]["weights"] == "IMAGENET1K_V1" and res["mode"] == "deconv"
    x = torch.from_numpy(np.load(out / "input.npy"))
    torch.testing.assert_close(x, member.transforms()(load_image(image)).unsqueeze(0), rtol=0, atol=1e-6)
    ref = project(model, x, ["layer4:11"])[0, 0]
    np.testing.assert_allclose(np.load(out / "layer4_11.npy")[0], ref.numpy(), rtol=1e-5,
                               atol=1e-6 * ref.abs().max().item())
