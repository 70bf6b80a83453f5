"""The atlas: result.json, pictures and site from a tiny model; resume (also after a kill -9 in the
projection phase); the CLI; real SqueezeNet on real photos (values recomputed, deep tiles that read)."""

import functools
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import PRE, Tiny, make_folder

from zfnet.cli import main
from zfnet.data.images import ImageDataset, Preprocess, load_image
from zfnet.engine.project import project
from zfnet.inspect.layers import layer_table, run_with_taps
from zfnet.present.tiles import PAD, Q_STRETCH, SPRITE_GAP
from zfnet.understanding.atlas import atlas
from zfnet.understanding.atlas_tiles import image_view, unit_picture

LAYERS = ["relu1", "relu2"]
TESTS = Path(__file__).resolve().parents[1]
HOSTILE_CLASS = 'we<i>rd "dogs"'


def class_folders(root: Path) -> Path:
    make_folder(root / "cats", n=6, seed=0)
    make_folder(root / HOSTILE_CLASS, n=6, seed=1)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("atlas")
    folder = class_folders(root / "imgs")
    model = Tiny()
    res = atlas(model, folder, root / "out", LAYERS, k=4, batch_size=8, preprocess=PRE, progress=False,
                model_name="tiny")
    return model, folder, root / "out", res


def test_result_json_and_files(built):
    model, folder, out, res = built
    meta = json.loads((out / "result.json").read_text())
    assert meta["schema"] == 2 and meta["model"] == "tiny" and meta["images"] == 16
    assert list(meta["layers"]) == LAYERS and len(meta["layers"]["relu1"]) == 6
    assert meta["dead"] == {"relu1": [5], "relu2": []} and meta["classes"] == ["cats", HOSTILE_CLASS]
    table = layer_table(model, (32, 32))
    for layer in LAYERS:
        d = res.mined.layers[layer]
        f = table[layer].field
        fh, fw = meta["tiles"][layer]["field"]
        assert (fh, fw) == (min(f.size_y, 32), min(f.size_x, 32))
        for ch, entries in meta["layers"][layer].items():
            c = int(ch)
            n = int((d["image"][c, :4] >= 0).sum())
            assert len(entries) == n and [e["index"] for e in entries] == d["image"][c, :n].tolist()
            assert [e["value"] for e in entries] == d["value"][c, :n].tolist()
            for e in entries:
                assert (folder / e["image"]).is_file() and e["value"] > 0
                y0, y1, x0, x1 = e["box"]
                assert (y0, y1, x0, x1) == table[layer].window(e["y"], e["x"], (32, 32))
                fy0, fx0 = f.start_y + e["y"] * f.jump_y, f.start_x + e["x"] * f.jump_x
                assert e["at"] == [y0 - fy0, x0 - fx0]  # the clipped box keeps its place in the field
                src = meta["sources"][str(e["index"])]
                assert src["label"] == Path(e["image"]).parts[0] and src["file"] == e["image"]
                assert (out / src["view"]).is_file()
            u = meta["units"][layer][ch]
            assert u["max"] == (entries[0]["value"] if entries else None)
            assert u["fires"] == int(res.mined.stats[layer]["fires"][c])
            assert (out / unit_picture(layer, c)).exists() and (out / f"units/{layer}_{c}.html").exists()
        assert (out / meta["figures"][layer]["panel"]).exists() and (out / meta["figures"][layer]["thumb"]).exists()
    assert (out / "index.html").exists() and (out / "search.js").exists() and (out / "atlas.js").exists()
    npz = np.load(out / "mine.npz")
    assert np.array_equal(npz["relu2.image"], res.mined.layers["relu2"]["image"].numpy())
    assert np.array_equal(npz["predictions"], res.mined.predictions.numpy())


def test_class_tags_count_the_top_images(built):
    """Tags: the most frequent labels (class folders) and predictions among each unit's top N images."""
    model, folder, out, res = built
    meta = res.meta
    mined = res.mined
    for layer in LAYERS:
        for c in range(6 if layer == "relu1" else 5):
            top = [i for i in mined.layers[layer]["image"][c, :50].tolist() if i >= 0]
            u = meta["units"][layer][str(c)]
            want = {}
            for i in top:
                name = meta["classes"][mined.labels[i]]
                want[name] = want.get(name, 0) + 1
            assert {n: k for n, k in u["labels"]} == want and u["top_n"] == len(top)
            assert sum(k for _, k in u["predicted"]) == len(top) or len(u["predicted"]) == 3


def _sprite_tile(sprite: np.ndarray, j: int, size) -> np.ndarray:
    th, tw = size
    r, col = divmod(j, 3)
    y, x = SPRITE_GAP + r * (th + SPRITE_GAP), SPRITE_GAP + col * (tw + SPRITE_GAP)
    return sprite[y:y + th, x:x + tw].astype(int)


def test_sprites_are_the_projections_in_their_fields(built):
    """Tile j of a unit's sprite is entry j's deconvnet projection (computed here on the full image),
    cut to the receptive field, placed where the field lies, stretched to the Q_STRETCH quantile of |p|,
    enlarged by an integer factor; outside the image it is PAD. Checked at the centre of every enlarged
    input pixel (the pictures are lossy)."""
    model, folder, out, res = built
    ds = ImageDataset(res.mined.paths, transform=PRE)
    meta = res.meta
    errors = []
    for layer in LAYERS:
        fh, fw = meta["tiles"][layer]["field"]
        th, tw = meta["tiles"][layer]["size"]
        s = th // fh
        assert th == fh * s and tw == fw * s and s >= 2  # small fields: an integer enlargement
        for c in range(2):
            sprite = np.asarray(Image.open(out / unit_picture(layer, c)).convert("RGB"))
            assert sprite.shape == (SPRITE_GAP + 2 * (th + SPRITE_GAP), SPRITE_GAP + 3 * (tw + SPRITE_GAP), 3)
            for j, e in enumerate(meta["layers"][layer][str(c)]):
                x = ds[e["index"]][0][None].double()
                g = project(model, x, [f"{layer}:{c}@{e['y']},{e['x']}"], pairs=True)[0]
                y0, y1, x0, x1 = e["box"]
                oy, ox = e["at"]
                win = g[:, y0:y1, x0:x1].numpy()
                mags = np.sort(np.abs(win).ravel())[::-1]
                scale = mags[math.ceil((1 - Q_STRETCH) * mags.size) - 1] or mags[0]
                want = np.tile(np.array(PAD, float), (fh, fw, 1))
                shown = 255 * (0.5 + 0.5 * np.clip(win / scale, -1, 1))
                want[oy:oy + y1 - y0, ox:ox + x1 - x0] = shown.transpose(1, 2, 0)
                tile = _sprite_tile(sprite, j, (th, tw))
                centres = tile[s // 2::s, s // 2::s]
                errors.append(np.abs(centres - want))
    err = np.concatenate([e.ravel() for e in errors])
    assert np.median(err) <= 2 and np.percentile(err, 99) <= 24, (np.median(err), np.percentile(err, 99))


def test_dead_unit_sprite_is_blank_and_views_are_the_inputs(built):
    model, folder, out, res = built
    dead = np.asarray(Image.open(out / unit_picture("relu1", 5)).convert("RGB")).astype(int)
    assert (dead >= 250).all()  # nothing fires: no tile at all
    ds = ImageDataset(res.mined.paths, transform=PRE)
    for i in {e["index"] for e in res.meta["layers"]["relu2"]["0"]}:
        view = np.asarray(Image.open(out / image_view(i)).convert("RGB")).astype(int)
        want = (PRE.unnormalize(ds[i][0]).permute(1, 2, 0).numpy() * 255 + 0.5).astype(int)
        # JPEG of uniform noise (the worst case) is off by ~10 levels; another image would be by ~85
        assert view.shape == want.shape and np.abs(view - want).mean() < 14


def test_values_are_recomputed(built):
    model, folder, out, res = built
    ds = ImageDataset(res.mined.paths, transform=PRE)
    for layer in LAYERS:
        d = res.mined.layers[layer]
        for c in range(d["value"].shape[0]):
            if int(d["image"][c, 0]) < 0:
                continue
            i, y, x = (int(d[key][c, 0]) for key in ("image", "y", "x"))
            a = run_with_taps(model, ds[i][0][None].double(), [layer])[layer][0, c]
            assert float(a[y, x]) == pytest.approx(float(d["value"][c, 0]), rel=1e-9)
            assert float(a.max()) == float(a[y, x])


def test_images_are_decoded_once_per_run(built, tmp_path, monkeypatch):
    import zfnet.understanding.atlas_tiles as tiles_mod

    monkeypatch.setattr(tiles_mod, "CHUNK_PAIRS", 4)  # one unit per chunk: many chunks share images
    model, folder, _, _ = built
    res = atlas(model, folder, tmp_path / "o", LAYERS, k=4, batch_size=8, preprocess=PRE, progress=False)
    used = {e["index"] for layer in LAYERS for es in res.meta["layers"][layer].values() for e in es}
    assert res.meta["timing"]["decoded"] == len(used)


def test_resume_skips_finished_layers(built, tmp_path):
    model, folder, _, _ = built
    out = tmp_path / "o"
    atlas(model, folder, out, LAYERS, k=2, batch_size=8, preprocess=PRE, progress=False)
    png = out / unit_picture("relu1", 0)
    before = png.stat().st_mtime_ns
    res = atlas(model, folder, out, LAYERS, k=2, batch_size=8, preprocess=PRE, progress=False, resume=True)
    assert png.stat().st_mtime_ns == before and res.mined.images == 16 and res.meta["timing"]["decoded"] == 0
    atlas(model, folder, out, LAYERS, k=2, batch_size=8, preprocess=PRE, progress=False)  # no resume: redo
    assert png.stat().st_mtime_ns != before


_RUNNER = """
import os, sys, time
import torch
sys.path.insert(0, {tests!r})
from tiny import PRE, Tiny
import zfnet.understanding.atlas_tiles as tiles
from zfnet.understanding.atlas import atlas

tiles.CHUNK_PAIRS = 4  # one unit per chunk, so that a kill lands between chunks and inside one

class Slow(Tiny):
    def forward(self, x):
        if os.environ.get("SLOW") and torch.is_grad_enabled():  # the projection phase only
            time.sleep(0.4)
        return super().forward(x)

torch.set_num_threads(1)
atlas(Slow(), {folder!r}, sys.argv[1], ["relu1", "relu2"], k=4, batch_size=4, preprocess=PRE, progress=False,
      model_name="tiny", resume="--resume" in sys.argv)
"""


def _files(out: Path) -> dict[str, bytes]:
    got = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "mine-state.pt":
            data = p.read_bytes()
            if p.name == "result.json":
                meta = json.loads(data)
                meta.pop("timing")
                data = json.dumps(meta).encode()
            elif p.name == "index.html":
                data = re.sub(rb"<tr><th>time</th>.*?</tr>", b"", data)
            got[p.relative_to(out).as_posix()] = data
    return got


def test_kill_during_projection_resumes_to_identical_files(tmp_path):
    """kill -9 in the middle of the projection phase, then --resume: every file equals an uninterrupted
    run's (timing aside), finished chunks are not redone, and a temporary file that an interrupted write
    left behind is removed."""
    folder = class_folders(tmp_path / "imgs")
    script = tmp_path / "run.py"
    script.write_text(_RUNNER.format(tests=str(TESTS), folder=str(folder)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run([sys.executable, str(script), str(ref)], env=env, check=True, timeout=300)
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env={**env, "SLOW": "1"})
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list(out.glob("units/relu2_*"))) < 2:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        assert len(list(out.glob("units/relu2_*"))) >= 2, "no projection written in time"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "result.json").exists() and not (out / "index.html").exists()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("units/*")}
    assert 2 <= sum(n.startswith("relu2_") for n in done) < 5  # mid-layer, not at its end
    (out / "units" / ".relu2_4.webp.k1ll3d_x.webp").write_bytes(b"half a picture")  # an interrupted write
    subprocess.run([sys.executable, str(script), str(out), "--resume"], env=env, check=True, timeout=300)
    assert _files(out) == _files(ref)
    assert all((out / "units" / n).stat().st_mtime_ns == t for n, t in done.items())  # kept, not redone


def test_cli_atlas(tmp_path, capsys):
    folder = make_folder(tmp_path / "data" / "imgs", n=5)
    out = tmp_path / "out"
    rc = main(["atlas", "--model", "tiny:Tiny", "--weights", "none", "--data", str(folder), "--layers",
               "relu1", "--k", "3", "--out", str(out), "--batch-size", "4", "--json"])
    assert rc == 0
    cap = capsys.readouterr()
    summary = json.loads(cap.out)
    assert summary["images"] == 7 and summary["layers"] == ["relu1"] and summary["units"] == 6
    assert set(summary["dead"]) == {"relu1"} and summary["dead"]["relu1"] == len(json.loads(
        (out / "result.json").read_text())["dead"]["relu1"])
    meta = json.loads((out / "result.json").read_text())
    assert meta["schema"] == 2 and meta["model"] == "tiny:Tiny"
    e = meta["layers"]["relu1"]["0"][0]
    assert set(e) >= {"image", "value", "y", "x", "box"} and (folder / e["image"]).is_file()
    assert (out / "index.html").exists()
    rc = main(["atlas", "--model", "tiny:Tiny", "--weights", "none", "--data", str(folder), "--layers",
               "relu1", "--k", "3", "--out", str(tmp_path / "out2"), "--batch-size", "4"])
    cap = capsys.readouterr()
    assert rc == 0 and re.search(r"atlas of 7 images, 1 layer, 6 units \(\d dead\) in \d+:\d\d", cap.out)
    assert f"open {tmp_path / 'out2' / 'index.html'}" in cap.out
    assert "zfnet: project" in cap.err and "zfnet: project" not in cap.out  # progress lines on stderr
    rc = main(["atlas", "--model", "tiny:Tiny", "--weights", "none", "--data", str(folder), "--layers",
               "nope", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown layer 'nope'" in err and "Traceback" not in err
    (tmp_path / "file").write_text("x")
    rc = main(["atlas", "--model", "tiny:Tiny", "--weights", "none", "--data", str(folder), "--out",
               str(tmp_path / "file")])
    assert rc == 2 and "is a file" in capsys.readouterr().err


def test_source_names_are_relative_to_the_data_folder_through_symlinks(tmp_path):
    real = make_folder(tmp_path / "elsewhere" / "photos", n=5)
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for p in sorted(real.iterdir()):
        (data / "sub" / p.name).symlink_to(p)
    res = atlas(Tiny(), data, tmp_path / "out", ["relu2"], k=3, preprocess=PRE, progress=False, site=False)
    names = {e["image"] for es in res.meta["layers"]["relu2"].values() for e in es}
    assert names and all(n.startswith("sub/img") and not os.path.isabs(n) for n in names)


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
        for ch in rng.sample(sorted(c for c in chans if chans[c]), 4):
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


def test_deep_tiles_show_their_structure(squeezenet, tmp_path, monkeypatch):
    """Real SqueezeNet, real photos (the built-in demo), features.12: the RMS contrast (distance from grey
    over the in-image pixels) of the rendered tiles, as the atlas writes them. Scaled by each tile's
    maximum (what the atlas did before) they are grey fields with specks; stretched to the Q_STRETCH
    quantile their structure shows."""
    import zfnet.understanding.atlas_tiles as atlas_tiles
    from zfnet.data.samples import demo_dir
    from zfnet.engine.mine import mine
    from zfnet.present.tiles import projection_tiles
    from zfnet.understanding.atlas_tiles import Inputs, layer_layout, project_units

    pre = Preprocess.for_model(squeezenet)
    full = ImageDataset.from_folder(demo_dir(), pre)
    ds = ImageDataset(full.paths[::4], None, pre)  # 51 photos, one of every second class
    layer = "features.12"
    mined = mine(squeezenet, ds, [layer], k=3, batch_size=17, progress=False)
    info = layer_table(squeezenet, (224, 224))[layer]
    layout = layer_layout(info, (224, 224), 128)
    channels = [c for c in range(0, 512, 43) if mined.top(layer, c)]

    def contrast(q, out):
        monkeypatch.setattr(atlas_tiles, "projection_tiles", functools.partial(projection_tiles, q=q))
        project_units(squeezenet, mined, layer, info, layout, Inputs(ds, out), out, channels, k=3,
                      mode="deconv", device="cpu", dtype=torch.float32)
        rms = []
        for c in channels:
            sprite = np.asarray(Image.open(out / unit_picture(layer, c)).convert("RGB")).astype(float)
            for j in range(len(mined.top(layer, c))):
                t = _sprite_tile(sprite, j, layout.size)
                inside = np.abs(t - np.array(PAD)).sum(-1) > 12
                rms.append(np.sqrt(((t[inside] - 128) ** 2).mean()) / 128)
        return float(np.median(rms))

    stretched = contrast(Q_STRETCH, tmp_path / "q")
    by_max = contrast(1.0, tmp_path / "max")
    assert stretched >= 0.08 and stretched >= 2.5 * by_max, (stretched, by_max)


def test_chunks_hold_whole_units_within_their_bounds(monkeypatch):
    import zfnet.understanding.atlas_tiles as tiles_mod

    class Mined:  # unit c's top entries: images c .. c + 2
        def top(self, layer, c, k):
            return [{"index": c + j} for j in range(min(k, 3))]

    monkeypatch.setattr(tiles_mod, "CHUNK_PAIRS", 7)
    got = tiles_mod.chunks(Mined(), "l", list(range(6)), 3, image_bytes=1)
    assert got == [[0, 1], [2, 3], [4, 5]]  # 6 projections each: a third unit would make 9 > 7
    monkeypatch.setattr(tiles_mod, "CHUNK_PAIRS", 100)
    monkeypatch.setattr(tiles_mod, "CHUNK_INPUT_BYTES", 5)
    got = tiles_mod.chunks(Mined(), "l", list(range(6)), 3, image_bytes=1)
    assert got == [[0, 1, 2], [3, 4, 5]]  # images 0..4, then 3..7: at most 5 distinct images each
    assert tiles_mod.chunks(Mined(), "l", [7], 3, image_bytes=10) == [[7]]  # a unit alone may exceed it
