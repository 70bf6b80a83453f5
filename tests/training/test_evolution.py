"""Fig. 4 from the snapshots of a tiny training run: right checkpoint per column, right unit per row."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import make_data, tiny_cfg

from zfnet.core.errors import ZfnetError
from zfnet.engine.project import project
from zfnet.inspect.layers import run_with_taps
from zfnet.training.checkpoints import epoch_snapshots, load_checkpoint, model_from_checkpoint, preprocess_for
from zfnet.training.evolution import evolution, pick_epochs
from zfnet.training.recipe import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evo")
    data = make_data(tmp / "data")
    cfg = tiny_cfg(data, tmp / "run", epochs=3, lr=0.05, init_std=0.0)  # He init: epochs differ
    main(cfg)
    return tmp / "run", data


def test_pick_epochs():
    assert pick_epochs(list(range(1, 71)), 8)[0] == 1 and pick_epochs(list(range(1, 71)), 8)[-1] == 70
    assert len(pick_epochs(list(range(1, 71)), 8)) == 8
    assert pick_epochs([1, 2, 3], 8) == [1, 2, 3]
    e = pick_epochs(list(range(1, 11)), 5)
    assert e == sorted(set(e)) and len(e) == 5


def test_evolution_grid_and_values(run, tmp_path):
    run_dir, data = run
    ev = evolution(run_dir, data, tmp_path / "out", epochs=[1, 3], layers=["relu1", "relu2"], units=3,
                   progress=False)
    assert ev.units == {"relu1": [0, 2, 3], "relu2": [0, 2, 5]}
    im = Image.open(tmp_path / "out" / "evolution_relu1.png")
    tile = 2 + 48 // 7 * 7  # cell of a 7x7 receptive field, scaled, plus padding
    assert im.size == (2 + 2 * tile, 2 + 3 * tile)  # columns = epochs, rows = units
    r = json.loads((tmp_path / "out" / "result.json").read_text())
    assert r["schema"] == 1 and r["epochs"] == [1, 3]
    # each entry is the strongest activation of that unit under THAT epoch's weights (brute force)
    paths = sorted(p for p in data.rglob("*.png"))
    for e in (1, 3):
        model = model_from_checkpoint(epoch_snapshots(run_dir)[e])
        pre = preprocess_for(model)
        x = torch.stack([pre(Image.open(p).convert("RGB")) for p in paths])
        acts = run_with_taps(model, x, ["relu2"])["relu2"]
        for entry in (en for en in ev.entries if en["epoch"] == e and en["layer"] == "relu2"):
            c = entry["channel"]
            assert entry["value"] == pytest.approx(acts[:, c].max().item(), rel=1e-5)
    v = {e: [en["value"] for en in ev.entries if en["epoch"] == e] for e in (1, 3)}
    assert v[1] != v[3]  # the columns really come from different checkpoints
    # the saved projection is the deconvnet projection of that activation, cut to its receptive field
    arrays = np.load(tmp_path / "out" / "projections.npz")
    en = next(en for en in ev.entries if en["epoch"] == 3 and en["layer"] == "relu2" and en["value"] > 0)
    model = model_from_checkpoint(epoch_snapshots(run_dir)[3])
    pre = preprocess_for(model)
    img = pre(Image.open(data / en["image"]).convert("RGB"))[None]
    p = project(model, img, [f"relu2:{en['channel']}@{en['y']},{en['x']}"], pairs=True)[0]
    saved = arrays[f"relu2_{en['channel']}_epoch3"]
    nz = np.argwhere(np.abs(p.numpy()).sum(0) > 0)
    assert saved.shape[-2] >= np.ptp(nz[:, 0]) + 1  # the patch covers everything the unit projects to
    assert np.abs(saved).sum() == pytest.approx(p.abs().sum().item(), rel=1e-5)


def test_evolution_bad_epoch(run, tmp_path):
    with pytest.raises(ZfnetError, match="no snapshot for epoch"):
        evolution(run[0], run[1], epochs=[9], progress=False)


def test_cli_evolution_and_diagnose_on_a_run(run, tmp_path, capsys):
    from zfnet.cli import main as cli

    run_dir, data = run
    assert cli(["evolution", "--run", str(run_dir), "--data", str(data), "--out", str(tmp_path / "evo"),
                "--epochs", "1,2", "--units", "2", "--layers", "relu1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["epochs"] == [1, 2] and r["units"] == {"relu1": [0, 3]}
    assert cli(["diagnose", "--weights", str(run_dir / "checkpoint.pth"), "--data", str(data),
                "--out", str(tmp_path / "diag"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["layer1"] == "conv1" and d["stride1"] == 2 and d["filters"] == 4 and d["images"] == 18
    assert (tmp_path / "diag" / "layer1_filters.png").exists()
    # bad input: one line, exit 2
    assert cli(["diagnose", "--out", str(tmp_path / "x")]) == 2
    assert "--model auto needs --weights" in capsys.readouterr().err
    assert cli(["evolution", "--run", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path)]) == 2
    assert "run folder not found" in capsys.readouterr().err


def test_cli_ablate_table(tmp_path, capsys):
    from zfnet.cli import main as cli

    data = make_data(tmp_path / "data")
    assert cli(["ablate", "--variants", "zfnet,remove-3-4", "--data", str(data), "--train-per-class", "4",
                "--widths", "4,6,6,6,4", "--fc", "8", "--resize", "52", "--crop", "48", "--batch-size", "4",
                "--epochs", "1", "--out", str(tmp_path / "abl"), "--progress", "no", "--val-crops", "center"]) == 0
    out = capsys.readouterr().out
    assert "| zfnet | 1 |" in out and "| remove-3-4 | 1 |" in out
    r = json.loads((tmp_path / "abl" / "result.json").read_text())
    assert [v["variant"] for v in r["variants"]] == ["zfnet", "remove-3-4"]
    ck = load_checkpoint(tmp_path / "abl" / "remove-3-4" / "checkpoint.pth")
    assert not any(k.startswith(("conv3", "conv4")) for k in ck["model"])  # the variant really trained
