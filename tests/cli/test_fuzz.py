"""Fuzz the whole CLI: every registered command on a corpus of bad files and on property-based bad
arguments (hypothesis, one strategy per argument type).

Asserted for every run: no "Traceback" on stderr; the exit code is non-zero exactly when nothing was
produced; every good image of a mixed folder is processed and every bad entry is listed; nothing an
earlier run wrote is lost. Commands come from zfnet.cli.COMMANDS: a command added later without a
scenario here fails `test_every_command_has_a_scenario`, and an option whose values are not checked by a
zfnet.cli.common type fails `test_every_option_has_a_checked_type`. ZFNET_FUZZ_SCALE=10 runs ten
times the examples (a deeper search than CI's, which stays within minutes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from corpus import HOSTILE_NAMES, bad_images, good_images, weights_files
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zfnet.cli import COMMANDS, build_parser, main
from zfnet.cli import common as cc

TINY = ["--model", "cli_models:tiny", "--weights", "none"]
SCALE = int(os.environ.get("ZFNET_FUZZ_SCALE", "1"))  # more examples per command for a deeper local run
# A ZFNet small enough to train in seconds (the training commands build their own networks).
TRAIN = ["--widths", "4,6,6,6,4", "--fc", "8", "--resize", "52", "--crop", "48", "--batch-size", "4",
         "--epochs", "1", "--train-per-class", "4", "--progress", "no", "--threads", "1", "--cache", "no",
         "--val-crops", "center"]


@dataclass
class Corpus:
    root: Path
    mixed: Path  # good and bad images side by side
    goods: list[Path]
    bads: list[Path]
    bad_only: Path  # nothing readable
    bad_only_files: list[Path]
    bad_classes: Path  # class folders of nothing readable
    bad_class_files: list[Path]
    classes: Path  # two class folders, each good and bad images
    class_goods: list[Path]
    class_bads: list[Path]
    parts: Path  # a parts file naming good and bad images
    parts_bad: Path  # a parts file naming only bad images
    weights: Path
    bad_weights: dict
    marker: Path
    run: Path  # a tiny `zfnet train` run (evolution, diagnose)


def _rc(argv: list, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    assert rc in (0, 1, 2), rc
    return rc, out, err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    goods = good_images(root / "mixed")
    bads = bad_images(root / "mixed")
    bad_only = bad_images(root / "bad_only")
    bad_class_files = [p for c in ["cats", "dogs"] for p in bad_images(root / "bad_classes" / c)]
    class_goods, class_bads = [], []
    for i, c in enumerate(["cats", "dogs"]):
        class_goods += good_images(root / "classes" / c, seed=100 * i)
        class_bads += bad_images(root / "classes" / c)
    centre = lambda p: [0, 0] if p.name == "one_pixel.png" else [20, 18]  # noqa: E731 -- inside every crop
    parts = root / "parts.json"
    parts.write_text(json.dumps({"images": [{"file": str(p), "nose": centre(p)} for p in goods + bads]}))
    parts_bad = root / "parts_bad.json"
    parts_bad.write_text(json.dumps({"images": [{"file": str(p), "nose": [1, 1]} for p in bads]}))
    weights, bad_weights, marker = weights_files(root / "weights")
    clean = root / "clean"  # training on only good images, for the commands that read a run
    for i, c in enumerate(["a", "b"]):
        good_images(clean / c, seed=7 + i)
    run = root / "run"
    assert main(["train", "--data", str(clean), "--out", str(run), *TRAIN, "--init-std", "0"]) == 0
    return Corpus(root, root / "mixed", goods, bads, root / "bad_only", bad_only, root / "bad_classes",
                  bad_class_files, root / "classes", class_goods, class_bads, parts, parts_bad, weights, bad_weights,
                  marker, run)


# ----------------------------------------------------------------------------------------------------
# One scenario per command: a good run on the mixed corpus (into a fresh `out`), what it produces, what
# proves every good image was processed, and a run that can process nothing.
@dataclass
class Scenario:
    good: Callable[[Corpus, Path], list]
    produced: Callable[[Path, str, str], bool]  # (out, stdout, stderr) -> whether the run produced its result
    check: Callable[[Corpus, Path, str, str], None] | None = None
    nothing: Callable[[Corpus, Path], list] | None = None  # a run with no readable input, into the same out
    nothing_lists: Callable[[Corpus], list] = lambda c: c.bad_only_files  # what that run must list
    nothing_fresh: bool = False  # ... into a fresh out (training resumes a finished run in the same one)
    per_file: bool = False  # the command reads one image: run it on every bad file and on `goods`
    goods: tuple | None = None  # names of the good images for a per-file command (None: all)
    examples: int = 6  # hypothesis examples for its arguments
    fuzz: Callable[[Corpus, Path], list] | None = None  # the run whose arguments are fuzzed (default: good)


def _result(out: Path, _stdout: str = "", _stderr: str = "") -> bool:
    return (out / "result.json").is_file()


def _listed(err: str, paths) -> None:
    # "zfnet: skipped: ..." at the end of a batch job; training says "zfnet: skipping ..." as it goes
    skipped = "\n".join(ln for ln in err.split("zfnet: ") if ln.startswith(("skipped:", "skipping ")))
    missing = [str(p) for p in paths if str(p) not in skipped]
    assert not missing, f"not listed among the skipped: {missing}\n{err[-3000:]}"


def _json(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def _same_files(a, b) -> None:
    assert sorted(map(str, a)) == sorted(map(str, b))


def check_predict(c, out, stdout, err):
    _same_files((p["file"] for p in json.loads(stdout)), c.goods)
    _listed(err, c.bads)


def check_atlas(c, out, stdout, err):
    assert _json(out)["images"] == len(c.goods)
    _listed(err, c.bads)


def check_files(key="files"):
    def check(c, out, stdout, err):
        _same_files(_json(out)[key], c.goods)
        _listed(err, c.bads)
    return check


def check_overlap(c, out, stdout, err):
    n = len(c.goods)
    assert f"among {n} x {n} images" in err
    _listed(err, c.bads)


def check_probe(c, out, stdout, err):
    _listed(err, c.class_bads)
    _same_files((s[0] for s in _json(out)["skipped"]), c.class_bads)  # the features of all the others


def check_train(c, out, stdout, err):
    _listed(err, c.class_bads)


SCENARIOS: dict[str, Scenario] = {
    "layers": Scenario(lambda c, out: ["layers", "--model", "cli_models:tiny", "--weights", c.weights, "--json"],
                       lambda out, stdout, err: '"layers"' in stdout),
    "project": Scenario(lambda c, out: ["project", *TINY, "--out", out, "--unit", "relu2:1"],
                        lambda out, stdout, err: any(out.glob("*.png")), per_file=True),
    "train": Scenario(lambda c, out: ["train", "--data", c.classes, "--out", out, *TRAIN],
                      lambda out, stdout, err: (out / "checkpoint.pth").is_file(), check_train,
                      lambda c, out: ["train", "--data", c.bad_classes, "--out", out, *TRAIN],
                      # stops at the mean image, before the validation share is read: the training share is listed
                      lambda c: [], nothing_fresh=True, examples=3),
    "predict": Scenario(lambda c, out: ["predict", *TINY, "--json", c.mixed],
                        lambda out, stdout, err: stdout.strip() not in ("", "[]"), check_predict,
                        lambda c, out: ["predict", *TINY, "--json", c.bad_only]),
    "diagnose": Scenario(lambda c, out: ["diagnose", "--weights", c.run / "checkpoint.pth", "--data", c.mixed,
                                         "--out", out],
                         _result, lambda c, out, stdout, err: _listed(err, c.bads)),
    "evolution": Scenario(lambda c, out: ["evolution", "--run", c.run, "--data", c.mixed, "--out", out,
                                          "--units", "1", "--layers", "relu1"],
                          _result, lambda c, out, stdout, err: _listed(err, c.bads),
                          lambda c, out: ["evolution", "--run", c.run, "--data", c.bad_only, "--out", out]),
    "ablate": Scenario(lambda c, out: ["ablate", "--variants", "remove-3-4", "--data", c.classes, "--out", out,
                                       *TRAIN],
                       lambda out, stdout, err: (out / "table.md").is_file(), check_train, examples=2),
    "atlas": Scenario(lambda c, out: ["atlas", *TINY, "--data", c.mixed, "--out", out, "--layers", "relu2",
                                      "--k", "2", "--tile", "16", "--json"],
                      _result, check_atlas,
                      lambda c, out: ["atlas", *TINY, "--data", c.bad_only, "--out", out, "--layers", "relu2"]),
    "occlude": Scenario(lambda c, out: ["occlude", *TINY, "--out", out, "--size", "112", "--stride", "112"],
                        _result, per_file=True, goods=("one_pixel.png", "cmyk.jpg", "animated.gif", HOSTILE_NAMES[5]),
                        examples=4),
    "invariance": Scenario(lambda c, out: ["invariance", *TINY, *c.goods, *c.bads, "--out", out, "--layers",
                                           "relu2", "--translate", "-10:10:10", "--scale", "1,1.2", "--rotate",
                                           "0,90"],
                           _result, check_files(),
                           lambda c, out: ["invariance", *TINY, *c.bads, "--out", out], lambda c: c.bads,
                           fuzz=lambda c, out: ["invariance", *TINY, c.goods[0], "--out", out, "--layers", "relu2",
                                                "--translate", "0,10", "--scale", "1", "--rotate", "0"]),
    "correspond": Scenario(lambda c, out: ["correspond", *TINY, "--parts", c.parts, "--out", out, "--layers",
                                           "relu2", "fc", "--draws", "1", "--size", "8"],
                           _result, check_files(),
                           lambda c, out: ["correspond", *TINY, "--parts", c.parts_bad, "--out", out],
                           lambda c: c.bads),
    "probe": Scenario(lambda c, out: ["probe", *TINY, "--data", c.classes, "--out", out, "--layers", "relu2",
                                      "--per-class", "2", "--folds", "1", "--max-test", "2", "--Cs", "1",
                                      "--cache", "none", "--classifiers", "softmax"],
                      _result, check_probe,
                      lambda c, out: ["probe", *TINY, "--data", c.bad_classes, "--out", out, "--cache", "none"],
                      lambda c: c.bad_class_files),
    "fewshot": Scenario(lambda c, out: ["fewshot", *TINY, "--data", c.classes, "--out", out, "--layers",
                                        "relu2", "--per-class", "1,2", "--folds", "1", "--max-test", "2", "--Cs",
                                        "1", "--cache", "none", "--classifier", "softmax"],
                        _result, check_probe,
                        lambda c, out: ["fewshot", *TINY, "--data", c.bad_classes, "--out", out, "--layers", "relu2",
                                        "--cache", "none"], lambda c: c.bad_class_files),
    "overlap": Scenario(lambda c, out: ["overlap", c.mixed, c.mixed],
                        lambda out, stdout, err: " among " in err, check_overlap,
                        lambda c, out: ["overlap", c.bad_only, c.mixed]),
    "evaluate": Scenario(lambda c, out: ["evaluate", *TINY, "--data", c.classes, "--out", out, "--batch-size", "2",
                                         "--progress", "no"],
                         lambda out, stdout, err: (out / "table.md").is_file(), check_train,
                         lambda c, out: ["evaluate", *TINY, "--data", c.bad_classes, "--out", out, "--progress", "no"],
                         lambda c: c.bad_class_files, examples=4),
    "activations": Scenario(lambda c, out: ["activations", *TINY, c.mixed, "--out", out, "--layers", "relu2"],
                            _result, lambda c, out, stdout, err: _listed(err, c.bads),
                            lambda c, out: ["activations", *TINY, c.bad_only, "--out", out]),
    "filters": Scenario(lambda c, out: ["filters", *TINY, "--out", out], _result),
    "tsne": Scenario(lambda c, out: ["tsne", *TINY, "--data", c.classes, "--out", out, "--layer", "relu2",
                                     "--cache", "none"],
                     _result, check_train,
                     lambda c, out: ["tsne", *TINY, "--data", c.bad_classes, "--out", out, "--cache", "none"],
                     lambda c: c.bad_class_files, examples=4),
    "invert": Scenario(lambda c, out: ["invert", *TINY, "--out", out, "--layers", "relu2", "--steps", "2"],
                       _result, per_file=True, goods=("one_pixel.png", "cmyk.jpg", "animated.gif", HOSTILE_NAMES[5]),
                       examples=4),
    "fool": Scenario(lambda c, out: ["fool", *TINY, *c.goods, *c.bads, "--out", out, "--steps", "2"],
                     _result, lambda c, out, stdout, err: (_same_files((e["file"] for e in _json(out)["examples"]),
                                                                       c.goods), _listed(err, c.bads)),
                     lambda c, out: ["fool", *TINY, *c.bads, "--out", out], lambda c: c.bads,
                     fuzz=lambda c, out: ["fool", *TINY, c.goods[0], "--out", out, "--steps", "2"]),
    # (the probes and the slower CS231n steps have their own tests in tests/report: here the steps that read
    # every image of the folder, or one)
    "report": Scenario(lambda c, out: ["report", *TINY, "--data", c.classes, "--out", out, "--few-images", "1",
                                       "--only", "fig2_atlas,fig7_occlusion,activations,filters"],
                       lambda out, stdout, err: (out / "index.html").is_file(), check_train, examples=3,
                       fuzz=lambda c, out: ["report", *TINY, "--data", c.classes, "--out", out, "--only", "filters"]),
}


def test_every_command_has_a_scenario():
    names = [c[0] for c in COMMANDS]
    missing = [n for n in names if n not in SCENARIOS]
    assert not missing, f"add a fuzz scenario for the new command(s) {missing} to SCENARIOS in {__file__}"
    assert not [n for n in SCENARIOS if n not in names], "SCENARIOS names a command that no longer exists"


# Options whose values are names or paths the command itself resolves (and reports, one line, if wrong).
FREE_TEXT = {"weights", "data", "parts", "run_dir", "images_root", "cache", "layer", "image", "images",
             "inputs", "dir_a", "dir_b", "model", "val_data", "path", "target"}


def _options(name: str) -> list[argparse.Action]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices[name]._actions if a.nargs != 0 and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("name", [c[0] for c in COMMANDS])
def test_every_option_has_a_checked_type(name):
    for a in _options(name):
        if a.choices is not None or a.dest in FREE_TEXT:
            continue
        assert a.type is not None and a.type not in (int, float, str), (
            f"{name} {a.option_strings or a.dest}: give it a type from zfnet.cli.common (positive_int, "
            f"int_range, float_range, add_list_arg, sweep, out_dir, ...), not {a.type}")


# ----------------------------------------------------------------------------------------------------
# The corpus of bad files.
def _snapshot(out: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()
            and not p.name.startswith("mine-state")}  # the resume state of a run that is started over


def _nothing_lost(before: dict) -> None:
    lost = [str(p) for p, h in before.items() if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != h]
    assert not lost, f"already written and then lost or changed: {lost}"


@pytest.mark.parametrize("name", [c[0] for c in COMMANDS])
def test_command_on_the_bad_file_corpus(name, corpus, capsys, tmp_path):
    s = SCENARIOS.get(name)
    assert s is not None, f"no fuzz scenario for {name}"
    if name == "layers":  # reads no image: its corpus is the bad weights files
        rc, stdout, err = _rc(s.good(corpus, tmp_path), capsys)
        assert rc == 0 and s.produced(tmp_path, stdout, err)
        for w in corpus.bad_weights.values():
            rc, stdout, err = _rc(["layers", "--model", "cli_models:tiny", "--weights", w], capsys)
            assert rc == 2 and stdout == "" and str(w) in err, (w, err)
        assert not corpus.marker.exists(), "a weights file ran code"
        return
    if s.per_file:
        shared = tmp_path / "shared"
        rc, stdout, err = _rc(s.good(corpus, shared) + [corpus.goods[0]], capsys)
        assert rc == 0 and s.produced(shared, stdout, err)
        before = _snapshot(shared)
        for f in [g for g in corpus.goods if s.goods is None or g.name in s.goods]:
            out = tmp_path / f"good{len(list(tmp_path.iterdir()))}"
            rc, stdout, err = _rc(s.good(corpus, out) + [f], capsys)
            assert rc == 0 and s.produced(out, stdout, err), (f, err[-2000:])
        for f in corpus.bads:
            rc, stdout, err = _rc(s.good(corpus, shared) + [f], capsys)
            assert rc == 2 and str(f) in err, (f, err[-2000:])
        _nothing_lost(before)
        return
    out = tmp_path / "out"
    rc, stdout, err = _rc(s.good(corpus, out), capsys)
    assert rc == 0 and s.produced(out, stdout, err), err[-3000:]
    if s.check:
        s.check(corpus, out, stdout, err)
    if s.nothing:
        before = _snapshot(out)
        rc, stdout, err = _rc(s.nothing(corpus, tmp_path / "fresh" if s.nothing_fresh else out), capsys)
        assert rc != 0, f"{name} processed nothing but exited 0"
        _listed(err, s.nothing_lists(corpus))
        _nothing_lost(before)


# ----------------------------------------------------------------------------------------------------
# Property-based bad arguments: one strategy per argument type (boundaries, junk, NaN, lists with empty
# items, reversed sweeps, paths that are files ...), every value run through the whole command. Numbers
# stay small where they would be valid: the point is the checking, not hour-long valid runs.
_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=12)
_NUMBERS = st.one_of(st.integers(-3, 6).map(str), st.floats(-1e6, 1e6).map(str),
                     st.sampled_from(["", " ", "-0", "1.5", "1e3", "0x10", "nan", "inf", "-inf", "1e400", "١٢",
                                      "1_0", "--1", "+3", "9" * 30 + ".5", "one"]))
_LISTS = st.lists(st.one_of(_NUMBERS, _TEXT.filter(lambda t: "," not in t)), max_size=4).map(",".join)
_SWEEPS = st.one_of(st.tuples(*[st.integers(-5, 12).map(str)] * 2, st.sampled_from(["0", "-1", "0.5", "3", "nan"]))
                    .map(":".join), _LISTS,
                    st.sampled_from(["0:1e9:1e-9", "1:0:1", "0:10:0", "-1:-1:1", "nan:1:1", "a:b:c", "::", ","]))


def _strategy(a: argparse.Action, c: Corpus, tmp: Path):
    t = a.type
    if a.choices is not None:
        return st.one_of(st.sampled_from(list(a.choices)), _TEXT)
    if t is cc.out_dir:
        return st.sampled_from([str(c.goods[0]), str(c.goods[0] / "sub"), "", " ", str(tmp / "new" / "deep")])
    if t is cc.device_name:
        return st.one_of(st.sampled_from(["cuda:99", "cpu:0", "mps", "meta", "CPU", "cuda:-1", "xpu", "cpu"]), _TEXT)
    if t is cc.model_spec:
        return st.one_of(st.sampled_from([":", "a:", ":b", "cli_models:nope", "no_such_module_zf:net", "x y",
                                          "cli_models:broken", "squeezenet2"]),
                         _TEXT.filter(lambda s: ":" not in s))  # never import a module that exists by chance
    if t is cc.unit_address:
        return st.one_of(st.sampled_from(["relu2:99", "relu2:0@99,0", "nope:1", "relu2:-1", "relu2"]), _TEXT)
    if t in (cc.sweep, cc.positive_sweep):
        return _SWEEPS
    if getattr(t, "__name__", "") == "list" or a.nargs == "+":
        return _LISTS
    if t is None:  # names and paths the command resolves: files that are not what they should be
        paths = [str(p) for p in [*c.bads[:4], *c.bad_weights.values()]] + [str(tmp / "missing"), "file:///x.pth"]
        return st.one_of(st.sampled_from(paths), _TEXT)
    return _NUMBERS


@pytest.mark.parametrize("name", [c[0] for c in COMMANDS])
def test_bad_arguments(name, corpus, capsys, tmp_path_factory, monkeypatch):
    s = SCENARIOS.get(name)
    assert s is not None, f"no fuzz scenario for {name}"
    options = [a for a in _options(name) if a.option_strings]
    tmp = tmp_path_factory.mktemp(f"args-{name}")
    monkeypatch.chdir(tmp)  # a fuzzed relative path (a --cache folder, say) is created here, not in the checkout
    counter = iter(range(10**6))

    @settings(max_examples=s.examples * SCALE, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(data=st.data())
    def fuzz(data):
        a = data.draw(st.sampled_from(options), label="option")
        value = data.draw(_strategy(a, corpus, tmp), label=a.option_strings[-1])
        out = tmp / f"run{next(counter)}"
        argv = [str(v) for v in (s.fuzz or s.good)(corpus, out)]
        if s.per_file:
            argv.append(str(corpus.goods[0]))
        flag = a.option_strings[-1]
        argv += [f"{flag}={value}"] if value.startswith("-") else [flag, value]  # a value, never an option
        rc, stdout, err = _rc(argv, capsys)
        if a.dest == "out" and value.strip():
            out = Path(value)  # where a valid --out sends the result
        made = (out.exists() or bool(stdout) or bool(err)) and s.produced(out, stdout, err)
        assert (rc == 0) == made, f"exit {rc} but {'something' if made else 'nothing'} produced:\n{err[-2000:]}"
        if rc == 2:
            assert len([ln for ln in err.splitlines() if "error:" in ln]) == 1, err[-2000:]

    fuzz()


def test_hostile_names_survive_to_the_outputs(corpus, capsys, tmp_path):
    """Every name reaches the JSON output intact; none is mistaken for an option."""
    rc, stdout, err = _rc(["predict", *TINY, "--json", *[corpus.mixed / n for n in HOSTILE_NAMES]], capsys)
    assert rc == 0 and sorted(Path(p["file"]).name for p in json.loads(stdout)) == sorted(HOSTILE_NAMES)
    assert "error:" not in err
