"""`report()`: run every step of the report on one model and one data folder, resumably, and write the page.

    OUT/report.json   schema 1: model, weights, data, budgets, and per step its status (done / failed /
                      skipped), seconds, error, the commands that reproduce it and its result folder
    OUT/<step>/       each step's own result folder (result.json, figures, arrays)
    OUT/index.html    the report (zfnet.present.report), rewritten after every step

A step that fails is recorded with its error and the run goes on; a run started again in the same folder
skips the steps already done with the same commands (a step whose commands changed, or that failed, runs
again), and the atlas step resumes its own mining. One line per step on stderr says where the run is.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

import torch.nn as nn

from ..core.errors import ZfnetError
from ..core.results import read_json, write_json
from ..present.report import write_report
from .budget import Budgets, budgets_for
from .steps import Context, data_of, plan

__all__ = ["report", "SCHEMA"]

SCHEMA = 1


def _say(progress: bool, text: str):
    if progress:
        print(f"zfnet report: {text}", file=sys.stderr, flush=True)


def _load_state(path: Path, identity: dict) -> dict:
    if not path.exists():
        return {}
    try:
        state = read_json(path)
    except (OSError, ValueError):
        return {}
    if not isinstance(state, dict) or state.get("schema") != SCHEMA:
        return {}
    if any(state.get(k) != v for k, v in identity.items()):  # another model or data: start over
        return {}
    return {s["name"]: s for s in state.get("steps", []) if isinstance(s, dict) and "name" in s}


def report(model: nn.Module, data, out: str | os.PathLike, *, model_name: str | None = None,
           weights: str | None = None, budgets: Budgets | None = None, only: list[str] | None = None,
           force: bool = False, progress: bool = True) -> dict:
    """Run the report's steps on `model` over the image folder `data` into `out` and write out/index.html.

    Args:
        model_name, weights: how the commands in the report name the model (`--model`, `--weights`).
        budgets: sizes of the experiments (default: Budgets(), fitted to the data by budgets_for).
        only: run only these steps (names as in report.json: fig2_atlas, fig5_invariance, ...).
        force: run every step again, even those already done.
    Returns: the report.json content.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ZfnetError(f"--out {out} is a file; the report needs a folder")
    out.mkdir(parents=True, exist_ok=True)
    data, paths, labels, classes = data_of(data)
    model_name = model_name or type(model).__name__
    counts = None
    if labels is not None and classes:
        counts = [labels.count(i) for i in range(len(classes))]
        if only is None or "table7_probes" in only:
            counts = _readable_counts(model, data, len(classes), progress)
    b = budgets_for(model, len(paths), counts, budgets)
    ctx = Context(model, model_name, weights, data.resolve(), paths, labels, classes, b, progress)
    steps = plan(ctx, out)
    names = [s.name for s in steps]
    unknown = [n for n in (only or []) if n not in names]
    if unknown:
        raise ZfnetError(f"unknown report step {unknown[0]!r}; steps: {', '.join(names)}")
    identity = {"model": model_name, "weights": weights, "data": str(ctx.data)}
    previous = _load_state(out / "report.json", identity)
    state = {"schema": SCHEMA, **identity, "images": len(paths), "classes": len(classes or []),
             "budgets": b.to_json(), "steps": []}
    records = {}

    def save():
        state["steps"] = [records.get(s.name) or previous.get(s.name) or _record(s, out, "pending") for s in steps]
        write_json(out / "report.json", state)
        write_report(out)

    t_all = time.time()
    for i, s in enumerate(steps, 1):
        where = f"[{i}/{len(steps)}] {s.name}"
        prev = previous.get(s.name)
        if only and s.name not in only:
            continue
        if s.skip:
            records[s.name] = _record(s, out, "skipped", reason=s.skip)
            _say(progress, f"{where}: skipped ({s.skip})")
            save()
            continue
        if (not force and prev and prev.get("status") == "done" and prev.get("key") == s.key()
                and (out / s.name / "result.json").exists()):
            _say(progress, f"{where}: done already ({prev.get('seconds', '?')} s), skipped")
            records[s.name] = prev
            continue
        _say(progress, f"{where}: running ({s.paper}: {s.title})")
        t0 = time.time()
        try:
            s.run(ctx, out / s.name)
            if not (out / s.name / "result.json").exists():
                raise ZfnetError(f"step {s.name} wrote no result.json")
            records[s.name] = _record(s, out, "done", seconds=round(time.time() - t0, 1))
            _say(progress, f"{where}: done in {time.time() - t0:.1f} s")
        except ZfnetError as e:
            records[s.name] = _record(s, out, "failed", seconds=round(time.time() - t0, 1), error=str(e))
            _say(progress, f"{where}: FAILED: {e}")
        except Exception as e:  # a bug in one experiment must not cost the others: record it and go on
            tb = traceback.format_exc().strip().splitlines()
            records[s.name] = _record(s, out, "failed", seconds=round(time.time() - t0, 1),
                                      error=f"{type(e).__name__}: {e}", trace=tb[-12:])
            _say(progress, f"{where}: FAILED: {type(e).__name__}: {e}")
        save()
    state["seconds"] = round(time.time() - t_all, 1)
    state["skipped"] = _skipped(out, state["steps"])
    save()
    failed = [r["name"] for r in state["steps"] if r["status"] == "failed"]
    _say(progress, f"wrote {out / 'index.html'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return state


def _skipped(out: Path, records: list[dict]) -> list[list[str]]:
    """[path, why] of every input some finished step could not read (each once), for the end-of-run list."""
    seen: dict[str, str] = {}
    for r in records:
        try:
            res = read_json(out / r["folder"] / "result.json") if r.get("status") == "done" else {}
        except (OSError, ValueError):
            continue
        for e in (res.get("skipped") or []) if isinstance(res, dict) else []:
            # the atlas writes {"file", "error"}, the other steps [path, why]
            path, why = (e.get("file"), e.get("error")) if isinstance(e, dict) else (e[0], e[-1])
            seen.setdefault(str(path), str(why or f"cannot read {path}"))
    return [[p, w] for p, w in seen.items()]


def _readable_counts(model: nn.Module, data: Path, n_classes: int, progress: bool) -> list[int]:
    """Images per class that decode: the probes' training share must fit what can be read, not what is
    listed. Their features are extracted here once, into the cache the probe step then reads."""
    import numpy as np

    from ..engine.features import default_cache_dir, extract_features

    feats = extract_features(model, data, None, pool=("avg",), cache_dir=default_cache_dir(), progress=progress)
    return np.bincount(np.asarray(feats.labels, np.int64), minlength=n_classes).tolist()


def _record(step, out: Path, status: str, **extra) -> dict:
    return {"name": step.name, "paper": step.paper, "title": step.title, "status": status,
            "folder": step.name, "commands": step.commands, "key": step.key(), "links": step.links, **extra}
