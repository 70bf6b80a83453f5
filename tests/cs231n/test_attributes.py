"""Performance by image attributes: hand-counted groups, true classes from ImageNet file names, and
`zfnet predict DIR --by` on real SqueezeNet predictions checked against a brute-force count."""

import csv
import json
import os

import pytest
from PIL import Image
from shared_data import SQUEEZENET_WEIGHTS, need_shared

from zfnet.cli import main
from zfnet.core.errors import ZfnetError
from zfnet.cs231n.attributes import accuracy_by, read_attributes, size_bin, true_labels
from zfnet.models.predict import Prediction
from zfnet.models.weights import imagenet_classes


def _pred(file, *top):
    return Prediction(file, [{"index": c, "label": str(c), "prob": 0.1} for c in top])


def test_groups_are_counted_by_hand(tmp_path):
    files = [str(tmp_path / f"{c}.png") for c in "abcd"]
    for f, size in zip(files, [(30, 40), (300, 200), (100, 100), (2000, 1500)]):
        Image.new("RGB", size).save(f)
    preds = [_pred(files[0], 1, 2, 3, 4, 5), _pred(files[1], 2, 1, 3, 4, 5), _pred(files[2], 9, 8, 7, 6, 0),
             _pred(files[3], 3, 9, 9, 9, 9)]
    labels = {files[0]: 1, files[1]: 1, files[2]: 1, files[3]: 3}
    tags = {files[0]: "x", files[1]: "x", files[2]: "y", files[3]: "y"}
    b = accuracy_by(preds, labels, {"tag": tags, "class": None, "size": None}, categories=[str(i) for i in range(10)])
    assert b.overall == {"n": 4, "top1": 50.0, "top5": 75.0}
    assert b.groups["tag"] == {"x": {"n": 2, "top1": 50.0, "top5": 100.0}, "y": {"n": 2, "top1": 50.0, "top5": 50.0}}
    assert b.groups["class"]["1"] == pytest.approx({"n": 3, "top1": 100 / 3, "top5": 200 / 3})
    assert list(b.groups["size"]) == ["<64 px", "64-127 px", "128-255 px", ">=1024 px"]
    assert size_bin(files[1]) == "128-255 px"  # the shorter side, 200
    assert "tag" in b.format() and "top-1" in b.format()


def test_true_classes_from_imagenet_file_names_are_the_file_order(imagenet_samples):
    files = [str(p) for p in sorted(imagenet_samples.glob("*.jpg"))]
    labels = true_labels(files, list(imagenet_classes()))
    assert [labels[f] for f in files] == list(range(1000))  # file i has class i


def test_csv_rows_name_files_three_ways_and_unknown_rows_fail(tmp_path):
    files = [str(tmp_path / "d" / "a.png"), str(tmp_path / "d" / "sub" / "b.png")]
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "tag"])
        w.writerow(["a.png", "3", "red"])  # bare name
        w.writerow(["sub/b.png", "tench", ""])  # relative to the data folder
    table = read_attributes(tmp_path / "t.csv", files, tmp_path / "d")
    assert table["tag"] == {files[0]: "red", files[1]: "(empty)"}
    labels = true_labels(files, list(imagenet_classes()), given=table["label"])
    assert labels == {files[0]: 3, files[1]: 0}
    with open(tmp_path / "bad.csv", "w") as f:
        f.write("file,tag\nzzz.png,1\n")
    with pytest.raises(ZfnetError, match="line 2: 'zzz.png' is not one of the predicted images"):
        read_attributes(tmp_path / "bad.csv", files, tmp_path / "d")
    with pytest.raises(ZfnetError, match="no true classes"):
        true_labels(files, ["cat", "dog"])


def test_cli_by_csv_class_and_size_on_real_predictions(tmp_path, capsys, imagenet_samples):
    w = str(need_shared(SQUEEZENET_WEIGHTS))
    every = sorted(imagenet_samples.glob("*.jpg"))
    picked = every[::25]  # 40 real photos; file i of the full set has class i
    data = tmp_path / "photos"
    data.mkdir()
    truth = {}
    for p in picked:
        os.symlink(p, data / p.name)
        truth[p.name] = every.index(p)
    with open(tmp_path / "tags.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["file", "grey"])
        for p in picked:
            with Image.open(p) as im:
                wr.writerow([p.name, "grey" if im.mode == "L" else "colour"])
    rc = main(["predict", "--weights", w, str(data), "--by", str(tmp_path / "tags.csv"), "--by", "class", "--by",
               "size", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and len(out["predictions"]) == 40
    hits = {}
    for p in out["predictions"]:
        y = truth[os.path.basename(p["file"])]
        top = [t["index"] for t in p["top5"]]
        hits[os.path.basename(p["file"])] = (top[0] == y, y in top)
    b = out["breakdown"]
    assert b["overall"]["n"] == 40
    assert b["overall"]["top1"] == pytest.approx(100 * sum(a for a, _ in hits.values()) / 40)
    assert b["overall"]["top5"] == pytest.approx(100 * sum(c for _, c in hits.values()) / 40)
    groups = {}
    with open(tmp_path / "tags.csv") as f:
        for row in csv.DictReader(f):
            groups.setdefault(row["grey"], []).append(hits[row["file"]])
    for value, hs in groups.items():
        n = len(hs)
        expect = {"n": n, "top1": 100 * sum(a for a, _ in hs) / n, "top5": 100 * sum(c for _, c in hs) / n}
        assert b["groups"]["grey"][value] == pytest.approx(expect)
    assert len(b["groups"]["class"]) == 40 and sum(g["n"] for g in b["groups"]["size"].values()) == 40
    # refused by argparse, before any image is predicted
    assert main(["predict", "--weights", w, str(data), "--by", str(tmp_path / "nope.csv")]) == 2
    assert "attributes file not found" in capsys.readouterr().err
