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


def brute_force(model, folder, layers, k, dtype=torch.float64):
    """Per-image forward passes, one image at a time; python sorting of (-value, image, location)."""
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
                a = m[c].reshape(-1).numpy()
                best = a.max()
                loc = int(np.flatnonzero(a == best)[0])
                cands.append((-float(best), i, loc))
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


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("mine") / "imgs")


@pytest.mark.parametrize("k,batch_size,dtype", [(4, 3, torch.float64), (20, 5, torch.float64),
                                               (4, 3, torch.float32), (20, 4, torch.float32)])
def test_equals_brute_force_with_ties(folder, k, batch_size, dtype):
    """float32 takes the packed-key path, float64 the two-stable-sorts path: both equal brute force."""
    model = Tiny(dtype)
    res = mine(model, folder, LAYERS, k=k, batch_size=batch_size, preprocess=PRE, progress=False)
    brute = brute_force(model, folder, LAYERS, k, dtype)
    check_equal_brute(res, brute, LAYERS, k, {"relu1": 16, "relu2": 8, "fc": 1},
                      rtol=1e-9 if dtype == torch.float64 else 1e-6,  # float32: batch-dependent ulps
                      atol=0 if dtype == torch.float64 else 1e-6)
    # the ties really are exercised: dead channel all 0 -> images in index order, location 0
    assert res.layers["relu1"]["image"][5, :4].tolist() == [0, 1, 2, 3]
    assert res.layers["relu1"]["value"][5].max() == 0
    assert res.images == 13 and not res.skipped
    js = res.to_json()
    assert js["layers"]["relu2"]["0"][0]["image"] == f"img{int(res.layers['relu2']['image'][0, 0]):02d}.png"
    assert len(js["layers"]["fc"]["1"]) == min(k, 13)


def test_packed_keys_rank_like_floats():
    from zfnet.engine.mine import _decode, _encode

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
    ref = mine(model, base, LAYERS, k=4, batch_size=2, progress=False)
    state = tmp_path / "state.pt"
    with pytest.raises(Killed):
        mine(model, DiesAt(base, die=9), LAYERS, k=4, batch_size=2, state=state, progress=False, save_every=2)
    assert state.exists()
    again = DiesAt(base)
    res = mine(model, again, LAYERS, k=4, batch_size=2, state=state, progress=False, save_every=2)
    assert again.loaded == 13 - 8  # resumed after the last saved batch (8 items), not from scratch
    results_equal(ref, res)
    assert res.images == 13
    # finished state: a rerun reads nothing
    third = DiesAt(base)
    results_equal(ref, mine(model, third, LAYERS, k=4, batch_size=2, state=state, progress=False))
    assert third.loaded == 0
    # a state written for something else is refused with one clear line
    with pytest.raises(ZfnetError, match="another run"):
        mine(model, base, LAYERS, k=5, batch_size=2, state=state, progress=False)


def _worker(rank, world, init, folder, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        res = mine(Tiny(torch.float32), folder, LAYERS, k=4, batch_size=3, preprocess=PRE, progress=False)
        torch.save({"layers": res.layers, "images": res.images, "skipped": res.skipped}, f"{out}.{rank}")
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
        ref = mine(Tiny(torch.float32), root, LAYERS, k=4, batch_size=3, preprocess=PRE, progress=False)
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
