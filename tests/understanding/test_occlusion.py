"""Occlusion sensitivity (Fig. 7): hand-checked cases, incremental == naive == Captum, geometry, CLI."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from shared_data import SAMPLES, SQUEEZENET_WEIGHTS, need_shared

from zfnet.core.errors import ZfnetError
from zfnet.data.images import Preprocess, load_image
from zfnet.models.networks import zfnet
from zfnet.understanding.occlusion import occluded_outputs, occluder_boxes, occlusion


class RegionNet(nn.Module):
    """Two logits: +-(sum of the pixels in rows 8..15, cols 20..27); nothing else matters."""

    def forward(self, x):
        r = x[:, :, 8:16, 20:28].sum((1, 2, 3))
        return torch.stack([r, -r], 1)


def test_occluder_boxes_match_captum_convention():
    assert occluder_boxes(10, 4, 3) == [(0, 4), (3, 7), (6, 10)]
    assert occluder_boxes(10, 4, 4) == [(0, 4), (4, 8), (8, 10)]  # the last one truncated at the border
    assert occluder_boxes(5, 5, 2) == [(0, 5)]
    with pytest.raises(ZfnetError, match="exceeds"):
        occluder_boxes(5, 6, 1)


def test_region_model_hand_checked():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32) + 0.1  # all positive, so any occlusion of the region lowers the logit
    model = RegionNet()
    # The region model has no feature layers: compare its outputs directly.
    boxes = [(y0, y1, x0, x1) for y0, y1 in occluder_boxes(32, 4, 4) for x0, x1 in occluder_boxes(32, 4, 4)]
    out, _ = occluded_outputs(model, x, boxes, fill=0.0)
    clean = x[0, :, 8:16, 20:28].sum()
    for (y0, y1, x0, x1), o in zip(boxes, out):
        xo = x.clone()
        xo[:, :, y0:y1, x0:x1] = 0
        expect = xo[0, :, 8:16, 20:28].sum()
        assert torch.allclose(o[0], expect)
        touches = y0 < 16 and y1 > 8 and x0 < 28 and x1 > 20
        assert bool(o[0] < clean) == touches


def _tiny_zfnet():
    torch.manual_seed(1)
    m = zfnet(num_classes=7, widths=(8, 16, 16, 16, 8), fc=32).eval()
    for p in m.parameters():  # larger weights than the paper's 1e-2 init so the maps are not flat
        p.data.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("size,stride", [(32, 24), (17, 31), (60, 60)])
def test_incremental_equals_naive_zfnet(size, stride):
    m = _tiny_zfnet()
    x = torch.randn(1, 3, 224, 224)
    rows = occluder_boxes(224, size, stride)
    boxes = [(a, b, c, d) for a, b in rows for c, d in rows]
    o1, s1 = occluded_outputs(m, x, boxes, track="relu5", batch_size=50)
    o2, s2 = occluded_outputs(m, x, boxes, track="relu5", method="naive", batch_size=50)
    assert torch.allclose(o1, o2, rtol=1e-5, atol=1e-5 * o2.abs().max().item())
    assert torch.allclose(s1, s2, rtol=1e-5, atol=1e-5 * s2.abs().max().item())
    assert (o2 != o2[0]).any()  # the maps are not trivially constant


def test_incremental_equals_naive_and_captum_squeezenet(squeezenet):
    pytest.importorskip("captum")
    from captum.attr import Occlusion

    path = need_shared(SAMPLES) / "n02123045_tabby.jpg"
    if not path.exists():
        path = sorted(SAMPLES.glob("n02123045*"))[0]
    # A central 160 x 160 crop keeps the three runs (incremental, naive, Captum) quick. Float64: in float32
    # the three differ by rounding that depends on the CPU and the thread count (1.4e-6 seen), in float64
    # only the method can make them differ.
    squeezenet = copy.deepcopy(squeezenet).double()
    x = Preprocess.for_model(squeezenet)(load_image(path))[None, :, 32:192, 32:192].double().contiguous()
    S, T = 48, 37  # 5 x 5 positions, the last ones truncated at the border (as Captum does)
    fast = occlusion(squeezenet, x, size=S, stride=T, project_map=False)
    slow = occlusion(squeezenet, x, size=S, stride=T, method="naive", project_map=False)
    np.testing.assert_allclose(fast.prob, slow.prob, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fast.activity, slow.activity, rtol=1e-9, atol=1e-9 * np.abs(slow.activity).max())
    np.testing.assert_array_equal(fast.argmax_label, slow.argmax_label)
    assert fast.feature_map.startswith("features.12:")
    assert fast.prob.min() < fast.clean_prob - 0.05  # occlusion matters somewhere on a real photo

    captum = Occlusion(lambda t: squeezenet(t).softmax(-1)).attribute(
        x, sliding_window_shapes=(3, S, S), strides=(3, T, T), target=fast.label, baselines=0,
        perturbations_per_eval=16)
    ref = captum[0, 0].numpy()
    assert np.allclose(captum[0, 0], captum[0, 1])  # the window spans the channels
    # Captum divides by window counts it keeps in float32, so its float64 answer is rounded to float32.
    np.testing.assert_allclose(fast.pixel_attribution(), ref, rtol=2e-7, atol=1e-9)


def test_centres_in_file_pixels():
    pre = Preprocess()  # torchvision: shorter side 256, centre 224
    # 256 x 341 file: no resize, crop offset round(117 / 2) = 58 rows, 16 columns.
    y, x = pre.to_file(256, 341, 0.0, 0.0)
    assert (float(y), float(x)) == (58.0, 16.0)
    # 512 x 682 file: scale 2 both ways (resized 256 x 341)
    y, x = pre.to_file(512, 682, 0.0, 0.0)
    assert (float(y), float(x)) == pytest.approx((116.5, 32.5))
    yy, xx = pre.to_input(640, 480, *pre.to_file(640, 480, 100.0, 17.0))
    assert (float(yy), float(xx)) == pytest.approx((100.0, 17.0))


def test_bad_inputs(tmp_path):
    m = _tiny_zfnet()
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ZfnetError, match="broken.jpg"):
        occlusion(m, bad)
    x = torch.randn(1, 3, 224, 224)
    with pytest.raises(ZfnetError, match="unknown layer 'conv9'"):
        occlusion(m, x, layer="conv9", project_map=False)
    with pytest.raises(ZfnetError, match="label 9 out of range"):
        occlusion(m, x, label=9, project_map=False)
    with pytest.raises(ZfnetError, match="exceeds"):
        occlusion(m, x, size=300, project_map=False)


def test_figure_and_cli(tmp_path, squeezenet):
    from zfnet.cli import main

    img = need_shared(SAMPLES) / "n01440764_tench.jpg"
    img = img if img.exists() else sorted(SAMPLES.glob("*.jpg"))[0]
    out = tmp_path / "occ"
    rc = main(["occlude", "--weights", str(SQUEEZENET_WEIGHTS), str(img), "--size", "112", "--stride", "56",
               "--label", "0", "--out", str(out), "--json"])
    assert rc == 0
    res = json.loads((out / "result.json").read_text())
    assert res["schema"] == 1 and res["label"] == 0
    assert len(res["prob"]) == len(res["centers_y"]) == 3 and len(res["prob"][0]) == len(res["centers_x"]) == 3
    assert res["feature_map"].startswith("features.12:")
    assert np.array(res["argmax_label"]).shape == (3, 3) and np.array(res["activity"]).shape == (3, 3)
    assert (out / "occlusion.png").exists() and (out / "maps.npz").exists()
    assert main(["occlude", "--weights", str(SQUEEZENET_WEIGHTS), str(tmp_path / "none.jpg"), "--out",
                 str(out)]) == 2
