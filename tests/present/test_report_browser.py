"""The atlas site in a real headless browser (Debian's chromium driven by Playwright), from file://:
every picture and thumbnail renders, every link resolves, the search box finds units and classes, the
field box sits on the field, patches are the field's pixels, tiles have one size per layer, dead units
are flagged, and hostile file, class and model names stay text."""

import io
import json
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image
from tiny import PRE, Tiny, make_folder

from zfnet.present.site import THUMB, write_site
from zfnet.present.tiles import PAD
from zfnet.understanding.atlas import atlas

HOSTILE = ['we<i>rd & "q" \'x\'.png', "space name.png", "ünï %41 #h?.png"]
HOSTILE_CLASS = 'b<b>ad "cls" & co'
EVIL = "<script>window.PWNED = 1</script>"

# every url(...) of the tiles (projection crops of sprites, patch crops of the input views), loaded
_BACKGROUNDS = """async () => {
  const urls = new Set();
  document.querySelectorAll('.t').forEach(e => {
    const m = /url\\("(.*)"\\)/.exec(getComputedStyle(e).backgroundImage); if (m) urls.add(m[1]); });
  const bad = [];
  await Promise.all([...urls].map(u => new Promise(r => {
    const i = new Image(); i.onload = () => { if (!i.naturalWidth) bad.push(u); r(); };
    i.onerror = () => { bad.push(u); r(); }; i.src = u; })));
  return {n: urls.size, bad: bad};
}"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    data = root / "my data"
    cats = make_folder(data / "cats", n=6)
    make_folder(data / HOSTILE_CLASS, n=4, seed=3)
    for name, src in zip(HOSTILE, ["img00.png", "img01.png", "img04.png"]):
        shutil.copy(cats / src, cats / name)
    out = root / "atlas <out>"
    atlas(Tiny(), data, out, ["relu1", "relu2"], k=9, batch_size=8, preprocess=PRE, progress=False,
          model_name=EVIL, weights='"w.pth"')
    return out


@pytest.fixture()
def page(browser):
    pg = browser.new_page(viewport={"width": 1300, "height": 900})
    pg.failed, pg.errors = [], []
    pg.on("requestfailed", lambda r: pg.failed.append(r.url))
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    assert pg.failed == [] and pg.errors == []
    pg.close()


def _meta(site):
    return json.loads((site / "result.json").read_text())


def _check_page(page, url, min_images=1):
    page.goto(url)
    page.wait_for_load_state("load")
    n = page.evaluate("document.images.length")
    broken = page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
                           ".map(i => i.getAttribute('src'))")
    assert n >= min_images, url
    assert broken == [], f"{url}: images that do not render: {broken}"
    bg = page.evaluate(_BACKGROUNDS)
    assert bg["bad"] == [], f"{url}: tiles whose picture does not load: {bg['bad']}"
    assert page.evaluate("typeof window.PWNED") == "undefined"
    scripts = page.evaluate("Array.from(document.scripts).map(s => s.getAttribute('src'))")
    assert all(scripts) and [Path(s).name for s in scripts][-2:] == ["search.js", "atlas.js"]  # none inline
    assert {Path(s).name for s in scripts} <= {"search.js", "atlas.js", "sources.js", "relu1.js", "relu2.js"}
    return page.evaluate("Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")


def test_site_renders_offline_in_chromium(site, page):
    index = site / "index.html"
    links = _check_page(page, index.as_uri(), min_images=2)  # a thumbnail per layer
    assert EVIL in page.inner_text("h1")  # shown as text, not run
    layer_pages = sorted({u for u in links if "/layers/" in u})
    assert len(layer_pages) == 2
    unit_pages = []
    for url in layer_pages:
        links = _check_page(page, url, min_images=1)  # the Fig. 2 panel
        assert page.evaluate("document.querySelectorAll('.unit .t').length") > 0  # unit thumbnails
        unit_pages += [u for u in links if "/units/" in u]
    assert len(set(unit_pages)) == 6 + 5
    sources = set()
    for url in sorted(set(unit_pages)):
        links = _check_page(page, url, min_images=0)
        sources |= {u for u in links if "/my%20data/" in u or "/my data/" in u}
    names = {Path(unquote(urlparse(u).path)).name for u in sources}
    assert set(HOSTILE) & names, names
    for u in sorted(sources):  # every source image link opens the real file (hostile names included)
        page.goto(u)
        assert page.evaluate("document.images.length && document.images[0].naturalWidth") > 0, u


def test_search_finds_a_unit_a_layer_and_a_class(site, page):
    page.goto((site / "layers" / "relu1.html").as_uri())
    box = page.locator("form.search input")
    box.fill("relu2:3")
    box.press("Enter")
    page.wait_for_url("**/units/relu2_3.html")
    assert "Unit relu2:3" in page.inner_text("h1")
    page.locator("form.search input").fill("relu1")
    page.locator("form.search input").press("Enter")
    page.wait_for_url("**/layers/relu1.html")
    # a class name (part of it, any case) -> the units whose top images are most often of that class
    meta = _meta(site)
    want = {f"{layer}:{c}" for layer, us in meta["units"].items() for c, u in us.items()
            if any(n == HOSTILE_CLASS for n, _ in u.get("labels", []))}
    assert want
    page.locator("form.search input").fill("B<B>AD")
    items = page.locator("form.search .results li a")
    items.first.wait_for()
    texts = items.all_inner_texts()
    assert {t.split()[0] for t in texts} == want and all(HOSTILE_CLASS in t for t in texts)
    assert page.evaluate("document.querySelectorAll('.results b').length") == 0  # text, not markup
    items.first.click()
    page.wait_for_url("**/units/*.html")
    page.locator("form.search input").fill("no such thing")
    assert "no unit" in page.locator("form.search .results").inner_text()


def test_field_box_is_drawn_on_the_input(site, page):
    meta = _meta(site)
    for layer, c in (("relu1", 0), ("relu2", 2)):
        page.goto((site / "units" / f"{layer}_{c}.html").as_uri())
        page.wait_for_load_state("load")
        geo = page.evaluate("""() => Array.from(document.querySelectorAll('.full')).map(f => {
            const i = f.querySelector('img').getBoundingClientRect();
            const b = f.querySelector('.box').getBoundingClientRect();
            return [b.top - i.top, b.bottom - i.top, b.left - i.left, b.right - i.left, i.height, i.width]; })""")
        entries = meta["layers"][layer][str(c)]
        assert len(geo) == len(entries) > 0
        for (t, b, lft, r, h, w), e in zip(geo, entries):
            y0, y1 = (v * h / 32 for v in e["box"][:2])  # the input is 32 x 32, shown at h x w
            x0, x1 = (v * w / 32 for v in e["box"][2:])
            assert b - t > 2 and r - lft > 2
            assert max(abs(t - y0), abs(b - y1), abs(lft - x0), abs(r - x1)) <= 1.5


def test_patches_are_the_field_pixels(site, page):
    """A patch on a unit page, as the browser paints it, is the input view's field, each input pixel an
    s x s block, placed in the tile as the field is (PAD outside the image)."""
    meta = _meta(site)
    layer = "relu2"
    fh, fw = meta["tiles"][layer]["field"]
    th, _ = meta["tiles"][layer]["size"]
    s = th // fh
    checked = 0
    for c in range(2):
        page.goto((site / "units" / f"{layer}_{c}.html").as_uri())
        page.wait_for_load_state("load")
        for j, e in enumerate(meta["layers"][layer][str(c)][:4]):
            shot = page.locator(".entry").nth(j).locator(".t").nth(1).screenshot()
            got = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)
            view = np.asarray(Image.open(site / meta["sources"][str(e["index"])]["view"]).convert("RGB")).astype(int)
            y0, y1, x0, x1 = e["box"]
            oy, ox = e["at"]
            want = np.tile(np.array(PAD), (fh, fw, 1))
            want[oy:oy + y1 - y0, ox:ox + x1 - x0] = view[y0:y1, x0:x1]
            # the element screenshot is rounded out to whole pixels: at most one more row / column
            assert got.shape[0] - fh * s in (0, 1) and got.shape[1] - fw * s in (0, 1), got.shape
            centres = got[s // 2:fh * s:s, s // 2:fw * s:s]
            assert np.abs(centres - want).max() <= 3, (c, j)
            checked += 1
    assert checked >= 6


def test_top_k_on_pages_is_distinct_and_positive(site, page):
    meta = _meta(site)
    for layer, units in meta["layers"].items():
        for c, entries in units.items():
            page.goto((site / "units" / f"{layer}_{c}.html").as_uri())
            caps = page.locator(".entry figcaption").all_inner_texts()
            assert len(caps) == len(entries) <= 9
            values = [float(t.split("value ")[1].split()[0]) for t in caps]
            files = [t.splitlines()[1] for t in caps]
            assert all(v > 0 for v in values) and values == sorted(values, reverse=True)
            assert len(set(files)) == len(files)  # k distinct images
            assert all(("label " in t) and ("predicted " in t) for t in caps)


def test_dead_unit_is_flagged(site, page):
    meta = _meta(site)
    assert meta["dead"]["relu1"] == [5]
    page.goto((site / "index.html").as_uri())
    row = page.locator("table.layers tr", has_text="relu1").first
    assert row.locator("td").nth(4).inner_text().strip() == "1"
    page.goto((site / "layers" / "relu1.html").as_uri())
    dead = page.locator(".unit.dead")
    assert dead.count() == 1 and dead.first.get_attribute("data-ch") == "5" and "dead" in dead.first.inner_text()
    assert "1 dead" in page.inner_text("body")
    page.select_option("select.sort", "max")  # sorting by maximum puts the dead unit last
    chans = page.evaluate("Array.from(document.querySelectorAll('.unit')).map(u => +u.dataset.ch)")
    maxes = [float(meta["units"]["relu1"][str(ch)]["max"] or -1) for ch in chans]
    assert chans[-1] == 5 and maxes == sorted(maxes, reverse=True)
    page.goto((site / "units" / "relu1_5.html").as_uri())
    assert "never fires" in page.inner_text("body") and page.locator(".entry").count() == 0


def test_tiles_have_one_size_per_layer(site, page):
    meta = _meta(site)
    for layer, units in meta["layers"].items():
        th, tw = meta["tiles"][layer]["size"]
        sizes = set()
        for c in units:
            page.goto((site / "units" / f"{layer}_{c}.html").as_uri())
            sizes |= {tuple(s) for s in page.evaluate(
                "Array.from(document.querySelectorAll('.entry .t')).map(t => { const r = t.getBoundingClientRect();"
                " return [Math.round(r.height), Math.round(r.width)]; })")}
        assert sizes == {(th, tw)}, (layer, sizes)
        page.goto((site / "layers" / f"{layer}.html").as_uri())
        thumbs = {tuple(s) for s in page.evaluate(
            "Array.from(document.querySelectorAll('.unit .t, .unit img.sprite')).map(t => {"
            " const r = t.getBoundingClientRect(); return [t.tagName, Math.round(r.height), Math.round(r.width)]; })")}
        sprite = round(THUMB / th * (2 + 3 * (th + 2)))  # the 3 x 3 projections, at THUMB px a tile
        assert thumbs == {("SPAN", THUMB, round(THUMB * tw / th)), ("IMG", sprite, sprite)}, (layer, thumbs)


def test_report_needs_only_the_saved_results(site, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(site, copy)
    for p in copy.rglob("*.html"):
        p.unlink()
    write_site(copy)  # no model anywhere
    assert (copy / "index.html").exists() and len(list((copy / "units").glob("*.html"))) == 11
    html = (copy / "index.html").read_text()
    assert EVIL not in html and "&lt;script&gt;" in html
    for p in copy.rglob("*.html"):
        text = p.read_text()
        assert "<i>" not in text and "<b>ad" not in text and EVIL not in text
    js = (copy / "search.js").read_text()
    assert "</" not in js and json.loads(js.split("=", 1)[1].rstrip().rstrip(";"))["classes"]
