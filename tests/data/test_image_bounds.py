"""Bounded memory per image (size and aspect refused from the header) and folder walks that list every
entry they cannot read."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import png_claiming

from zfnet.core.errors import ZfnetError
from zfnet.data.images import MAX_ASPECT, MAX_PIXELS, ImageDataset, list_images, load_image

ROOT = Path(__file__).resolve().parents[2]


def _photo(path: Path, w: int, h: int, seed: int = 0) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("w, h, match", [
    (10_000, 10_000, "too large .*100 Mpx.*above the 89 Mpx"),  # between PIL's warning and its error
    (20_000, 20_000, "too large .*400 Mpx.*above the 89 Mpx"),  # above PIL's error
])
def test_images_above_the_pixel_limit_are_refused_from_the_header(tmp_path, w, h, match, recwarn):
    p = png_claiming(tmp_path / "bomb.png", w, h)
    with pytest.raises(ZfnetError, match=match) as e:
        load_image(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]  # no warning printed


def test_extreme_aspect_ratios_are_refused_and_the_limit_itself_loads(tmp_path):
    for w, h in [(10_000, 3), (3, 10_000), (int(MAX_ASPECT * 10) + 1, 10)]:
        p = _photo(tmp_path / f"long_{w}x{h}.png", w, h)
        with pytest.raises(ZfnetError, match=f"{w}x{h}: an aspect ratio above 20:1") as e:
            load_image(p)
        assert str(p) in str(e.value)
    assert load_image(_photo(tmp_path / "limit.png", int(MAX_ASPECT * 10), 10)).size == (200, 10)
    assert load_image(_photo(tmp_path / "one.png", 1, 1)).size == (1, 1)
    assert MAX_PIXELS == Image.MAX_IMAGE_PIXELS  # the same bound as PIL's own


# Peak RSS of one CLI run, measured in a forked child of a process that has imported torch and zfnet (so
# every run starts from the same memory), under an address-space cap: on code that allocates the resized
# image, the cap turns what would be ~21 GB into a quick failure instead of swapping the machine.
_PEAK = """
import json, os, resource, sys
import torch, zfnet.cli
runs, cap = json.loads(sys.argv[1]), int(sys.argv[2]) * 2**20
torch.set_num_threads(1)
for argv in runs:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
        try:
            rc = zfnet.cli.main(argv)
        except BaseException as e:
            rc = repr(e)[:200]
        os.write(w, json.dumps([rc, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024]).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.waitpid(pid, 0)
    print("PEAK", data.decode() or json.dumps(["killed", -1]), flush=True)
"""


def test_peak_memory_of_an_extreme_image_is_bounded(tmp_path):
    """Stated bound: a refused 10000x3 image costs at most 64 MiB above a run on a normal 40x44 photo, and
    an accepted image at the aspect limit (2000x100) at most 1 GiB above it. Before the bound, resizing
    the 10000x3 image's shorter side to 256 made an 853,333 x 256 image: ~21 GB peak in `invariance`."""
    normal, edge, wide = (_photo(tmp_path / n, w, h) for n, w, h in
                          [("normal.png", 44, 40), ("edge.png", 2000, 100), ("wide.png", 10_000, 3)])
    base = ["invariance", "--model", "cli_models:tiny", "--weights", "none", "--layers", "relu2",
            "--translate", "-20:20:20", "--scale", "1,1.5", "--rotate", "0,90"]
    runs = [base + [str(f), "--out", str(tmp_path / f.stem)] for f in (normal, edge, wide)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("", "tests", "tests/cli"))}
    r = subprocess.run([sys.executable, "-c", _PEAK, json.dumps(runs), "4096"], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (rc_n, peak_n), (rc_e, peak_e), (rc_w, peak_w) = (json.loads(line[5:]) for line in r.stdout.splitlines()
                                                             if line.startswith("PEAK "))
    assert (rc_n, rc_e) == (0, 0), r.stderr[-2000:]
    assert rc_w == 1 and f"{wide}" in r.stderr and "aspect ratio above 20:1" in r.stderr  # refused, listed
    assert peak_w <= peak_n + 64, (peak_n, peak_w)
    assert peak_e <= peak_n + 1024, (peak_n, peak_e)


def test_folder_walk_lists_every_entry_it_cannot_read(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    good = _photo(flat / "good.png", 20, 20)
    (flat / "dangling.jpg").symlink_to(flat / "gone.jpg")
    (flat / "folder.jpg").mkdir()
    os.mkfifo(flat / "pipe.png")  # opening it would block forever
    (flat / "notes.txt").write_text("not named like an image: not a candidate")
    paths, labels, classes = list_images(flat)
    assert [p.name for p in paths] == ["dangling.jpg", "folder.jpg", "good.png", "pipe.png"]
    ds = ImageDataset(paths)
    errors = {ds.paths[i].name: ds[i][3] for i in range(len(ds))}
    assert errors["good.png"] is None
    assert "broken link" in errors["dangling.jpg"] and "is a folder" in errors["folder.jpg"]
    assert "not a regular file" in errors["pipe.png"]
    assert all(str(flat / n) in e for n, e in errors.items() if e)
    # a folder holding only a folder named like an image is a folder of one bad image, not a class
    only = tmp_path / "only"
    (only / "x.jpg").mkdir(parents=True)
    assert list_images(only) == ([only / "x.jpg"], None, None)
    # class folders: the same entries are listed (and images inside a folder named x.jpg are found)
    tree = tmp_path / "tree"
    (tree / "a").mkdir(parents=True)
    (tree / "b" / "x.jpg").mkdir(parents=True)
    _photo(tree / "a" / "1.png", 20, 20)
    (tree / "a" / "dangling.jpg").symlink_to(tree / "gone.jpg")
    _photo(tree / "b" / "x.jpg" / "2.png", 20, 20)
    paths, labels, classes = list_images(tree)
    assert [str(p.relative_to(tree)) for p in paths] == ["a/1.png", "a/dangling.jpg", "b/x.jpg", "b/x.jpg/2.png"]
    assert labels == [0, 0, 1, 1] and classes == ["a", "b"]
    assert good.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_unreadable_file_is_listed(tmp_path):
    p = _photo(tmp_path / "secret.png", 20, 20)
    p.chmod(0)
    with pytest.raises(ZfnetError, match="permission denied"):
        load_image(p)
