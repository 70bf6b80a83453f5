"""Static HTML for saved results: the feature atlas (Fig. 2) as a site that opens offline from disk.

Reads `result.json` and the PNGs beside it, never a model. Pages: `index.html` (model, data, config,
layers), `layers/<layer>.html` (every unit of a layer), `units/<unit>.html` (9 projections, 9 patches,
values, links to the source images). No scripts and no network: every link is a relative path, so the
folder can be opened with file:// or served as it is. Every string that comes from the user (file names,
layer names, model names, config values) is HTML-escaped; paths are also URL-quoted.
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

__all__ = ["write_site", "check_result", "layer_files", "unit_files"]

SCHEMA = 1


def layer_files(layer: str) -> dict[str, str]:
    """Paths (relative to the result folder) of one layer's page and Fig. 2 panel."""
    name = file_safe(layer)  # named like unit files
    return {"page": f"layers/{name}.html", "figure": f"layers/{name}.png"}


def unit_files(layer: str, channel: int) -> dict[str, str]:
    """Paths (relative to the result folder) of one unit's page and pictures."""
    slug = Unit(layer, channel).slug
    return {"page": f"units/{slug}.html", "proj": f"units/{slug}_proj.png", "patch": f"units/{slug}_patch.png"}


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


def _href(target: str | Path, page_dir: Path) -> str:
    """Relative, URL-quoted, HTML-escaped link from a page folder to a file (absolute or site-relative)."""
    rel = os.path.relpath(Path(target), page_dir)
    return _e(quote(Path(rel).as_posix()))


def _page(title: str, body: str, css: str) -> str:
    """css: an already escaped href."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{_e(title)}</title><link rel="stylesheet" href="{css}"></head>\n'
            f'<body>\n{body}\n</body></html>\n')


def _write(path: Path, text: str):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4g}"


def write_site(out: str | os.PathLike) -> Path:
    """Write index.html, one page per layer and one per unit into the atlas folder `out`."""
    out = Path(out)
    meta = check_result(out)
    css_src = resources.files(__package__).joinpath("templates/atlas.css").read_text(encoding="utf-8")
    _write(out / "style.css", css_src)
    data_root = Path(meta["data"]) if meta.get("data") else None
    layers = meta["layers"]
    table = meta.get("table", {})
    figures = meta.get("figures", {})

    def source(rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() or data_root is None else data_root / p

    # ---- index
    rows = []
    for name, units in layers.items():
        t = table.get(name, {})
        f = t.get("field") or {}
        lp = layer_files(name)["page"]
        rows.append(f'<tr><td><a href="{_href(out / lp, out)}">{_e(name)}</a></td><td>{_e(t.get("kind", ""))}</td>'
                    f'<td class="num">{len(units)}</td><td class="num">{_e(t.get("height", "?"))}×'
                    f'{_e(t.get("width", "?"))}</td><td class="num">{_e(f.get("jump_y", "–"))}</td>'
                    f'<td class="num">{_e(f.get("size_y", "all"))}</td></tr>')
    skipped = meta.get("skipped", [])
    skipped_html = ""
    if skipped:
        skipped_html = (f"<h2>Skipped files ({len(skipped)})</h2><ul>"
                        + "".join(f"<li>{_e(s.get('error', s))}</li>" for s in skipped) + "</ul>")
    timing = meta.get("timing", {})
    body = (f"<h1>Feature atlas: {_e(meta.get('model', '?'))}</h1>"
            f"<p class=\"muted\">Zeiler &amp; Fergus (2013), Fig. 2: for every feature map the top "
            f"{_e(meta.get('k', 9))} activations across the data, projected to pixels with the deconvnet, "
            f"beside the receptive-field patches of the input.</p>"
            f"<table><tr><th>model</th><td>{_e(meta.get('model'))}</td></tr>"
            f"<tr><th>weights</th><td>{_e(meta.get('weights'))}</td></tr>"
            f"<tr><th>data</th><td>{_e(meta.get('data'))}</td></tr>"
            f"<tr><th>images mined</th><td>{_e(meta.get('images'))}</td></tr>"
            f"<tr><th>time</th><td>{_e(timing.get('total_s', '?'))} s (mining {_e(timing.get('mine_s', '?'))} s)"
            f"</td></tr></table>"
            f"<h2>Layers</h2><table><tr><th>layer</th><th>kind</th><th class=\"num\">channels</th>"
            f"<th class=\"num\">size</th><th class=\"num\">stride</th><th class=\"num\">receptive field</th></tr>"
            + "".join(rows) + "</table>" + skipped_html
            + f"<h2>Config</h2><pre>{_e(json.dumps(meta.get('config', {}), indent=1))}</pre>")
    _write(out / "index.html", _page(f"atlas: {meta.get('model', '')}", body, "style.css"))

    # ---- layer pages and unit pages
    names = list(layers)
    for li, name in enumerate(names):
        units = layers[name]
        ldir = out / "layers"
        nav = [f'<a href="{_href(out / "index.html", ldir)}">index</a>']
        if li > 0:
            prev = names[li - 1]
            nav.append(f'<a href="{_href(out / layer_files(prev)["page"], ldir)}">← {_e(prev)}</a>')
        if li + 1 < len(names):
            nxt = names[li + 1]
            nav.append(f'<a href="{_href(out / layer_files(nxt)["page"], ldir)}">{_e(nxt)} →</a>')
        chans = list(units)
        unit_paths = [unit_files(name, int(ch)) for ch in chans]
        cells = []
        for (ch, entries), files in zip(units.items(), unit_paths):
            top = entries[0]["value"] if entries else None
            cells.append(f'<div class="unit"><a href="{_href(out / files["page"], ldir)}">'
                         f'<img src="{_href(out / files["proj"], ldir)}" alt="projections of {_e(name)}:{_e(ch)}">'
                         f'<img src="{_href(out / files["patch"], ldir)}" alt="patches of {_e(name)}:{_e(ch)}">'
                         f'<br>{_e(ch)} <span class="muted">max {_fmt(top)}</span></a></div>')
        fig = figures.get(name)
        fig_html = (f'<h2>Fig. 2-style panel</h2><p class="figure"><img src="{_href(out / fig, ldir)}" '
                    f'alt="panel of {_e(name)}"></p>') if fig else ""
        body = (f"<nav>{''.join(nav)}</nav><h1>Layer {_e(name)}</h1>{fig_html}"
                f"<h2>All {len(units)} feature maps (projections | patches)</h2>"
                f"<div class=\"units\">{''.join(cells)}</div>")
        page = out / layer_files(name)["page"]
        _write(page, _page(f"layer {name}", body, _href(out / "style.css", ldir)))

        udir = out / "units"
        for ci, (ch, files) in enumerate(zip(chans, unit_paths)):
            unav = [f'<a href="{_href(out / "index.html", udir)}">index</a>',
                    f'<a href="{_href(page, udir)}">layer {_e(name)}</a>']
            if ci > 0:
                unav.append(f'<a href="{_href(out / unit_paths[ci - 1]["page"], udir)}">← {_e(chans[ci - 1])}</a>')
            if ci + 1 < len(chans):
                unav.append(f'<a href="{_href(out / unit_paths[ci + 1]["page"], udir)}">{_e(chans[ci + 1])} →</a>')
            trs = "".join(
                f'<tr><td class="num">{r + 1}</td><td class="num">{_fmt(e["value"])}</td>'
                f'<td><a href="{_href(source(e["image"]), udir)}">{_e(e["image"])}</a></td>'
                f'<td class="num">{_e(e["y"])}, {_e(e["x"])}</td></tr>' for r, e in enumerate(units[ch]))
            body = (f"<nav>{''.join(unav)}</nav><h1>Unit {_e(name)}:{_e(ch)}</h1>"
                    f'<div class="pair"><figure><img src="{_href(out / files["proj"], udir)}" '
                    f'alt="deconvnet projections"><figcaption>deconvnet projections, best first (row-major)'
                    f'</figcaption></figure><figure><img src="{_href(out / files["patch"], udir)}" '
                    f'alt="input patches"><figcaption>receptive-field patches of the input</figcaption></figure>'
                    f'</div><h2>Top activations</h2><table><tr><th class="num">#</th><th class="num">value</th>'
                    f'<th>image</th><th class="num">location (y, x)</th></tr>{trs}</table>')
            _write(out / files["page"], _page(f"unit {name}:{ch}", body, _href(out / "style.css", udir)))
    return out / "index.html"
