"""Projections and mining on the 20 zoo networks against independent references.

For each network, a middle and a deep layer (by execution order in the layer table, spatial maps only): deconv,
guided and saliency of one unit each equal
  * Captum (NeuronDeconvolution / NeuronGuidedBackprop) where its rules apply: networks whose only
    nonlinearities are ReLUs. Captum hooks nn.ReLU modules, and only out-of-place ones, so its twin of the
    model has every in-place flag off, ReLU6 modules as clamping nn.ReLU subclasses, and the functional
    `F.relu(x, inplace=True)` of torchvision's BasicConv2d (GoogLeNet, Inception) as an nn.ReLU module;
  * elsewhere the rule table of docs/projection-rules.md written again here, independently of
    zfnet.engine.rules: per-module forward hooks whose autograd function carries the rule, with closed-form
    derivatives, gates recognised by the squeeze-and-excitation module they sit in;
  * saliency: Captum's NeuronGradient on every network.
Mining (zfnet.mine) equals brute force (one image per forward pass, spatial maxima sorted) on a few photos.
In float32, as users run them (float64 convolutions on CPU are 10-100x slower): a single activation is
projected on its receptive field only, so ours and the reference differ by float32 rounding (TOL).
"""

import copy
import math
import types
import warnings
from functools import lru_cache

import pytest
import torch
import torch.nn as nn
from zoo_models import NAMES, SIZE, build

from zfnet.data.images import ImageDataset, Preprocess, load_image
from zfnet.engine import passes
from zfnet.engine.mine import mine
from zfnet.engine.project import project
from zfnet.inspect.layers import layer_table, parse_unit

CAPTUM = {"deconv": "NeuronDeconvolution", "guided": "NeuronGuidedBackprop", "saliency": "NeuronGradient"}
PRE = Preprocess(resize=SIZE + SIZE // 7, size=SIZE)
# Modules whose rule Captum does not implement, by class name: timm has its own classes for some (its GELU is
# an nn.Module calling F.gelu, not an nn.GELU), which an isinstance test would miss. The hook reference
# takes over on networks that have any of them.
MODERN = {"SiLU", "Swish", "GELU", "GELUTanh", "QuickGELU", "Hardswish", "HardSwish", "Hardsigmoid", "HardSigmoid",
          "Sigmoid", "Mish", "Tanh", "ELU", "LeakyReLU", "PReLU", "LayerNorm", "LayerNorm2d", "GroupNorm", "GroupNorm1"}
TOL = 1e-4  # of the reference's largest magnitude; a wrong rule is off by 1e-1 or more (checked below)


@lru_cache(maxsize=1)
def zoo_model(name):
    model = non_degenerate(build(name))
    return model, chosen_layers(model)


def non_degenerate(model):
    """Undo the initialisations that make an untrained residual network an identity on purpose (timm's
    zero-initialised last norm of each block, ConvNeXt's layer scale of 1e-6): with them the blocks
    contribute nothing and a projection cannot tell one rule from another."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None \
                    and not m.weight.any():
                m.weight.fill_(1.0)
        for n, p in model.named_parameters():
            if n.rsplit(".", 1)[-1] in ("layer_scale", "gamma") and p.abs().max() < 1e-4:
                p.fill_(1.0)
    return model


@lru_cache(maxsize=1)
def _photos(folder):
    paths = sorted(folder.iterdir())[::199][:5]  # five classes far apart
    return paths, torch.stack([PRE(load_image(p)) for p in paths])


@pytest.fixture
def photos(imagenet_samples):
    return _photos(imagenet_samples)


def chosen_layers(model):
    """A middle and a deep layer by execution order: spatial maps of modules that run once (so that a
    module hook, as Captum and the brute force use, sees the same output as the layer)."""
    table = layer_table(model, SIZE)
    names = set(table.names())  # a module called twice has a layer `name#2` (the table lists every call)
    spatial = [i.name for i in table if i.height * i.width > 1 and i.channels > 1 and "#" not in i.name
               and f"{i.name}#2" not in names]
    assert len(spatial) >= 4, spatial
    return spatial[len(spatial) // 2], spatial[-1]


def strongest(model, x, layer):
    """The channel with the largest activation and its location, on image 0."""
    out = {}
    def keep(m, a, o):  # (returns None: a hook's return value would replace the output)
        out.setdefault("a", o.detach().clone())  # clone: later code may change it in place (`out += identity`)

    h = dict(model.named_modules())[layer].register_forward_hook(keep)
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        h.remove()
    a = out["a"][0]
    c = int(a.flatten(1).amax(1).argmax())
    y, xx = divmod(int(a[c].argmax()), a.shape[-1])
    return c, y, xx


# ----------------------------------------------------------------------------------------------------
# The Captum twin.
class ClampReLU(nn.ReLU):
    """ReLU6 as an nn.ReLU Captum hooks: its backward hook then gives relu(g) (deconv) and relu(g * mask)
    (guided), the ReLU6 rules."""

    def __init__(self, hi):
        super().__init__()
        self.hi = hi

    def forward(self, x):
        return x.clamp(0, self.hi)


def _basic_conv_forward(self, x):
    return self.relu(self.bn(self.conv(x)))


def captum_twin(model):
    twin = copy.deepcopy(model)
    for m in list(twin.modules()):
        if hasattr(m, "inplace"):
            m.inplace = False
        for name, child in m.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(m, name, ClampReLU(6.0))
        if type(m).__name__ == "BasicConv2d" and not hasattr(m, "relu"):  # F.relu(bn(conv(x)), inplace=True)
            m.relu = nn.ReLU()
            m.forward = types.MethodType(_basic_conv_forward, m)
    return twin


class Protect(nn.Module):
    """The model goes on with a copy of the module's output, so that Captum's hook on the module keeps the
    values it produced whatever in-place op follows (`out += identity`, `result += input`)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs).clone()


def protect(twin, layer):
    """Wrap the twin's module `layer` in Protect; returns the module itself (for Captum to hook)."""
    parent, _, attr = layer.rpartition(".")
    owner = twin.get_submodule(parent) if parent else twin
    inner = getattr(owner, attr)
    setattr(owner, attr, Protect(inner))
    return inner


def captum_reference(twin, module, x, unit, mode):
    from captum import attr

    def select(o):
        t = o[0, unit.channel] if unit.y is None else o[0, unit.channel, unit.y, unit.x]
        return (t * t.detach()).sum().view(1)  # gradient seed: the activation itself, as zfnet seeds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = getattr(attr, CAPTUM[mode])(twin, module)
        return method.attribute(x[:1].clone(), select)[0]


# ----------------------------------------------------------------------------------------------------
# The rule table, again, as module hooks with closed-form derivatives.
def _phi(x):
    return torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _Phi(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def _gelu_d(m, x):
    if getattr(m, "approximate", "none") == "tanh":
        c = math.sqrt(2 / math.pi)
        u = torch.tanh(c * (x + 0.044715 * x ** 3))
        return 0.5 * (1 + u) + 0.5 * x * (1 - u * u) * c * (1 + 3 * 0.044715 * x * x)
    return _Phi(x) + x * _phi(x)


DERIVATIVE = {  # module class name (torch's and timm's) -> f'(x)
    "ReLU": lambda m, x: (x > 0).to(x.dtype),
    "ReLU6": lambda m, x: ((x > 0) & (x < 6)).to(x.dtype),
    "SiLU": lambda m, x: torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x))),
    "GELU": _gelu_d,
    "Hardswish": lambda m, x: torch.where(x < -3, 0.0, torch.where(x > 3, 1.0, (2 * x + 3) / 6)),
}
DERIVATIVE.update(Swish=DERIVATIVE["SiLU"], HardSwish=DERIVATIVE["Hardswish"])


class _Backward(torch.autograd.Function):
    """Output values as computed by the module; input gradient = rule(g)."""

    @staticmethod
    def forward(ctx, x, y, rule):
        ctx.rule = rule
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        return ctx.rule(g), None, None


def _is_gate(parent, child):
    return "SqueezeExc" in type(parent).__name__ and type(child).__name__ in ("Sigmoid", "Hardsigmoid", "HardSigmoid")


def _layer_norm_scale(m, x):
    if type(m).__name__.endswith("2d"):  # ConvNeXt's LayerNorm2d: over the channels of NCHW
        std = (x.var(1, unbiased=False, keepdim=True) + m.eps).sqrt()
        return m.weight.view(1, -1, 1, 1) / std
    dims = tuple(range(x.dim() - len(m.normalized_shape), x.dim()))
    return m.weight / (x.var(dims, unbiased=False, keepdim=True) + m.eps).sqrt()


def hooked_reference(model, x, layer, unit, mode):
    twin = copy.deepcopy(model)
    gates = {id(c) for p in twin.modules() for c in p.children() if _is_gate(p, c)}
    handles, seen = [], {}

    def hook(m, args, out):
        xin = args[0].detach()
        if id(m) in gates:
            rule = torch.zeros_like
        elif isinstance(m, nn.LayerNorm):
            if mode != "deconv":
                return None
            scale = _layer_norm_scale(m, xin)
            rule = lambda g: g * scale
        else:
            d = DERIVATIVE[type(m).__name__](m, xin)
            rule = (lambda g: g.clamp(min=0)) if mode == "deconv" else (lambda g: g.clamp(min=0) * d.clamp(min=0))
        return _Backward.apply(args[0], out.detach(), rule)

    def keep(m, a, o):  # a clone keeps the graph and the values, whatever in-place op follows
        seen.setdefault("a", o.clone())

    for name, m in twin.named_modules():
        if hasattr(m, "inplace"):
            m.inplace = False
        if type(m).__name__ in DERIVATIVE or isinstance(m, nn.LayerNorm) or id(m) in gates:
            handles.append(m.register_forward_hook(hook))
        elif type(m).__name__ in MODERN:
            raise AssertionError(f"the reference has no rule for {name} ({type(m).__name__})")
        if name == layer:
            handles.append(m.register_forward_hook(keep))
    leaf = x[:1].clone().requires_grad_(True)
    try:
        for p in twin.parameters():
            p.requires_grad_(False)
        twin(leaf)
    finally:
        for h in handles:
            h.remove()
    a = seen["a"]
    seed = torch.zeros_like(a)
    if unit.y is None:
        seed[0, unit.channel] = a.detach()[0, unit.channel]
    else:
        seed[0, unit.channel, unit.y, unit.x] = a.detach()[0, unit.channel, unit.y, unit.x]
    return torch.autograd.grad(a, leaf, seed)[0][0]


# ----------------------------------------------------------------------------------------------------
def captum_applies(model):
    return not any(type(m).__name__ in MODERN for m in model.modules())


# One test function, so that each network is built once for its three checks.
@pytest.mark.parametrize("check", ["project middle", "project deep", "mine"])
@pytest.mark.parametrize("name", NAMES)
def test_zoo_network(name, check, photos):
    if check == "mine":
        mining_equals_brute_force(name, photos)
    else:
        projections_equal_the_reference(name, check.split()[1], photos)


def projections_equal_the_reference(name, depth, photos):
    model, layers = zoo_model(name)
    _, x = photos
    layer = layers[depth == "deep"]
    c, y, xx = strongest(model, x, layer)
    # The middle unit is one activation (computed on its receptive field), the deep one a whole map.
    unit = parse_unit(f"{layer}:{c}@{y},{xx}" if depth == "middle" else f"{layer}:{c}")
    twin = captum_twin(model)  # Captum's rules for ReLU networks; its NeuronGradient for every network
    target = protect(twin, layer)
    results = {}
    for mode in ("deconv", "guided", "saliency"):
        ours = project(model, x[:1], [unit], mode)[0, 0]
        # The reference runs in the layout the engine's passes ran in (channels last on the CPU, unless the
        # model refused it): in float32 another summation order can flip a near-tied max-pool switch.
        xr = x[:1].contiguous(memory_format=passes._LAYOUT.get(model, torch.channels_last))
        if mode == "saliency" or captum_applies(model):
            ref = captum_reference(twin, target, xr, unit, mode)
        else:
            ref = hooked_reference(model, xr, layer, unit, mode)
        scale = ref.abs().max().item()
        assert scale > 0, f"{name} {unit} {mode}: the reference is zero"
        diff = (ours - ref).abs().max().item()
        assert diff <= TOL * scale, f"{name} {unit} {mode}: max diff {diff:.3g} vs max |ref| {scale:.3g}"
        results[mode] = ours
    # The three rules differ on every network (all equal would mean a rule was not applied).
    for a, b in [("deconv", "guided"), ("deconv", "saliency"), ("guided", "saliency")]:
        assert (results[a] - results[b]).abs().max() > 100 * TOL * results[b].abs().max(), (name, a, b)


def brute_force_maps(model, x, layers):
    """Each layer's maps, (N, C, h, w), from module hooks with one forward pass per image (no batching, no
    taps): what mining must agree with."""
    maps = {layer: [] for layer in layers}
    modules = dict(model.named_modules())
    hooks = [modules[layer].register_forward_hook(lambda m, a, o, n=layer: maps[n].append(o[0].clone()))
             for layer in layers]
    try:
        for i in range(len(x)):
            with torch.no_grad():
                model(x[i:i + 1])
    finally:
        for h in hooks:
            h.remove()
    return {layer: torch.stack(m) for layer, m in maps.items()}


def brute_force_top(a, k):
    """Per channel of maps a (N, C, h, w): the k largest spatial maxima, ties to the lower image index,
    location = first maximum in row-major order."""
    value, loc = a.flatten(2).max(2)  # first maximum
    C, N = a.shape[1], a.shape[0]
    rows = []
    for ch in range(C):
        order = sorted(range(N), key=lambda i: (-value[i, ch].item(), i))[:k]
        rows.append([(value[i, ch].item(), i, int(loc[i, ch]) // a.shape[-1], int(loc[i, ch]) % a.shape[-1])
                     for i in order])
    return rows


def mining_equals_brute_force(name, photos):
    model, layers = zoo_model(name)
    paths, x = photos
    res = mine(model, ImageDataset(paths, transform=PRE), list(layers), k=3, batch_size=2, progress=False)
    for layer, maps in brute_force_maps(model, x, layers).items():
        ref = brute_force_top(maps, 3)
        d = res.layers[layer]
        tol = 1e-5 * maps.abs().max().item()  # a batch of 2 and a batch of 1 round differently
        exact = 0
        for ch, entries in enumerate(ref):
            got = [(d["value"][ch, j].item(), int(d["image"][ch, j]), int(d["y"][ch, j]), int(d["x"][ch, j]))
                   for j in range(3)]
            assert all(abs(g[0] - e[0]) <= tol for g, e in zip(got, entries)), (name, layer, ch, got, entries)
            for v, i, y, xx in got:  # each entry is that image's maximum, where it says
                assert abs(maps[i, ch, y, xx].item() - v) <= tol and abs(maps[i, ch].max().item() - v) <= tol
            values = sorted(maps[:, ch].flatten(1).amax(1).tolist(), reverse=True)
            if all(abs(a - b) > tol for a, b in zip(values, values[1:])):  # no near-tie: the same images
                assert [g[1] for g in got] == [e[1] for e in entries], (name, layer, ch)
                exact += 1
        assert exact >= len(ref) // 2, (name, layer, exact)  # near-ties are the exception
