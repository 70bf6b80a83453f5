"""Correspondence (Table 1): sign change by hand, identical images give 0, real dogs, bad inputs, CLI."""

import json
import shutil

import numpy as np
import pytest
import torch
from shared_data import SHARED, SQUEEZENET_WEIGHTS, need_shared

from zfnet.core.errors import ZfnetError
from zfnet.data.samples import sample_dir
from zfnet.models.networks import zfnet
from zfnet.understanding.correspondence import correspondence, load_parts, sign_change

DOGS = SHARED / "data" / "dogs" / "parts.json"


def _tiny():
    torch.manual_seed(0)
    m = zfnet(num_classes=5, widths=(8, 16, 16, 16, 8), fc=16).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.3)
    return m


def _parts_file(tmp_path, entries):
    f = tmp_path / "parts.json"
    f.write_text(json.dumps({"images": entries}))
    return f


def test_sign_change_by_hand():
    eps = torch.tensor([[1.0, -1.0, 0.0, 2.0], [1.0, 1.0, 0.0, -2.0], [1.0, -3.0, 0.0, 2.0]])
    # pairs (0,1): 2 of 4 signs differ; (0,2): 0; (1,2): 2
    np.testing.assert_allclose(sign_change(eps), [0.5, 0.0, 0.5])


def test_identical_images_give_zero(tmp_path):
    img = sample_dir() / "chelsea_cat.jpg"
    for i in range(3):
        shutil.copy(img, tmp_path / f"cat{i}.jpg")
    entry = {"left_eye": [150, 120], "nose": [200, 200], "face_box": [1, 2, 3, 4]}
    f = _parts_file(tmp_path, [dict(file=f"cat{i}.jpg", **entry) for i in range(3)])
    r = correspondence(_tiny(), f, random_draws=3, seed=1)
    assert r.layers == ["relu5", "relu7"] and r.parts == ["left_eye", "nose"]  # face_box is a box, not a part
    for name in r.layers:
        for p in r.parts:
            assert r.table[name][p]["mean"] == 0.0 and r.table[name][p]["std"] == 0.0
            assert len(r.table[name][p]["pairs"]) == 3
        assert r.table[name]["random"]["mean"] > 0  # different random squares do change signs differently
        assert len(r.table[name]["random"]["pairs"]) == 9
    again = correspondence(_tiny(), f, random_draws=3, seed=1)
    assert again.table == r.table  # seeded
    assert "left_eye" in r.format() and "random" in r.markdown()


def test_bad_inputs(tmp_path):
    m = _tiny()
    img = sample_dir() / "chelsea_cat.jpg"  # 385 x 256
    shutil.copy(img, tmp_path / "a.jpg")
    shutil.copy(img, tmp_path / "b.jpg")
    with pytest.raises(ZfnetError, match="lies outside the 385x256 image"):
        correspondence(m, _parts_file(tmp_path, [{"file": "a.jpg", "nose": [500, 10]},
                                                 {"file": "b.jpg", "nose": [5, 10]}]))
    with pytest.raises(ZfnetError, match="outside the central 224x224 crop"):
        correspondence(m, _parts_file(tmp_path, [{"file": "a.jpg", "nose": [5, 10]},
                                                 {"file": "b.jpg", "nose": [200, 150]}]))
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    f = _parts_file(tmp_path, [{"file": n, "nose": [200, 150]} for n in ("a.jpg", "b.jpg", "bad.jpg")])
    r = correspondence(m, f, random_draws=1)
    assert len(r.files) == 2 and "bad.jpg" in r.skipped[0][1]
    f1 = _parts_file(tmp_path, [{"file": n, "nose": [200, 150]} for n in ("a.jpg", "bad.jpg")])
    with pytest.raises(ZfnetError, match="at least 2 readable images"):
        correspondence(m, f1)
    with pytest.raises(ZfnetError, match="unknown layer 'conv9'"):
        correspondence(m, f, layers=["conv9"])
    with pytest.raises(ZfnetError, match="unknown part 'tail'"):
        correspondence(m, f, parts=["tail"])
    with pytest.raises(ZfnetError, match="parts file not found"):
        correspondence(m, tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ZfnetError, match="cannot read parts file"):
        correspondence(m, tmp_path / "broken.json")
    with pytest.raises(ZfnetError, match="no part"):
        correspondence(m, _parts_file(tmp_path, [{"file": "a.jpg"}, {"file": "b.jpg"}]))


def test_real_dogs_cli(tmp_path):
    """The shared dogs with real SqueezeNet through the CLI: result.json schema, masks where the parts are."""
    from zfnet.cli import main

    need_shared(DOGS)
    entries, names = load_parts(DOGS)  # images found in ../imagenet-samples next to the dogs folder
    assert names == ["left_eye", "right_eye", "nose"] and all(e["file"].exists() for e in entries)
    out = tmp_path / "t1"
    rc = main(["correspond", "--parts", str(DOGS), "--weights", str(SQUEEZENET_WEIGHTS), "--draws", "2",
               "--layers", "features.12", "classifier.2", "--out", str(out), "--json"])
    assert rc == 0
    res = json.loads((out / "result.json").read_text())
    assert res["schema"] == 1 and list(res["layers"]) == ["features.12", "classifier.2"]
    for name in res["layers"]:
        assert set(res["layers"][name]) == {"left_eye", "right_eye", "nose", "random"}
        for key, v in res["layers"][name].items():
            assert 0 < v["mean"] < 1 and v["std"] >= 0
            assert len(v["pairs"]) == (10 if key != "random" else 20)
    assert len(res["files"]) == 5 and res["skipped"] == []
    # the Maltese's left eye at file (128, 101) -> input (101 - 58, 128 - 16) = (43, 112) under resize
    # 256 / centre crop 224, so the 30-px square starts at (28, 97)
    assert res["boxes"]["left_eye"][0] == [28, 58, 97, 127]
    assert "| nose |" in (out / "table1.md").read_text() and (out / "masks.png").exists()
    assert main(["correspond", "--parts", str(tmp_path / "x.json"), "--weights", str(SQUEEZENET_WEIGHTS),
                 "--out", str(out)]) == 2
