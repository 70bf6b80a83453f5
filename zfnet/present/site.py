"""Static HTML for a saved atlas (Fig. 2): a site that opens offline from disk, no server.

Reads `result.json` and the pictures beside it, never a model. Pages:
  * `index.html`: model, data, the layer table with a thumbnail (a Fig. 2 block) and the dead units of
    every layer;
  * `layers/<layer>.html`: the layer's Fig. 2 panel and one thumbnail per unit (its k projections beside
    its k patches), sortable by maximum activation, dead units flagged;
  * `units/<unit>.html`: the k projections and patches at full size, each with its source image (relative
    to the data folder), that image's label (its class folder) and the model's top-1 prediction, value
    and location, and the field box drawn on the input; the unit's firing rate, quantiles and class tags.
Patches are drawn from the one stored view of each source image (a CSS crop of `images/<i>.<ext>`), so
they take no space of their own. Every page has a search box (a unit address, a layer, or a class name ->
the units whose top images are most often of that class) that works from `search.js`, a small index
loaded as a script because file:// pages cannot fetch JSON. Every string that comes from the user (file
names, layer names, class names, model names, config values) is HTML-escaped; paths are also URL-quoted.
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
from .tiles import SPRITE_GAP, TileLayout, sprite_cell

__all__ = ["write_site", "check_result", "layer_files", "unit_files"]

SCHEMA = 2
THUMB = 36  # px per tile in the layer pages' unit thumbnails
FULL = 168  # px of the input view with its field box on unit pages


def layer_files(layer: str) -> dict[str, str]:
    """Paths (relative to the result folder) of one layer's page."""
    return {"page": f"layers/{file_safe(layer)}.html"}


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


def _href(target: str | Path, page_dir: Path) -> str:
    """Relative, URL-quoted, HTML-escaped link from a page folder to a file (absolute or site-relative)."""
    return _e(quote(Path(os.path.relpath(Path(target), page_dir)).as_posix()))


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4g}"


def _write(path: Path, text: str):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def _page(title: str, body: str, depth: int, nav: str = "") -> str:
    up = "../" * depth
    search = ('<form class="search" role="search"><input type="search" placeholder="unit (features.12:7), layer '
              'or class" aria-label="search units, layers and classes"><ul class="results"></ul></form>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{_e(title)}</title><link rel="stylesheet" href="{up}style.css"></head>\n'
            f'<body data-root="{up or "./"}"><header><nav>{nav}</nav>{search}</header>\n{body}\n'
            f'<script src="{up}search.js"></script><script src="{up}atlas.js"></script></body></html>\n')


class _Layer:
    """What the pages need of one layer: its tile layout and how to draw a patch or a projection tile."""

    def __init__(self, meta: dict, name: str):
        t = meta["tiles"][name]
        self.name, self.ext, self.ncol = name, t["ext"], t["ncol"]
        self.layout = TileLayout(tuple(t["field"]), tuple(t["size"]))
        self.H, self.W = meta["config"]["preprocess"]["size"], meta["config"]["preprocess"]["size"]
        self.nrow = -(-meta["k"] // self.ncol)

    def sprite(self, channel: int) -> str:
        return f"units/{Unit(self.name, channel).slug}.{self.ext}"

    def projection(self, channel: int, j: int, depth: int, shown: int | None = None) -> str:
        """Tile j of the unit's sprite, at `shown` px per tile (default: as stored)."""
        th, tw = self.layout.size
        s = (shown or th) / th
        top, left = sprite_cell(j, self.layout, self.ncol)
        sw = (SPRITE_GAP + self.ncol * (tw + SPRITE_GAP)) * s
        sh = (SPRITE_GAP + self.nrow * (th + SPRITE_GAP)) * s
        return (f'<span class="t" style="width:{tw * s:.0f}px;height:{th * s:.0f}px;background-image:url('
                f"'{_url(self.sprite(channel), depth)}');background-size:{sw:.1f}px {sh:.1f}px;"
                f'background-position:{-left * s:.1f}px {-top * s:.1f}px"></span>')

    def patch(self, entry: dict, view: str, depth: int, shown: int | None = None) -> str:
        """The entry's receptive field, cut from the input view, placed in the tile as the projection is."""
        th, tw = self.layout.size
        fh, fw = self.layout.field
        sy, sx = (shown or th) / fh, (shown or th) * tw / th / fw
        y0, _, x0, _ = entry["box"]
        oy, ox = entry["at"]
        px = " px" if sy >= 2 else ""  # enlarged: show input pixels as blocks
        return (f'<span class="t{px}" style="width:{fw * sx:.0f}px;height:{fh * sy:.0f}px;background-image:url('
                f"'{_url(view, depth)}');background-size:{self.W * sx:.1f}px {self.H * sy:.1f}px;"
                f'background-position:{(ox - x0) * sx:.1f}px {(oy - y0) * sy:.1f}px"></span>')

    def box(self, entry: dict) -> str:
        y0, y1, x0, x1 = entry["box"]
        H, W = self.H, self.W
        return (f'<span class="box" style="top:{100 * y0 / H:.2f}%;left:{100 * x0 / W:.2f}%;'
                f'height:{100 * (y1 - y0) / H:.2f}%;width:{100 * (x1 - x0) / W:.2f}%"></span>')


def _tags(u: dict) -> str:
    parts = []
    for key, what in (("labels", "label"), ("predicted", "predicted")):
        if u.get(key):
            tags = " ".join(f'<span class="tag">{_e(n)} <b>{c}</b></span>' for n, c in u[key])
            parts.append(f'<span class="tags" title="most frequent {what} classes among the unit\'s top '
                         f'{u.get("top_n")} images">{_e(what)}: {tags}</span>')
    return " ".join(parts)


def write_site(out: str | os.PathLike) -> Path:
    """Write index.html, one page per layer and one per unit, style.css, atlas.js and search.js into `out`."""
    out = Path(out)
    meta = check_result(out)
    templates = resources.files(__package__).joinpath("templates")
    for name in ("style.css", "atlas.js"):
        src = {"style.css": "atlas.css"}.get(name, name)
        _write(out / name, templates.joinpath(src).read_text(encoding="utf-8"))
    names = list(meta["layers"])
    info = {n: _Layer(meta, n) for n in names}
    _write(out / "search.js", _search_index(meta, names))
    _index(out, meta, names, info)
    for li, name in enumerate(names):
        _layer_page(out, meta, names, li, info[name])
        chans = sorted(int(c) for c in meta["layers"][name])
        for ci in range(len(chans)):
            _unit_page(out, meta, names, li, info[name], chans, ci)
    return out / "index.html"


def _search_index(meta: dict, names: list[str]) -> str:
    """search.js: layers, class names and per unit (layer, channel, max, [class, count, ...])."""
    classes: dict[str, int] = {}
    units = []
    for li, name in enumerate(names):
        for c, u in sorted(meta["units"][name].items(), key=lambda kv: int(kv[0])):
            tags = []
            for n, cnt in (u.get("labels") or []) + (u.get("predicted") or []):
                tags += [classes.setdefault(n, len(classes)), cnt]
            units.append([li, int(c), u["max"], tags])
    data = {"layers": [{"name": n, "file": file_safe(n), "channels": len(meta["layers"][n])} for n in names],
            "classes": list(classes), "units": units}
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":")).replace("</", "<\\/")
    return f"window.ZFNET_ATLAS = {text};\n"


def _index(out: Path, meta: dict, names: list[str], info: dict):
    rows = []
    figures = meta.get("figures", {})
    for name in names:
        t = meta.get("table", {}).get(name, {})
        f = t.get("field") or {}
        lp = layer_files(name)["page"]
        fig = figures.get(name)
        thumb = f'<img src="{_url(fig["thumb"], 0)}" alt="Fig. 2 block of {_e(name)}" class="lthumb">' if fig else ""
        dead = len(meta["dead"].get(name, []))
        lay = info[name].layout
        rows.append(f'<tr><td><a href="{_url(lp, 0)}">{thumb}</a></td><td><a href="{_url(lp, 0)}">{_e(name)}</a></td>'
                    f'<td>{_e(t.get("kind", ""))}</td><td class="num">{len(meta["layers"][name])}</td>'
                    f'<td class="num{" warn" if dead else ""}">{dead}</td>'
                    f'<td class="num">{_e(t.get("height", "?"))}×{_e(t.get("width", "?"))}</td>'
                    f'<td class="num">{_e(f.get("jump_y", "–"))}</td><td class="num">{_e(f.get("size_y", "all"))}</td>'
                    f'<td class="num">{lay.size[0]} px</td></tr>')
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


def _layer_nav(names: list[str], li: int, depth: int) -> str:
    nav = [f'<a href="{_url("index.html", depth)}">index</a>']
    if li > 0:
        nav.append(f'<a href="{_url(layer_files(names[li - 1])["page"], depth)}">← layer {_e(names[li - 1])}</a>')
    if li + 1 < len(names):
        nav.append(f'<a href="{_url(layer_files(names[li + 1])["page"], depth)}">layer {_e(names[li + 1])} →</a>')
    return "".join(nav)


def _layer_page(out: Path, meta: dict, names: list[str], li: int, lay: _Layer):
    name = lay.name
    dead = set(meta["dead"].get(name, []))
    cells = []
    th = lay.layout.size[0]
    for c in sorted(int(ch) for ch in meta["layers"][name]):
        entries = meta["layers"][name][str(c)]
        u = meta["units"][name][str(c)]
        href = _url(unit_files(name, c)["page"], 1)
        if c in dead:
            cells.append(f'<a class="unit dead" href="{href}" data-ch="{c}" data-max="-1">'
                         f'<span class="deadmark">dead</span><br>{c} <span class="muted">never fires</span></a>')
            continue
        projs = "".join(lay.projection(c, j, 1, THUMB) for j in range(len(entries)))
        patches = "".join(lay.patch(e, meta["sources"][str(e["index"])]["view"], 1, THUMB) for e in entries)
        cells.append(f'<a class="unit" href="{href}" data-ch="{c}" data-max="{u["max"]}" '
                     f'title="{_e(name)}:{c}"><span class="grid">{projs}</span>'
                     f'<span class="grid">{patches}</span><br>{c} '
                     f'<span class="muted">max {_fmt(u["max"])}</span></a>')
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
            f"<div class=\"units\">{''.join(cells)}</div>")
    _write(out / layer_files(name)["page"], _page(f"layer {name}", body, 1, _layer_nav(names, li, 1)))


def _unit_page(out: Path, meta: dict, names: list[str], li: int, lay: _Layer, chans: list[int], ci: int):
    name, c = lay.name, chans[ci]
    entries = meta["layers"][name][str(c)]
    u = meta["units"][name][str(c)]
    nav = [f'<a href="{_url("index.html", 1)}">index</a>',
           f'<a href="{_url(layer_files(name)["page"], 1)}">layer {_e(name)}</a>']
    if ci > 0:
        nav.append(f'<a href="{_url(unit_files(name, chans[ci - 1])["page"], 1)}">← unit {chans[ci - 1]}</a>')
    if ci + 1 < len(chans):
        nav.append(f'<a href="{_url(unit_files(name, chans[ci + 1])["page"], 1)}">unit {chans[ci + 1]} →</a>')
    for lj, arrow in ((li - 1, "←"), (li + 1, "→")):
        if 0 <= lj < len(names):
            text = f"{arrow} layer {_e(names[lj])}" if arrow == "←" else f"layer {_e(names[lj])} {arrow}"
            nav.append(f'<a href="{_url(layer_files(names[lj])["page"], 1)}">{text}</a>')
    data_root = Path(meta["data"]) if meta.get("data") else None
    images = meta.get("images") or 0
    if u["max"] is None:
        stats = "<p class=\"warn\">dead: this unit never fires (no activation above 0 on any image).</p>"
    else:
        qs = u.get("quantiles") or []
        qtxt = ", ".join(f"{round(100 * q, 1):g}%: {_fmt(v)}" for q, v in zip(meta.get("quantiles", []), qs))
        fires = u.get("fires")
        stats = (f"<p>fires (maximum above 0) on <b>{fires}</b> of {images} images"
                 f" ({100 * fires / max(images, 1):.0f} %); per-image maximum quantiles {qtxt}; "
                 f"maximum {_fmt(u['max'])}.</p>" if fires is not None else "")
        if len(entries) < meta.get("k", 9):
            stats += f"<p class=\"muted\">only {len(entries)} images make it fire: all are shown.</p>"
        stats += f"<p>{_tags(u)}</p>" if _tags(u) else ""
    cards = []
    for r, e in enumerate(entries):
        src = meta["sources"][str(e["index"])]
        file = Path(src["file"])
        link = _href((file if file.is_absolute() or data_root is None else data_root / file), out / "units")
        label = f'<br>label <b>{_e(src["label"])}</b>' if "label" in src else ""
        pred = (f'<br>predicted <b>{_e(src["predicted"])}</b> ({100 * src["confidence"]:.0f} %)'
                if "predicted" in src else "")
        cards.append(f'<figure class="entry"><div class="pair">{lay.projection(c, r, 1)}'
                     f'{lay.patch(e, src["view"], 1)}<span class="full">'
                     f'<img src="{_url(src["view"], 1)}" width="{FULL}" height="{FULL}" alt="input of #{r + 1}">'
                     f'{lay.box(e)}</span></div><figcaption>#{r + 1} value <b>{_fmt(e["value"])}</b> at ('
                     f'{e["y"]}, {e["x"]})<br><a href="{link}">{_e(src["file"])}</a>{label}{pred}'
                     f'</figcaption></figure>')
    body = (f"<h1>Unit {_e(name)}:{c}</h1>{stats}"
            f"<p class=\"muted\">Each entry: the deconvnet projection of the activation, the receptive-field "
            f"patch of the input, and the input as the network saw it with the field drawn on it.</p>"
            f"<div class=\"entries\">{''.join(cards)}</div>")
    _write(out / unit_files(name, c)["page"], _page(f"unit {name}:{c}", body, 1, "".join(nav)))

