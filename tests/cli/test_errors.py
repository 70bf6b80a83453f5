"""Every bad argument and input found by trying the CLI as a new user: one line `zfnet: error: ...` naming
the file or argument, exit 2 (1 when a command could process nothing), never a traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_models import tiny
from PIL import Image

from zfnet.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "cli_models:tiny", "--weights", "none"]


def photo(path: Path, w=44, h=40, seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def run(capsys, argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, err
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    return lines[0]


# ---- argument types: refused by argparse, naming the option -------------------------------------------
@pytest.mark.parametrize("argv, option", [
    (["predict", *TINY, "--batch-size", "0", "IMG"], "--batch-size"),
    (["predict", *TINY, "--batch-size", "-1", "IMG"], "--batch-size"),
    (["atlas", *TINY, "--workers", "-1"], "--workers"),
    (["layers", *TINY, "--size", "0"], "--size"),
    (["layers", *TINY, "--size", "-1"], "--size"),
    (["layers", *TINY, "--num-classes", "0"], "--num-classes"),
    (["correspond", *TINY, "--parts", "p.json", "--out", "o", "--draws", "0"], "--draws"),
    (["atlas", *TINY, "--tile", "0"], "--tile"),
    (["atlas", *TINY, "--layers", ","], "--layers"),
    (["atlas", *TINY, "--layers", ""], "--layers"),
    (["correspond", *TINY, "--parts", "p.json", "--out", "o", "--layers", "a,,b"], "--layers"),
    (["predict", *TINY, "--device", "bogus", "IMG"], "--device"),
    (["layers", "--model", ":"], "--model"),
    (["layers", "--model", "pkg.mod:"], "--model"),
    (["occlude", *TINY, "IMG", "--out", "o", "--fill", "nan"], "--fill"),
    (["invariance", *TINY, "IMG", "--out", "o", "--rotate", "0:90:0"], "--rotate"),
    (["invariance", *TINY, "IMG", "--out", "o", "--scale", "-1:1:0.5"], "--scale"),
    (["overlap", "a", "b", "--threshold", "2"], "--threshold"),
    (["probe", *TINY, "--data", "d", "--out", "o", "--pool", "median"], "--pool"),
    (["fewshot", *TINY, "--data", "d", "--out", "o", "--layers", "relu2", "--per-class", "1,0"], "--per-class"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--lr", "inf"], "--lr"),
    (["train", "--widths", "4,4"], "--widths"),
    (["evolution", "--run", "r", "--data", "d", "--out", "o", "--units", "0"], "--units"),
])
def test_bad_values_are_refused_naming_the_option(capsys, argv, option):
    rc, out, err = run(capsys, argv)
    assert rc == 2 and out == ""
    assert f"argument {option}" in one_error_line(err)


def test_out_that_cannot_be_a_folder(tmp_path, capsys):
    img = photo(tmp_path / "a.png")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for out in (a_file, a_file / "sub"):
        rc, _, err = run(capsys, ["project", *TINY, img, "--out", out])
        assert rc == 2 and f"{a_file} is a file, not a folder" in one_error_line(err)
    assert a_file.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_out_in_an_unwritable_place(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    rc, _, err = run(capsys, ["project", *TINY, photo(tmp_path / "a.png"), "--out", locked / "o"])
    assert rc == 2 and "no permission to write" in one_error_line(err)


def test_an_error_while_writing_names_the_file(tmp_path, capsys, monkeypatch):
    """Past the checks (the disk fills up, a folder vanishes): the OSError becomes one line with its path."""
    import zfnet.present.render as render

    def full(rgb, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(render, "save_png", full)
    rc, _, err = run(capsys, ["project", *TINY, photo(tmp_path / "a.png"), "--out", tmp_path / "o"])
    assert rc == 2 and "no space left on device" in one_error_line(err) and str(tmp_path / "o") in err


def test_device_cuda_without_cuda_is_one_line(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, _, err = run(capsys, ["predict", *TINY, "--device", "cuda", photo(tmp_path / "a.png")])
    assert rc == 2 and "--device cuda: CUDA is not available" in one_error_line(err)
    rc, _, err = run(capsys, ["atlas", *TINY, "--device", "cuda:1", "--data", tmp_path, "--out", tmp_path / "o"])
    assert rc == 2 and "--device cuda:1: CUDA is not available" in one_error_line(err)


def test_negative_ranges_read_as_the_help_writes_them():
    p = build_parser()
    a = p.parse_args(["invariance", "x.jpg", "--out", "o", "--translate", "-20:20:20", "--rotate", "-90,0,90",
                      "--scale", "0.5:1:0.25"])
    assert a.translate == [-20.0, 0.0, 20.0] and a.rotate == [-90.0, 0.0, 90.0] and a.scale == [0.5, 0.75, 1.0]
    assert p.parse_args(["invariance", "x.jpg", "--out", "o"]).translate == [float(t) for t in range(-60, 61, 10)]
    assert p.parse_args(["occlude", "x.jpg", "--out", "o", "--fill", "-1.5"]).fill == -1.5


def test_list_options_read_the_same_in_every_command():
    p = build_parser()
    need = {"atlas": [], "invariance": ["x.jpg", "--out", "o"], "correspond": ["--parts", "p", "--out", "o"],
            "probe": ["--data", "d", "--out", "o"], "fewshot": ["--data", "d", "--out", "o"],
            "evolution": ["--run", "r", "--data", "d", "--out", "o"]}
    forms = [["--layers", "a,b", "c"], ["--layers", "a", "b,c"], ["--layers", "a", "--layers", "b", "c"],
             ["--layers", "a,b,c"]]
    for name, rest in need.items():
        for form in forms:
            assert p.parse_args([name, *rest, *form]).layers == ["a", "b", "c"], (name, form)
    assert p.parse_args(["invariance", "x.jpg", "y.jpg", "--label", "3,5", "--out", "o"]).label == [3, 5]
    assert p.parse_args(["probe", "--data", "d", "--out", "o"]).Cs == [0.001, 0.01, 0.1, 1.0]  # string default
    assert p.parse_args(["probe", "--data", "d", "--out", "o", "--pool", "max", "avg"]).pool == ["max", "avg"]


# ---- the error boundary --------------------------------------------------------------------------------
def test_a_user_factory_that_raises_is_reported_as_theirs(capsys, monkeypatch):
    rc, _, err = run(capsys, ["layers", "--model", "cli_models:broken", "--weights", "none"])
    assert rc == 2
    line = one_error_line(err)
    assert line.startswith("zfnet: error: model factory cli_models:broken raised RuntimeError: CUDA driver too old")
    assert "--debug" in line
    rc, _, err = run(capsys, ["layers", "--model", "sys:exit", "--weights", "none"])  # not the CLI's own exit
    assert rc == 2 and "model factory sys:exit raised SystemExit" in one_error_line(err)
    for argv, env in [(["--debug", "layers"], None), (["layers", "--debug"], None), (["layers"], "1")]:
        if env:
            monkeypatch.setenv("ZFNET_DEBUG", env)
        rc = main(argv + ["--model", "cli_models:broken", "--weights", "none"])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" in err and 'raise RuntimeError("CUDA driver too old' in err
        assert err.rstrip().splitlines()[-1].startswith("zfnet: error: model factory cli_models:broken raised")


def test_an_unexpected_exception_becomes_one_line(capsys, monkeypatch, tmp_path):
    import zfnet.models.predict as predict

    def bug(*a, **k):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(predict, "predict", bug)
    rc, out, err = run(capsys, ["predict", *TINY, photo(tmp_path / "a.png")])
    assert rc == 2 and out == ""
    assert one_error_line(err) == ("zfnet: error: ValueError: an internal invariant broke "
                                   "(--debug shows the traceback)")


def test_unknown_layer_names_three_closest_and_where_to_list_them(capsys, tmp_path):
    rc, _, err = run(capsys, ["atlas", "--model", "squeezenet1_1", "--weights", "none", "--data",
                              photo(tmp_path / "d" / "a.png").parent, "--layers", "features.12.expand3x4",
                              "--out", tmp_path / "o"])
    assert rc == 2
    line = one_error_line(err)
    assert "unknown layer 'features.12.expand3x4'; closest: features.12.expand3x3, features.12.expand1x1" in line
    assert "`zfnet layers --model squeezenet1_1` lists all" in line
    assert len(line) < 240  # not the model's hundred module names


# ---- weights and numbers --------------------------------------------------------------------------------
def test_nan_weights_are_refused_naming_the_tensors_and_strict_json_when_allowed(tmp_path, capsys):
    state = tiny().state_dict()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    state["fc.bias"][1] = float("inf")
    torch.save(state, tmp_path / "nan.pth")
    img = photo(tmp_path / "a.png")
    argv = ["predict", "--model", "cli_models:tiny", "--weights", tmp_path / "nan.pth", "--json", img]
    rc, out, err = run(capsys, argv)
    assert rc == 2 and out == ""
    line = one_error_line(err)
    assert "NaN or Infinity in 2 tensor(s): conv1.weight (1 NaN), fc.bias (1 Inf)" in line and "nan.pth" in line
    rc, out, err = run(capsys, argv + ["--allow-nonfinite-weights"])
    assert rc == 0
    top5 = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))[0]["top5"]
    assert all(t["prob"] is None for t in top5)
    assert "zfnet: warning: JSON on stdout:" in err and "written as null" in err


def test_empty_weights_file(tmp_path, capsys):
    (tmp_path / "w.pth").write_bytes(b"")
    rc, _, err = run(capsys, ["layers", "--model", "cli_models:tiny", "--weights", tmp_path / "w.pth"])
    assert rc == 2 and f"weights file {tmp_path / 'w.pth'} is empty" in one_error_line(err)


def test_layer_table_size_too_small_for_the_model(capsys):
    rc, _, err = run(capsys, ["layers", "--model", "squeezenet1_1", "--size", "8"])
    assert rc == 2 and "--size 8: squeezenet1_1 cannot run on a 8x8 input" in one_error_line(err)


# ---- exit codes: non-zero exactly when nothing was processed, with the list ----------------------------
def test_overlap_with_one_side_all_unreadable_exits_1_with_the_list(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    photo(a / "1.png")
    b.mkdir()
    (b / "1.jpg").write_bytes(b"not a jpeg")
    (b / "2.png").write_bytes(b"")
    rc, _, err = run(capsys, ["overlap", a, b, "--json"])
    assert rc == 1 and str(b / "1.jpg") in err and str(b / "2.png") in err and "error" not in err


def test_predict_on_a_folder_whose_only_entry_is_a_folder_named_like_an_image(tmp_path, capsys):
    (tmp_path / "x.jpg").mkdir()
    rc, out, err = run(capsys, ["predict", *TINY, tmp_path])
    assert rc == 1 and out == "" and f"skipped: {tmp_path / 'x.jpg'} is a folder, not an image" in err


def test_mixed_folder_lists_every_skipped_entry_and_processes_every_good_image(tmp_path, capsys):
    goods = [photo(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "text.jpg").write_text("hello")
    rc, out, err = run(capsys, ["predict", *TINY, tmp_path, "--json"])
    assert rc == 0 and sorted(p["file"] for p in json.loads(out)) == sorted(map(str, goods))
    skipped = [ln for ln in err.splitlines() if ln.startswith("zfnet: skipped:")]
    assert len(skipped) == 3
    for name in ["dangling.jpg", "dir.jpg", "text.jpg"]:
        assert any(str(tmp_path / name) in ln for ln in skipped), name


def test_python_dash_m_debug_and_clean_error():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("", "tests", "tests/cli"))}
    r = subprocess.run([sys.executable, "-m", "zfnet", "layers", "--model", "cli_models:broken"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("zfnet: error: model factory cli_models:broken raised RuntimeError")
