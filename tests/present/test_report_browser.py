"""The atlas site in a real headless browser (Debian's chromium driven by Playwright), from file://:
every picture renders, every link resolves, and hostile file / model names stay text."""

import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from tiny import PRE, Tiny, make_folder

from zfnet.present.site import write_site
from zfnet.understanding.atlas import atlas

CHROMIUM = os.environ.get("ZFNET_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
HOSTILE = ['we<i>rd & "q" \'x\'.png', "space name.png", "ünï %41 #h?.png"]
EVIL = "<script>window.PWNED = 1</script>"


def _need_browser():
    why = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        why = "playwright is not installed (pip install playwright)"
    if why is None and not Path(CHROMIUM).exists():
        why = f"no chromium at {CHROMIUM} (apt-get install chromium)"
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser test cannot run under CI: {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    folder = make_folder(root / "my data" / "imgs", n=6)
    for name, src in zip(HOSTILE, ["img00.png", "img01.png", "img04.png"]):
        shutil.copy(folder / src, folder / name)
    out = root / "atlas <out>"
    atlas(Tiny(), folder, out, ["relu1", "relu2"], k=9, batch_size=8, preprocess=PRE, progress=False,
          model_name=EVIL, weights='"w.pth"')
    return out


def _check_page(page, url, min_images=1):
    page.goto(url)
    page.wait_for_load_state("load")
    n = page.evaluate("document.images.length")
    broken = page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
                           ".map(i => i.getAttribute('src'))")
    assert n >= min_images, url
    assert broken == [], f"{url}: images that do not render: {broken}"
    assert page.evaluate("typeof window.PWNED") == "undefined"
    assert page.evaluate("document.scripts.length") == 0
    return page.evaluate("Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")


def test_site_renders_offline_in_chromium(site, browser):
    page = browser.new_page()
    failed = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    index = site / "index.html"
    links = _check_page(page, index.as_uri(), min_images=0)
    assert EVIL in page.inner_text("h1")  # shown as text, not run
    layer_pages = [u for u in links if "/layers/" in u]
    assert len(layer_pages) == 2
    unit_pages = []
    for url in layer_pages:
        links = _check_page(page, url, min_images=2 * 5 + 1)  # proj + patch per unit, and the panel
        unit_pages += [u for u in links if "/units/" in u]
    assert len(set(unit_pages)) == 6 + 5
    sources = set()
    for url in sorted(set(unit_pages)):
        links = _check_page(page, url, min_images=2)
        text = page.inner_text("table")
        sources |= {u for u in links if "/imgs/" in u}
        assert "value" in text
    # every source image link opens the real file (hostile names included)
    names = {Path(unquote(urlparse(u).path)).name for u in sources}
    assert set(HOSTILE) & names, names
    for u in sorted(sources):
        page.goto(u)
        assert page.evaluate("document.images.length && document.images[0].naturalWidth") > 0, u
    assert failed == []
    page.close()


def test_report_needs_only_the_saved_results(site, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(site, copy)
    for p in copy.rglob("*.html"):
        p.unlink()
    write_site(copy)  # no model anywhere
    assert (copy / "index.html").exists() and len(list((copy / "units").glob("*.html"))) == 11
    html = (copy / "index.html").read_text()
    assert EVIL not in html and "&lt;script&gt;" in html
    unit = (copy / "units" / "relu2_0.html").read_text()
    assert "<i>" not in unit
