"""Mining equals brute force (ties included), shards merge to the single-process answer, runs resume."""

import sys

import numpy as np
import pytest
import torch
from tiny import PRE, Tiny, make_folder

from zfnet.core.errors import ZfnetError
from zfnet.data.images import ImageDataset, Preprocess
from zfnet.engine.mine import merge_topk, mine
from zfnet.inspect.layers import run_with_taps

LAYERS = ["relu1", "relu2", "fc"]


def brute_force(model, folder, layers, k, dtype=torch.float64, per_image=1, positive=True):
    """Per-image forward passes, one image at a time; python sorting of (-value, image, location).

    Candidates of an image: its first spatial maximum (per_image=1), else its `per_image` strongest local
    maxima (a value no smaller than any of its 8 neighbours), ties by location; only values > 0 when
    `positive`."""
    ds = ImageDataset.from_folder(folder, PRE)
    maps = {n: [] for n in layers}
    for i in range(len(ds)):
        x = ds[i][0][None].to(dtype)
        out = run_with_taps(model, x, layers)
        for n in layers:
            maps[n].append(out[n][0])
    res = {}
    for n in layers:
        C = maps[n][0].shape[0]
        per = []
        for c in range(C):
            cands = []
            for i, m in enumerate(maps[n]):
                a = m[c].numpy()
                if a.ndim == 0 or per_image == 1:
                    flat = a.reshape(-1)
                    best = flat.max()
                    found = [(float(best), int(np.flatnonzero(flat == best)[0]))]
                else:
                    H, W = a.shape
                    found = []
                    for y in range(H):
                        for x in range(W):
                            nb = a[max(0, y - 1):y + 2, max(0, x - 1):x + 2]
                            if a[y, x] >= nb.max():
                                found.append((float(a[y, x]), y * W + x))
                    found = sorted(found, key=lambda t: (-t[0], t[1]))[:per_image]
                cands += [(-v, i, loc) for v, loc in found if v > 0 or not positive]
            per.append(sorted(cands)[:k])
        res[n] = per
    return res


def check_equal_brute(result, brute, layers, k, widths, rtol=1e-9, atol=0.0):
    for n in layers:
        d = result.layers[n]
        for c, expect in enumerate(brute[n]):
            got_img = d["image"][c].tolist()
            assert got_img[:len(expect)] == [e[1] for e in expect], (n, c)
            assert got_img[len(expect):] == [-1] * (k - len(expect))
            np.testing.assert_allclose(d["value"][c, :len(expect)].numpy(), [-e[0] for e in expect], rtol=rtol,
                                       atol=atol)
            W = widths[n]
            assert d["y"][c, :len(expect)].tolist() == [e[2] // W for e in expect]
            assert d["x"][c, :len(expect)].tolist() == [e[2] % W for e in expect]


def results_equal(a, b):
    assert a.paths == b.paths and a.layers.keys() == b.layers.keys()
    for n in a.layers:
        for key in ("value", "image", "y", "x"):
            assert torch.equal(a.layers[n][key], b.layers[n][key]), (n, key)
        assert torch.equal(a.stats[n]["fires"], b.stats[n]["fires"])
        assert torch.equal(a.stats[n]["sample"].nan_to_num(-7), b.stats[n]["sample"].nan_to_num(-7))
    for x, y in ((a.predictions, b.predictions), (a.confidence, b.confidence)):
        assert (x is None and y is None) or torch.equal(x, y)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("mine") / "imgs")


@pytest.mark.parametrize("k,batch_size,dtype", [(4, 3, torch.float64), (20, 5, torch.float64),
                                               (4, 3, torch.float32), (20, 4, torch.float32)])
def test_equals_brute_force_with_ties(folder, k, batch_size, dtype):
    """float32 takes the packed-key path, float64 the three-stable-sorts path: both equal brute force."""
    model = Tiny(dtype)
    res = mine(model, folder, LAYERS, k=k, batch_size=batch_size, preprocess=PRE, progress=False, positive=True)
    brute = brute_force(model, folder, LAYERS, k, dtype)
    check_equal_brute(res, brute, LAYERS, k, {"relu1": 16, "relu2": 8, "fc": 1},
                      rtol=1e-9 if dtype == torch.float64 else 1e-6,  # float32: batch-dependent ulps
                      atol=0 if dtype == torch.float64 else 1e-6)
    # the dead channel (all 0) has no entry at all: zero is not a top activation
    assert res.layers["relu1"]["image"][5].tolist() == [-1] * k and res.dead("relu1") == [5]
    assert res.top("relu1", 5) == [] and res.dead("relu2") == []
    assert res.images == 13 and not res.skipped
    js = res.to_json()
    assert js["layers"]["relu2"]["0"][0]["image"] == f"img{int(res.layers['relu2']['image'][0, 0]):02d}.png"
    assert js["layers"]["relu1"]["5"] == []
    # fc may be negative: only its positive values are entries
    fc_pos = [len(e) for e in brute["fc"]]
    assert [len(js["layers"]["fc"][str(c)]) for c in range(4)] == fc_pos and min(fc_pos) < min(k, 13)


def test_top_k_is_k_distinct_images_and_never_non_positive(folder):
    res = mine(Tiny(torch.float32), folder, LAYERS, k=9, batch_size=4, preprocess=PRE, progress=False,
               positive=True)
    for n in LAYERS:
        for c in range(res.layers[n]["value"].shape[0]):
            top = res.top(n, c)
            assert len({e["index"] for e in top}) == len(top)
            assert all(e["value"] > 0 for e in top)


def test_by_default_every_value_ranks(folder):
    model = Tiny()
    res = mine(model, folder, ["relu1", "fc"], k=4, batch_size=3, preprocess=PRE, progress=False)
    brute = brute_force(model, folder, ["relu1", "fc"], 4, positive=False)
    check_equal_brute(res, brute, ["relu1", "fc"], 4, {"relu1": 16, "fc": 1})
    assert res.layers["relu1"]["image"][5].tolist() == [0, 1, 2, 3]  # all 0: ties go to the lower index
    assert res.dead("relu1") == [5]  # still dead: its best is 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_several_locations_per_image_equal_brute_force(folder, dtype):
    model = Tiny(dtype)
    res = mine(model, folder, LAYERS, k=12, batch_size=5, preprocess=PRE, progress=False, per_image=3,
               positive=True)
    brute = brute_force(model, folder, LAYERS, 12, dtype, per_image=3)
    check_equal_brute(res, brute, LAYERS, 12, {"relu1": 16, "relu2": 8, "fc": 1},
                      rtol=1e-9 if dtype == torch.float64 else 1e-6, atol=0 if dtype == torch.float64 else 1e-6)
    imgs = res.layers["relu2"]["image"][0].tolist()
    assert max(imgs.count(i) for i in set(imgs)) > 1  # really several locations of one image


def test_statistics_and_predictions_equal_brute_force(folder):
    model = Tiny()
    res = mine(model, folder, LAYERS, k=3, batch_size=4, preprocess=PRE, progress=False, predict=True)
    ds = ImageDataset.from_folder(folder, PRE)
    with torch.no_grad():
        x = torch.stack([ds[i][0] for i in range(len(ds))]).double()
        maps = run_with_taps(model, x, LAYERS, stop=False)
        logits = model(x)
    for n in LAYERS:
        best = maps[n].flatten(2).amax(2) if maps[n].dim() == 4 else maps[n]  # (N, C)
        assert res.stats[n]["fires"].tolist() == (best > 0).sum(0).tolist()
        np.testing.assert_allclose(res.stats[n]["sample"].numpy(), best.t().numpy(), rtol=1e-6)
        q = res.quantiles(n, [0.5, 0.9])
        np.testing.assert_allclose(q.numpy(), np.quantile(best.numpy(), [0.5, 0.9], axis=0).T, rtol=1e-6)
    p = logits.softmax(-1)
    assert res.predictions.tolist() == p.argmax(-1).tolist()
    np.testing.assert_allclose(res.confidence.numpy(), p.amax(-1).numpy(), rtol=1e-5)
    # without predict the pass stops at the deepest tap and records none
    assert mine(model, folder, ["relu1"], k=3, preprocess=PRE, progress=False).predictions is None


def test_sampled_quantiles_take_every_stride_th_image(folder, monkeypatch):
    import zfnet.engine.mine as mine_mod

    monkeypatch.setattr(mine_mod, "SAMPLE_BUDGET", 2 * (6 + 5 + 4))  # two images' worth: stride 7 of 13
    res = mine(Tiny(), folder, LAYERS, k=2, batch_size=4, preprocess=PRE, progress=False)
    ds = ImageDataset.from_folder(folder, PRE)
    x = torch.stack([ds[i][0] for i in (0, 7)]).double()
    best = run_with_taps(Tiny(), x, ["relu2"])["relu2"].flatten(2).amax(2)
    np.testing.assert_allclose(res.stats["relu2"]["sample"].numpy(), best.t().numpy(), rtol=1e-6)  # kept as float32


def test_packed_keys_rank_like_floats():
    from zfnet.engine.topk import _decode, _encode

    v = torch.tensor([0.0, -0.0, 1.5, -1.5, float("inf"), float("-inf"), 1e-45, -1e-45, 3.0, 3.0, 1.5, -2.0])
    img = torch.tensor([4, 3, 0, 1, 9, 8, 7, 6, 11, 10, 2, 5])
    key = _encode(v, img)
    order = key.argsort(descending=True).tolist()
    expect = sorted(range(len(v)), key=lambda j: (-float(v[j]), int(img[j])))  # -0.0 ties +0.0
    assert order == expect
    dv, di = _decode(key)
    assert torch.equal(di, img) and torch.equal(dv, v + 0.0)


def test_duplicates_tie_to_lower_index(folder):
    res = mine(Tiny(), folder, ["relu2"], k=13, batch_size=4, preprocess=PRE, progress=False)
    for c in range(5):
        imgs = res.layers["relu2"]["image"][c].tolist()
        pos = [imgs.index(i) for i in (2, 7, 11)]
        assert pos == sorted(pos) and pos[2] - pos[0] == 2  # adjacent, in index order


def test_merge_is_order_independent():
    g = torch.Generator().manual_seed(1)
    v = torch.randint(0, 4, (3, 12), generator=g).float()  # many ties
    i = torch.randperm(12, generator=g).expand(3, 12).clone()
    lc = torch.randint(0, 9, (3, 12), generator=g)
    full = merge_topk(v, i, lc, 5)
    a = merge_topk(v[:, :7], i[:, :7], lc[:, :7], 5)
    b = merge_topk(v[:, 7:], i[:, 7:], lc[:, 7:], 5)
    two = merge_topk(torch.cat([b[0], a[0]], 1), torch.cat([b[1], a[1]], 1), torch.cat([b[2], a[2]], 1), 5)
    for x, y in zip(full, two):
        assert torch.equal(x, y)
    for c in range(3):
        keys = sorted(zip((-v[c]).tolist(), i[c].tolist()))[:5]
        assert full[1][c].tolist() == [k[1] for k in keys]


def test_unreadable_files_are_skipped_and_reported(tmp_path):
    root = make_folder(tmp_path / "imgs", n=6)
    (root / "broken.png").write_bytes(b"not an image")
    model = Tiny()
    res = mine(model, root, ["relu2"], k=3, batch_size=2, preprocess=PRE, progress=False)
    assert [p for p, _ in res.skipped] == [str(root / "broken.png")]
    assert res.images == 8  # 6 + the two duplicates
    clean = mine(model, ImageDataset([p for p in res.paths if "broken" not in p], transform=PRE), ["relu2"],
                 k=3, progress=False)
    names = lambda r: [[r.paths[i] for i in row] for row in r.layers["relu2"]["image"].tolist()]
    assert names(res) == names(clean)


def test_bad_arguments(folder):
    with pytest.raises(ZfnetError, match="unknown layer 'nope'"):
        mine(Tiny(), folder, ["nope"], preprocess=PRE, progress=False)
    with pytest.raises(ZfnetError, match="crop"):
        mine(Tiny(), folder, ["relu1"], preprocess=Preprocess(crop="ten"), progress=False)
    with pytest.raises(ZfnetError, match="no such file"):
        mine(Tiny(), folder / "missing", ["relu1"], progress=False)


class Killed(Exception):
    pass


class DiesAt(ImageDataset):
    """Raises on item `die` (a crash mid-run); counts the items it decodes."""

    def __init__(self, base, die=None):
        super().__init__(base.paths, base.labels, base.transform)
        self.die, self.loaded = die, 0

    def __getitem__(self, i):
        if i == self.die:
            raise Killed
        self.loaded += 1
        return super().__getitem__(i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resume_after_crash_gives_identical_result(folder, tmp_path, dtype):
    model = Tiny(dtype)
    base = ImageDataset.from_folder(folder, PRE)
    ref = mine(model, base, LAYERS, k=4, batch_size=2, progress=False, predict=True)
    state = tmp_path / "state.pt"
    with pytest.raises(Killed):
        mine(model, DiesAt(base, die=9), LAYERS, k=4, batch_size=2, state=state, progress=False, save_every=2,
             predict=True)
    assert state.exists()
    again = DiesAt(base)
    res = mine(model, again, LAYERS, k=4, batch_size=2, state=state, progress=False, save_every=2,
             predict=True)
    assert again.loaded == 13 - 8  # resumed after the last saved batch (8 items), not from scratch
    results_equal(ref, res)
    assert res.images == 13
    # finished state: a rerun reads nothing
    third = DiesAt(base)
    results_equal(ref, mine(model, third, LAYERS, k=4, batch_size=2, state=state, progress=False, predict=True))
    assert third.loaded == 0
    # a state written for something else is refused with one clear line
    with pytest.raises(ZfnetError, match="another run"):
        mine(model, base, LAYERS, k=5, batch_size=2, state=state, progress=False, predict=True)


def _worker(rank, world, init, folder, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        res = mine(Tiny(torch.float32), folder, LAYERS, k=4, batch_size=3, preprocess=PRE, progress=False,
                   predict=True)
        torch.save({"layers": res.layers, "images": res.images, "skipped": res.skipped, "stats": res.stats,
                    "predictions": res.predictions, "confidence": res.confidence}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform == "win32", reason="gloo file init")
def test_two_processes_on_gloo_merge_to_single_process(tmp_path):
    import torch.multiprocessing as mp

    root = make_folder(tmp_path / "imgs", n=11)
    (root / "bad.jpg").write_bytes(b"")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: float32 sums are bit-identical only with the same threads
    try:
        ref = mine(Tiny(torch.float32), root, LAYERS, k=4, batch_size=3, preprocess=PRE, progress=False,
                   predict=True)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "res"
    mp.start_processes(_worker, args=(2, f"file://{tmp_path / 'init'}", root, str(out)), nprocs=2,
                       start_method="spawn")
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert got["images"] == ref.images == 12  # 11 + a duplicate
        assert [tuple(s) for s in got["skipped"]] == [tuple(s) for s in ref.skipped]
        for n in LAYERS:
            for key in ("value", "image", "y", "x"):
                assert torch.equal(got["layers"][n][key], ref.layers[n][key]), (rank, n, key)
            assert torch.equal(got["stats"][n]["fires"], ref.stats[n]["fires"])
            assert torch.equal(got["stats"][n]["sample"].nan_to_num(-7), ref.stats[n]["sample"].nan_to_num(-7))
        assert torch.equal(got["predictions"], ref.predictions) and torch.equal(got["confidence"], ref.confidence)
