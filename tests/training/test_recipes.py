"""The two papers' recipes (ZF Sec. 3, Krizhevsky et al. Secs. 3-5) and AlexNet's PCA lighting (Sec. 4.1):
the presets and their overrides, bias initialization, the three learning-rate drops, the lighting statistics
against a hand computation, the shift's effect on channel statistics, caching and resuming."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from test_train import make_data, tiny_cfg

from zfnet.cli import build_parser
from zfnet.cli.training import config_from_args
from zfnet.core.distributed import Dist
from zfnet.core.errors import ZfnetError
from zfnet.data.lighting import Lighting
from zfnet.data.trainset import TrainImages, train_statistics
from zfnet.training.checkpoints import load_checkpoint
from zfnet.training.networks import build_model
from zfnet.training.recipe import STATS, main, plateau_schedule
from zfnet.training.settings import RECIPES, TrainConfig


# ----------------------------------------------------------------------------------------------------
# presets
def test_zfnet_recipe_is_the_default_and_alexnet_states_its_paper():
    assert TrainConfig() == TrainConfig.recipe("zfnet") == TrainConfig.recipe()
    a = TrainConfig.recipe("alexnet")
    assert (a.model, a.weight_decay, a.init_std, a.lr, a.lr_factor, a.lr_drops, a.epochs, a.lighting,
            a.clip_radius, a.batch_size, a.momentum, a.dropout) == \
        ("alexnet", 5e-4, 1e-2, 1e-2, 0.1, 3, 90, 0.1, 0.0, 128, 0.9, 0.5)
    assert a.bias_one == ("conv2", "conv4", "conv5", "fc6", "fc7")
    z = TrainConfig.recipe("zfnet")
    assert (z.model, z.weight_decay, z.bias_one, z.lr_drops, z.epochs, z.lighting, z.clip_radius) == \
        ("zfnet", 0.0, (), None, 70, 0.0, 0.1)
    # every preset names real fields, and overrides win
    fields = set(TrainConfig.__dataclass_fields__)
    assert all(set(r) <= fields for r in RECIPES.values())
    b = TrainConfig.recipe("alexnet", lighting=0.0, epochs=5)
    assert (b.lighting, b.epochs, b.weight_decay) == (0.0, 5, 5e-4)
    with pytest.raises(ZfnetError, match="unknown recipe 'vgg'"):
        TrainConfig.recipe("vgg")
    with pytest.raises(ZfnetError, match="unknown training setting"):
        TrainConfig.recipe("alexnet", wd=1)


def _cfg(argv):
    return config_from_args(build_parser().parse_args(["train"] + argv))


def test_cli_recipe_with_explicit_flags_overriding():
    assert _cfg([]) == TrainConfig()
    assert _cfg(["--recipe", "alexnet"]) == TrainConfig.recipe("alexnet")
    c = _cfg(["--recipe", "alexnet", "--weight-decay", "0", "--lighting", "0", "--lr-drops", "none",
              "--bias-one", "fc6,fc7", "--model", "zfnet", "--epochs", "12"])
    assert (c.weight_decay, c.lighting, c.lr_drops, c.bias_one, c.model, c.epochs) == \
        (0.0, 0.0, None, ("fc6", "fc7"), "zfnet", 12)
    assert c.lr_patience == 3 and c.clip_radius == 0.0  # the rest is still AlexNet's
    assert _cfg(["--recipe", "alexnet", "--bias-one", "none"]).bias_one == ()
    # a flag given explicitly with the recipe's own value is an override too (not "unset")
    assert _cfg(["--recipe", "alexnet", "--clip-radius", "0.1"]).clip_radius == 0.1


def test_bias_one_and_weight_init():
    torch.manual_seed(0)
    arch = {"model": "alexnet", "widths": [16, 32, 32, 32, 16], "fc": 64, "num_classes": 5, "crop": 64,
            "init_std": 1e-2, "bias_one": RECIPES["alexnet"]["bias_one"]}
    m = build_model(arch)
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        b = getattr(m, name).bias
        want = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.all(b == want), name
    w = torch.cat([p.weight.flatten() for p in m.modules() if isinstance(p, (nn.Conv2d, nn.Linear))])
    assert abs(w.std().item() - 1e-2) < 5e-4 and abs(w.mean().item()) < 5e-4
    two = build_model(dict(arch, model="alexnet2"))
    assert two.conv2.groups == two.conv4.groups == two.conv5.groups == 2 and two.conv3.groups == 1
    assert torch.all(two.conv4.bias == 1)
    with pytest.raises(ZfnetError, match="bias_one names conv4, which remove-3-4 does not have"):
        build_model(dict(arch, model="remove-3-4"))
    with pytest.raises(ZfnetError, match="must be even"):
        build_model(dict(arch, model="alexnet2", widths=[15, 32, 32, 32, 16]))


def test_learning_rate_divided_by_ten_three_times_then_held():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = plateau_schedule(opt, TrainConfig.recipe("alexnet", lr_patience=1))
    lrs = []
    for err in [50.0, 40.0] + [40.0] * 14:  # improves once, then never again
        sched.step(err)
        lrs.append(opt.param_groups[0]["lr"])
    drops = sum(b < a for a, b in zip([0.01] + lrs, lrs))
    assert drops == 3
    assert lrs[-1] == pytest.approx(1e-5) and lrs[:3] == [0.01, 0.01, 0.01]
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)  # ZF: no limit
    sched2 = plateau_schedule(opt2, TrainConfig(lr_patience=1))
    for err in [50.0] * 12:
        sched2.step(err)
    assert opt2.param_groups[0]["lr"] < 1e-6


# ----------------------------------------------------------------------------------------------------
# PCA lighting
def _tiny_images(root: Path) -> list[Path]:
    """Three 4x4 images (no resizing or cropping at resize 4): pixel values chosen, not random."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(3)
    paths = []
    for i in range(3):
        a = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
        a[..., 1] = (a[..., 0] // 2 + 40 * i).astype(np.uint8)  # correlated channels, as in photos
        p = root / f"{i}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


def test_lighting_statistics_and_shift_by_hand(tmp_path):
    paths = _tiny_images(tmp_path / "im")
    ds = TrainImages(paths, [0, 1, 2], resize=4, crop=4)
    stats = train_statistics(ds, Dist(), batch_size=2, workers=0, progress=False)
    # by hand: every pixel of every image is one sample of an RGB vector in [0, 1]
    px = np.concatenate([np.asarray(Image.open(p), dtype=np.float64).reshape(-1, 3) / 255.0 for p in paths])
    mean = px.mean(0)
    cov = sum(np.outer(v - mean, v - mean) for v in px) / len(px)
    np.testing.assert_allclose(stats.rgb_cov.numpy(), cov, rtol=1e-6)  # float32 pixels
    assert stats.pixels == 48
    np.testing.assert_allclose(stats.mean_image.numpy(), np.stack([np.asarray(Image.open(p), np.float64) / 255
                                                                   for p in paths]).mean(0).transpose(2, 0, 1),
                               atol=1e-6)
    light = stats.lighting(0.1)
    val, vec = np.linalg.eigh(cov)
    order = np.argsort(val)[::-1]
    val, vec = val[order], vec[:, order]
    np.testing.assert_allclose(light.eigval.numpy(), val, rtol=1e-5)
    for i in range(3):  # eigenvectors up to sign; the sign: largest component positive
        v = vec[:, i] * np.sign(vec[np.argmax(np.abs(vec[:, i])), i])
        np.testing.assert_allclose(light.eigvec[:, i].numpy(), v, atol=1e-5)
    # the shift: sum_i alpha_i * lambda_i * p_i, with the eigenvalue itself (not its square root)
    alpha = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    want = sum(alpha[i].item() * val[i] * light.eigvec[:, i].numpy() for i in range(3))
    np.testing.assert_allclose(light.shift(alpha).numpy(), want, rtol=1e-6)
    # applied through the dataset: the same crop and flip as without lighting, plus one constant shift
    mean_im = stats.mean_image
    plain = TrainImages(paths, [0, 1, 2], 4, 4, "random", mean_image=mean_im, seed=5)
    lit = TrainImages(paths, [0, 1, 2], 4, 4, "random", mean_image=mean_im, seed=5, lighting=light)
    for epoch in (1, 2):
        plain.epoch = lit.epoch = epoch
        for i in range(3):
            a, b = plain[i][0], lit[i][0]
            shift = light.shift(light.alpha(5, epoch, i))
            torch.testing.assert_close(b - a, shift.view(3, 1, 1).expand_as(a), atol=1e-6, rtol=0)
    assert not torch.equal(light.alpha(5, 1, 0), light.alpha(5, 2, 0))  # a new draw every epoch
    assert not torch.equal(light.alpha(5, 1, 0), light.alpha(5, 1, 1))  # and for every image
    torch.testing.assert_close(light.alpha(5, 1, 0), Lighting(light.eigval, light.eigvec, 0.1).alpha(5, 1, 0))


def test_lighting_changes_channel_statistics_as_the_paper_says():
    """Over many draws the colour shift has mean 0 and, along principal component p_i, standard deviation
    0.1 * lambda_i; it moves every pixel of an image alike (the spatial structure is untouched)."""
    cov = torch.tensor([[0.070, 0.060, 0.050], [0.060, 0.065, 0.055], [0.050, 0.055, 0.068]], dtype=torch.float64)
    light = Lighting.from_covariance(cov, 0.1)
    shifts = torch.stack([light.shift(light.alpha(0, e, i)) for e in range(40) for i in range(100)]).double()
    assert shifts.mean(0).abs().max() < 4 * 0.1 * light.eigval[0] / 4000 ** 0.5
    proj = shifts @ light.eigvec  # coordinates along p_1, p_2, p_3
    torch.testing.assert_close(proj.std(0), 0.1 * light.eigval, rtol=0.05, atol=0)
    emp = torch.cov(proj.T)
    assert abs(emp[0, 1]) < 0.1 * emp[0, 0] and abs(emp[0, 2]) < 0.1 * emp[0, 0]  # independent components
    # the augmented image set: channel means move by the shift, channel covariance within the image not at all
    x = torch.rand(3, 8, 8)
    y = light(x, 0, 3, 7)
    torch.testing.assert_close(torch.cov((y - y.mean((1, 2), keepdim=True)).flatten(1)),
                               torch.cov((x - x.mean((1, 2), keepdim=True)).flatten(1)))
    torch.testing.assert_close(y.mean((1, 2)) - x.mean((1, 2)), light.shift(light.alpha(0, 3, 7)))


def test_lighting_runs_resume_and_reuse_the_cached_statistics(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    kw = dict(lighting=0.1, weight_decay=5e-4, bias_one=("conv2", "fc6"), dropout=0.0, init_std=0.0)  # He: it learns
    main(tiny_cfg(data, tmp_path / "ref", epochs=3, **kw))
    main(tiny_cfg(data, tmp_path / "res", epochs=1, **kw))
    main(tiny_cfg(data, tmp_path / "res", epochs=3, **kw))  # epochs is resumable: continues to 3
    a, b = load_checkpoint(tmp_path / "ref" / "checkpoint.pth"), load_checkpoint(tmp_path / "res" / "checkpoint.pth")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=0, rtol=0, msg=k)
    off = tiny_cfg(data, tmp_path / "off", epochs=3, **dict(kw, lighting=0.0))
    main(off)
    c = load_checkpoint(tmp_path / "off" / "checkpoint.pth")
    assert not torch.allclose(a["model"]["conv1.weight"], c["model"]["conv1.weight"])  # lighting did something
    torch.testing.assert_close(a["train_stats"]["rgb_cov"], c["train_stats"]["rgb_cov"])
    # a run stopped before its first checkpoint finds the statistics in the run folder and reuses them
    (tmp_path / "again").mkdir()
    cached = torch.load(tmp_path / "ref" / STATS, weights_only=True)
    cached["mean_image"] = cached["mean_image"] + 0.25  # marked: recomputing would not give this
    torch.save(cached, tmp_path / "again" / STATS)
    capsys.readouterr()
    main(tiny_cfg(data, tmp_path / "again", epochs=1, **kw))
    assert "training-set statistics from" in capsys.readouterr().err
    d = load_checkpoint(tmp_path / "again" / "checkpoint.pth")
    torch.testing.assert_close(d["mean_image"], a["mean_image"] + 0.25)
    # ... but only when they describe this training set
    shutil.copy(tmp_path / "again" / STATS, tmp_path / "other.pth")
    (tmp_path / "fewer").mkdir()
    shutil.copy(tmp_path / "other.pth", tmp_path / "fewer" / STATS)
    main(tiny_cfg(data, tmp_path / "fewer", epochs=1, train_per_class=3, **kw))
    e = load_checkpoint(tmp_path / "fewer" / "checkpoint.pth")
    assert not torch.allclose(e["mean_image"], d["mean_image"])
