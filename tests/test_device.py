"""The same results on $ZFNET_TEST_DEVICE as on the CPU: projections, mining, occlusion, the atlas, training
(float32, and the AMP + channels_last path), prediction and Table 2 evaluation of an ensemble.

On the CPU (the default) both sides run on the CPU and these are smoke tests of the device plumbing; with
ZFNET_TEST_DEVICE=cuda (bench/gpu_check.sh) they compare the CUDA paths with the CPU. float64 models make
the comparisons exact up to summation order."""

import copy
import json

import pytest
import torch
import torch.nn as nn
from PIL import Image
from tiny import PRE, Tiny, make_folder

from zfnet.engine.mine import mine
from zfnet.engine.project import project
from zfnet.models.predict import predict
from zfnet.training.checkpoints import load_checkpoint
from zfnet.training.evaluation import evaluate_models
from zfnet.training.recipe import TrainConfig, main
from zfnet.understanding.atlas import atlas
from zfnet.understanding.occlusion import occlusion

CPU = torch.device("cpu")


def on(model, dev):
    return copy.deepcopy(model).to(dev)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("device") / "imgs", n=9)


@pytest.mark.parametrize("mode", ["deconv", "guided", "saliency"])
def test_project(device, mode):
    model = Tiny()
    torch.manual_seed(1)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    units = ["relu2:1@3,3", "relu1:2", "fc:3"]
    want = project(model, x, units, mode)
    got = project(on(model, device), x.to(device), units, mode)
    assert got.device.type == device.type
    torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-12)


def test_mine(device, folder):
    model = Tiny()
    want = mine(model, folder, ["relu1", "relu2", "fc"], k=4, batch_size=3, preprocess=PRE, progress=False)
    got = mine(on(model, device), folder, ["relu1", "relu2", "fc"], k=4, batch_size=3, preprocess=PRE,
               progress=False)
    for layer in want.layers:
        for key in ("image", "y", "x"):
            assert torch.equal(got.layers[layer][key].cpu(), want.layers[layer][key]), (layer, key)
        torch.testing.assert_close(got.layers[layer]["value"].cpu(), want.layers[layer]["value"], rtol=1e-9, atol=0)


def test_occlusion(device):
    model = Tiny()
    torch.manual_seed(2)
    x = torch.rand(3, 32, 32, dtype=torch.float64)
    want = occlusion(model, x, size=8, stride=4, layer="relu2", project_map=False)
    got = occlusion(on(model, device), x, size=8, stride=4, layer="relu2", project_map=False)
    assert got.feature_map == want.feature_map
    torch.testing.assert_close(torch.from_numpy(got.prob), torch.from_numpy(want.prob), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.from_numpy(got.activity), torch.from_numpy(want.activity), rtol=1e-9, atol=1e-9)


def test_atlas(device, folder, tmp_path):
    model = Tiny()
    a = atlas(model, folder, tmp_path / "cpu", ["relu2"], k=3, batch_size=4, preprocess=PRE, progress=False)
    b = atlas(on(model, device), folder, tmp_path / "dev", ["relu2"], k=3, batch_size=4, preprocess=PRE,
              progress=False)
    assert torch.equal(a.mined.layers["relu2"]["image"], b.mined.layers["relu2"]["image"].cpu())
    assert (tmp_path / "dev" / "index.html").is_file()
    ja, jb = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("cpu", "dev"))
    assert ja["layers"].keys() == jb["layers"].keys()


def _data(root, classes=3, per_class=6):
    import numpy as np

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 60, (56, 60, 3)).astype(np.uint8)
            a[..., c] += 150
            Image.fromarray(a).save(root / f"class{c}" / f"{i}.png")
    return root


def _cfg(data, out, device, **kw):
    return TrainConfig(**dict(data=str(data), train_per_class=4, widths=(4, 6, 6, 6, 4), fc=8, resize=52, crop=48,
                              batch_size=4, epochs=2, lr=0.05, init_std=0.0, dropout=0.0, lighting=0.1,
                              out=str(out), progress=False, threads=1, device=str(device), **kw))


def test_train_float32_matches_cpu_and_amp_trains(device, tmp_path):
    data = _data(tmp_path / "data")
    main(_cfg(data, tmp_path / "cpu", CPU, amp=False))
    main(_cfg(data, tmp_path / "dev", device, amp=False, channels_last=False))
    a, b = (load_checkpoint(tmp_path / d / "checkpoint.pth") for d in ("cpu", "dev"))
    for k in a["model"]:
        assert b["model"][k].device.type == "cpu"  # checkpoints load anywhere
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-3, atol=1e-5, msg=k)
    # AMP (float16 autocast + gradient scaling) and channels_last on CUDA; plain float32 elsewhere
    main(_cfg(data, tmp_path / "amp", device, amp=True, channels_last=True))
    c = load_checkpoint(tmp_path / "amp" / "checkpoint.pth")
    first = load_checkpoint(tmp_path / "amp" / "epoch_001.pth")
    assert all(torch.isfinite(v).all() for v in c["model"].values())
    assert not torch.equal(c["model"]["conv1.weight"], first["model"]["conv1.weight"])  # it kept learning
    m = c["metrics"][-1]
    assert m["train_img_per_s"] > 0 and m["val_images"] == 6
    if device.type == "cuda":
        assert c["scaler"], "the AMP run saved no gradient-scaler state"


class Small(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 5, 2)
        self.fc = nn.Linear(4 * 10 * 10, 7)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1)) * 20


def test_predict_and_evaluate_ensemble(device, tmp_path):
    data = _data(tmp_path / "val", per_class=2)
    from zfnet.data.images import Preprocess

    models = [Small(0).eval(), Small(1).eval()]
    pre = [Preprocess(size=24, resize=28)] * 2
    want = predict(models, data, crop="ten", preprocess=pre, progress=False).to_json()
    got = predict([on(m, device) for m in models], data, crop="ten", preprocess=pre, progress=False).to_json()
    for w, g in zip(want, got):
        assert [t["index"] for t in w["top5"]] == [t["index"] for t in g["top5"]]
        assert [t["prob"] for t in g["top5"]] == pytest.approx([t["prob"] for t in w["top5"]], rel=1e-4, abs=1e-6)
    a = evaluate_models(models, data, preprocess=pre, progress=False)
    b = evaluate_models([on(m, device) for m in models], data, preprocess=pre, progress=False)
    assert a["rows"] == b["rows"]
