"""The atlas: pictures, result.json and site from a tiny model; the CLI; real SqueezeNet on real photos."""

import os
import random

import numpy as np
import pytest
from PIL import Image
from tiny import PRE, Tiny, make_folder

from zfnet.cli import main
from zfnet.data.images import ImageDataset, Preprocess, load_image
from zfnet.engine.project import project
from zfnet.inspect.layers import layer_table, run_with_taps
from zfnet.present.render import image_to_rgb
from zfnet.present.site import unit_files
from zfnet.understanding.atlas import atlas

LAYERS = ["relu1", "relu2"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("atlas")
    folder = make_folder(root / "imgs", n=10)
    model = Tiny()
    res = atlas(model, folder, root / "out", LAYERS, k=4, batch_size=8, preprocess=PRE, progress=False,
                model_name="tiny")
    return model, folder, root / "out", res


def test_result_json_and_files(built):
    model, folder, out, res = built
    meta = __import__("json").loads((out / "result.json").read_text())
    assert meta["schema"] == 1 and meta["model"] == "tiny" and meta["images"] == 11
    assert list(meta["layers"]) == LAYERS and len(meta["layers"]["relu1"]) == 6
    for layer in LAYERS:
        d = res.mined.layers[layer]
        for ch, entries in meta["layers"][layer].items():
            c = int(ch)
            assert [e["image"] for e in entries] == [os.path.basename(res.mined.paths[i]) for i in d["image"][c]]
            assert [e["value"] for e in entries] == d["value"][c].tolist()
            assert (folder / entries[0]["image"]).exists()
            files = unit_files(layer, c)
            for key in ("page", "proj", "patch"):
                assert (out / files[key]).exists(), files[key]
        assert (out / meta["figures"][layer]).exists()
    assert (out / "index.html").exists() and (out / "mine.npz").exists()
    npz = np.load(out / "mine.npz")
    assert np.array_equal(npz["relu2.image"], res.mined.layers["relu2"]["image"].numpy())


def test_pictures_are_the_projection_and_the_receptive_field(built):
    """Tile j of a unit = the input pixels of entry j's receptive-field window and the deconvnet projection
    of that unit cropped to the same window; the projection is zero outside the window (checked against a
    full-image projection, so nothing is cut off)."""
    model, folder, out, res = built
    table = layer_table(model, (32, 32))
    ds = ImageDataset(res.mined.paths, transform=PRE)
    layer, c = "relu2", 2
    d = res.mined.layers[layer]
    proj = np.asarray(Image.open(out / unit_files(layer, c)["proj"]))
    patch = np.asarray(Image.open(out / unit_files(layer, c)["patch"]))
    boxes = [table[layer].window(int(d["y"][c, j]), int(d["x"][c, j]), (32, 32)) for j in range(4)]
    ch = max(b[1] - b[0] for b in boxes)
    cw = max(b[3] - b[2] for b in boxes)
    for j, (y0, y1, x0, x1) in enumerate(boxes):
        i, y, x = (int(d[key][c, j]) for key in ("image", "y", "x"))
        g = project(model, ds[i][0][None].double(), [f"{layer}:{c}@{y},{x}"], pairs=True)[0]
        outside = g.clone()
        outside[:, y0:y1, x0:x1] = 0
        assert outside.abs().max() == 0
        assert g.abs().max() > 0 or d["value"][c, j] == 0
        r, col = divmod(j, 2)  # 2x2 grid, pad 2, cells as large as the largest tile
        ty, tx = 2 + r * (ch + 2), 2 + col * (cw + 2)
        want = image_to_rgb(PRE.unnormalize(ds[i][0])[:, y0:y1, x0:x1])
        assert np.array_equal(patch[ty:ty + y1 - y0, tx:tx + x1 - x0], want)
        dev = np.abs(proj[ty:ty + y1 - y0, tx:tx + x1 - x0].astype(int) - 128).sum(-1)
        gw = g[:, y0:y1, x0:x1].abs().sum(0).numpy()
        assert (dev[gw == 0] <= 1).all()  # zero -> mid grey
        if gw.max() > 0:
            py, px = np.unravel_index(gw.argmax(), gw.shape)
            assert dev[py, px] >= 120  # the strongest pixel -> (near) black or white


def test_values_are_recomputed(built):
    model, folder, out, res = built
    ds = ImageDataset(res.mined.paths, transform=PRE)
    for layer in LAYERS:
        d = res.mined.layers[layer]
        for c in range(d["value"].shape[0]):
            i, y, x = (int(d[key][c, 0]) for key in ("image", "y", "x"))
            a = run_with_taps(model, ds[i][0][None].double(), [layer])[layer][0, c]
            assert float(a[y, x]) == pytest.approx(float(d["value"][c, 0]), rel=1e-9)
            assert float(a.max()) == float(a[y, x])


def test_resume_skips_finished_layers(built, tmp_path):
    model, folder, _, _ = built
    out = tmp_path / "o"
    atlas(model, folder, out, LAYERS, k=2, batch_size=8, preprocess=PRE, progress=False)
    png = out / unit_files("relu1", 0)["proj"]
    before = png.stat().st_mtime_ns
    res = atlas(model, folder, out, LAYERS, k=2, batch_size=8, preprocess=PRE, progress=False, resume=True)
    assert png.stat().st_mtime_ns == before and res.mined.images == 11
    atlas(model, folder, out, LAYERS, k=2, batch_size=8, preprocess=PRE, progress=False)  # no resume: redo
    assert png.stat().st_mtime_ns != before


def test_cli_atlas(tmp_path, capsys):
    folder = make_folder(tmp_path / "data" / "imgs", n=5)
    out = tmp_path / "out"
    rc = main(["atlas", "--model", "tiny:Tiny", "--weights", "none", "--data", str(folder), "--layers",
               "relu1", "--k", "3", "--out", str(out), "--batch-size", "4", "--json"])
    assert rc == 0
    summary = __import__("json").loads(capsys.readouterr().out)
    assert summary["images"] == 7 and summary["layers"] == ["relu1"]
    meta = __import__("json").loads((out / "result.json").read_text())
    assert meta["schema"] == 1 and meta["model"] == "tiny:Tiny"
    e = meta["layers"]["relu1"]["0"][0]
    assert set(e) >= {"image", "value", "y", "x"} and (folder / e["image"]).is_file()
    assert (out / "index.html").exists()
    rc = main(["atlas", "--model", "tiny:Tiny", "--weights", "none", "--data", str(folder), "--layers",
               "nope", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown layer 'nope'" in err and "Traceback" not in err
    (tmp_path / "file").write_text("x")
    rc = main(["atlas", "--model", "tiny:Tiny", "--weights", "none", "--data", str(folder), "--out",
               str(tmp_path / "file")])
    assert rc == 2 and "is a file" in capsys.readouterr().err


def test_squeezenet_on_real_photos(squeezenet, imagenet_samples, tmp_path):
    """Real weights, 100 real photos, two layers: the atlas builds and recorded activations are what a
    fresh forward pass computes."""
    data = tmp_path / "photos"
    data.mkdir()
    files = sorted(p for p in imagenet_samples.iterdir() if p.is_file())[::10][:100]
    for p in files:
        os.symlink(p, data / p.name)
    layers = ["features.3.squeeze_activation", "features.9.squeeze_activation"]
    res = atlas(squeezenet, data, tmp_path / "out", layers, k=3, batch_size=25, progress=False, tile=48)
    meta = res.meta
    assert meta["images"] == 100 and not meta["skipped"]
    assert (tmp_path / "out" / "index.html").exists()
    pre = Preprocess.for_model(squeezenet)
    rng = random.Random(0)
    for layer in layers:
        chans = meta["layers"][layer]
        for ch in rng.sample(sorted(chans), 4):
            for e in chans[ch][:2]:
                x = pre(load_image(data / e["image"]))[None]
                a = run_with_taps(squeezenet, x, [layer])[layer][0, int(ch)]
                assert float(a[e["y"], e["x"]]) == pytest.approx(e["value"], rel=1e-4, abs=1e-5)
                assert float(a.max()) == pytest.approx(e["value"], rel=1e-4, abs=1e-5)
            # and no other photo beats the recorded best (spot check on a few)
            for p in rng.sample(files, 3):
                x = pre(load_image(p))[None]
                a = run_with_taps(squeezenet, x, [layer])[layer][0, int(ch)]
                assert float(a.max()) <= chans[ch][0]["value"] * (1 + 1e-4) + 1e-5
