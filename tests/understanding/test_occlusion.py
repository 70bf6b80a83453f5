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
    with pytest.raises(ZfnetError, match="size 6 exceeds the 5-pixel input"):
        occluder_boxes(5, 6, 1)
    with pytest.raises(ZfnetError, match="stride 5 exceeds its size 4"):  # pixels 4 and 9 never occluded
        occluder_boxes(10, 4, 5)


def test_region_model_hand_checked():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32) + 0.1  # all positive, so any occlusion of the region lowers the logit
    model = RegionNet()
    # The region model has no feature layers: compare its outputs directly.
    boxes = [(y0, y1, x0, x1) for y0, y1 in occluder_boxes(32, 4, 4) for x0, x1 in occluder_boxes(32, 4, 4)]
    out = occluded_outputs(model, x, boxes).outputs
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


@pytest.mark.parametrize("size,stride", [(32, 24), (31, 17), (60, 60)])
def test_incremental_equals_naive_zfnet(size, stride):
    m = _tiny_zfnet()
    x = torch.randn(1, 3, 224, 224)
    rows = occluder_boxes(224, size, stride)
    boxes = [(a, b, c, d) for a, b in rows for c, d in rows]
    fast = occluded_outputs(m, x, boxes, tracks=["relu5"], batch_size=50, method="incremental")
    slow = occluded_outputs(m, x, boxes, tracks=["relu5"], method="naive", batch_size=50)
    (o1, [s1]), (o2, [s2]) = (fast.outputs, fast.tracks), (slow.outputs, slow.tracks)
    assert fast.method == "incremental" and fast.positions == {"incremental": len(boxes), "naive": 0}
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
    before = x.clone()
    fast = occlusion(squeezenet, x, size=S, stride=T, project_map=False)
    slow = occlusion(squeezenet, x, size=S, stride=T, method="naive", project_map=False)
    assert torch.equal(x, before)  # the caller's image is never written into
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
    assert res["schema"] == 2 and res["label"] == 0 and res["size"] == [112, 112]
    assert len(res["prob"]) == len(res["centers_y"]) == 3 and len(res["prob"][0]) == len(res["centers_x"]) == 3
    assert res["feature_map"].startswith("features.12:")
    assert np.array(res["argmax_label"]).shape == (3, 3) and np.array(res["activity"]).shape == (3, 3)
    assert (out / "occlusion.png").exists() and (out / "maps.npz").exists()
    assert main(["occlude", "--weights", str(SQUEEZENET_WEIGHTS), str(tmp_path / "none.jpg"), "--out",
                 str(out)]) == 2


# ----------------------------------------------------------------------------------------------------
# Flexible occlusion: rectangles, per-axis strides, baselines, targets, batches.
class TinyCNN(nn.Module):
    def __init__(self, channels=3, classes=5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, 2),
                                      nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def _tiny(channels=3):
    torch.manual_seed(0)
    return TinyCNN(channels).double().eval()


def _captum(forward, x, window, strides, baseline, target):
    pytest.importorskip("captum")
    from captum.attr import Occlusion

    with torch.no_grad():
        return Occlusion(forward).attribute(x, sliding_window_shapes=(x.shape[1], *window),
                                            strides=(x.shape[1], *strides), baselines=baseline, target=target)[0, 0]


@pytest.mark.parametrize("method", ["naive", "incremental", "auto"])
@pytest.mark.parametrize("baseline", [0.5, "mean", "blur:2", "tensor"])
def test_rectangles_strides_and_baselines_match_captum(baseline, method):
    from zfnet.understanding.occlusion import baseline_image

    m = _tiny()
    torch.manual_seed(1)
    x = torch.randn(1, 3, 37, 29, dtype=torch.float64)
    if baseline == "tensor":
        baseline = torch.randn(3, 37, 29, dtype=torch.float64)
    r = occlusion(m, x, target="logit", size=(9, 5), stride=(4, 3), baseline=baseline, method=method,
                  project_map=False)
    assert r.size == (9, 5) and r.stride == (4, 3) and len(r.rows) == 8 and len(r.cols) == 9
    assert r.rows[-1] == (28, 37) and r.cols[-1] == (24, 29)
    ref = _captum(m, x, (9, 5), (4, 3), baseline_image(x, baseline)[0], r.label)
    np.testing.assert_allclose(r.pixel_attribution(), ref.numpy(), rtol=1e-7, atol=1e-9)
    assert r.method["method"] == ("naive" if method == "naive" else r.method["method"])
    assert (r.score != r.score[0, 0]).any()


def test_blur_and_mean_baselines():
    """The blurred copy is a Gaussian blur with edge pixels repeated (scipy's gaussian_filter, 'nearest');
    the mean baseline is each channel's own mean."""
    from scipy.ndimage import gaussian_filter

    from zfnet.understanding.occlusion import baseline_image

    torch.manual_seed(0)
    x = torch.rand(1, 3, 30, 41, dtype=torch.float64)
    for sigma in (1.5, 2.0, 4.0):
        got, name = baseline_image(x, f"blur:{sigma}")
        assert name == f"blur:{sigma:g}"
        np.testing.assert_allclose(got.numpy(), gaussian_filter(x.numpy(), (0, 0, sigma, sigma), mode="nearest",
                                                                truncate=3.0), rtol=1e-12, atol=1e-12)
    assert baseline_image(x, "blur")[1] == "blur:1.5"  # default: 1/20 of the shorter side
    mean, name = baseline_image(x, "mean")
    assert name == "mean" and torch.allclose(mean[0, :, 7, 3], x[0].mean((1, 2)))
    assert baseline_image(x, "0.25")[0].unique().tolist() == [0.25]
    with pytest.raises(ZfnetError, match="blur:SIGMA needs a positive SIGMA"):
        baseline_image(x, "blur:-1")
    with pytest.raises(ZfnetError, match="bad baseline 'grey'"):
        baseline_image(x, "grey")
    with pytest.raises(ZfnetError, match=r"does not broadcast to the image's \(3, 30, 41\)"):
        baseline_image(x, torch.zeros(2, 30, 41))


class _TwiceAct(nn.Module):
    """One activation module called twice: units of its second call are `act#2:...`."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, 2), nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.act(self.c2(self.act(self.c1(x)))).mean((2, 3)))


@pytest.mark.parametrize("method", ["naive", "incremental"])
def test_targets_logprob_and_units_match_captum(method):
    torch.manual_seed(0)
    m = _TwiceAct().double().eval()
    x = torch.randn(1, 3, 24, 20, dtype=torch.float64)
    kw = dict(size=(6, 4), stride=(3, 2), project_map=False, method=method)
    r = occlusion(m, x, target="logprob", label=2, **kw)
    np.testing.assert_allclose(r.pixel_attribution(), _captum(lambda t: m(t).log_softmax(-1), x, (6, 4), (3, 2), 0,
                                                              2).numpy(), rtol=1e-7, atol=1e-10)
    assert r.target == "logprob" and np.allclose(r.prob, np.exp(r.score))

    def second_call(t):  # what `act#2` outputs, computed without zfnet
        return torch.relu(m.c2(torch.relu(m.c1(t))))

    cases = {"act#2:1@3,2": lambda t: second_call(t)[:, 1, 3, 2], "act#2:3": lambda t: second_call(t)[:, 3].sum((1, 2)),
             "act:0@5,5": lambda t: torch.relu(m.c1(t))[:, 0, 5, 5], "fc:1": lambda t: m(t)[:, 1]}
    for unit, forward in cases.items():
        r = occlusion(m, x, target=unit, **kw)
        assert r.target == unit
        np.testing.assert_allclose(r.pixel_attribution(), _captum(forward, x, (6, 4), (3, 2), 0, None).numpy(),
                                   rtol=1e-7, atol=1e-10, err_msg=unit)
    with pytest.raises(ZfnetError, match="channel 4 out of range 0..3 for layer act#2"):
        occlusion(m, x, target="act#2:4", **kw)
    with pytest.raises(ZfnetError, match=r"location \(11,2\) outside the 11x9 output of layer act#2"):
        occlusion(m, x, target="act#2:0@11,2", **kw)
    with pytest.raises(ZfnetError, match="unknown layer 'nope'"):
        occlusion(m, x, target="nope:0", **kw)
    with pytest.raises(ZfnetError, match="was not called"):
        occlusion(m, x, target="act#3:0", **kw)


def test_a_batch_of_images_gives_one_result_each():
    m = _tiny()
    torch.manual_seed(2)
    xs = torch.randn(3, 3, 20, 20, dtype=torch.float64)
    batch = occlusion(m, xs, label=[0, 1, 2], size=7, stride=5, project_map=False)
    assert [r.label for r in batch] == [0, 1, 2]
    for x, lab, r in zip(xs, [0, 1, 2], batch):
        one = occlusion(m, x, label=lab, size=7, stride=5, project_map=False)
        np.testing.assert_allclose(r.prob, one.prob)
        np.testing.assert_allclose(r.activity, one.activity)
    assert len(occlusion(m, list(xs[:2]), size=7, stride=5, project_map=False)) == 2
    with pytest.raises(ZfnetError, match="2 labels for 3 images"):
        occlusion(m, xs, label=[0, 1], size=7, stride=5)


def test_layer_table_at_the_images_own_size_and_channels():
    """A one-channel model on 40 x 52 images, no layer given: the default layer is found on the image's own
    grid (it used to be looked up at 3 x 224 x 224, which this model cannot run)."""
    m = _tiny(channels=1)
    torch.manual_seed(3)
    x = torch.randn(1, 1, 40, 52, dtype=torch.float64)
    before = x.clone()
    r = occlusion(m, x, size=(40, 52), stride=1, method="naive")  # one position: the whole image
    assert r.feature_map.startswith("features.3:") and r.input_size == (40, 52) and r.score.shape == (1, 1)
    assert r.image is None and r.projection is not None and r.projection.shape == (1, 40, 52)
    assert torch.equal(x, before)  # the caller's image is never written into


def test_geometry_errors_name_the_axis():
    m = _tiny()
    x = torch.randn(1, 3, 20, 30, dtype=torch.float64)
    with pytest.raises(ZfnetError, match="occluder height size 21 exceeds the 20-pixel input"):
        occlusion(m, x, size=(21, 5))
    with pytest.raises(ZfnetError, match="occluder width stride 6 exceeds its size 5"):
        occlusion(m, x, size=(4, 5), stride=(2, 6))
    with pytest.raises(ZfnetError, match="occluder size must be an int or"):
        occlusion(m, x, size="big")
    with pytest.raises(ZfnetError, match="unknown occlusion method 'fast'"):
        occlusion(m, x, size=5, stride=5, method="fast", project_map=False)


def test_the_method_that_ran_is_reported(capsys):
    m = _tiny()
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    r = occlusion(m, x, size=8, stride=8, method="incremental", project_map=False)
    assert r.method["method"] == "incremental" and r.method["positions"] == {"incremental": 25, "naive": 0}
    assert r.to_json()["method"] == r.method
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["zfnet: occlusion by exact incremental inference: " + r.method["reason"]]
    r = occlusion(m, x, size=8, stride=8, method="naive", project_map=False)
    assert r.method == {"method": "naive", "reason": "requested", "positions": {"incremental": 0, "naive": 25}}


def test_cli_options_and_several_images(tmp_path, squeezenet):
    from zfnet.cli import main

    imgs = sorted(need_shared(SAMPLES).glob("*.jpg"))[:2]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "occ"
    rc = main(["occlude", "--weights", str(SQUEEZENET_WEIGHTS), str(imgs[0]), str(bad), str(imgs[1]),
               "--size", "96x64", "--stride", "64x48", "--baseline", "mean", "--target", "logit", "--out", str(out),
               "--json"])
    assert rc == 0
    index = json.loads((out / "result.json").read_text())
    assert [d["folder"] for d in index["images"]] == [imgs[0].stem, imgs[1].stem]
    assert index["skipped"][0]["file"] == str(bad) and "broken.jpg" in index["skipped"][0]["error"]
    res = json.loads((out / imgs[0].stem / "result.json").read_text())
    assert res["size"] == [96, 64] and res["stride"] == [64, 48] and res["baseline"] == "mean"
    assert res["target"] == "logit" and res["method"]["method"] in ("incremental", "naive")
    assert len(res["rows"]) == 3 and len(res["cols"]) == 5 and np.array(res["score"]).shape == (3, 5)
    assert (out / imgs[1].stem / "occlusion.png").exists()
    assert main(["occlude", str(imgs[0]), "--out", str(out), "--method", "fast"]) == 2  # argparse's exit code
    assert main(["occlude", "--weights", str(SQUEEZENET_WEIGHTS), str(imgs[0]), "--size", "48x", "--out",
                 str(out)]) == 2


@pytest.mark.parametrize("bad", ["nan", "inf", "blur:0", "blur:-1", "blur:x", "grey"])
def test_cli_refuses_a_bad_baseline_naming_the_option(capsys, bad):
    from zfnet.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["occlude", "x.jpg", "--out", "o", "--baseline", bad])
    assert e.value.code == 2 and "argument --baseline" in capsys.readouterr().err
    args = build_parser().parse_args(["occlude", "x.jpg", "--out", "o", "--baseline", "blur:2", "--fill", "-1.5"])
    assert args.baseline == "blur:2" and args.fill == -1.5  # (where both are given, --fill NUMBER is used)


@pytest.mark.parametrize("method", ["naive", "incremental"])
def test_panel_layer_and_target_unit_on_the_same_layer(method):
    """Panel (b) tracks a layer's channel totals and the target is one unit of the same layer: two values
    of one module call, both right (full passes used to keep only the last one recorded for the layer)."""
    torch.manual_seed(0)
    m = _TwiceAct().double().eval()
    x = torch.randn(1, 3, 24, 20, dtype=torch.float64)
    r = occlusion(m, x, layer="act#2", target="act#2:1@3,2", size=(6, 4), stride=(3, 2), project_map=False,
                  method=method)
    channel = int(r.feature_map.split(":")[1])
    boxes = [(y0, y1, x0, x1) for y0, y1 in r.rows for x0, x1 in r.cols]
    act, unit = [], []
    for y0, y1, x0, x1 in boxes:  # brute force: one occluded copy at a time, act#2 computed by hand
        xo = x.clone()
        xo[:, :, y0:y1, x0:x1] = 0
        with torch.no_grad():
            v = torch.relu(m.c2(torch.relu(m.c1(xo))))[0]
        act.append(float(v[channel].sum()))
        unit.append(float(v[1, 3, 2]))
    shape = (len(r.rows), len(r.cols))
    np.testing.assert_allclose(r.activity, np.reshape(act, shape), rtol=1e-10)
    np.testing.assert_allclose(r.score, np.reshape(unit, shape), rtol=1e-10)
    assert not np.allclose(r.activity, r.score)  # two different values of the one layer
