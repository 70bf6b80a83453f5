"""Fooling: FGSM equals its closed form on a linear model, every attack keeps its L-inf budget on the [0, 1]
image (not the normalised input), and targeted PGD turns real photos into a chosen class on real SqueezeNet."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from zfnet.cli import main
from zfnet.core.errors import ZfnetError
from zfnet.cs231n.fooling import attack, fool, fooling_images, random_targets, resolve_class
from zfnet.data.images import Preprocess

PRE = Preprocess(resize=8, size=8)


class Linear(nn.Module):
    def __init__(self, k=4):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 8 * 8, k).double()

    def forward(self, x):
        return self.fc(x.flatten(1))


def _images(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64) * 0.8 + 0.1


def test_fgsm_is_the_sign_of_the_closed_form_gradient():
    model, u = Linear(), _images()
    eps = 4 / 255
    x = PRE.normalize(u)
    z = model(x)
    y = z.argmax(1)
    # d CE / d x = (softmax - onehot) W; d x / d u = 1 / std > 0, so the signs agree
    g = (z.softmax(1) - torch.nn.functional.one_hot(y, 4)) @ model.fc.weight
    expect = (u + eps * g.view_as(u).sign()).clamp(0, 1)
    adv, _ = attack(model, u, method="fgsm", eps=eps, preprocess=PRE)
    torch.testing.assert_close(adv, expect, rtol=0, atol=1e-12)
    target = (y + 1) % 4  # targeted: down the target's loss
    gt = (z.softmax(1) - torch.nn.functional.one_hot(target, 4)) @ model.fc.weight
    adv, _ = attack(model, u, method="fgsm", eps=eps, target=target, preprocess=PRE)
    torch.testing.assert_close(adv, (u - eps * gt.view_as(u).sign()).clamp(0, 1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("target", [None, "shift"])
def test_pgd_keeps_the_pixel_budget_and_fools_a_linear_model(target):
    model, u = Linear(), _images(6, seed=3)
    eps = 24 / 255  # the linear model's margins need more than 8/255 for every image
    with torch.no_grad():
        y = model(PRE.normalize(u)).argmax(1)
    t = (y + 1) % 4 if target else None
    adv, info = attack(model, u, eps=eps, steps=40, target=t, preprocess=PRE, early_stop=False)
    assert info["steps_run"] == 40
    assert (adv - u).abs().max() <= eps + 1e-12 and adv.min() >= 0 and adv.max() <= 1
    # in the normalised input the change is up to eps / std, larger than eps: the budget is on pixels
    assert (PRE.normalize(adv) - PRE.normalize(u)).abs().max() > eps * 1.5
    with torch.no_grad():
        pred = model(PRE.normalize(adv)).argmax(1)
    assert ((pred == t).all() if target else (pred != y).all()), (pred, y, t)


def test_random_targets_differ_from_the_labels():
    labels = list(range(10)) * 5
    targets = random_targets(labels, 10, seed=1)
    assert all(t != y and 0 <= t < 10 for t, y in zip(targets, labels))
    assert targets == random_targets(labels, 10, seed=1) and len(set(targets)) > 5


def test_targeted_pgd_turns_real_photos_into_the_target_class(squeezenet, imagenet_samples):
    """eps = 8/255 on the [0, 1] image, 10 steps: at least 9 of 10 real photos reach their (random) target."""
    files = sorted(imagenet_samples.glob("*.jpg"))[::100]
    assert len(files) == 10
    res = fool(squeezenet, files, method="pgd", eps=8 / 255, steps=10, targets="random",
               labels=[i * 100 for i in range(10)], seed=0)
    assert sum(e["success"] for e in res.examples) >= 9, [e["adversarial"] for e in res.examples]
    assert max(e["linf"] for e in res.examples) <= 8 / 255 + 1e-6
    assert res.adversarial.min() >= 0 and res.adversarial.max() <= 1
    # re-check with a plain forward pass of the model's own preprocessing of the adversarial images
    pre = Preprocess.for_model(squeezenet)
    with torch.no_grad():
        pred = squeezenet(pre.normalize(torch.from_numpy(res.adversarial))).argmax(1).tolist()
    targets = [e["target"] for e in res.examples]
    assert sum(p == t for p, t in zip(pred, targets)) >= 9
    assert all(t != i * 100 for i, t in enumerate(targets))


def test_fooling_image_from_noise_is_confident(squeezenet):
    pre = Preprocess(resize=128, size=112)  # a smaller canvas keeps the test's CPU time low
    cls = resolve_class(squeezenet, "goldfish")
    assert cls == 1
    imgs, info = fooling_images(squeezenet, [cls], steps=100, confidence=0.99, preprocess=pre)
    assert info["prob"][0] >= 0.99, info
    assert imgs.shape == (1, 3, 112, 112) and imgs.min() >= 0 and imgs.max() <= 1
    with torch.no_grad():
        assert squeezenet(pre.normalize(imgs)).softmax(1)[0, cls] >= 0.99


def test_cli_untargeted_fgsm_and_bad_input(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"")
    rc = main(["fool", "--model", "tiny:Tiny", "--weights", "none", str(tmp_path / "0.png"), str(tmp_path / "1.png"),
               str(tmp_path / "bad.png"), "--method", "fgsm", "--eps", "4/255", "--out", str(tmp_path / "out"),
               "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert rc == 0 and out["method"] == "fgsm" and out["eps"] == pytest.approx(4 / 255) and not out["targeted"]
    assert len(out["examples"]) == 2 and len(out["skipped"]) == 1 and "bad.png" in captured.err
    assert out["summary"]["max_linf"] <= 4 / 255 + 1e-6
    assert (tmp_path / "out" / "fooling.png").is_file() and (tmp_path / "out" / "images.npz").is_file()
    with pytest.raises(ZfnetError, match="eps must be in"):
        attack(Linear(), _images(), eps=0, preprocess=PRE)
    with pytest.raises(ZfnetError, match="unknown class 'no such thing'"):
        resolve_class(Linear(), "no such thing")
