"""Build the built-in demo photos (`zfnet.data.samples.demo_dir()`) from Caltech-101.

Takes the first `--per-class` images (sorted file names) of every class folder, scales the shorter side
down to `--size` pixels (never up), re-encodes them as JPEG and writes them in class folders, so the
atlas knows each photo's label, with ATTRIBUTION.md naming the dataset, its license and every file
taken. Deterministic: the same source gives the same files.

    python scripts/demo_photos.py ../shared/data/caltech101 zfnet/assets/demo
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from PIL import Image

ATTRIBUTION = """# Demo photos: a subset of Caltech 101

These {n} photos ({per} of each of the {classes} object classes) are taken from **Caltech 101**:

> L. Fei-Fei, R. Fergus and P. Perona. *Caltech 101*. CaltechDATA (https://data.caltech.edu), the
> Caltech research data repository. First published with: L. Fei-Fei, R. Fergus and P. Perona,
> "Learning generative visual models from few training examples: an incremental Bayesian approach
> tested on 101 object categories", CVPR Workshop on Generative-Model Based Vision, 2004.

License: Creative Commons Attribution 4.0 International (CC-BY-4.0),
https://creativecommons.org/licenses/by/4.0/ .

Changes made: the first {per} images of each class folder (sorted by file name) were taken, scaled so
that their shorter side is at most {size} px (bilinear, never enlarged) and re-encoded as JPEG (quality
{quality}); the background class is not included. Built by `scripts/demo_photos.py` of zfnet.

Files taken (class folder / file name, identical to the names in Caltech 101):

{files}
"""


def build(src: Path, out: Path, per_class: int = 2, size: int = 160, quality: int = 85) -> list[Path]:
    classes = sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith(".")
                     and d.name != "BACKGROUND_Google")
    if not classes:
        sys.exit(f"no class folders in {src}")
    if out.exists():
        shutil.rmtree(out)
    written = []
    for d in classes:
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:per_class]
        for p in files:
            im = Image.open(p).convert("RGB")
            s = size / min(im.size)
            if s < 1:
                im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BILINEAR)
            dst = out / d.name / (p.stem + ".jpg")
            dst.parent.mkdir(parents=True, exist_ok=True)
            im.save(dst, format="JPEG", quality=quality, optimize=True)
            written.append(dst)
    listing = "\n".join(f"- {p.parent.name}/{p.name}" for p in written)
    (out / "ATTRIBUTION.md").write_text(ATTRIBUTION.format(n=len(written), per=per_class, classes=len(classes),
                                                           size=size, quality=quality, files=listing))
    return written


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="the Caltech-101 folder (one folder per class)")
    ap.add_argument("out", type=Path, help="where to write (replaced)")
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--size", type=int, default=160, help="shorter side in pixels (default: %(default)s)")
    ap.add_argument("--quality", type=int, default=85, help="JPEG quality (default: %(default)s)")
    args = ap.parse_args()
    written = build(args.src, args.out, args.per_class, args.size, args.quality)
    total = sum(p.stat().st_size for p in written)
    print(f"{len(written)} photos, {total / 1e6:.2f} MB in {args.out}")


if __name__ == "__main__":
    main()
