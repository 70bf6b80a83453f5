"""`zfnet report`: every step runs into its own result folder, a resumed run skips what is done, a failing step is
reported while the rest goes on, the recorded commands reproduce the folders, and the page (from the saved
results only) renders in a real browser with every image and link working and hostile names kept as text."""

import json
import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from report_models import tiny32
from tiny import make_folder

from zfnet.cli import main
from zfnet.present.report import write_report
from zfnet.report import steps as steps_mod
from zfnet.report.budget import Budgets
from zfnet.report.run import report

STEPS = ["fig2_atlas", "fig5_invariance", "fig6_diagnose", "fig7_occlusion", "table7_probes", "tsne", "activations",
         "filters", "inversion", "fooling"]
MODEL = "report_models:tiny32"
HOSTILE_CLASS = 'dogs <b>&"x"'
HOSTILE_FILE = "we<i>rd & 'q' #1.png"
SMALL = dict(few_images=1, data_images=10, probe_folds=1, inversion_steps=3, fooling_images=2, fooling_steps=2,
             fooling_image_steps=3)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    # A two-conv model: extra threads only add overhead (and on a loaded machine, a lot of it).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    cache = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(root / "cache")  # the probes' and t-SNE's feature cache, not the user's
    data = root / "my data"
    make_folder(data / "cats", n=4, seed=1)
    make_folder(data / HOSTILE_CLASS, n=4, seed=2)
    shutil.copy(data / "cats" / "img00.png", data / "cats" / HOSTILE_FILE)
    (data / "cats" / "broken.png").write_bytes(b"")  # every step skips it
    out = root / "report <out>"
    state = report(tiny32(), data, out, model_name=MODEL, weights="none", budgets=Budgets(**SMALL), progress=False)
    yield out, data, state
    torch.set_num_threads(threads)
    if cache is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = cache


def test_every_step_runs_into_its_folder(done):
    out, _, state = done
    assert [s["name"] for s in state["steps"]] == STEPS
    bad = {s["name"]: s.get("error") for s in state["steps"] if s["status"] != "done"}
    assert not bad, bad
    for s in state["steps"]:
        assert (out / s["folder"] / "result.json").is_file(), s["name"]
        assert s["commands"] and all(c[0] == "zfnet" for c in s["commands"])
    saved = json.loads((out / "report.json").read_text())
    assert saved["images"] == 14 and saved["classes"] == 2  # 6 photos in each class, a hostile name, a broken file
    assert saved["budgets"]["probe_per_class"] == 5  # one less than the smallest class
    assert (out / "index.html").is_file() and (out / "fig2_atlas" / "index.html").is_file()
    assert list((out.parent / "cache" / "zfnet" / "features").glob("*.npz"))  # probes and t-SNE shared it


def test_a_resumed_run_skips_finished_steps(done, monkeypatch, capsys):
    out, data, _ = done
    for name in ("_atlas", "_invariance", "_diagnose", "_occlusion", "_probes", "_tsne", "_activations", "_filters",
                 "_inversion", "_fooling"):
        monkeypatch.setattr(steps_mod, name, lambda *a, **k: pytest.fail("a finished step ran again"))
    state = report(tiny32(), data, out, model_name=MODEL, weights="none", budgets=Budgets(**SMALL))
    assert all(s["status"] == "done" for s in state["steps"])
    err = capsys.readouterr().err
    assert err.count("done already") == len(STEPS)


def test_a_failing_step_is_reported_and_the_rest_goes_on(done, tmp_path, monkeypatch):
    out, data, _ = done
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)  # a report moved elsewhere still resumes: its commands name the folder OUT
    for folder in ("filters", "inversion"):
        shutil.rmtree(copy / folder)
    ran = []
    real_filters, real_inversion = steps_mod._filters, steps_mod._inversion

    def boom(ctx, folder):
        ran.append("filters")
        raise RuntimeError("boom <script>window.PWNED = 1</script>")

    def inversion(ctx, folder):
        ran.append("inversion")
        real_inversion(ctx, folder)

    monkeypatch.setattr(steps_mod, "_filters", boom)
    monkeypatch.setattr(steps_mod, "_inversion", inversion)
    state = report(tiny32(), data, copy, model_name=MODEL, weights="none", budgets=Budgets(**SMALL), progress=False)
    status = {s["name"]: s["status"] for s in state["steps"]}
    assert ran == ["filters", "inversion"]  # the failure did not stop the steps after it
    assert status == {**{n: "done" for n in STEPS}, "filters": "failed"}
    failed = next(s for s in state["steps"] if s["name"] == "filters")
    assert failed["error"] == "RuntimeError: boom <script>window.PWNED = 1</script>" and failed["trace"]
    html = (copy / "index.html").read_text()
    assert "boom &lt;script&gt;" in html and "<script>" not in html
    monkeypatch.setattr(steps_mod, "_filters", lambda ctx, folder: (ran.append("filters again"),
                                                                     real_filters(ctx, folder)))
    state = report(tiny32(), data, copy, model_name=MODEL, weights="none", budgets=Budgets(**SMALL), progress=False)
    assert ran[2:] == ["filters again"] and all(s["status"] == "done" for s in state["steps"])


def test_recorded_commands_reproduce_the_folders(done, tmp_path, capsys):
    out, _, state = done
    by = {s["name"]: s for s in state["steps"]}
    for name in ("filters", "activations", "fig6_diagnose"):
        (argv,) = by[name]["commands"]
        argv = [a.replace(str(out / name), str(tmp_path / name)) for a in argv]
        assert main(argv[1:]) == 0, argv
        mine = json.loads((tmp_path / name / "result.json").read_text())
        theirs = json.loads((out / name / "result.json").read_text())
        if name == "fig6_diagnose":  # diagnose records how it was called
            mine.pop("config"), theirs.pop("config")
        assert mine == theirs, name
    a, b = out / "filters" / "conv1.png", tmp_path / "filters" / "conv1.png"
    assert a.read_bytes() == b.read_bytes()
    capsys.readouterr()


def test_the_page_needs_only_the_saved_results(done, tmp_path):
    out, _, _ = done
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = (copy / "index.html").read_text()
    (copy / "index.html").unlink()
    write_report(copy)  # no model anywhere
    assert (copy / "index.html").read_text() == before
    assert "&lt;b&gt;" in before and HOSTILE_CLASS not in before


def test_cli_runs_one_step_and_says_where_it_is(done, tmp_path, capsys):
    _, data, _ = done
    rc = main(["report", "--model", MODEL, "--weights", "none", "--data", str(data), "--out", str(tmp_path / "r"),
               "--only", "filters"])
    captured = capsys.readouterr()
    assert rc == 0 and "[8/10] filters: running" in captured.err and "index.html" in captured.out
    state = json.loads((tmp_path / "r" / "report.json").read_text())
    assert {s["name"]: s["status"] for s in state["steps"]}["filters"] == "done"
    assert {s["status"] for s in state["steps"] if s["name"] != "filters"} == {"pending"}
    assert main(["report", "--model", MODEL, "--weights", "none", "--data", str(data), "--out", str(tmp_path / "r"),
                 "--only", "nope"]) == 2
    assert "unknown report step 'nope'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# In a real browser (Debian's chromium driven by Playwright: the `browser` fixture of conftest), from file://.
def test_report_renders_in_chromium(done, browser):
    out, _, state = done
    page = browser.new_page()
    failed = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.goto((out / "index.html").as_uri())
    page.wait_for_load_state("load")
    assert page.evaluate("document.scripts.length") == 0 and page.evaluate("typeof window.PWNED") == "undefined"
    sections = page.evaluate("Array.from(document.querySelectorAll('section')).map(s => s.id)")
    assert sections == STEPS
    for name in STEPS:  # every section has its picture and the command that reproduces it
        n = page.evaluate(f"document.querySelectorAll('#{name} img').length")
        assert n >= 1, name
        assert page.inner_text(f"#{name} pre").startswith("zfnet "), name
        assert page.inner_text(f"#{name} h2").endswith("done"), name
    broken = page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
                           ".map(i => i.getAttribute('src'))")
    assert broken == [], broken
    assert HOSTILE_CLASS in page.inner_text("#fooling")  # the hostile class folder, shown as text
    links = page.evaluate("Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")
    files = [Path(unquote(urlparse(u).path)) for u in links if u.startswith("file:")]
    assert len(files) >= 3 * len(STEPS)  # folder + result.json per step, the figures, the atlas site
    missing = [str(f) for f in files if not f.exists()]
    assert not missing, missing
    for u in links:  # the atlas site and every result.json open
        if u.endswith("/index.html") or u.endswith("result.json"):
            page.goto(u)
            page.wait_for_load_state("load")
    assert failed == []
    page.close()
