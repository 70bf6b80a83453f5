"""Captum's own occlusion tests, replayed through zfnet.occlusion.

The tiny models below are rebuilt from Captum's tests/attr/helpers/basic_models.py (pytorch/captum), with
their fixed weights; the inputs and the hand-computed expected attributions are those of Captum's
tests/attr/test_occlusion.py, one zfnet test per Captum test (named in each docstring). Captum's
attribution is, per input pixel, the mean over the occluders covering it of (clean output - occluded
output) for the target output: zfnet's `OcclusionResult.pixel_attribution()` with target="logit".

How the cases are expressed: zfnet occludes images (N, C, H, W) with 2-D windows spanning all channels,
so a vector input of F features is a 1 x F image (a wrapper flattens it back), several examples are a
batch of images, and Captum's several inputs (each occluded while the others stay) are several runs, each
occluding one input while the model holds the others fixed (as buffers, so the engine sees constants).
Every case runs with each method (full passes, the incremental engine, and the automatic choice).

Not expressible: Captum's windows over the channel dimension (test_too_large_stride's third case) and
its progress-bar text (test_simple_input_with_show_progress; zfnet shows bars on terminals only); the
checks on the number of window / stride dimensions map to zfnet's one-line errors for sizes that are not
an int or (rows, cols) (test_improper_window_shape, test_improper_stride).
"""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zfnet.core.errors import ZfnetError
from zfnet.understanding.occlusion import occlusion

METHODS = ["naive", "incremental", "auto"]


@pytest.fixture(autouse=True)
def captum_seed():
    """Captum's BaseTest.setUp seeds torch with 1234 before each test: the layers whose parameters its models
    leave at their random init (the bias of BasicModel_ConvNet_One_Conv.fc1) start from the same draw."""
    torch.manual_seed(1234)


# ----------------------------------------------------------------------------------------------------
# Captum's tests/attr/helpers/basic_models.py, as defined there.
class BasicModel3(nn.Module):
    """f(x1, x2) = ReLU(ReLU(x1 - 1) - ReLU(x2))."""

    def forward(self, input1, input2):
        return F.relu(F.relu(input1 - 1) - F.relu(input2))


class BasicModel_MultiLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear0 = nn.Linear(3, 3)  # the identity
        self.linear0.weight = nn.Parameter(torch.eye(3))
        self.linear0.bias = nn.Parameter(torch.zeros(3))
        self.linear1 = nn.Linear(3, 4)
        self.linear1.weight = nn.Parameter(torch.ones(4, 3))
        self.linear1.bias = nn.Parameter(torch.tensor([-10.0, 1.0, 1.0, 1.0]))
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(4, 2)
        self.linear2.weight = nn.Parameter(torch.ones(2, 4))
        self.linear2.bias = nn.Parameter(torch.tensor([-1.0, 1.0]))

    def forward(self, x):
        return self.linear2(self.relu(self.linear1(self.linear0(x))))


class BasicModel_MultiLayer_MultiInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = BasicModel_MultiLayer()

    def forward(self, x1, x2, x3, scale):
        return self.model(scale * (x1 + x2 + x3))


class BasicModel_ConvNet_One_Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, 1)
        self.relu1 = nn.ReLU()
        self.fc1 = nn.Linear(8, 4)
        self.conv1.weight = nn.Parameter(torch.ones(2, 1, 3, 3))
        self.conv1.bias = nn.Parameter(torch.tensor([-50.0, -75.0]))
        self.fc1.weight = nn.Parameter(torch.cat([torch.ones(4, 5), -1 * torch.ones(4, 3)], dim=1))
        self.relu2 = nn.ReLU()

    def forward(self, x, x2=None):
        if x2 is not None:
            x = x + x2
        x = self.relu1(self.conv1(x))
        x = x.view(-1, 8)
        return self.relu2(self.fc1(x))


# ----------------------------------------------------------------------------------------------------
# Captum's inputs as zfnet images.
class Vector(nn.Module):
    """A model of vectors (N, F) on 1 x F images: the image is flattened back."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.flatten(1))


class Pair(nn.Module):
    """BasicModel3's two scalar inputs side by side in a 1 x 2 image. ints: run it on integers (Captum's
    int tests); floats: answer in floats (the wrapper of test_simple_multi_input_int_to_float); flat: one
    scalar per example (Captum's 0-d inputs)."""

    def __init__(self, ints=False, floats=False, flat=False):
        super().__init__()
        self.net, self.ints, self.floats, self.flat = BasicModel3(), ints, floats, flat

    def forward(self, x):
        a, b = x[:, :, :, 0].flatten(1), x[:, :, :, 1].flatten(1)
        if self.ints:
            a, b = a.long(), b.long()
        out = self.net(a, b)
        out = out.float() if self.floats else out
        return out[:, 0] if self.flat else out


class OneOf(nn.Module):
    """A multi-input model with every input but one held fixed (buffers): the image is input `which`."""

    def __init__(self, net, inputs, which, extra=(), conv=False):
        super().__init__()
        self.net, self.which, self.extra, self.conv = net, which, tuple(extra), conv
        for i, t in enumerate(inputs):
            self.register_buffer(f"in{i}", t.clone())
        self.n = len(inputs)

    def forward(self, x):
        x = x if self.conv else x.flatten(1)
        return self.net(*[x if i == self.which else getattr(self, f"in{i}") for i in range(self.n)], *self.extra)


def attribution(model, image, size, stride=1, baseline=0.0, method="auto", label=0):
    r = occlusion(model.eval(), image, label=label, target="logit", size=size, stride=stride, baseline=baseline,
                  method=method, project_map=False)
    return torch.tensor(r.pixel_attribution())


def assert_allclose(actual, expected, err_msg=""):
    """Captum's assertTensorAlmostEqual (its default mode "sum"): sum of |actual - expected| <= 1e-4."""
    actual, expected = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, err_msg
    assert float((actual - expected).abs().sum()) <= 1e-4, f"{err_msg}\n{actual}\n!=\n{expected}"


def vector_image(v):
    """A feature vector (F,) as a (1, 1, F) image."""
    return torch.as_tensor(v, dtype=torch.float32).view(1, 1, -1)


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_simple_input(method):
    """Captum test_simple_input: BasicModel_MultiLayer, window (1,), target 0."""
    got = attribution(Vector(BasicModel_MultiLayer()), vector_image([20.0, 50.0, 30.0]), (1, 1), method=method)
    assert_allclose(got, [[80.0, 200.0, 120.0]])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case,model", [("test_simple_multi_input", Pair()),
                                        ("test_simple_multi_input_int_to_int", Pair(ints=True)),
                                        ("test_simple_multi_input_int_to_float", Pair(ints=True, floats=True)),
                                        ("test_simple_multi_input_0d", Pair(flat=True))])
def test_simple_multi_input(case, model, method):
    """Captum test_simple_multi_input, _int_to_int, _int_to_float and _0d: BasicModel3 on two examples of
    two one-feature inputs (-10, -5) and (3, 1), window (1,) each, target 0 (None for the 0-d inputs):
    attributions ([0, 1], [0, -1]). Here each example is a 1 x 2 image (input1, input2); int_to_int runs
    the model on integers and answers in integers, int_to_float answers in floats (as its wrapper does)."""
    images = torch.tensor([[[[-10.0, -5.0]]], [[[3.0, 1.0]]]])  # (2 examples, 1, 1, 2)
    results = occlusion(model.eval(), images, label=0, target="logit", size=(1, 1), stride=1, method=method,
                        project_map=False)
    got = torch.tensor(np.array([r.pixel_attribution()[0] for r in results]))  # (example, input)
    assert_allclose(got[:, 0], [0.0, 1.0])  # input1's attributions per example
    assert_allclose(got[:, 1], [0.0, -1.0])  # input2's


@pytest.mark.parametrize("method", METHODS)
def test_simple_input_larger_shape(method):
    """Captum test_simple_input_larger_shape: window (2,), baseline tensor [10, 10, 10]."""
    got = attribution(Vector(BasicModel_MultiLayer()), vector_image([20.0, 50.0, 30.0]), (1, 2), method=method,
                      baseline=torch.tensor([10.0, 10.0, 10.0]).view(1, 1, 3))
    assert_allclose(got, [[200.0, 220.0, 240.0]])


@pytest.mark.parametrize("method", METHODS)
def test_simple_input_shape_with_stride(method):
    """Captum test_simple_input_shape_with_stride: window (2,), stride 2 (the last window truncated)."""
    got = attribution(Vector(BasicModel_MultiLayer()), vector_image([20.0, 50.0, 30.0]), (1, 2), stride=2,
                      method=method)
    assert_allclose(got, [[280.0, 280.0, 120.0]])


@pytest.mark.parametrize("method", METHODS)
def test_multi_sample_ablation(method):
    """Captum test_multi_sample_ablation: two examples, window (1,)."""
    images = torch.tensor([[2.0, 10.0, 3.0], [20.0, 50.0, 30.0]]).view(2, 1, 1, 3)
    results = occlusion(Vector(BasicModel_MultiLayer()).eval(), images, label=0, target="logit", size=(1, 1),
                        stride=1, method=method, project_map=False)
    got = torch.tensor(np.array([r.pixel_attribution()[0] for r in results]))
    assert_allclose(got, [[8.0, 35.0, 12.0], [80.0, 200.0, 120.0]])


INP1 = torch.tensor([[23.0, 100.0, 0.0], [20.0, 50.0, 30.0]])
INP2 = torch.tensor([[20.0, 50.0, 30.0], [0.0, 100.0, 0.0]])
INP3 = torch.tensor([[0.0, 100.0, 10.0], [2.0, 10.0, 3.0]])


@pytest.mark.parametrize("method", METHODS)
def test_multi_input_ablation_with_mask(method):
    """Captum test_multi_input_ablation_with_mask: BasicModel_MultiLayer_MultiInput(x1, x2, x3, scale=1),
    windows (3,), (1,), (2,), target 0. Its second part (x3 and the scale as additional forward arguments,
    only x1 attributed) has the same model and expectation for x1: one run covers both."""
    expected = ([[492.0, 492.0, 492.0], [400.0, 400.0, 400.0]],
                [[80.0, 200.0, 120.0], [0.0, 400.0, 0.0]],
                [[400.0, 420.0, 440.0], [48.0, 50.0, 52.0]])
    windows = [3, 1, 2]
    for which in range(3):
        for e in range(2):  # each example with its own fixed other inputs
            inputs = [t[e:e + 1] for t in (INP1, INP2, INP3)]
            model = OneOf(BasicModel_MultiLayer_MultiInput(), inputs, which, extra=(1,))
            got = attribution(model, vector_image(inputs[which][0]), (1, windows[which]), method=method)
            assert_allclose(got[0], expected[which][e], err_msg=f"input {which + 1}, example {e}")


@pytest.mark.parametrize("method", METHODS)
def test_multi_input_ablation_with_baselines(method):
    """Captum test_multi_input_ablation_with_baselines: windows (3,), (1,), (2,), strides (2, 1, 2),
    baselines: a tensor per example for x1, 3.0 for x2, one value per example for x3."""
    expected = ([[444.0, 444.0, 444.0], [328.0, 328.0, 328.0]],
                [[68.0, 188.0, 108.0], [-12.0, 388.0, -12.0]],
                [[368.0, 368.0, 24.0], [0.0, 0.0, -12.0]])
    baselines = (torch.tensor([[1.0, 4, 7], [3.0, 6, 9]]), torch.full((2, 3), 3.0),
                 torch.tensor([[4.0], [6]]).expand(2, 3))
    windows, strides = [3, 1, 2], [2, 1, 2]
    for which in range(3):
        for e in range(2):
            inputs = [t[e:e + 1] for t in (INP1, INP2, INP3)]
            model = OneOf(BasicModel_MultiLayer_MultiInput(), inputs, which, extra=(1,))
            got = attribution(model, vector_image(inputs[which][0]), (1, windows[which]), stride=(1, strides[which]),
                              baseline=baselines[which][e].reshape(1, 1, 3), method=method)
            assert_allclose(got[0], expected[which][e], err_msg=f"input {which + 1}, example {e}")


@pytest.mark.parametrize("method", METHODS)
def test_simple_multi_input_conv(method):
    """Captum test_simple_multi_input_conv: BasicModel_ConvNet_One_Conv(inp, inp2), inp = 0..15 as 4 x 4,
    inp2 = ones; windows (1, 4, 4) on both: 67 on inp, 13 on inp2; then windows (1, 2, 3) with strides
    (1, 2, 1) on inp and (1, 1, 2) with strides (1, 1, 2) on inp2 (rectangles, per-axis strides). The
    model adds the held input to the occluded one, convolves, then views as (-1, 8): the model that
    crashed the incremental engine."""
    inp = torch.arange(16, dtype=torch.float).view(1, 1, 4, 4)
    inp2 = torch.ones((1, 1, 4, 4))
    net = BasicModel_ConvNet_One_Conv()  # one model, as in Captum's test
    on_inp, on_inp2 = OneOf(net, [inp, inp2], 0, conv=True), OneOf(net, [inp, inp2], 1, conv=True)
    assert_allclose(attribution(on_inp, inp, (4, 4), method=method), 67 * torch.ones(4, 4))
    assert_allclose(attribution(on_inp2, inp2, (4, 4), method=method), 13 * torch.ones(4, 4))
    assert_allclose(attribution(on_inp, inp, (2, 3), stride=(2, 1), method=method),
                    [[17.0, 17.0, 17.0, 17.0], [17.0, 17.0, 17.0, 17.0],
                     [64.0, 65.5, 65.5, 67.0], [64.0, 65.5, 65.5, 67.0]])
    assert_allclose(attribution(on_inp2, inp2, (1, 2), stride=(1, 2), method=method),
                    [[3.0, 3.0, 3.0, 3.0], [3.0, 3.0, 3.0, 3.0], [3.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]])


def test_too_large_stride():
    """Captum test_too_large_stride, first two cases: a stride larger than the window along an axis would
    leave pixels never occluded (window (1, 1, 2) with stride 2; window (1, 4, 2) with strides (1, 2, 3))."""
    inp = torch.arange(16, dtype=torch.float).view(1, 1, 4, 4)
    model = BasicModel_ConvNet_One_Conv().eval()
    with pytest.raises(ZfnetError, match="occluder height stride 2 exceeds its size 1"):
        occlusion(model, inp, label=0, size=(1, 2), stride=2, project_map=False)
    with pytest.raises(ZfnetError, match="occluder width stride 3 exceeds its size 2"):
        occlusion(model, inp, label=0, size=(4, 2), stride=(2, 3), project_map=False)


def test_improper_window_shape_and_stride():
    """Captum test_improper_window_shape / test_improper_stride: windows and strides of the wrong
    dimensionality are refused (in zfnet: anything but an int or (rows, cols))."""
    inp = torch.arange(16, dtype=torch.float).view(1, 1, 4, 4)
    model = BasicModel_ConvNet_One_Conv().eval()
    with pytest.raises(ZfnetError, match="occluder size must be an int or"):
        occlusion(model, inp, label=0, size=(1, 1, 2), project_map=False)
    with pytest.raises(ZfnetError, match="occluder stride must be an int or"):
        occlusion(model, inp, label=0, size=(2, 2), stride=(1, 2, 2), project_map=False)
