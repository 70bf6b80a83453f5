"""t-SNE of the codes: the grid snapping is the optimal assignment (brute force), and on real SqueezeNet codes
of real photos the embedding keeps the classes apart."""

import itertools
import json
import shutil

import numpy as np
import pytest
from shared_data import SHARED, SQUEEZENET_WEIGHTS, need_shared

from zfnet.cli import main
from zfnet.core.errors import ZfnetError
from zfnet.cs231n.codes import embed, grid_shape, snap_to_grid


def _cost(xy, cells, rows, cols):
    lo, span = xy.min(0), np.ptp(xy, 0)
    u = (xy - lo) / np.where(span > 0, span, 1.0)
    u[:, 1] = 1 - u[:, 1]
    centres = np.stack([(cells[:, 1] + 0.5) / cols, (cells[:, 0] + 0.5) / rows], 1)
    return float(((u - centres) ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_snapping_is_the_optimal_assignment(seed):
    xy = np.random.default_rng(seed).normal(size=(5, 2))
    rows, cols = grid_shape(5)
    assert (rows, cols) == (2, 3)
    cells = snap_to_grid(xy)
    assert len({tuple(c) for c in cells}) == 5 and cells[:, 0].max() < rows and cells[:, 1].max() < cols
    all_cells = [np.array(divmod(i, cols)) for i in range(rows * cols)]
    best = min(_cost(xy, np.stack(p), rows, cols) for p in itertools.permutations(all_cells, 5))
    assert _cost(xy, cells, rows, cols) == pytest.approx(best, abs=1e-12)


def test_points_on_the_grid_stay_in_their_cells():
    rows, cols = 3, 4
    cells = np.array([divmod(i, cols) for i in range(12)])
    xy = np.stack([cells[:, 1], rows - 1 - cells[:, 0]], 1).astype(float)  # y up, rows down
    np.testing.assert_array_equal(snap_to_grid(xy, rows, cols), cells)
    with pytest.raises(ZfnetError, match="cannot hold"):
        snap_to_grid(xy, 2, 2)


def test_too_few_images_is_a_clear_error():
    with pytest.raises(ZfnetError, match="at least 4 images"):
        embed(np.zeros((3, 8)))


def test_real_codes_keep_classes_apart(tmp_path, capsys):
    """SqueezeNet codes (features.12, the layer before the classifier) of 3 Caltech-101 classes x 6 photos:
    most 5-nearest neighbours in the 2-D embedding share the image's class, as they do in the codes."""
    w = str(need_shared(SQUEEZENET_WEIGHTS))
    caltech = need_shared(SHARED / "data" / "caltech101")
    data = tmp_path / "data"
    for c in ("Faces_easy", "Motorbikes", "sunflower"):
        (data / c).mkdir(parents=True)
        for f in sorted((caltech / c).glob("*.jpg"))[:6]:
            shutil.copy(f, data / c / f.name)
    rc = main(["tsne", "--weights", w, "--data", str(data), "--out", str(tmp_path / "out"), "--cache", "none",
               "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["layer"] == "features.12" and out["classes"] == ["Faces_easy", "Motorbikes", "sunflower"]
    coords = np.asarray(out["coords"])
    assert coords.shape == (18, 2) and np.isfinite(coords).all()
    assert len({tuple(c) for c in out["grid"]}) == 18 and out["grid_shape"] == [4, 5]
    e = out["embedding"]
    assert e["same_class_neighbours"]["codes"] >= 90, e
    assert e["same_class_neighbours"]["embedding"] >= 80, e
    assert e["trustworthiness"] >= 0.9, e
    for f in ("tsne_grid.png", "tsne_positions.png", "tsne_scatter.png", "result.json"):
        assert (tmp_path / "out" / f).is_file()
    assert json.loads((tmp_path / "out" / "result.json").read_text())["coords"] == out["coords"]
