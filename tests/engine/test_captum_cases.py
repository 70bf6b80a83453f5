"""Captum's own hand-computed projection tests, replayed through zfnet's public API.

Each case rebuilds a tiny model of Captum's test suite from its definition (pytorch/captum,
tests/helpers/basic_models.py and tests/helpers/classification_models.py) with the expected numbers
written in Captum's test, and asks `zfnet.engine.project.project` for the same thing: seed "one" for
Captum's neuron attributions, `target=` for its output attributions. Captum computes attributions of
several inputs and of flat vectors; zfnet projects one (N, C, H, W) image tensor, so a case with several
inputs is run once per input with the others fixed (`Fixed`), and a vector input is laid out as a
(N, D, 1, 1) image (`Flat`): the same functions of the same numbers. Where a Captum test compares two of
its own methods ("matching"), zfnet's two corresponding calls are compared, and both with autograd.
Captum's Saliency reports |gradient| by default; zfnet's saliency is signed, so those cases compare
|zfnet|. Captum's cases that zfnet cannot express at all are listed at the end of this module.

Sources (pytorch/captum): tests/attr/test_deconvolution.py, tests/attr/test_guided_backprop.py,
tests/attr/test_saliency.py, tests/attr/neuron/test_neuron_gradient.py.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zfnet.engine.project import project


# ----------------------------------------------------------------------------------------------------
# Captum's tiny models, rebuilt from tests/helpers/basic_models.py and classification_models.py.
class BasicModel(nn.Module):
    def forward(self, input):
        return 1 - F.relu(1 - input)


class BasicModel5_MultiArgs(nn.Module):
    def forward(self, input1, input2, additional_input1, additional_input2=0):
        relu_out1 = F.relu(input1 - 1) * additional_input1[0]
        relu_out2 = F.relu(input2) * additional_input1[1]
        return F.relu(relu_out1 - relu_out2)[:, additional_input2]


class MultiRelu(nn.Module):
    def __init__(self, inplace=False):
        super().__init__()
        self.relu1 = nn.ReLU(inplace=inplace)
        self.relu2 = nn.ReLU(inplace=inplace)

    def forward(self, arg1, arg2):
        return self.relu1(arg1), self.relu2(arg2)


class BasicModel_MultiLayer(nn.Module):
    def __init__(self, inplace=False):
        super().__init__()
        self.linear0 = nn.Linear(3, 3)
        self.linear0.weight = nn.Parameter(torch.eye(3))
        self.linear0.bias = nn.Parameter(torch.zeros(3))
        self.linear1 = nn.Linear(3, 4)
        self.linear1.weight = nn.Parameter(torch.ones(4, 3))
        self.linear1.bias = nn.Parameter(torch.tensor([-10.0, 1.0, 1.0, 1.0]))
        self.linear1_alt = nn.Linear(3, 4)
        self.linear1_alt.weight = nn.Parameter(torch.ones(4, 3))
        self.linear1_alt.bias = nn.Parameter(torch.tensor([-10.0, 1.0, 1.0, 1.0]))
        self.multi_relu = MultiRelu(inplace=inplace)
        self.relu = nn.ReLU(inplace=inplace)
        self.linear2 = nn.Linear(4, 2)
        self.linear2.weight = nn.Parameter(torch.ones(2, 4))
        self.linear2.bias = nn.Parameter(torch.tensor([-1.0, 1.0]))

    def forward(self, x, add_input=None):
        input = x if add_input is None else x + add_input
        lin1_out = self.linear1(self.linear0(input))
        return self.linear2(self.relu(lin1_out))


class BasicModel_MultiLayer_MultiInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = BasicModel_MultiLayer()

    def forward(self, x1, x2, x3, scale):
        return self.model(scale * (x1 + x2 + x3))


class BasicModel_ConvNet_One_Conv(nn.Module):
    def __init__(self, inplace=False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, 1)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.fc1 = nn.Linear(8, 4)
        self.conv1.weight = nn.Parameter(torch.ones(2, 1, 3, 3))
        self.conv1.bias = nn.Parameter(torch.tensor([-50.0, -75.0]))
        self.fc1.weight = nn.Parameter(torch.cat([torch.ones(4, 5), -1 * torch.ones(4, 3)], dim=1))
        self.fc1.bias = nn.Parameter(torch.zeros(4))
        self.relu2 = nn.ReLU(inplace=inplace)

    def forward(self, x, x2=None):
        if x2 is not None:
            x = x + x2
        x = self.relu1(self.conv1(x))
        x = x.view(-1, 8)
        return self.relu2(self.fc1(x))


class BasicModel_ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, 1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(2, 4, 3, 1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(4, 8)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(8, 10)
        self.softmax = nn.Softmax(dim=1)
        self.fc1.weight = nn.Parameter(torch.ones(8, 4))
        self.fc2.weight = nn.Parameter(torch.ones(10, 8))

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = x.view(-1, 4)
        return self.softmax(self.fc2(self.relu3(self.fc1(x))))


class SoftmaxModel(nn.Module):
    def __init__(self, num_in, num_hidden, num_out, inplace=False):
        super().__init__()
        self.lin1 = nn.Linear(num_in, num_hidden)
        self.lin2 = nn.Linear(num_hidden, num_hidden)
        self.lin3 = nn.Linear(num_hidden, num_out)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.relu2 = nn.ReLU(inplace=inplace)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, input):
        lin1 = self.relu1(self.lin1(input))
        lin2 = self.relu2(self.lin2(lin1))
        return self.softmax(self.lin3(lin2))


# ----------------------------------------------------------------------------------------------------
# The two adapters (plain function composition, no rule of their own).
class Fixed(nn.Module):
    """net with all inputs but one fixed: forward(x) = net(*before, x, *after)."""

    def __init__(self, net, before=(), after=()):
        super().__init__()
        self.net, self.before, self.after = net, before, after

    def forward(self, x):
        return self.net(*self.before, x, *self.after)


class Flat(nn.Module):
    """A vector model seen as an image model: (N, D, 1, 1) -> net((N, D)); output made (N, classes)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        out = self.net(x.flatten(1))
        return out.unsqueeze(1) if out.dim() == 1 else out


def image(v):
    """A (N, D) tensor of Captum's test as a (N, D, 1, 1) image."""
    return torch.as_tensor(v, dtype=torch.float32).view(len(v), -1, 1, 1)


def close(ours, expected, delta=1e-4):
    expected = torch.as_tensor(expected, dtype=ours.dtype)
    assert ours.shape == expected.shape, (ours.shape, expected.shape)
    assert (ours - expected).abs().max().item() <= delta, (ours, expected)


def autograd_of(fn, x):
    """Plain autograd reference: d sum(fn(x)) / dx."""
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(fn(x).sum(), x)[0]


ARANGE = torch.arange(16, dtype=torch.float).view(1, 1, 4, 4)


# ----------------------------------------------------------------------------------------------------
# tests/attr/test_deconvolution.py and tests/attr/test_guided_backprop.py (same model, same inputs).
DECONV_EXP = [[2.0, 3.0, 3.0, 1.0], [3.0, 5.0, 5.0, 2.0], [3.0, 5.0, 5.0, 2.0], [1.0, 2.0, 2.0, 1.0]]
GUIDED_EXP = [[0.0, 1.0, 1.0, 1.0], [1.0, 3.0, 3.0, 2.0], [1.0, 3.0, 3.0, 2.0], [1.0, 2.0, 2.0, 1.0]]
GUIDED_MULTI_EXP = [[1.0, 2.0, 2.0, 1.0], [2.0, 4.0, 4.0, 2.0], [2.0, 4.0, 4.0, 2.0], [1.0, 2.0, 2.0, 1.0]]


@pytest.mark.parametrize("mode, expected", [("deconv", DECONV_EXP), ("guided", GUIDED_EXP)])
def test_simple_input_conv(mode, expected):
    # test_simple_input_conv_deconv / test_simple_input_conv_gb: Deconvolution / GuidedBackprop(net)
    # .attribute(inp, target=0): the output's class 0, seeded with one.
    net = BasicModel_ConvNet_One_Conv()
    close(project(net, ARANGE, target=0, mode=mode, crop=False)[0, 0], expected, 0.01)
    close(project(net, ARANGE, target=0, mode=mode)[0, 0], expected, 0.01)


@pytest.mark.parametrize("mode, expected", [("deconv", DECONV_EXP), ("guided", GUIDED_EXP)])
def test_simple_input_conv_neuron(mode, expected):
    # test_simple_input_conv_neuron_deconv / _neuron_gb: NeuronDeconvolution / NeuronGuidedBackprop
    # (net, net.fc1).attribute(inp, neuron_index=(0,)): a unit of a vector layer, seed one.
    net = BasicModel_ConvNet_One_Conv()
    close(project(net, ARANGE, ["fc1:0"], mode, seed="one")[0, 0, 0], expected, 0.01)


@pytest.mark.parametrize("mode, expected", [("deconv", DECONV_EXP), ("guided", GUIDED_MULTI_EXP)])
@pytest.mark.parametrize("neuron", [None, 3])
def test_simple_multi_input_conv(mode, expected, neuron):
    # test_simple_multi_input_conv_deconv / _gb (target=0) and test_simple_multi_input_conv_neuron_deconv
    # / _neuron_gb (fc1, neuron (3,)): inputs (arange, ones); the attribution of each input, the other fixed.
    net = BasicModel_ConvNet_One_Conv()
    inp, inp2 = ARANGE, torch.ones(1, 1, 4, 4)
    for model, x in ((Fixed(net, after=(inp2,)), inp), (Fixed(net, before=(inp,)), inp2)):
        if neuron is None:
            ours = project(model, x, target=0, mode=mode)[0, 0]
        else:
            ours = project(model, x, [f"net.fc1:{neuron}"], mode, seed="one")[0, 0, 0]
        close(ours, expected, 0.01)


@pytest.mark.parametrize("mode", ["deconv", "guided"])
def test_matching(mode):
    # test_deconv_matching / test_gb_matching: Deconvolution(target=i) == NeuronDeconvolution(relu2, (i,))
    # for every output i, on 100 * randn: here the target and the unit of the output layer, and Captum's
    # own answer where Captum is installed.
    torch.manual_seed(0)
    net = BasicModel_ConvNet_One_Conv()
    inp = 100.0 * torch.randn(1, 1, 4, 4)
    captum = pytest.importorskip("captum.attr")
    ref_cls = captum.Deconvolution if mode == "deconv" else captum.GuidedBackprop
    seen = 0
    for i in range(4):
        by_target = project(net, inp, target=i, mode=mode)
        by_unit = project(net, inp, [f"relu2:{i}"], mode, seed="one")[:, 0]
        assert torch.allclose(by_target, by_unit, atol=1e-6)
        assert torch.allclose(by_target, ref_cls(net).attribute(inp, target=i), atol=1e-4)
        seen += bool(by_target.abs().max() > 0)
    assert seen  # not all trivially zero


# ----------------------------------------------------------------------------------------------------
# tests/attr/test_saliency.py
BASIC_INPUT = [1.0, 2.0, 3.0, 0.0, -1.0, 7.0]
BASIC_GRADS = [0.0, 0.0, 0.0, 1.0, 1.0, 0.0]


def basic_image():
    # Captum's (6,) input to an elementwise model, laid out as one 1x1x1x6 image; no target: Captum
    # differentiates the sum of the outputs, which is zfnet's class 0 summed over its positions.
    return torch.tensor(BASIC_INPUT).view(1, 1, 1, 6)


def test_saliency_test_basic_vanilla():
    ours = project(BasicModel(), basic_image(), target=0, mode="saliency")
    close(ours.abs().flatten(), BASIC_GRADS, 0.5)  # Captum's _assert_attribution: delta 0.5, mode max
    close(ours.abs().flatten(), BASIC_GRADS, 0.0)  # and in fact exactly


@pytest.mark.parametrize("kind", ["smoothgrad", "vargrad"])
def test_saliency_test_basic_noise(kind):
    # test_saliency_test_basic_smoothgrad / _vargrad: NoiseTunnel, 10 samples, stdevs 2e-7 (Captum checks
    # the shape only). Here also the values: away from the kink at 1 the noise changes nothing (mean =
    # the gradient, variance 0); at the kink the gradient is 0 or 1, so the mean lies in [0, 1] and the
    # variance is p (1 - p) of the fraction p of ones.
    x = basic_image()
    ours = project(BasicModel(), x, target=0, mode="saliency", smooth=kind, samples=10, sigma=2e-7 / 8.0)
    assert ours.shape == x.shape
    flat = ours.flatten()
    smooth = [g for i, g in enumerate(BASIC_GRADS) if BASIC_INPUT[i] != 1.0]
    rest = flat[torch.tensor([v != 1.0 for v in BASIC_INPUT])]
    if kind == "smoothgrad":
        close(rest, smooth, 1e-6)
        assert 0.0 <= flat[0].item() <= 1.0
    else:
        close(rest, [0.0] * 5, 1e-6)
        p = project(BasicModel(), x, target=0, mode="saliency", smooth="smoothgrad", samples=10,
                    sigma=2e-7 / 8.0).flatten()[0].item()
        assert abs(flat[0].item() - p * (1 - p)) < 1e-6


def multiargs_case(large=False):
    """_get_multiargs_basic_config(_large): BasicModel5_MultiArgs with additional args ([2, 3], 1); the
    two inputs as the two channels of a (N, 2, 1, 3) image."""
    if large:
        x1 = torch.tensor([[10.5, 12.0, 34.3], [43.4, 51.2, 32.0]]).repeat_interleave(3, dim=0)
        x2 = torch.tensor([[1.0, 3.5, 23.2], [2.3, 1.2, 0.3]]).repeat_interleave(3, dim=0)
    else:
        x1 = torch.tensor([[1.5, 2.0, 34.3], [3.4, 1.2, 2.0]])
        x2 = torch.tensor([[3.0, 3.5, 23.2], [2.3, 1.2, 0.3]])
    net = BasicModel5_MultiArgs()

    class TwoChannels(nn.Module):
        def forward(self, x):
            return net(x[:, 0, 0], x[:, 1, 0], [2, 3], 1).unsqueeze(1)

    return TwoChannels(), torch.stack([x1, x2], 1).unsqueeze(2), lambda a, b: net(a, b, [2, 3], 1), x1, x2


def test_saliency_test_basic_multi_variable_vanilla():
    # Expected: compute_gradients (autograd) of the model, per input.
    model, x, fn, x1, x2 = multiargs_case()
    ours = project(model, x, target=0, mode="saliency")
    close(ours[:, 0, 0], autograd_of(lambda a: fn(a, x2), x1).abs(), 1e-6)
    close(ours[:, 1, 0], autograd_of(lambda b: fn(x1, b), x2).abs(), 1e-6)  # all 0: the final relu is off


@pytest.mark.parametrize("kind", ["smoothgrad", "vargrad"])
def test_saliency_test_basic_multi_variable_noise(kind):
    # test_saliency_test_basic_multi_variable_smoothgrad / test_saliency_test_basic_multi_vargrad
    # (stdevs 2e-7: Captum checks the shape; the mean is the gradient, the variance 0: no kink is near).
    model, x, fn, x1, x2 = multiargs_case()
    ours = project(model, x, target=0, mode="saliency", smooth=kind, samples=10,
                   sigma=2e-7 / float(x.max() - x.min()))
    assert ours.shape == x.shape
    if kind == "smoothgrad":
        close(ours[:, 0, 0], autograd_of(lambda a: fn(a, x2), x1), 1e-6)
    else:
        close(ours, torch.zeros_like(ours), 1e-9)


@pytest.mark.parametrize("kind, batch", [("smoothgrad", 2), ("smoothgrad_sq", 3), ("vargrad", 1), ("vargrad", 6)])
def test_saliency_test_basic_multivar_n_samples_batch_size(kind, batch):
    # test_saliency_test_basic_multivar_sg_n_samples_batch_size_2 / _3 (smoothgrad_sq) and
    # _vg_n_samples_batch_size_1 / _6: the same answer whatever the batching (here: bit for bit, the
    # noise being one seeded sequence).
    model, x, *_ = multiargs_case(large=True)
    kw = dict(target=0, mode="saliency", smooth=kind, samples=10, sigma=0.01)
    assert torch.equal(project(model, x, batch_size=batch, **kw), project(model, x, **kw))


def test_saliency_classification_vanilla():
    # test_saliency_classification_vanilla: SoftmaxModel(5, 20, 10), target 5; expected |d model(x)[:, 5] / dx|,
    # the softmax output itself: zfnet's score="prob". zfnet's default scores the logits before the
    # final softmax (Simonyan et al.), and says so.
    torch.manual_seed(0)
    model = SoftmaxModel(5, 20, 10)
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    expected = autograd_of(lambda v: model(v)[:, 5], x).abs()
    ours = project(Flat(model), image(x), target=5, mode="saliency", score="prob").view(1, 5)
    close(ours.abs(), expected, 1e-7)
    logit, info = project(Flat(model), image(x), target=5, mode="saliency", return_info=True)
    pre = autograd_of(lambda v: model.lin3(model.relu2(model.lin2(model.relu1(model.lin1(v)))))[:, 5], x)
    close(logit.view(1, 5), pre, 1e-6)
    assert "softmax" in info.score_source


@pytest.mark.parametrize("kind", ["smoothgrad", "vargrad"])
def test_saliency_classification_noise(kind):
    # test_saliency_classification_smoothgrad / _vargrad: stdevs 2e-4 (Captum checks the shape).
    torch.manual_seed(0)
    model = SoftmaxModel(5, 20, 10)
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    ours = project(Flat(model), image(x), target=5, mode="saliency", score="prob", smooth=kind, samples=10,
                   sigma=2e-4 / 4.0).view(1, 5)
    plain = autograd_of(lambda v: model(v)[:, 5], x)
    close(ours, plain if kind == "smoothgrad" else torch.zeros_like(plain), 1e-5 * plain.abs().max().item())


def test_saliency_grad_unchanged():
    x = basic_image().requires_grad_(True)
    x.grad = torch.randn_like(x)
    before = x.grad.clone()
    close(project(BasicModel(), x, target=0, mode="saliency").abs().flatten(), BASIC_GRADS, 0.0)
    assert torch.equal(x.grad, before)


# ----------------------------------------------------------------------------------------------------
# tests/attr/neuron/test_neuron_gradient.py: NeuronGradient = saliency of a unit, seed one.
@pytest.mark.parametrize("inplace, inp, unit, expected", [
    (False, [0.0, 100.0, 0.0], "linear2:0", [4.0, 4.0, 4.0]),  # test_simple_gradient_input_linear2
    (False, [0.0, 100.0, 0.0], "linear1:0", [1.0, 1.0, 1.0]),  # test_simple_gradient_input_linear1
    # test_simple_gradient_input_relu_inplace: attribute_to_neuron_input of the relu = linear1's output
    (True, [0.0, 5.0, 4.0], "linear1:0", [1.0, 1.0, 1.0]),
    (True, [0.0, 5.0, 4.0], "linear1:0", [1.0, 1.0, 1.0]),  # test_simple_gradient_input_linear1_inplace
    (False, [0.0, 5.0, 4.0], "relu:0", [0.0, 0.0, 0.0]),  # test_simple_gradient_input_relu
    (False, [0.0, 5.0, 4.0], "relu:1", [1.0, 1.0, 1.0]),  # test_simple_gradient_input_relu2
])
def test_simple_gradient_input(inplace, inp, unit, expected):
    model = Flat(BasicModel_MultiLayer(inplace=inplace))
    ours = project(model, image([inp]), [f"net.{unit}"], "saliency", seed="one")
    close(ours.view(3), expected)


@pytest.mark.parametrize("layer, scale, n_inputs, expected", [
    ("linear2", 3, 3, 12.0),  # test_simple_gradient_multi_input_linear2: inputs (inp1, inp2, inp3), scale 3
    ("linear1", 5, 2, 5.0),  # test_simple_gradient_multi_input_linear1: (inp1, inp2), (inp3, 5) fixed
])
def test_simple_gradient_multi_input(layer, scale, n_inputs, expected):
    inp = torch.tensor([[0.0, 100.0, 0.0]])
    net = BasicModel_MultiLayer_MultiInput()
    for free in range(n_inputs):  # each of Captum's inputs in turn, the others fixed
        others = [inp, inp, inp]
        model = Flat(Fixed(net, before=tuple(others[:free]), after=tuple(others[free + 1:]) + (scale,)))
        ours = project(model, image(inp), [f"net.net.model.{layer}:0"], "saliency", seed="one")
        close(ours.view(3), [expected] * 3)


def test_matching_output_gradient():
    # NeuronGradient(net, net.softmax, (i,)) == Saliency(abs=False) of that output, for every i, on
    # randn(2, 1, 10, 10): here a unit of the softmax layer, and the target scored as a probability.
    torch.manual_seed(0)
    net = BasicModel_ConvNet()
    inp = torch.randn(2, 1, 10, 10)
    for i in range(10):
        unit = project(net, inp, [f"softmax:{i}"], "saliency", seed="one")[:, 0]
        by_target = project(net, inp, target=i, mode="saliency", score="prob")
        ref = autograd_of(lambda v, i=i: net(v)[:, i], inp)
        assert torch.allclose(unit, ref, atol=1e-7) and torch.allclose(by_target, ref, atol=1e-7)


def test_matching_intermediate_gradient():
    # NeuronGradient(net, net.relu2, (i, 0, 0)) == Saliency of that neuron, on randn(3, 1, 10, 10).
    torch.manual_seed(0)
    net = BasicModel_ConvNet()
    inp = torch.randn(3, 1, 10, 10)
    units = [f"relu2:{i}@0,0" for i in range(4)]
    ours = project(net, inp, units, "saliency", seed="one")
    for k in range(4):
        ref = autograd_of(lambda v, k=k: F.relu(net.conv2(net.pool1(F.relu(net.conv1(v)))))[:, k, 0, 0], inp)
        assert torch.allclose(ours[:, k], ref, atol=1e-6)
    assert ours.abs().max() > 0


# ----------------------------------------------------------------------------------------------------
# Not expressible: none of the deconvolution, guided-backprop, saliency and neuron-gradient cases above
# is left out. (Captum's `additional_forward_args` and tuple inputs are expressed through `Fixed` and
# channels; its flat inputs through `Flat`.)
