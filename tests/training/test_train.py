"""The training recipe: filter clipping, 10-crop evaluation, checkpoints, SIGKILL + resume, torchrun."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from zfnet.core.errors import ZfnetError
from zfnet.data.images import ten_crop
from zfnet.data.trainset import TrainImages, split_per_class
from zfnet.models.networks import TABLE3_VARIANTS
from zfnet.models.predict import ten_crop_probs
from zfnet.models.weights import load_model
from zfnet.training.checkpoints import load_checkpoint, model_from_checkpoint
from zfnet.training.networks import build_model, clip_filters, filter_rms
from zfnet.training.recipe import TrainConfig, evaluate, main

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def make_data(root: Path, classes=3, per_class=6, size=56) -> Path:
    """Tiny image folders whose classes differ in colour and stripe direction (learnable in a few steps)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 60, (size, size + 8 * (i % 2), 3)).astype(np.uint8)
            a[..., c] += 150
            if c % 2:
                a[::4] = 255
            else:
                a[:, ::4] = 255
            Image.fromarray(a).save(d / f"{i}.png")
    return root


def tiny_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), train_per_class=4, widths=(4, 6, 6, 6, 4), fc=8, resize=52, crop=48,
                batch_size=4, epochs=3, lr=0.05, out=str(out), progress=False, threads=1, cache=False)
    base.update(kw)
    return TrainConfig(**base)


def cli_args(cfg: TrainConfig) -> list[str]:
    return ["train", "--data", cfg.data, "--train-per-class", str(cfg.train_per_class),
            "--widths", ",".join(map(str, cfg.widths)), "--fc", str(cfg.fc), "--resize", str(cfg.resize),
            "--crop", str(cfg.crop), "--batch-size", str(cfg.batch_size), "--epochs", str(cfg.epochs),
            "--lr", str(cfg.lr), "--out", cfg.out, "--progress", "no", "--threads", "1",
            "--dropout", str(cfg.dropout), "--cache", "no", "--lighting", str(cfg.lighting),
            "--init-std", str(cfg.init_std)]


def weights_of(path) -> dict:
    return load_checkpoint(path)["model"]


def test_clip_filters_exact_radius():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3)
    fc = nn.Linear(3, 2)
    with torch.no_grad():
        fc.weight.fill_(5.0)
        for o, rms in enumerate([0.05, 0.1, 0.3, 2.0]):
            w = torch.randn(2, 3, 3)
            conv.weight[o] = w / w.pow(2).mean().sqrt() * rms
    before = conv.weight.detach().clone()
    radius = float(filter_rms(conv.weight)[1])  # 0.1 up to float32 rounding: the boundary case, exactly
    n = clip_filters(nn.Sequential(conv, fc), radius)
    assert n == 2  # 0.3 and 2.0; a filter at the radius itself is not "above"
    torch.testing.assert_close(filter_rms(conv.weight), torch.tensor([0.05, 0.1, 0.1, 0.1]), atol=1e-7, rtol=0)
    torch.testing.assert_close(conv.weight[:2], before[:2], atol=0, rtol=0)  # small filters untouched
    cos = nn.functional.cosine_similarity(conv.weight.flatten(1), before.flatten(1))
    torch.testing.assert_close(cos, torch.ones(4))  # direction kept
    assert torch.all(fc.weight == 5.0)  # only convolutional filters are clipped (Sec. 3)


def test_ten_crop_probs_average_softmax_not_logits():
    class CornerNet(nn.Module):  # logits depend on the crop's top-left pixel: crops disagree
        def forward(self, x):
            v = x[:, 0, 0, 0]
            return torch.stack([3 * v, -v, torch.zeros_like(v)], 1)

    torch.manual_seed(0)
    img = torch.randn(2, 3, 12, 12)
    crops = torch.stack([ten_crop(im, 8) for im in img])  # (2, 10, 3, 8, 8)
    got = ten_crop_probs(CornerNet(), crops)
    want = torch.stack([torch.stack([CornerNet()(c[None])[0].softmax(-1) for c in cs]).mean(0) for cs in crops])
    torch.testing.assert_close(got, want)
    wrong = CornerNet()(crops.flatten(0, 1)).view(2, 10, 3).mean(1).softmax(-1)  # mean of logits differs
    assert not torch.allclose(got, wrong, atol=1e-3)


def test_evaluate_ten_crop_errors_by_brute_force(tmp_path):
    data = make_data(tmp_path / "d", classes=3, per_class=2)
    paths = sorted(data.rglob("*.png"))
    labels = [int(p.parent.name[-1]) for p in paths]
    mean = torch.full((3, 52, 52), 0.4)
    ds = TrainImages(paths, labels, 52, 48, "ten", mean_image=mean)
    torch.manual_seed(1)
    model = build_model({"model": "zfnet", "widths": [4, 6, 6, 6, 4], "fc": 8, "num_classes": 3, "crop": 48,
                         "init_std": 0.3}).eval()
    from zfnet.data.images import collate

    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
    m = evaluate(model, loader, torch.device("cpu"), progress=False)
    from zfnet.data.images import _center_crop, _resize_shorter, _to_tensor, load_image

    top1 = top5 = 0
    for p, y in zip(paths, labels):
        x = _to_tensor(_center_crop(_resize_shorter(load_image(p), 52), 52)) - mean
        with torch.no_grad():
            probs = torch.stack([model(c[None])[0].softmax(-1) for c in ten_crop(x, 48)]).mean(0)
        top1 += int(probs.argmax()) == y
        top5 += y in probs.topk(3).indices.tolist()
    assert m["val_images"] == len(paths)
    assert m["val_top1_err"] == pytest.approx(100 * (1 - top1 / len(paths)))
    assert m["val_top5_err"] == pytest.approx(100 * (1 - top5 / len(paths)))


@pytest.mark.parametrize("name", ["alexnet"] + list(TABLE3_VARIANTS))
def test_build_model_fits_small_inputs(name):
    model = build_model({"model": name, "widths": [8, 16, 16, 16, 8], "fc": 16, "num_classes": 5, "crop": 64})
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.bias.abs().max() == 0 for m in convs)  # Sec. 3: biases 0
    w = torch.cat([m.weight.flatten() for m in convs])
    assert abs(w.std().item() - 1e-2) < 2e-3  # Sec. 3: N(0, 1e-2)


def test_split_per_class():
    labels = [0] * 10 + [1] * 5 + [2] * 40
    tr, te = split_per_class(labels, 4, seed=3)
    assert sorted(tr + te) == list(range(len(labels)))
    assert [sum(labels[i] == c for i in tr) for c in range(3)] == [4, 4, 4]
    assert split_per_class(labels, 4, seed=3) == (tr, te)


def test_sigkill_and_resume_gives_the_same_weights(tmp_path):
    data = make_data(tmp_path / "data")
    ref = tiny_cfg(data, tmp_path / "ref", epochs=4)
    main(ref)
    killed = tiny_cfg(data, tmp_path / "killed", epochs=4)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([PY, "-m", "zfnet"] + cli_args(killed), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = Path(killed.out) / "checkpoint.pth"  # written after epoch_001.pth: the full state of epoch 1
    deadline = time.time() + 60
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = load_checkpoint(Path(killed.out) / "checkpoint.pth")["epoch"]
    assert 1 <= done < 4  # it really was interrupted mid-run
    r = subprocess.run([PY, "-m", "zfnet"] + cli_args(killed), cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming {killed.out} after epoch {done}" in r.stderr
    a, b = weights_of(Path(ref.out) / "checkpoint.pth"), weights_of(Path(killed.out) / "checkpoint.pth")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    ck = load_checkpoint(Path(killed.out) / "checkpoint.pth")
    assert ck["epoch"] == 4 and len(ck["metrics"]) == 4
    assert ck["mean_image"].shape == (3, 52, 52)
    # the same file loads as a model, with its mean image, both ways
    m = model_from_checkpoint(Path(killed.out) / "checkpoint.pth")
    assert m.zfnet_weights.preprocessing == "paper" and m.zfnet_weights.categories == ("class0", "class1", "class2")
    m2 = load_model(build_model(ck["arch"]), str(Path(killed.out) / "epoch_004.pth"))
    torch.testing.assert_close(m2.zfnet_weights.mean_image, ck["mean_image"])
    # a different recipe in the same folder is refused, not mixed in
    with pytest.raises(ZfnetError, match="different settings"):
        main(tiny_cfg(data, tmp_path / "killed", epochs=5, lr=0.1))


def test_torchrun_two_processes_match_one(tmp_path):
    data = make_data(tmp_path / "data")
    # no dropout (masks differ per process); crops and PCA lighting depend only on (seed, epoch, image):
    # 2 x 2 images = 1 x 4; the training-set statistics are sharded and summed
    one = tiny_cfg(data, tmp_path / "one", epochs=2, dropout=0.0, lighting=0.1, init_std=0.0)
    main(one)
    two = tiny_cfg(data, tmp_path / "two", epochs=2, dropout=0.0, lighting=0.1, init_std=0.0)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "zfnet"] + cli_args(two),
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_checkpoint(Path(one.out) / "checkpoint.pth"), load_checkpoint(Path(two.out) / "checkpoint.pth")
    torch.testing.assert_close(a["mean_image"], b["mean_image"])
    torch.testing.assert_close(a["train_stats"]["rgb_cov"], b["train_stats"]["rgb_cov"], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(a["model"]["conv1.weight"], load_checkpoint(Path(one.out) / "epoch_001.pth")["model"]
                              ["conv1.weight"])  # it learns: the comparison means something
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4, msg=k)
    assert a["metrics"][-1]["val_images"] == b["metrics"][-1]["val_images"] == 6
    assert a["metrics"][-1]["val_top1_err"] == pytest.approx(b["metrics"][-1]["val_top1_err"])
    assert sorted(p.name for p in Path(two.out).iterdir()) == ["checkpoint.pth", "epoch_001.pth",
                                                               "epoch_002.pth", "metrics.json", "train_stats.pth"]


def test_unreadable_training_files_are_skipped_and_reported(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    for c in range(3):  # 7 files a class: 6 train + 1 test, and the broken one lands in one of them
        (data / f"class{c}" / "zz_broken.png").write_bytes(b"not an image")
    main(tiny_cfg(data, tmp_path / "run", epochs=1, train_per_class=6))
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("zfnet: skipping") and "zz_broken.png" in ln]
    assert len(lines) == 3  # each reported once, from the training or the test share
    n_val = ck["metrics"][-1]["val_images"]
    assert len(ck["skipped_train"]) + (3 - n_val) == 3
    with pytest.raises(ZfnetError, match="no training data"):
        main(TrainConfig(out=str(tmp_path / "x")))
