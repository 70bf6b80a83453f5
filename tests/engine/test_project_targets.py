"""project's seeds, output targets, aggregates and SmoothGrad / VarGrad, against Captum and autograd."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_project import zoo_pair

from zfnet.core.errors import ZfnetError
from zfnet.engine.project import project
from zfnet.engine.rules import BackwardRules, projection_state
from zfnet.inspect.layers import parse_unit, run_with_taps

captum = pytest.importorskip("captum.attr")
NEURON = {"deconv": "NeuronDeconvolution", "guided": "NeuronGuidedBackprop", "saliency": "NeuronGradient"}
OUTPUT = {"deconv": "Deconvolution", "guided": "GuidedBackprop"}


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def double_zoo():
    ours, twin = zoo_pair()
    return ours.double().eval(), twin.double(), torch.randn(2, 3, 21, 19, generator=torch.Generator().manual_seed(4),
                                                     dtype=torch.float64)


def neuron(u):
    u = parse_unit(u)
    return (u.channel,) if u.y is None else (u.channel, u.y, u.x)


def pick(model, x, layer, want):
    """A location of channel 0 in image 0 whose activation is `want` ("zero", "negative", "positive")."""
    a = run_with_taps(model, x, [layer])[layer][0, 0]
    test = {"zero": a == 0, "negative": a < 0, "positive": a > 0}[want]
    y, x_ = (int(v) for v in test.nonzero()[0])
    return f"{layer}:0@{y},{x_}"


@pytest.mark.parametrize("mode", ["deconv", "guided", "saliency"])
def test_seed_one_equals_captum_whatever_the_activation(mode):
    ours, twin, x = double_zoo()
    units = [pick(twin, x, "relu1", "zero"), pick(twin, x, "conv1", "negative"), pick(twin, x, "conv2", "positive"),
             "fc:3", "relu3:2"]
    got = project(ours, x, units, mode, seed="one")
    mods = dict(twin.named_modules())
    for k, u in enumerate(units):
        ref = quiet(getattr(captum, NEURON[mode])(twin, mods[parse_unit(u).layer]).attribute, x, neuron(u)) \
            if parse_unit(u).y is not None or parse_unit(u).layer == "fc" else None
        if ref is None:  # a whole map: Captum's selector sums it (seed one everywhere)
            c = parse_unit(u).channel
            ref = quiet(getattr(captum, NEURON[mode])(twin, mods[parse_unit(u).layer]).attribute, x,
                        lambda o, c=c: o[:, c].sum((1, 2)))
        assert torch.allclose(got[:, k], ref, atol=1e-10, rtol=1e-8), u
        assert ref.abs().max() > 0, u  # the zero-activation unit too: Captum's deconv does not look at it


def test_zero_activation_is_reported_not_silent(capsys):
    ours, _, x = double_zoo()
    zero = pick(ours, x, "relu1", "zero")
    got, info = project(ours, x[:1], [zero, "relu3:2"], return_info=True)
    assert got[0, 0].abs().max() == 0 and got[0, 1].abs().max() > 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 of 2 projections are blank" in err[0] and zero in err[0] and "seed='one'" in err[0]
    assert info.zero_seed == [f"{zero} on image 0"] and info.seed == "activation"
    assert project(ours, x[:1], [zero], seed="one").abs().max() > 0
    assert capsys.readouterr().err == ""  # seed one: nothing blank, nothing said


@pytest.mark.parametrize("mode", ["deconv", "guided"])
def test_activation_seed_of_a_negative_activation_is_sign_dependent(mode):
    # The rectified backward is positively homogeneous, not linear: seeding with a < 0 gives |a| times the
    # projection of -1, not a times the projection of +1. Seed "one" is Captum's (tested above).
    ours, _, x = double_zoo()
    u = pick(ours, x, "conv2", "negative")  # behind a ReLU (conv1's backward alone is linear)
    a = run_with_taps(ours, x, ["conv2"])["conv2"][0, 0, parse_unit(u).y, parse_unit(u).x].item()
    by_act = project(ours, x[:1], [u], mode)[0, 0]
    minus = project(ours, x[:1], [u], mode, seed=torch.tensor(-1.0))[0, 0]
    plus = project(ours, x[:1], [u], mode, seed="one")[0, 0]
    assert torch.allclose(by_act, abs(a) * minus, atol=1e-12)
    assert not torch.allclose(by_act, a * plus, atol=1e-6)


def test_seed_tensor_per_unit_and_image():
    ours, _, x = double_zoo()
    units = ["relu1:3@4,5", "fire:6"]
    one = project(ours, x, units, "saliency", seed="one")
    vals = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    got = project(ours, x, units, "saliency", seed=vals)  # saliency is linear in the seed
    assert torch.allclose(got, vals.double().view(2, 2, 1, 1, 1) * one, atol=1e-12)
    deconv = project(ours, x, units, "deconv", seed=torch.tensor([2.0, 3.0]))  # (U,) broadcast over images
    assert torch.allclose(deconv, torch.tensor([2.0, 3.0]).double().view(1, 2, 1, 1, 1)
                          * project(ours, x, units, "deconv", seed="one"), atol=1e-12)
    with pytest.raises(ZfnetError, match="broadcast"):
        project(ours, x, units, seed=torch.ones(3))


# ----------------------------------------------------------------------------------------------------
# Output targets.
def grad_of(fn, x):
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(fn(x).sum(), x)[0]


def test_target_scores_equal_autograd():
    ours, twin, x = double_zoo()
    assert torch.allclose(project(ours, x, target=3, mode="saliency"), grad_of(lambda v: twin(v)[:, 3], x),
                          atol=1e-12)
    lp = project(ours, x, target=[1, 4], mode="saliency", score="log_prob")
    ref = grad_of(lambda v: F.log_softmax(twin(v), 1)[torch.arange(2), torch.tensor([1, 4])], x)
    assert torch.allclose(lp, ref, atol=1e-12)
    pr = project(ours, x, target=torch.tensor([4, 0]), mode="saliency", score="prob")
    ref = grad_of(lambda v: F.softmax(twin(v), 1)[torch.arange(2), torch.tensor([4, 0])], x)
    assert torch.allclose(pr, ref, atol=1e-12) and pr.abs().max() > 0


@pytest.mark.parametrize("mode", ["deconv", "guided"])
def test_target_deconv_and_guided_equal_captum(mode):
    ours, twin, x = double_zoo()
    for c in (0, 2):
        ref = quiet(getattr(captum, OUTPUT[mode])(twin).attribute, x, target=c)
        assert torch.allclose(project(ours, x, target=c, mode=mode), ref, atol=1e-10), c


def test_target_of_a_model_ending_in_softmax_scores_the_logits():
    ours, twin, x = double_zoo()
    with_softmax = nn.Sequential(copy.deepcopy(ours), nn.Softmax(dim=1))
    logit, info = project(with_softmax, x, target=2, mode="saliency", return_info=True)
    assert torch.allclose(logit, grad_of(lambda v: twin(v)[:, 2], x), atol=1e-12)
    assert "final softmax" in info.score_source and info.seed == "one" and info.target == [2, 2]
    prob = project(with_softmax, x, target=2, mode="saliency", score="prob")
    assert torch.allclose(prob, grad_of(lambda v: F.softmax(twin(v), 1)[:, 2], x), atol=1e-12)
    plain = project(ours, x, target=2, mode="saliency", return_info=True)[1]
    assert plain.score_source == "the model's output"


@pytest.mark.parametrize("kw, message", [
    (dict(target=5), "out of range 0..4"),
    (dict(target=[1, 2, 3]), "one per image"),
    (dict(target="cat"), "class index"),
    (dict(units=["fc:1"], target=1), "not both"),
    (dict(), "nothing to project"),
    (dict(target=1, score="softmax"), "unknown score"),
    (dict(units=["fc:1"], aggregate=True, pairs=True), "aggregate"),
    (dict(target=1, smooth="blur"), "unknown smoothing"),
    (dict(target=1, smooth="smoothgrad", samples=0), "samples >= 1"),
    (dict(units=["fc:1"], seed="two"), "unknown seed"),
])
def test_bad_target_arguments_are_one_line_errors(kw, message):
    ours, _, x = double_zoo()
    with pytest.raises(ZfnetError, match=message):
        project(ours, x, **kw)


# ----------------------------------------------------------------------------------------------------
# Aggregates: several units as one objective.
def test_aggregate_is_one_objective():
    ours, twin, x = double_zoo()
    units = ["relu1:3@4,5", "conv2:5@2,3", "fire:6", "fc:1"]
    sal = project(ours, x, units, "saliency", seed="one", aggregate=True)
    assert sal.shape == x.shape
    assert torch.allclose(sal, project(ours, x, units, "saliency", seed="one").sum(1), atol=1e-12)  # linear
    # deconv rectifies the summed signal: Captum with a selector summing the units of one layer.
    same_layer = ["fire:4@4,4", "fire:6@1,2", "fire:1"]
    got = project(ours, x, same_layer, "deconv", seed="one", aggregate=True)
    ref = quiet(captum.NeuronDeconvolution(twin, twin.fire).attribute, x,
                lambda o: o[:, 4, 4, 4] + o[:, 6, 1, 2] + o[:, 1].sum((1, 2)))
    assert torch.allclose(got, ref, atol=1e-10)
    assert not torch.allclose(got, project(ours, x, same_layer, "deconv", seed="one").sum(1), atol=1e-6)


def test_aggregate_across_layers_by_hand():
    # deconv across layers: one backward pass from seeds at both layers (the reference builds it by hand).
    ours, _, x = double_zoo()
    units = ["conv2:5@2,3", "relu3:4"]
    got = project(ours, x, units, "deconv", aggregate=True)
    with projection_state(ours), torch.enable_grad():
        leaf = x.clone().requires_grad_(True)
        with BackwardRules("deconv", pass_norm=True):
            acts = run_with_taps(ours, leaf, ["conv2", "relu3"], detach=False)
        s2 = torch.zeros_like(acts["conv2"])
        s2[:, 5, 2, 3] = acts["conv2"][:, 5, 2, 3].detach()
        s3 = torch.zeros_like(acts["relu3"])
        s3[:, 4] = acts["relu3"][:, 4].detach()
        ref = torch.autograd.grad([acts["conv2"], acts["relu3"]], leaf, [s2, s3])[0]
    assert torch.allclose(got, ref, atol=1e-12) and ref.abs().max() > 0


# ----------------------------------------------------------------------------------------------------
# SmoothGrad / VarGrad.
def noisy_copies(x, samples, sigma, seed):
    """The documented noise: copy s is the s-th (N, C, H, W) draw of one generator, times sigma x range."""
    g = torch.Generator().manual_seed(seed)
    span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, 1, 1, 1)
    return [x + torch.randn(x.shape, generator=g, dtype=torch.float32).double() * sigma * span
            for _ in range(samples)]


@pytest.mark.parametrize("mode", ["deconv", "saliency"])
def test_smoothgrad_and_vargrad_equal_the_loop_they_batch(mode):
    ours, _, x = double_zoo()
    units = ["relu1:3@4,5", "fire:6", "fc:2"]
    loop = torch.stack([project(ours, xs, units, mode) for xs in noisy_copies(x, 6, 0.1, 7)])
    sg = project(ours, x, units, mode, smooth="smoothgrad", samples=6, sigma=0.1, noise_seed=7)
    vg, info = project(ours, x, units, mode, smooth="vargrad", samples=6, sigma=0.1, noise_seed=7,
                       batch_size=2, return_info=True)
    sq = project(ours, x, units, mode, smooth="smoothgrad_sq", samples=6, sigma=0.1, noise_seed=7)
    assert torch.allclose(sg, loop.mean(0), atol=1e-12)
    assert torch.allclose(vg, loop.var(0, unbiased=False), atol=1e-12) and vg.abs().max() > 0
    assert torch.allclose(sq, (loop ** 2).mean(0), atol=1e-12)
    assert info.smooth == {"kind": "vargrad", "samples": 6, "sigma": 0.1, "noise_seed": 7}
    other = project(ours, x, units, mode, smooth="smoothgrad", samples=6, sigma=0.1, noise_seed=8)
    assert not torch.allclose(other, sg, atol=1e-6)  # the seed is the noise


def test_smoothgrad_of_a_target_with_zero_noise_is_the_gradient():
    ours, _, x = double_zoo()
    plain = project(ours, x, target=1, mode="saliency")
    assert torch.allclose(project(ours, x, target=1, mode="saliency", smooth="smoothgrad", samples=3, sigma=0.0),
                          plain, atol=1e-12)
    assert project(ours, x, target=1, mode="saliency", smooth="vargrad", samples=3, sigma=0.0).abs().max() < 1e-12
