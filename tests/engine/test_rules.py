"""The projection rules, one nonlinearity at a time, against answers computed by hand (closed-form
derivatives, no autograd), and the record of what a projection met."""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zfnet.engine import rules as R
from zfnet.engine.project import project
from zfnet.engine.rules import BackwardRules, rule_for, rules_on_path

# Pre-activations on both sides of every kink: the negative dip of SiLU / GELU / Mish / Hardswish (-4 .. -1),
# around 0, and past ReLU6's clip.
Z = [-4.0, -2.0, -1.0, -0.5, 0.3, 1.0, 2.5, 4.0, 7.0]


def sig(z):
    return 1 / (1 + math.exp(-z))


def phi(z):
    return math.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def Phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def softplus(z):
    return math.log1p(math.exp(z))


SELU_A, SELU_S = 1.6732632423543772, 1.0507009873554805
C = math.sqrt(2 / math.pi)


def _gelu_tanh(z):
    u = C * (z + 0.044715 * z ** 3)
    return 0.5 * z * (1 + math.tanh(u))


def _gelu_tanh_d(z):
    u = C * (z + 0.044715 * z ** 3)
    return 0.5 * (1 + math.tanh(u)) + 0.5 * z * (1 - math.tanh(u) ** 2) * C * (1 + 3 * 0.044715 * z ** 2)


def _mish_d(z):
    sp = softplus(z)
    return math.tanh(sp) + z * (1 - math.tanh(sp) ** 2) * sig(z)


# kind -> (f, f') by hand
HAND = {
    "ReLU": (lambda z: max(z, 0.0), lambda z: float(z > 0)),
    "ReLU6": (lambda z: min(max(z, 0.0), 6.0), lambda z: float(0 < z < 6)),
    "LeakyReLU": (lambda z: z if z > 0 else 0.1 * z, lambda z: 1.0 if z > 0 else 0.1),
    "PReLU": (lambda z: z if z > 0 else 0.25 * z, lambda z: 1.0 if z > 0 else 0.25),
    "ELU": (lambda z: z if z > 0 else math.expm1(z), lambda z: 1.0 if z > 0 else math.exp(z)),
    "CELU": (lambda z: z if z > 0 else 2 * math.expm1(z / 2), lambda z: 1.0 if z > 0 else math.exp(z / 2)),
    "SELU": (lambda z: SELU_S * (z if z > 0 else SELU_A * math.expm1(z)),
             lambda z: SELU_S * (1.0 if z > 0 else SELU_A * math.exp(z))),
    "SiLU": (lambda z: z * sig(z), lambda z: sig(z) * (1 + z * (1 - sig(z)))),
    "GELU": (lambda z: z * Phi(z), lambda z: Phi(z) + z * phi(z)),
    "GELU tanh": (_gelu_tanh, _gelu_tanh_d),
    "Hardswish": (lambda z: 0.0 if z <= -3 else z if z >= 3 else z * (z + 3) / 6,
                  lambda z: 0.0 if z < -3 else 1.0 if z > 3 else (2 * z + 3) / 6),
    "Mish": (lambda z: z * math.tanh(softplus(z)), _mish_d),
    "Softplus": (softplus, sig),
    "Tanh": (math.tanh, lambda z: 1 - math.tanh(z) ** 2),
    "Hardtanh": (lambda z: min(max(z, -1.0), 1.0), lambda z: float(-1 < z < 1)),
    "Sigmoid": (sig, lambda z: sig(z) * (1 - sig(z))),
}

# How each kind is written in models: modules, functionals, tensor methods, in-place variants.
FORMS = {
    "ReLU": [nn.ReLU(), nn.ReLU(inplace=True), F.relu, torch.relu, lambda x: x.relu(), lambda x: x.relu_(),
             lambda x: F.relu(x, inplace=True), lambda x: x.clamp(min=0)],
    "ReLU6": [nn.ReLU6(), nn.ReLU6(inplace=True), F.relu6, lambda x: F.hardtanh(x, 0.0, 6.0),
              lambda x: x.clamp(0, 6)],
    "LeakyReLU": [nn.LeakyReLU(0.1), nn.LeakyReLU(0.1, inplace=True), lambda x: F.leaky_relu_(x, 0.1)],
    "PReLU": [nn.PReLU()],
    "ELU": [nn.ELU(), nn.ELU(inplace=True), F.elu],
    "CELU": [nn.CELU(2.0)],
    "SELU": [nn.SELU(), nn.SELU(inplace=True)],
    "SiLU": [nn.SiLU(), nn.SiLU(inplace=True), F.silu, lambda x: x * torch.sigmoid(x),
             lambda x: x.sigmoid() * x, lambda x: x.mul_(x.sigmoid())],
    "GELU": [nn.GELU(), F.gelu],
    "GELU tanh": [nn.GELU(approximate="tanh")],
    "Hardswish": [nn.Hardswish(), nn.Hardswish(inplace=True), F.hardswish, lambda x: x * F.hardsigmoid(x)],
    "Mish": [nn.Mish(), nn.Mish(inplace=True)],
    "Softplus": [nn.Softplus()],
    "Tanh": [nn.Tanh(), torch.tanh, lambda x: x.tanh_()],
    "Hardtanh": [nn.Hardtanh(), nn.Hardtanh(inplace=True)],
    "Sigmoid": [nn.Sigmoid(), torch.sigmoid, lambda x: x.sigmoid()],
}
# torch's hardsigmoid backward multiplies by a float32 1/6 even in float64 (3e-8 relative); every other op
# here matches the closed forms to 1e-9 and better.
HARDSIGMOID_RTOL = 1e-7
RECTIFIERS = [k for k in HAND if k not in ("Tanh", "Hardtanh", "Sigmoid")]


class ActThenConv(nn.Module):
    """out = v * act(x) + 0.5 at every position (a 1x1 conv). Projecting the whole map seeds the backward
    with `out`, so the signal reaching the activation is g = v * out, negative at some positions."""

    def __init__(self, act, v):
        super().__init__()
        self.act = act if isinstance(act, nn.Module) else None
        self.fn = act
        self.conv = nn.Conv2d(1, 1, 1).double()
        with torch.no_grad():
            self.conv.weight.fill_(v)
            self.conv.bias.fill_(0.5)

    def forward(self, x):
        return self.conv(self.act(x) if self.act is not None else self.fn(x))


def expected(kind, mode, v):
    f, d = HAND[kind]
    rows = []
    for z in Z:
        g = v * (v * f(z) + 0.5)
        if kind in RECTIFIERS:
            rows.append({"deconv": max(g, 0.0), "guided": max(g, 0.0) * max(d(z), 0.0), "saliency": g * d(z)}[mode])
        else:  # saturating: the deconvnet passes it through
            rows.append({"deconv": g, "guided": g * d(z), "saliency": g * d(z)}[mode])
    return torch.tensor(rows, dtype=torch.float64)


CASES = [(kind, i) for kind, forms in FORMS.items() for i in range(len(forms))]


@pytest.mark.parametrize("mode", R.MODES)
@pytest.mark.parametrize("v", [1.0, -1.0])
@pytest.mark.parametrize("kind,form", CASES, ids=[f"{k}-{i}" for k, i in CASES])
def test_pointwise_rule_by_hand(kind, form, v, mode):
    model = ActThenConv(FORMS[kind][form], v).double()
    x = torch.tensor(Z, dtype=torch.float64).view(1, 1, 1, -1)
    got = project(model, x, ["conv:0"], mode)[0, 0, 0, 0]
    torch.testing.assert_close(got, expected(kind, mode, v), rtol=HARDSIGMOID_RTOL, atol=1e-12)


def test_hand_answers_tell_the_modes_apart():
    # The cases above can fail: on SiLU with v = 1, deconv, guided and saliency all differ (before these
    # rules, all three were the plain gradient), and guided closes the gate in SiLU's negative dip.
    d, gd, s = (expected("SiLU", m, 1.0) for m in R.MODES)
    assert (d - s).abs().max() > 0.1 and (gd - s).abs().max() > 0.02 and (d - gd).abs().max() > 0.1
    assert gd[0] == 0 and s[0] < 0  # z = -4: f' < 0


# ----------------------------------------------------------------------------------------------------
# Gates: squeeze-and-excitation written as modules and as functions.
class SE(nn.Module):
    """y = x * gate(w * mean(x)), then out = v * y (a 1x1 conv): torchvision's and timm's SE, in one channel."""

    def __init__(self, gate, functional=False, w=0.7, v=-1.5):
        super().__init__()
        self.gate, self.functional = gate, functional
        self.w = w
        self.conv = nn.Conv2d(1, 1, 1, bias=False).double()
        with torch.no_grad():
            self.conv.weight.fill_(v)

    def forward(self, x):
        s = self.w * x.mean((2, 3), keepdim=True)
        s = s.sigmoid() if self.functional else self.gate(s)
        return self.conv(x * s) if self.functional else self.conv(s * x)


GATE_X = [0.8, -0.3, 2.0, 1.1]


def se_expected(mode, hard, w=0.7, v=-1.5):
    xs = GATE_X
    m = sum(xs) / len(xs)
    z = w * m
    s = min(max(z / 6 + 0.5, 0.0), 1.0) if hard else sig(z)
    ds = (1 / 6 if -3 < z < 3 else 0.0) if hard else sig(z) * (1 - sig(z))
    gy = [v * (v * s * x) for x in xs]  # seed out = v*s*x, back through the conv
    held = [g * s for g in gy]  # the gate held constant
    if mode != "saliency":
        return torch.tensor(held, dtype=torch.float64)
    through_gate = sum(g * x for g, x in zip(gy, xs)) * ds * w / len(xs)
    return torch.tensor([h + through_gate for h in held], dtype=torch.float64)


@pytest.mark.parametrize("mode", R.MODES)
@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid", "functional"])
def test_gate_is_held_constant_by_hand(gate, mode):
    module = {"sigmoid": nn.Sigmoid(), "hardsigmoid": nn.Hardsigmoid(), "functional": None}[gate]
    model = SE(module, functional=gate == "functional")
    x = torch.tensor(GATE_X, dtype=torch.float64).view(1, 1, 1, -1)
    got = project(model, x, ["conv:0"], mode)[0, 0, 0, 0]
    torch.testing.assert_close(got, se_expected(mode, gate == "hardsigmoid"), rtol=HARDSIGMOID_RTOL,
                               atol=HARDSIGMOID_RTOL * 0.1)
    kinds = {k["kind"] for k in rules_on_path(model, x, ["conv"], mode)["kinds"]}
    assert ("Hardsigmoid gate" if gate == "hardsigmoid" else "Sigmoid gate") in kinds
    assert "AvgPool" in kinds  # x.mean((2, 3)) is global average pooling


# ----------------------------------------------------------------------------------------------------
# Normalizations.
class NormThenConv(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm.double()
        c = getattr(norm, "num_channels", None) or getattr(norm, "num_features", None) or 1
        self.conv = nn.Conv2d(c, 1, 1, bias=False).double()
        with torch.no_grad():
            self.conv.weight.copy_(torch.linspace(-1.0, 1.5, c, dtype=torch.float64).view(1, c, 1, 1))
            if getattr(self.norm, "weight", None) is not None:
                self.norm.weight.copy_(torch.linspace(0.5, 2.0, self.norm.weight.numel()).view_as(self.norm.weight))
                self.norm.bias.copy_(torch.linspace(-0.3, 0.4, self.norm.bias.numel()).view_as(self.norm.bias))

    def forward(self, x):
        return self.conv(self.norm(x))


def _norm_case(norm, x, mode, backprop_norm):
    model = NormThenConv(norm)
    return model, project(model, x, ["conv:0"], mode, backprop_norm=backprop_norm)[0, 0]


def _seed_grad(model, x):
    """g at the norm's output: v_c * out (the 1x1 conv's backward of the seed out), by hand."""
    with torch.no_grad():
        out = model(x)
    return model.conv.weight.view(1, -1, 1, 1) * out


def test_layer_norm_statistics_held_constant_in_deconv_by_hand():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 2, 5, dtype=torch.float64)  # normalized over the last axis (5 values per row)
    ln = nn.LayerNorm(5)
    model, got = _norm_case(ln, x, "deconv", False)
    g = _seed_grad(model, x)
    std = (x.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    torch.testing.assert_close(got, (g * model.norm.weight / std)[0], rtol=1e-9, atol=1e-12)
    # backprop_norm, guided and saliency: the true gradient of layer norm, by its closed form
    xh = (x - x.mean(-1, keepdim=True)) / std
    gh = g * model.norm.weight
    true = (gh - gh.mean(-1, keepdim=True) - xh * (gh * xh).mean(-1, keepdim=True)) / std
    for mode, bp in [("deconv", True), ("saliency", False)]:
        torch.testing.assert_close(_norm_case(ln, x, mode, bp)[1], true[0], rtol=1e-9, atol=1e-12)
    assert (true - (g * model.norm.weight / std)).abs().max() > 1e-2  # the two rules differ here


def test_group_norm_statistics_held_constant_in_deconv_by_hand():
    torch.manual_seed(1)
    x = torch.randn(1, 4, 2, 3, dtype=torch.float64)
    gn = nn.GroupNorm(2, 4)
    model, got = _norm_case(gn, x, "deconv", False)
    g = _seed_grad(model, x)
    std = torch.stack([(x[0, 2 * k:2 * k + 2].var(unbiased=False) + gn.eps).sqrt() for k in range(2)])
    scale = model.norm.weight.detach() / std.repeat_interleave(2)
    torch.testing.assert_close(got, g[0] * scale.view(4, 1, 1), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", R.MODES)
def test_batch_norm_in_eval_is_its_gradient_in_every_mode(mode):
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
        bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.5]))
    bn.train()  # projection puts it in eval for the pass and restores train mode after
    model, got = _norm_case(bn, x, mode, False)
    g = _seed_grad(model.eval(), x)
    scale = model.norm.weight.detach() / (model.norm.running_var + model.norm.eps).sqrt()
    torch.testing.assert_close(got, g[0] * scale.view(3, 1, 1), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", R.MODES)
def test_average_pooling_spreads_the_signal_evenly(mode):
    # conv (weight -1) -> avg pool 2x2 -> unit: every input pixel of the window gets -a / 4, whatever the mode
    model = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.AvgPool2d(2)).double()
    with torch.no_grad():
        model[0].weight.fill_(-1.0)
    x = torch.tensor([[1.0, 2.0], [3.0, -4.0]], dtype=torch.float64).view(1, 1, 2, 2)
    a = -(1 + 2 + 3 - 4) / 4
    got = project(model, x, ["1:0"], mode)[0, 0, 0]
    torch.testing.assert_close(got, torch.full((2, 2), -a / 4, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------
# The record, and never silent.
class Mixed(nn.Module):
    """A path with a rectifier, a gate, a normalization, pools and one op without a rule (softsign)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.SiLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Conv2d(4, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = self.pool(self.act(self.bn(self.conv1(x))))
        x = x * self.fc(F.adaptive_avg_pool2d(x, 1)).sigmoid()
        return self.conv2(F.softsign(x))


def test_record_lists_every_kind_and_its_rule(capsys, monkeypatch):
    monkeypatch.setattr(R, "_WARNED", set())
    model = Mixed().eval()
    x = torch.randn(2, 3, 8, 8)
    rec = rules_on_path(model, x, ["conv2"], "deconv")
    kinds = {k["kind"]: k for k in rec["kinds"]}
    assert set(kinds) == {"SiLU", "Sigmoid gate", "BatchNorm", "MaxPool", "AvgPool", "softsign"}
    assert kinds["SiLU"]["rule"] == rule_for("SiLU", "deconv") == "rectify the signal: relu(g)"
    assert kinds["softsign"]["rule"].startswith("gradient (no projection rule")
    assert rec["unruled"] == ["softsign"] and rec["mode"] == "deconv" and rec["backprop_norm"] is False
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no deconv projection rule for softsign" in err
    project(model, x, ["conv2:1@2,2"], "deconv")  # the same kind again: no second line
    assert "softsign" not in capsys.readouterr().err  # (the engine's own line about crops may come)
    json.dumps(rec)  # JSON as it is
    # Saliency is the plain gradient everywhere: every kind has its rule, nothing to warn about.
    sal = rules_on_path(model, x, ["conv2"], "saliency")
    assert sal["unruled"] == [] and {k["rule"] for k in sal["kinds"]} == {"gradient"} | {
        rule_for(k, "saliency") for k in ("MaxPool", "AvgPool", "BatchNorm")}


def test_record_counts_calls_of_a_reused_module():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(1, 2, 3), relu, nn.Conv2d(2, 2, 3), relu).eval()
    rules = BackwardRules("guided", pass_norm=False)
    x = torch.randn(1, 1, 9, 9, requires_grad=True)
    with rules:
        model(x.clone())
    assert rules.record()["kinds"] == [{"kind": "ReLU", "calls": 2, "rule": rule_for("ReLU", "guided")}]


def test_forward_values_are_unchanged_by_the_rules():
    model = Mixed().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    for mode in R.MODES:
        with BackwardRules(mode, pass_norm=True):
            got = model(x.clone().requires_grad_(True))
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_every_kind_of_the_table_is_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "projection-rules.md").read_text()
    for kind in R.KINDS:
        assert f"| {kind} |" in doc, kind
    for mode in ("deconv", "guided"):
        for kind in R.KINDS:
            assert rule_for(kind, mode) in doc, (kind, mode)


# ----------------------------------------------------------------------------------------------------
# Where the record lands: `zfnet project`'s result.json and the atlas's config.
@pytest.mark.parametrize("backprop_norm", [False, True])
def test_project_command_writes_units_mode_and_rules(tmp_path, backprop_norm):
    import numpy as np
    from PIL import Image

    from zfnet.cli import main
    from zfnet.core.results import read_json

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 250, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "proj"
    argv = ["project", "--model", "zfnet", "--weights", "none", str(tmp_path / "a.png"), "--unit", "relu2:3",
            "--unit", "relu1:5@10,12", "--mode", "deconv", "--out", str(out), "--device", "cpu"]
    assert main(argv + (["--backprop-norm"] if backprop_norm else [])) == 0
    res = read_json(out / "result.json")
    assert [u["unit"] for u in res["units"]] == ["relu2:3", "relu1:5@10,12"]
    assert res["units"][0]["png"] == "relu2_3.png" and (out / "relu2_3.png").exists()
    assert res["mode"] == "deconv" and res["config"]["mode"] == "deconv"
    assert res["config"]["model"] == "zfnet" and res["config"]["units"] == ["relu2:3", "relu1:5@10,12"]
    kinds = {k["kind"]: k["rule"] for k in res["rules"]["kinds"]}
    assert set(kinds) == {"ReLU", "MaxPool", "LocalResponseNorm"}  # ZFNet up to relu2: relu, pool, LRN
    assert kinds["ReLU"] == "rectify the signal: relu(g)"
    assert kinds["LocalResponseNorm"] == ("gradient" if backprop_norm else "passed through: g")
    assert res["rules"]["backprop_norm"] is backprop_norm and res["config"]["backprop_norm"] is backprop_norm


def test_atlas_config_records_the_rules(tmp_path):
    from tiny import PRE, Tiny, make_folder

    from zfnet.core.results import read_json
    from zfnet.understanding.atlas import atlas

    folder = make_folder(tmp_path / "imgs", n=4)
    atlas(Tiny(), folder, tmp_path / "out", ["relu1", "relu2"], k=2, batch_size=4, preprocess=PRE, progress=False,
          mode="guided", site=False)
    rules = read_json(tmp_path / "out" / "result.json")["config"]["rules"]
    assert rules["mode"] == "guided" and rules["unruled"] == []
    assert {k["kind"]: k["calls"] for k in rules["kinds"]} == {"ReLU": 2, "MaxPool": 1}
