"""The overlap check (Sec. 5.2): planted near-duplicates of real photos are found, distinct photos are not."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from zfnet.cli import main
from zfnet.core.errors import ZfnetError
from zfnet.data.images import load_image
from zfnet.generalization.overlap import DEFAULT_THRESHOLD, find_overlap, thumbnails


def _variants(im):
    """Resized, re-encoded, slightly cropped (centred and off-centre) copies of one photo."""
    w, h = im.size
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=30)
    return {
        "small": im.resize((int(w * 0.6), int(h * 0.6)), Image.BILINEAR),
        "q30": Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
        "crop3": im.crop((int(0.03 * w), int(0.03 * h), w - int(0.03 * w), h - int(0.03 * h))),
        "skew": im.crop((int(0.05 * w), int(0.02 * h), w - int(0.01 * w), h - int(0.04 * h))).resize(
            (int(w * 0.5), int(h * 0.5))),
        "corner": im.crop((int(0.02 * w), int(0.02 * h), w, h)),
    }


@pytest.fixture(scope="module")
def planted(imagenet_samples, tmp_path_factory):
    files = sorted(imagenet_samples.iterdir())
    root = tmp_path_factory.mktemp("overlap")
    a, b = root / "a", root / "b"
    a.mkdir()
    b.mkdir()
    expected = set()
    for k in range(0, 1000, 125):  # 8 originals in A, 5 copies each in B
        im = load_image(files[k])
        im.save(a / f"{k}.png")
        for name, v in _variants(im).items():
            v.save(b / f"{k}_{name}.jpg", quality=90)
            expected.add((f"{k}.png", f"{k}_{name}.jpg"))
    for k in range(3, 1000, 53):  # distinct photos on both sides
        load_image(files[k]).save(a / f"d{k}.png")
        load_image(files[k + 21]).save(b / f"d{k + 21}.jpg")  # never one of the originals
    return a, b, expected


def test_planted_copies_found_and_distinct_photos_not(planted):
    a, b, expected = planted
    r = find_overlap(a, b, progress=False)
    found = {(p["a"].split("/")[-1], p["b"].split("/")[-1]) for p in r.pairs}
    assert found == expected
    assert all(p["score"] >= DEFAULT_THRESHOLD for p in r.pairs)
    assert [p["score"] for p in r.pairs] == sorted((p["score"] for p in r.pairs), reverse=True)
    assert r.n_a == 8 + 19 and r.n_b == 40 + 19


def test_plain_thumbnails_would_miss_the_crops(planted):
    # Why the zooms exist: one 32x32 thumbnail of the whole frame scores a 3%-cropped copy far lower.
    a, b, _ = planted
    t_orig, _, _ = thumbnails([a / "0.png"], zooms=(1.0,), blur=0, progress=False)
    t_crop, _, _ = thumbnails([b / "0_crop3.jpg"], zooms=(1.0,), blur=0, progress=False)
    plain = float(t_orig[0, 0] @ t_crop[0, 0])
    zoomed = find_overlap([a / "0.png"], [b / "0_crop3.jpg"], threshold=-1, progress=False).pairs[0]["score"]
    assert zoomed > plain and zoomed >= DEFAULT_THRESHOLD


def test_thumbnails_are_normalized_correlations(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    Image.fromarray((arr // 2 + 60).astype(np.uint8)).save(tmp_path / "dim.png")  # brightness/contrast change
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(tmp_path / "flat.png")
    t, kept, _ = thumbnails([tmp_path / "x.png", tmp_path / "dim.png", tmp_path / "flat.png"], size=16,
                            zooms=(1.0,), blur=0, progress=False)
    assert t.shape == (1, 3, 256)
    np.testing.assert_allclose(np.linalg.norm(t[0, :2], axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(t[0, :2].sum(1), 0, atol=1e-4)
    assert t[0, 0] @ t[0, 1] > 0.99  # correlation ignores brightness and contrast
    assert not t[0, 2].any()  # a flat image matches nothing
    # The same value by brute force: Pearson correlation of the two thumbnails.
    x = np.asarray(Image.fromarray(arr).resize((16, 16), Image.BOX), np.float64).ravel()
    y = np.asarray(Image.fromarray((arr // 2 + 60).astype(np.uint8)).resize((16, 16), Image.BOX),
                   np.float64).ravel()
    assert float(t[0, 0] @ t[0, 1]) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-4)


def test_within_one_set_each_pair_once_and_bad_files_skipped(tmp_path, imagenet_samples, capsys):
    files = sorted(imagenet_samples.iterdir())
    d = tmp_path / "d"
    d.mkdir()
    im = load_image(files[10])
    im.save(d / "one.png")
    im.resize((100, 80)).save(d / "two.jpg")
    load_image(files[500]).save(d / "other.png")
    (d / "broken.jpg").write_bytes(b"")
    r = find_overlap(d, d, progress=False)
    assert [(p["a"].split("/")[-1], p["b"].split("/")[-1]) for p in r.pairs] == [("one.png", "two.jpg")]
    assert len(r.skipped) == 1 and "broken.jpg" in r.skipped[0][0]

    assert main(["overlap", str(d), str(d), "--json"]) == 0
    out = capsys.readouterr()
    pairs = json.loads(out.out)
    assert len(pairs) == 1 and set(pairs[0]) == {"a", "b", "score"} and "broken.jpg" in out.err
    assert main(["overlap", str(d), str(d), "--threshold", "2"]) == 2
    assert "argument --threshold: must be in [-1, 1], got 2" in capsys.readouterr().err
    with pytest.raises(ZfnetError, match="no such file or folder"):
        find_overlap(tmp_path / "missing", d)
