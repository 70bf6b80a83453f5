"""The report page: one offline HTML page with a section per paper figure or table (and per CS231n tool),
each with its picture, its numbers, a link to its result folder and the commands that reproduce it.

Reads `report.json` (written by zfnet.report) and each step's `result.json`, never a model; a section is
drawn from the fields its result folder has, so a missing field shows as a dash, never as a crash. Like the
atlas site: no scripts, no network, relative links only, every string from the user (file, layer and model
names, errors, commands) HTML-escaped and every path URL-quoted.
"""

from __future__ import annotations

import json
import math
import shlex
from importlib import resources
from pathlib import Path

from ..core.errors import ZfnetError
from ..core.results import read_json
from .site import _document, _e, _href, _write

__all__ = ["write_report", "SECTIONS"]


def _pct(v, digits: int = 1) -> str:
    return "–" if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f} %"


def _num(v, fmt: str = ".3g") -> str:
    return "–" if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _get(d, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _name(path) -> str:
    return Path(str(path)).name


# ----------------------------------------------------------------------------------------------------
# One summary per kind of result folder: (figures [(relative path, caption)], rows [(label, value)]).
def _atlas(r: dict):
    figs = [(f.get("panel", ""), f"layer {layer}: Fig. 2 panel (deconvnet projections | input patches)")
            for layer, f in (r.get("figures") or {}).items() if isinstance(f, dict)]
    layers = r.get("layers") or {}
    dead = r.get("dead") or {}
    rows = [("images mined", r.get("images", "–")),
            ("layers", ", ".join(f"{n} ({len(u)} maps, {len(dead.get(n) or [])} dead)" for n, u in layers.items())
             or "–"),
            ("top activations per map", _get(r, "config", "k", default="–")),
            ("projection rule", _get(r, "config", "mode", default="–")),
            ("time", f"{_get(r, 'timing', 'total_s', default='–')} s")]
    return figs, rows


def _invariance(r: dict):
    rows = []
    for kind in r.get("sweeps") or {}:
        for layer in r.get("layers") or []:
            d = _get(r, "normalized", kind, layer) or []
            ends = [row[-1] for row in d if row]
            rows.append((f"{kind}: {layer}", f"normalized distance at the sweep's end "
                                                 f"{_num(sum(ends) / len(ends), '.2f') if ends else '–'}"))
        probs = [min(row) for row in (_get(r, "prob", kind) or []) if row]
        if probs:
            rows.append((f"{kind}: p(true label)", f"lowest over the sweep {_num(min(probs), '.2f')}"))
    rows.append(("images", ", ".join(_name(f) for f in r.get("files") or []) or "–"))
    return [("invariance.png", "Fig. 5: feature distance (normalized) and p(true label) against the transform")], rows


def _diagnose(r: dict):
    bands = r.get("bands") or {}
    l2 = r.get("layer2") or {}
    rows = [("first conv layer", f"{r.get('layer1', '–')} (stride {r.get('stride1', '–')})"),
            ("dead filters", f"{len(r.get('dead') or [])} of {r.get('filters', '–')}"),
            ("spectral energy low / mid / high", " / ".join(_pct(100 * bands[k]) if isinstance(bands.get(k), float)
                                                               else "–" for k in ("low", "mid", "high"))),
            ("filter-scale domination (max / median RMS)",
             ", ".join(f"{k} {_num(v, '.2f')}" for k, v in (r.get("domination") or {}).items()) or "–")]
    if l2:
        rows.append((f"layer 2 ({l2.get('layer', '?')})",
                     f"{len(l2.get('dead_never_active') or [])} never active; aliasing "
                        f"{_pct(100 * l2['aliasing']) if isinstance(l2.get('aliasing'), float) else '–'}"))
    rows.append(("images", r.get("images", "–")))
    return [("layer1_filters.png", "Fig. 6 (a-b): first-layer filters"),
            ("layer2_features.png", "Fig. 6 (c-d): layer-2 features, projected")], rows


def _occlusion(r: dict):
    figs, rows = [], []
    for im in r.get("images") or []:
        figs.append((im.get("figure", ""), f"{_name(im.get('file', ''))}: Fig. 7 (input, feature map, "
                                           f"projection, p(true label), most probable label)"))
        rows.append((_name(im.get("file", "?")),
                     f"{im.get('label_name', '?')}: p = {_num(im.get('clean_prob'), '.2f')} unoccluded, "
                        f"{_num(im.get('min_prob'), '.2f')} at worst; tracked {im.get('feature_map', '?')}"))
    return figs, rows


def _probes(r: dict):
    rows = []
    for layer, v in (r.get("layers") or {}).items():
        rows.append((layer, ", ".join(f"{k} {_num(s.get('mean'), '.1f')} ± {_num(s.get('std'), '.1f')} %"
                                         for k, s in v.items() if isinstance(s, dict))))
    c = r.get("config") or {}
    rows.append(("protocol", f"{c.get('per_class', '?')} training image(s) per class, {c.get('folds', '?')} "
                                f"fold(s), mean per-class accuracy"))
    return [("probes.png", "Table 7: accuracy of a linear classifier on each layer's features")], rows


def _tsne(r: dict):
    e = r.get("embedding") or {}
    rows = [("layer", f"{r.get('layer', '–')} ({r.get('pool', '?')}-pooled)"),
            ("images", len(r.get("files") or [])),
            ("perplexity / KL divergence", f"{_num(e.get('perplexity'))} / {_num(e.get('kl_divergence'))}"),
            ("trustworthiness (5 neighbours)", _num(e.get("trustworthiness"))),
            ("grid", "×".join(str(v) for v in r.get("grid_shape") or []) or "–")]
    nb = e.get("same_class_neighbours")
    if nb:
        rows.append(("same-class 5 nearest neighbours", f"{_pct(nb.get('embedding'))} in the embedding, "
                                                            f"{_pct(nb.get('codes'))} in the codes"))
    return [("tsne_grid.png", "images snapped to a grid by their t-SNE positions"),
            ("tsne_scatter.png", "the embedding, coloured by class"),
            ("tsne_positions.png", "images at their raw t-SNE positions")], rows


def _activations(r: dict):
    sp = _get(r, "sparsity", "layers") or {}
    figs = [("sparsity.png", "fraction of zeros per channel (red: dead, orange: sparse)")] if sp else []
    rows = []
    for layer, d in (r.get("layers") or {}).items():
        figs.append((d.get("figure", ""), f"{layer}: every channel's map for {_name(r.get('file', ''))}"))
        s = sp.get(layer)
        extra = ""
        if s:
            z = s.get("zero_fraction") or []
            mean = _pct(100 * sum(z) / len(z)) if z else "–"
            extra = (f"; over {_get(r, 'sparsity', 'images', default='?')} images {len(s.get('dead') or [])} dead, "
                     f"{len(s.get('sparse') or [])} sparse, mean zero fraction {mean}")
        rows.append((layer, f"{d.get('channels', '?')} maps of {d.get('height', '?')}×{d.get('width', '?')}{extra}"))
    return figs, rows


def _filters(r: dict):
    figs, rows = [], []
    for layer, d in (r.get("layers") or {}).items():
        k = d.get("kernel") or ["?", "?"]
        figs.append((d.get("figure", ""), f"{layer}: {d.get('style', '')} ({d.get('note', '')})"
                     if d.get("note") else f"{layer} ({d.get('style', '')})"))
        rows.append((layer, f"{d.get('out_channels', '?')} filters of {d.get('in_channels', '?')} × {k[0]}×{k[1]}, "
                               f"stride {'×'.join(str(s) for s in d.get('stride') or [])}"))
    return figs, rows


def _inversion(r: dict):
    rows = [(layer, f"code error {_pct(100 * d['code_error']) if isinstance(d.get('code_error'), float) else '–'},"
                    f" pixel RMS {_num(d.get('pixel_rmse'), '.3f')}, TV weight {_num(d.get('lambda_tv'))}")
            for layer, d in (r.get("layers") or {}).items()]
    c = r.get("config") or {}
    rows.append(("optimisation", f"{c.get('steps', '?')} steps, "
                                    f"alpha-norm weight {c.get('lambda_alpha', '?')} (alpha {c.get('alpha', '?')})"))
    return [("inversion.png", f"reconstructions of {_name(r.get('file', ''))} from its codes")], rows


def _fooling(r: dict):
    s = r.get("summary") or {}
    eps = r.get("eps")
    rows = [("attack", f"{str(r.get('method', '?')).upper()} {'targeted' if r.get('targeted') else 'untargeted'}, "
                          f"eps {_num(eps * 255 if isinstance(eps, float) else None, '.3g')}/255"),
            ("fooled", f"{s.get('success', '?')} of {s.get('images', '?')} "
                          f"({s.get('success_8bit', '?')} after rounding to 8 bits)"),
            ("largest change", f"{_num(s['max_linf'] * 255 if isinstance(s.get('max_linf'), float) else None)}/255")]
    for f in r.get("fooling") or []:
        rows.append((f"fooling image: {f.get('name', '?')}", f"p = {_num(f.get('prob'), '.3f')}"))
    return [("fooling.png", "original, amplified perturbation, adversarial; fooling images from noise")], rows


SECTIONS = {"fig2_atlas": _atlas, "fig5_invariance": _invariance, "fig6_diagnose": _diagnose,
            "fig7_occlusion": _occlusion, "table7_probes": _probes, "tsne": _tsne, "activations": _activations,
            "filters": _filters, "inversion": _inversion, "fooling": _fooling}


def _generic(r: dict):
    figs = [(v, k) for k, v in (r.get("figures") or {}).items() if isinstance(v, str) and v.endswith(".png")]
    return figs, []


# ----------------------------------------------------------------------------------------------------
def _section(out: Path, s: dict) -> str:
    name = str(s.get("name", ""))
    folder = out / str(s.get("folder", name))
    status = str(s.get("status", "pending"))
    head = (f'<section id="{_e(name)}"><h2>{_e(s.get("paper", ""))} · {_e(s.get("title", name))} '
            f'<span class="status {_e(status)}">{_e(status)}</span></h2>')
    parts = [head]
    if status == "failed":
        trace = "\n".join(s.get("trace") or [])
        parts.append(f'<div class="error"><p>{_e(s.get("error", "failed"))}</p>'
                     + (f"<details><summary>traceback</summary><pre>{_e(trace)}</pre></details>" if trace else "")
                     + "</div>")
    elif status == "skipped":
        parts.append(f'<p class="muted">Not run: {_e(s.get("reason", ""))}</p>')
    elif status != "done":
        parts.append('<p class="muted">Not run yet (the report is still running, or was stopped: run the same '
                     'command again to continue).</p>')
    if status == "done" and (folder / "result.json").exists():
        try:
            r = read_json(folder / "result.json")
        except (OSError, ValueError) as e:
            r = {}
            parts.append(f'<p class="error">cannot read {_e(folder / "result.json")}: {_e(e)}</p>')
        figs, rows = SECTIONS.get(name, _generic)(r if isinstance(r, dict) else {})
        shown = []
        for rel, caption in figs:
            path = folder / rel
            if rel and path.is_file():
                href = _href(path, out)
                shown.append(f'<figure><a href="{href}"><img src="{href}" alt="{_e(caption)}"></a>'
                             f"<figcaption>{_e(caption)}</figcaption></figure>")
        if shown:
            parts.append(f'<div class="figures">{"".join(shown)}</div>')
        if rows:
            parts.append("<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
                         + "</table>")
        seconds = s.get("seconds")
        parts.append(f'<p class="muted">{_e(f"{seconds} s" if seconds is not None else "")}</p>')
    if folder.is_dir():
        links = [f'<a href="{_href(folder, out)}/">result folder</a>']
        if (folder / "result.json").exists():
            links.append(f'<a href="{_href(folder / "result.json", out)}">result.json</a>')
        for label, rel in (s.get("links") or {}).items():
            if (folder / rel).exists():
                links.append(f'<a href="{_href(folder / rel, out)}">{_e(label)}</a>')
        parts.append(f'<p class="links">{" · ".join(links)}</p>')
    cmds = [shlex.join(c) for c in s.get("commands") or [] if isinstance(c, list)]
    if cmds:
        parts.append(f"<p>Reproduce:</p><pre><code>{_e(chr(10).join(cmds))}</code></pre>")
    parts.append("</section>")
    return "".join(parts)


def write_report(out) -> Path:
    """Write out/index.html (and report.css) from out/report.json and the result folders it names."""
    out = Path(out)
    path = out / "report.json"
    if not path.exists():
        raise ZfnetError(f"no report at {out} (report.json missing)")
    state = read_json(path)
    if not isinstance(state, dict) or state.get("schema") != 1:
        raise ZfnetError(f"{path} is not a zfnet report (schema 1)")
    css = resources.files(__package__).joinpath("templates/report.css").read_text(encoding="utf-8")
    _write(out / "report.css", css)
    steps = [s for s in state.get("steps") or [] if isinstance(s, dict)]
    toc = "".join(f'<li><a href="#{_e(s.get("name", ""))}">{_e(s.get("paper", ""))} · {_e(s.get("title", ""))}</a> '
                  f'<span class="status {_e(s.get("status", ""))}">{_e(s.get("status", ""))}</span></li>'
                  for s in steps)
    notes = "".join(f"<li>{_e(n)}</li>" for n in _get(state, "budgets", "notes", default=[]) or [])
    done = sum(s.get("status") == "done" for s in steps)
    meta = (f"<table><tr><th>model</th><td>{_e(state.get('model'))}</td></tr>"
            f"<tr><th>weights</th><td>{_e(state.get('weights'))}</td></tr>"
            f"<tr><th>data</th><td>{_e(state.get('data'))} ({_e(state.get('images', '?'))} images, "
            f"{_e(state.get('classes', 0))} classes)</td></tr>"
            f"<tr><th>steps</th><td>{done} of {len(steps)} done"
            + (f", {_e(state['seconds'])} s this run" if state.get("seconds") is not None else "")
            + "</td></tr></table>")
    body = (f"<h1>{_e(state.get('model', 'model'))}: Visualizing and Understanding, the report</h1>"
            f'<p class="muted">Zeiler &amp; Fergus (2013), "Visualizing and Understanding Convolutional Networks", '
            f"and the CS231n notes \"Visualizing what ConvNets learn\", run on this model and data by "
            f"<code>zfnet report</code>.</p>{meta}"
            + (f"<h2>Budgets</h2><ul>{notes}</ul>" if notes else "")
            + f"<details><summary>all budgets</summary><pre>{_e(json.dumps(state.get('budgets', {}), indent=1))}"
              f"</pre></details><nav><ol>{toc}</ol></nav>"
            + "".join(_section(out, s) for s in steps))
    _write(out / "index.html", _document(f"report: {state.get('model', '')}", "report.css", body))
    return out / "index.html"
