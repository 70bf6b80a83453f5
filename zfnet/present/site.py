"""Static HTML for a saved atlas (Fig. 2): a site that opens offline from disk, no server.

Reads `result.json` and the pictures beside it, never a model. Pages:
  * `index.html`: model, data, the layer table with a thumbnail (a Fig. 2 block) and the dead units of
    every layer;
  * `layers/<layer>.html`: the layer's Fig. 2 panel and one thumbnail per unit (its k projections beside
    its k patches), sortable by maximum activation, dead units flagged;
  * `units/<unit>.html`: the unit's firing rate, quantiles and class tags, and its k projections and
    patches at full tile size, each with its source image (relative to the data folder), that image's
    label (its class folder) and the model's top-1 prediction, value and location, and the field box
    drawn on the input.
The repeated parts (the entries of a unit, the patches of the thumbnails) are drawn in the page from
small data scripts, `layers/<layer>.js` and `sources.js`, so that thousands of unit pages stay a few MB;
patches are crops of the one stored view of each image (`images/<i>.jpg`) and take no space of their own.
Every page has a search box (a unit address, a layer, or a class name -> the units whose top images are
most often of that class) that works from `search.js`. Data are loaded as scripts because file:// pages
cannot fetch JSON. Every string that comes from the user (file, layer, class and model names, config
values) is HTML-escaped here and set as text (never as markup) by the scripts; paths are URL-quoted.
"""

from __future__ import annotations

import json
import os
from html import escape
from importlib import resources
from pathlib import Path
from urllib.parse import quote

from ..core.errors import ZfnetError
from ..core.results import atomic_path, read_json
from ..inspect.layers import Unit, file_safe
from .tiles import SPRITE_GAP

__all__ = ["write_site", "check_result", "layer_files", "unit_files"]

SCHEMA = 2
THUMB = 36  # px per tile in the layer pages' unit thumbnails (atlas.js draws them at this size)


def layer_files(layer: str) -> dict[str, str]:
    """Paths (relative to the result folder) of one layer's page and data script."""
    name = file_safe(layer)
    return {"page": f"layers/{name}.html", "data": f"layers/{name}.js"}


def unit_files(layer: str, channel: int) -> dict[str, str]:
    """Paths (relative to the result folder) of one unit's page."""
    return {"page": f"units/{Unit(layer, channel).slug}.html"}


def check_result(path: str | os.PathLike) -> dict:
    """Read an atlas result.json, with a clear error when it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / "result.json"
    if not path.exists():
        raise ZfnetError(f"no atlas result at {path}")
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA or "layers" not in meta:
        raise ZfnetError(f"{path} is not an atlas result (schema {SCHEMA})")
    return meta


def _e(v) -> str:
    return escape(str(v), quote=True)


def _url(rel: str, depth: int) -> str:
    """A site-relative path as seen from a page `depth` folders down, URL-quoted and escaped."""
    return _e(quote(("../" * depth) + rel))


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4g}"


def _write(path: Path, text: str):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def _json(value) -> str:
    """JSON that is also safe JavaScript inside any page: ASCII only, no `</`."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).replace("</", "<\\/")


def _href(target: str | Path, page_dir: Path) -> str:
    """Relative, URL-quoted, HTML-escaped link from a page folder to a file (absolute or site-relative)."""
    rel = os.path.relpath(Path(target), page_dir)
    return _e(quote(Path(rel).as_posix()))


def _document(title: str, css: str, body: str, body_attrs: str = "") -> str:
    """One HTML page (the atlas's and the report's); css and body_attrs already escaped."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{_e(title)}</title><link rel="stylesheet" href="{css}"></head>\n'
            f'<body{body_attrs}>\n{body}\n</body></html>\n')


def _page(title: str, body: str, depth: int, nav: str, scripts: list[str] = ()) -> str:
    up = "../" * depth
    tags = "".join(f'<script src="{_url(s, depth)}"></script>' for s in [*scripts, "search.js", "atlas.js"])
    return _document(title, f"{up}style.css", f"<header><nav>{nav}</nav></header>\n{body}\n{tags}",
                     f' data-root="{up or "./"}"')


def write_site(out: str | os.PathLike) -> Path:
    """Write index.html, one page per layer and one per unit, their data scripts, style.css, atlas.js and
    search.js into the atlas folder `out`."""
    out = Path(out)
    meta = check_result(out)
    templates = resources.files(__package__).joinpath("templates")
    _write(out / "style.css", templates.joinpath("atlas.css").read_text(encoding="utf-8"))
    _write(out / "atlas.js", templates.joinpath("atlas.js").read_text(encoding="utf-8"))
    names = list(meta["layers"])
    _write(out / "search.js", f"window.ZFNET_ATLAS = {_json(_search_index(meta, names))};\n")
    _write(out / "sources.js", f"window.ZFNET_SOURCES = {_json(_sources(meta, out))};\n")
    _index(out, meta, names)
    for li, name in enumerate(names):
        _write(out / layer_files(name)["data"], f"window.ZFNET_LAYERS = window.ZFNET_LAYERS || {{}};\n"
               f"window.ZFNET_LAYERS[{_json(name)}] = {_json(_layer_data(meta, name))};\n")
        _layer_page(out, meta, names, li)
        chans = sorted(int(c) for c in meta["layers"][name])
        for ci in range(len(chans)):
            _unit_page(out, meta, names, li, chans, ci)
    return out / "index.html"


def _search_index(meta: dict, names: list[str]) -> dict:
    """Layers, class names and per unit [layer, channel, max, [class, count, ...]]."""
    classes: dict[str, int] = {}
    units = []
    for li, name in enumerate(names):
        for c, u in sorted(meta["units"][name].items(), key=lambda kv: int(kv[0])):
            tags = []
            for n, cnt in (u.get("labels") or []) + (u.get("predicted") or []):
                tags += [classes.setdefault(n, len(classes)), cnt]
            units.append([li, int(c), u["max"], tags])
    return {"layers": [{"name": n, "file": file_safe(n), "channels": len(meta["layers"][n])} for n in names],
            "classes": list(classes), "units": units}


def _sources(meta: dict, out: Path) -> dict:
    """Every image shown: [file relative to the data folder, label, prediction, confidence], its view, and
    the data folder relative to the atlas (for links to the original files)."""
    data = meta.get("data")
    rel = Path(os.path.relpath(data, out)).as_posix() if data else None
    return {"data": rel, "items": {i: [s["file"], s.get("label"), s.get("predicted"), s.get("confidence"), s["view"]]
                                   for i, s in meta["sources"].items()}}


def _layer_data(meta: dict, name: str) -> dict:
    """What atlas.js needs to draw a layer's tiles: the layout and per unit its entries
    [image, value, y, x, y0, y1, x0, x1, oy, ox] (field box in the input, its place in the tile)."""
    t = meta["tiles"][name]
    size = meta["config"]["preprocess"]["size"]
    units = {c: [[e["index"], e["value"], e["y"], e["x"], *e["box"], *e["at"]] for e in es]
             for c, es in meta["layers"][name].items()}
    return {"name": name, "file": file_safe(name), "ext": t["ext"], "field": t["field"], "size": t["size"],
            "ncol": t["ncol"], "gap": SPRITE_GAP, "k": meta["k"], "input": [size, size], "thumb": THUMB,
            "units": units}


def _index(out: Path, meta: dict, names: list[str]):
    rows = []
    figures = meta.get("figures", {})
    for name in names:
        t = meta.get("table", {}).get(name, {})
        f = t.get("field") or {}
        lp = layer_files(name)["page"]
        fig = figures.get(name)
        thumb = f'<img src="{_url(fig["thumb"], 0)}" alt="Fig. 2 block of {_e(name)}" class="lthumb">' if fig else ""
        dead = len(meta["dead"].get(name, []))
        rows.append(f'<tr><td><a href="{_url(lp, 0)}">{thumb}</a></td><td><a href="{_url(lp, 0)}">{_e(name)}</a></td>'
                    f'<td>{_e(t.get("kind", ""))}</td><td class="num">{len(meta["layers"][name])}</td>'
                    f'<td class="num{" warn" if dead else ""}">{dead}</td>'
                    f'<td class="num">{_e(t.get("height", "?"))}×{_e(t.get("width", "?"))}</td>'
                    f'<td class="num">{_e(f.get("jump_y", "–"))}</td><td class="num">{_e(f.get("size_y", "all"))}</td>'
                    f'<td class="num">{meta["tiles"][name]["size"][0]} px</td></tr>')
    skipped = meta.get("skipped", [])
    skipped_html = ""
    if skipped:
        skipped_html = (f"<h2>Skipped files ({len(skipped)})</h2><ul>"
                        + "".join(f"<li>{_e(s.get('file', ''))}: {_e(s.get('error', ''))}</li>" for s in skipped)
                        + "</ul>")
    timing = meta.get("timing", {})
    dead = sum(len(v) for v in meta["dead"].values())
    units = sum(len(v) for v in meta["layers"].values())
    classes = meta.get("classes")
    body = (f"<h1>Feature atlas: {_e(meta.get('model', '?'))}</h1>"
            f"<p class=\"muted\">Zeiler &amp; Fergus (2013), Fig. 2: for every feature map its top "
            f"{_e(meta.get('k', 9))} activations across the data (distinct images), each projected to pixels "
            f"with the {_e(meta['config'].get('mode', 'deconv'))} rule beside the receptive-field patch of the "
            f"input it came from.</p>"
            f"<table><tr><th>model</th><td>{_e(meta.get('model'))}</td></tr>"
            f"<tr><th>weights</th><td>{_e(meta.get('weights'))}</td></tr>"
            f"<tr><th>data</th><td>{_e(meta.get('data'))}</td></tr>"
            f"<tr><th>images mined</th><td>{_e(meta.get('images'))}"
            + (f" ({len(classes)} classes)" if classes else "") + "</td></tr>"
            f"<tr><th>units</th><td>{units} ({dead} dead: never above 0)</td></tr>"
            f"<tr><th>time</th><td>{_e(timing.get('total_s', '?'))} s (mining {_e(timing.get('mine_s', '?'))} s)"
            f"</td></tr></table>"
            f"<h2>Layers</h2><table class=\"layers\"><tr><th></th><th>layer</th><th>kind</th>"
            f"<th class=\"num\">channels</th><th class=\"num\">dead</th><th class=\"num\">size</th>"
            f"<th class=\"num\">stride</th><th class=\"num\">receptive field</th><th class=\"num\">tile</th></tr>"
            + "".join(rows) + "</table>" + skipped_html
            + f"<h2>Config</h2><pre>{_e(json.dumps(meta.get('config', {}), indent=1))}</pre>")
    _write(out / "index.html", _page(f"atlas: {meta.get('model', '')}", body, 0, '<a href="index.html">index</a>'))


def _layer_nav(names: list[str], li: int) -> list[str]:
    nav = []
    if li > 0:
        nav.append(f'<a href="{_url(layer_files(names[li - 1])["page"], 1)}">← layer {_e(names[li - 1])}</a>')
    if li + 1 < len(names):
        nav.append(f'<a href="{_url(layer_files(names[li + 1])["page"], 1)}">layer {_e(names[li + 1])} →</a>')
    return nav


def _layer_page(out: Path, meta: dict, names: list[str], li: int):
    name = names[li]
    dead = set(meta["dead"].get(name, []))
    t = meta["tiles"][name]
    th, tw = t["size"]
    s = THUMB / th
    sw = round((SPRITE_GAP + t["ncol"] * (tw + SPRITE_GAP)) * s)
    cells = []
    for c in sorted(int(ch) for ch in meta["layers"][name]):
        u = meta["units"][name][str(c)]
        href = _url(unit_files(name, c)["page"], 1)
        if c in dead:
            cells.append(f'<a class="unit dead" href="{href}" data-ch="{c}" data-max="-1"><span class="deadmark">dead'
                         f'</span><br>{c} <span class="muted">never fires</span></a>')
            continue
        sprite = f"units/{Unit(name, c).slug}.{t['ext']}"
        cells.append(f'<a class="unit" href="{href}" data-ch="{c}" data-max="{u["max"]}"><img class="sprite" '
                     f'src="{_url(sprite, 1)}" width="{sw}" alt="projections of {_e(name)}:{c}"><span class="grid">'
                     f'</span><br>{c} <span class="muted">max {_fmt(u["max"])}</span></a>')
    fig = meta.get("figures", {}).get(name)
    fig_html = (f'<h2>Fig. 2 panel: {len(fig["units"])} random units (projections | patches)</h2>'
                f'<p class="figure"><img src="{_url(fig["panel"], 1)}" alt="Fig. 2 panel of {_e(name)}"></p>'
                if fig else "")
    f = (meta.get("table", {}).get(name, {}).get("field") or {})
    body = (f"<h1>Layer {_e(name)}</h1><p>{len(cells)} feature maps, <span class=\"{'warn' if dead else ''}\">"
            f"{len(dead)} dead</span> (never above 0 on the data); receptive field {_e(f.get('size_y', 'all'))} px, "
            f"shown as {th} px tiles.</p>{fig_html}"
            f"<h2>All feature maps (projections | patches)</h2><p>sort by <select class=\"sort\">"
            f"<option value=\"ch\">channel</option><option value=\"max\">maximum activation</option></select></p>"
            f"<div class=\"units\" data-layer=\"{_e(name)}\">{''.join(cells)}</div>")
    nav = "".join([f'<a href="{_url("index.html", 1)}">index</a>', *_layer_nav(names, li)])
    data = layer_files(name)["data"]
    _write(out / layer_files(name)["page"], _page(f"layer {name}", body, 1, nav, [data]))


def _tags(u: dict) -> str:
    parts = []
    for key, what in (("labels", "label"), ("predicted", "predicted")):
        if u.get(key):
            tags = " ".join(f'<span class="tag">{_e(n)} <b>{c}</b></span>' for n, c in u[key])
            parts.append(f'<span class="tags" title="most frequent {what} classes among the unit\'s top '
                         f'{u.get("top_n")} images">{_e(what)}: {tags}</span>')
    return " ".join(parts)


def _unit_page(out: Path, meta: dict, names: list[str], li: int, chans: list[int], ci: int):
    name, c = names[li], chans[ci]
    n = len(meta["layers"][name][str(c)])
    u = meta["units"][name][str(c)]
    nav = [f'<a href="{_url("index.html", 1)}">index</a>',
           f'<a href="{_url(layer_files(name)["page"], 1)}">layer {_e(name)}</a>']
    if ci > 0:
        nav.append(f'<a href="{_url(unit_files(name, chans[ci - 1])["page"], 1)}">← unit {chans[ci - 1]}</a>')
    if ci + 1 < len(chans):
        nav.append(f'<a href="{_url(unit_files(name, chans[ci + 1])["page"], 1)}">unit {chans[ci + 1]} →</a>')
    nav += _layer_nav(names, li)
    images = meta.get("images") or 0
    if u["max"] is None:
        stats = "<p class=\"warn\">dead: this unit never fires (no activation above 0 on any image).</p>"
    else:
        qtxt = ", ".join(f"{round(100 * q, 1):g}%: {_fmt(v)}"
                         for q, v in zip(meta.get("quantiles", []), u.get("quantiles") or []))
        fires = u.get("fires")
        stats = (f"<p>fires (maximum above 0) on <b>{fires}</b> of {images} images"
                 f" ({100 * fires / max(images, 1):.0f} %); per-image maximum quantiles {qtxt}; "
                 f"maximum {_fmt(u['max'])}.</p>" if fires is not None else "")
        if n < meta.get("k", 9):
            stats += f"<p class=\"muted\">only {n} images make it fire: all are shown.</p>"
        stats += f"<p>{_tags(u)}</p>" if _tags(u) else ""
    body = (f"<h1>Unit {_e(name)}:{c}</h1>{stats}<div class=\"entries\" data-layer=\"{_e(name)}\" data-ch=\"{c}\">"
            f"</div><noscript>The entries of this page are drawn by its scripts.</noscript>")
    _write(out / unit_files(name, c)["page"],
           _page(f"unit {name}:{c}", body, 1, "".join(nav), [layer_files(name)["data"], "sources.js"]))
