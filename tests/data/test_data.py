"""Decoding odd image files, folders, and the two preprocessing presets."""

import numpy as np
import pytest
import torch
from PIL import Image

from zfnet.core.errors import ZfnetError
from zfnet.data.images import Batches, ImageDataset, Preprocess, list_images, load_image, ten_crop


def _rgb(h=40, w=60, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_decodes_every_mode(tmp_path):
    a = _rgb()
    Image.fromarray(a).convert("L").save(tmp_path / "gray.png")
    Image.fromarray(a).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(a).convert("CMYK").save(tmp_path / "cmyk.jpg")
    rgba = np.dstack([a, np.full(a.shape[:2], 255, np.uint8)])
    rgba[:10, :10, 3] = 0  # transparent corner -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    deep16 = Image.fromarray(a[..., 0].astype(np.uint16) * 257)
    assert deep16.mode.startswith("I;16")
    deep16.save(tmp_path / "deep.png")
    for name in ["gray.png", "palette.png", "cmyk.jpg", "rgba.png", "deep.png"]:
        im = load_image(tmp_path / name)
        assert im.mode == "RGB" and im.size == (60, 40), name
    assert np.asarray(load_image(tmp_path / "rgba.png"))[:10, :10].min() == 255
    assert np.array_equal(np.asarray(load_image(tmp_path / "rgba.png"))[20:, 20:], a[20:, 20:])
    deep = np.asarray(load_image(tmp_path / "deep.png"))[..., 0].astype(int)
    assert np.abs(deep - a[..., 0]).max() <= 1  # 16-bit scaled back to 8 bits, not clipped


def test_exif_rotation(tmp_path):
    a = _rgb(30, 50)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    assert load_image(tmp_path / "rot.jpg").size == (30, 50)


@pytest.mark.parametrize("content,match", [(b"", "empty file"), (b"not an image at all", "cannot read image"),
                                           (b"\xff\xd8\xff\xe0" + b"\0" * 20, "cannot read image")])
def test_bad_files_name_the_file(tmp_path, content, match):
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(ZfnetError, match=match) as e:
        load_image(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ZfnetError, match="image not found"):
        load_image(tmp_path / "missing.jpg")


def test_folders(tmp_path):
    for cls in ["b_dogs", "a_cats"]:
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(_rgb(seed=i)).save(tmp_path / "tree" / cls / f"{i}.png")
    paths, labels, classes = list_images(tmp_path / "tree")
    assert classes == ["a_cats", "b_dogs"] and labels == [0, 0, 1, 1]
    (tmp_path / "flat").mkdir()
    Image.fromarray(_rgb()).save(tmp_path / "flat" / "x.jpg")
    (tmp_path / "flat" / "notes.txt").write_text("hi")
    assert list_images(tmp_path / "flat") == ([tmp_path / "flat" / "x.jpg"], None, None)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no pictures here")
    with pytest.raises(ZfnetError, match="no images found"):
        list_images(tmp_path / "empty")
    with pytest.raises(ZfnetError, match="no such file or folder"):
        list_images(tmp_path / "nope")


def test_batches_skip_unreadable_and_report(tmp_path):
    for i in range(5):
        Image.fromarray(_rgb(seed=i)).save(tmp_path / f"{i}.png")
    (tmp_path / "2.png").write_bytes(b"broken")
    ds = ImageDataset.from_folder(tmp_path)
    b = Batches(ds, batch_size=2, progress=False)
    seen = [int(i) for _, _, idx in b for i in idx]
    assert seen == [0, 1, 3, 4]
    assert len(b.skipped) == 1 and b.skipped[0][0].endswith("2.png") and "cannot read" in b.skipped[0][1]


def test_torchvision_preset_matches_hand_computation():
    a = _rgb(300, 400)
    x = Preprocess()(Image.fromarray(a))
    assert x.shape == (3, 224, 224)
    # shorter side 300 -> 256: PIL bilinear to (341, 256), centre 224 crop from (row 16, col 58)
    ref = np.asarray(Image.fromarray(a).resize((341, 256), Image.BILINEAR), dtype=np.float32)[16:240, 58:282] / 255
    ref = (ref - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(x.permute(1, 2, 0).numpy(), ref, atol=1e-5)


def test_paper_preset_subtracts_mean_image_and_crops():
    im = Image.fromarray(_rgb(256, 320))
    mean = torch.rand(3, 256, 256)
    full = torch.from_numpy(np.asarray(im, dtype=np.float32)[:, 32:288] / 255).permute(2, 0, 1) - mean
    assert torch.allclose(Preprocess("paper", mean_image=mean).base(im), full)
    center = Preprocess("paper", mean_image=mean)(im)
    assert torch.allclose(center, full[:, 16:240, 16:240])
    ten = Preprocess("paper", crop="ten", mean_image=mean)(im)
    assert ten.shape == (10, 3, 224, 224)
    assert torch.equal(ten[0], full[:, :224, :224]) and torch.equal(ten[3], full[:, 32:, 32:])
    assert torch.equal(ten[4], center) and torch.equal(ten[9], center.flip(-1))
    g = torch.Generator().manual_seed(0)
    crops = [Preprocess("paper", crop="random", mean_image=mean, generator=g)(im) for _ in range(20)]
    assert all(c.shape == (3, 224, 224) for c in crops)
    assert len({c.sum().item() for c in crops}) > 1  # random positions / flips
    for c in crops:  # every random crop is one of the 33x33x2 possible crops of `full` (or its mirror)
        found = False
        for f in (full, full.flip(-1)):
            corner = (f[:, :33, :33] == c[:, :1, :1]).all(0).nonzero().tolist()  # candidate top-left corners
            found |= any(torch.equal(c, f[:, t:t + 224, left:left + 224]) for t, left in corner)
        assert found
    assert torch.allclose(Preprocess("paper", mean_image=mean).unnormalize(center),
                          (center + mean[:, 16:240, 16:240]).clamp(0, 1))


def test_ten_crop_softmax_average_of_identity_model():
    x = torch.arange(2 * 5 * 5, dtype=torch.float32).view(2, 5, 5)
    crops = ten_crop(x, 3)
    assert crops.shape == (10, 2, 3, 3)
    assert torch.equal(crops[1], x[:, 0:3, 2:5]) and torch.equal(crops[5], x[:, 0:3, 0:3].flip(-1))
