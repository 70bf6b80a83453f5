"""Taps hold each module's output as it was, whatever in-place op later writes into that tensor, without
copying outputs nothing writes into; a module called several times is one layer per call."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from nets import Block
from tiny import module_calls

from zfnet.core.errors import ZfnetError
from zfnet.inspect.layers import TapOverwritten, Unit, layer_table, parse_unit, run_with_taps, taps


def plain_hooks(model, x, names):
    """The reference: each named module's outputs, one per call, cloned by a plain hook as it returns."""
    calls = module_calls(model, x)
    return {n: [calls[c] for c in calls if c == n or c.startswith(n + "#")] for n in names}


class BasicConv2d(nn.Module):
    """torchvision's Inception / GoogLeNet unit: the ReLU writes into the batch norm's output."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = BasicConv2d(3, 4)
        self.block = Block(4, 4, inplace=False)  # the writes are functional: no module is inplace=True
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.block(self.stem(x))
        y = self.head(x)
        return y.relu_().mean((2, 3))  # a method in place on a module's output


def _net():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):  # statistics that leave negative values for the ReLUs to clip
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


LAYERS = ["stem.conv", "stem.bn", "stem", "block.conv1", "block.bn1", "block.relu", "block.bn2", "block.relu#2",
          "block", "head"]


def test_taps_equal_outputs_cloned_by_plain_hooks():
    net = _net()
    x = torch.randn(2, 3, 12, 12)
    ref = plain_hooks(net, x, ["stem.conv", "stem.bn", "stem", "block.conv1", "block.bn1", "block.relu",
                               "block.bn2", "block", "head"])
    with torch.no_grad():
        got = run_with_taps(net, x, LAYERS, stop=False)
    for name in LAYERS:
        module, _, k = name.partition("#")
        assert torch.equal(got[name], ref[module][int(k or 1) - 1]), name
    assert (got["stem.bn"] < 0).any() and (got["block.bn2"] < 0).any() and (got["head"] < 0).any()
    assert torch.equal(got["block.relu#2"], got["block"]) and not torch.equal(got["block.relu"], got["block"])


@pytest.mark.parametrize("layer", ["stem.bn", "block.bn2", "head"])
def test_a_tap_stopping_there_is_right_too(layer):
    net = _net()
    x = torch.randn(1, 3, 12, 12)
    ref = plain_hooks(net, x, [layer])[layer][0]
    assert torch.equal(run_with_taps(net, x, [layer])[layer], ref)
    assert torch.equal(run_with_taps(net, x, [layer, "block.relu#2"], stop=True)[layer], ref)


def test_copies_only_what_an_op_writes_into():
    net = _net()
    x = torch.randn(1, 3, 12, 12)
    seen = {}

    def hook(name):
        def fn(module, args, output):
            seen[name] = output.data_ptr()
        return fn

    handles = [dict(net.named_modules())[n].register_forward_hook(hook(n)) for n in ("stem.conv", "block.conv1",
                                                                                     "stem.bn")]
    with torch.no_grad():
        got = run_with_taps(net, x, ["stem.conv", "block.conv1", "stem.bn"], stop=False)
    for h in handles:
        h.remove()
    assert got["stem.conv"].data_ptr() == seen["stem.conv"]  # nothing writes there: no copy
    assert got["block.conv1"].data_ptr() == seen["block.conv1"]
    assert got["stem.bn"].data_ptr() != seen["stem.bn"]  # the in-place ReLU wrote there: copied first


def test_gradients_flow_through_a_copied_tap():
    net = _net()
    x = torch.randn(1, 3, 12, 12, requires_grad=True)
    act = run_with_taps(net, x, ["block.bn2", "block"], stop=False, detach=False)["block.bn2"]
    (g,) = torch.autograd.grad(act.sum(), x)
    ref_x = x.detach().clone().requires_grad_(True)
    b = net.block
    ref = b.bn2(b.conv2(b.relu(b.bn1(b.conv1(net.stem(ref_x))))))
    (g_ref,) = torch.autograd.grad(ref.sum(), ref_x)
    assert torch.equal(act, ref) and torch.allclose(g, g_ref, atol=1e-6)


def test_inference_mode():
    net = _net()
    x = torch.randn(1, 3, 12, 12)
    ref = plain_hooks(net, x, ["stem.bn", "block.bn2"])
    with torch.inference_mode():
        got = run_with_taps(net, x, ["stem.bn", "block.bn2"], stop=False)
    assert torch.equal(got["stem.bn"], ref["stem.bn"][0]) and torch.equal(got["block.bn2"], ref["block.bn2"][0])


class Hidden(nn.Module):
    """An in-place op the taps cannot watch (as inside TorchScript or a C++ extension)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        with torch._C.DisableTorchFunction():
            y.relu_()
        return y


def test_an_unwatched_in_place_op_is_caught_by_the_version_counter(capsys):
    torch.manual_seed(0)
    model = Hidden().eval()
    x = torch.randn(1, 3, 10, 10)
    ref = plain_hooks(model, x, ["conv"])["conv"][0]
    with torch.no_grad():
        with pytest.raises(TapOverwritten, match="'?conv'?.*overwritten in place"):
            with taps(model, ["conv"]) as t:
                model(x)
        assert torch.equal(run_with_taps(model, x, ["conv"], stop=False)["conv"], ref) and (ref < 0).any()
        assert "changed in place" in capsys.readouterr().err
        passes = []
        h = model.register_forward_pre_hook(lambda m, a: passes.append(1))
        assert torch.equal(run_with_taps(model, x, ["conv"], stop=False)["conv"], ref)
        h.remove()
        assert len(passes) == 1 and capsys.readouterr().err == ""  # copies from now on: one pass, no re-run
        with taps(model, ["conv"], copy=True) as t:
            model(x)
    assert torch.equal(t["conv"], ref)


def test_later_forward_passes_replace_the_values_and_restart_the_call_numbers():
    net = _net()
    a, b = torch.randn(1, 3, 12, 12), torch.randn(1, 3, 12, 12)
    with torch.no_grad(), taps(net, ["block.relu", "block.relu#2"]) as t:
        net(a)
        net(b)
    ref = plain_hooks(net, b, ["block.relu"])["block.relu"]
    assert torch.equal(t["block.relu"], ref[0]) and torch.equal(t["block.relu#2"], ref[1])


def test_layer_names_of_calls():
    net = _net()
    table = layer_table(net, 12)
    names = table.names()
    assert names.index("block.relu") < names.index("block.bn2") < names.index("block.relu#2") < names.index("block")
    assert table["block.relu#2"].module == "block.relu" and table["block.relu#2"].kind == "ReLU"
    assert table["block.relu#2"].field == table["block"].field != table["block.relu"].field
    assert table["block.relu#2"].parent == "block" and table["block"].parent is None
    u = parse_unit("block.relu#2:3@1,2", table)
    assert u == Unit("block.relu#2", 3, 1, 2) and str(u) == "block.relu#2:3@1,2"
    assert u.slug == "block.relu-2_3_y1_x2" and "#" not in u.slug
    for bad in ("block.relu#1:3", "block.relu#x:3", "#2:3"):
        with pytest.raises(ZfnetError, match="bad layer name"):
            parse_unit(bad)
    with pytest.raises(ZfnetError, match="unknown layer 'block.relu#3'"):
        parse_unit("block.relu#3:0", table)
    with torch.no_grad():
        assert "block.relu#3" not in run_with_taps(net, torch.zeros(1, 3, 12, 12), ["block.relu#3"])
