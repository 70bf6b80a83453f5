"""A corpus of good and bad inputs, made by the tests (nothing is downloaded): images a user's folder may
hold, files that only look like images, and weights files that must be refused."""

import io
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from cli_models import tiny
from PIL import Image, features
from tiny import png_claiming

# Names a user's photos may have: spaces, quotes, HTML, non-ASCII, '#', a leading dash, a newline, a
# backslash, a hidden file, a name near the file-system limit.
HOSTILE_NAMES = ["we ird 'quote\".png", "<b>&amp;.png", "日本語の写真.png", "#hash%20.png", "-dash.png",
                 "new\nline.png", "back\\slash.png", ".hidden.png", "x" * 200 + ".png"]


def _rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def good_images(folder: Path, seed: int = 0) -> list[Path]:
    """Every kind of readable image: each must be processed."""
    folder.mkdir(parents=True, exist_ok=True)
    a = _rgb(40, 52, seed)
    made = {}

    def save(name, im, **kw):
        im.save(folder / name, **kw)
        made[name] = folder / name

    save("photo.jpg", Image.fromarray(a), quality=90)
    save("one_pixel.png", Image.fromarray(a[:1, :1]))
    save("cmyk.jpg", Image.fromarray(a).convert("CMYK"))
    save("deep16.png", Image.fromarray(a[..., 0].astype(np.uint16) * 257))
    pal = Image.fromarray(a).convert("P")
    save("palette.png", pal, transparency=0)
    frames = [Image.fromarray(_rgb(30, 30, seed + i)).convert("P") for i in range(3)]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=50, loop=0)
    save("photo.tiff", Image.fromarray(a))
    if features.check("webp"):
        save("photo.webp", Image.fromarray(a))
    save("gray.bmp", Image.fromarray(a).convert("L"))
    for i, name in enumerate(HOSTILE_NAMES):
        save(name, Image.fromarray(_rgb(36 + i, 44, seed + 10 + i)))
    return sorted(made.values())


def bad_images(folder: Path) -> list[Path]:
    """Entries named like images that cannot be decoded (or must not be): each must be skipped and listed."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64, 99)).save(buf, "JPEG", quality=95)
    jpeg = buf.getvalue()
    bad = {
        "empty.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "corrupt_header.png": b"\x89PNG\r\n\x1a\n" + os.urandom(64),
        "random.jpg": np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "text.jpg": b"this is a text file with an image's name\n",
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    png_claiming(folder / "bomb.png", 10_000, 10_000)  # above PIL's limit (it would only warn)
    png_claiming(folder / "bomb2.png", 20_000, 20_000)  # above twice PIL's limit (it raises)
    Image.fromarray(_rgb(3, 10_000, 2)).save(folder / "wide.png")  # ~21 GB once resized, without a bound
    (folder / "dangling.jpg").symlink_to(folder / "no-such-file.jpg")
    (folder / "folder.jpg").mkdir()
    os.mkfifo(folder / "fifo.png")  # opening it would block forever
    (folder / "notes.txt").write_text("not named like an image: not an input at all")
    made = [*bad, "bomb.png", "bomb2.png", "wide.png", "dangling.jpg", "folder.jpg", "fifo.png"]
    return sorted(folder / n for n in made)


class _RunsCode:
    """Unpickling this would create a marker file: a weights file must never run code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def weights_files(folder: Path) -> tuple[Path, dict[str, Path], Path]:
    """(good weights of cli_models:tiny, {name: bad weights file}, the marker malicious code would create)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "tiny.pth"
    state = tiny().state_dict()
    torch.save(state, good)
    marker = folder / "code-ran"
    bad = {name: folder / name for name in ["empty.pth", "random.pth", "truncated.pth", "nan.pth", "code.pth",
                                            "shapes.pth", "tensor.pth", "strings.pth", "dangling.pth", "dir.pth"]}
    bad["empty.pth"].write_bytes(b"")
    bad["random.pth"].write_bytes(os.urandom(2048))
    bad["truncated.pth"].write_bytes(good.read_bytes()[:300])
    nan = {k: v.clone() for k, v in state.items()}
    nan["conv2.weight"][0] = float("nan")
    torch.save(nan, bad["nan.pth"])
    with open(bad["code.pth"], "wb") as f:
        pickle.dump({"conv1.weight": _RunsCode(marker)}, f)
    torch.save({k: v[:1] for k, v in state.items()}, bad["shapes.pth"])
    torch.save(torch.zeros(3), bad["tensor.pth"])
    torch.save({"model": "not a state dict"}, bad["strings.pth"])
    bad["dangling.pth"].symlink_to(folder / "gone.pth")
    bad["dir.pth"].mkdir()
    return good, bad, marker
