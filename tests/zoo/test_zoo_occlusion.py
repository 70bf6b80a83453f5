"""Occlusion on the model zoo: on every architecture the fast path's outputs equal full forward passes, and
the method a run reports is the one that computed its results.

    PYTHONPATH=$PWD ZFNET_ZOO=1 /work/venv-zoo/bin/python -m pytest -q tests/zoo/test_zoo_occlusion.py
"""

import pytest
import torch
from zoo_models import NAMES, SIZE, build

import zfnet.engine.occluder as occluder
from zfnet.engine.incremental import Incremental
from zfnet.engine.occluder import PROBE, occluded_outputs, occluder_boxes

ROWS = occluder_boxes(SIZE, 48, 40)  # 3 x 3 positions, the last ones reaching the border
BOXES = [(a, b, c, d) for a, b in ROWS for c, d in ROWS]


@pytest.fixture
def counted(monkeypatch):
    """Positions each method actually computed (the engine's run and the full passes, spied on)."""
    done = {"incremental": 0, "naive": 0}
    run, naive = Incremental.run, occluder._naive

    def spy_run(engine, boxes, locations=None):
        out = run(engine, boxes, locations)
        done["incremental"] += len(boxes)
        return out

    def spy_naive(model, x, boxes, *args):
        out = naive(model, x, boxes, *args)
        done["naive"] += sum(b != (0, 0, 0, 0) for b in boxes)  # not the clean copy that checks the layout
        return out

    monkeypatch.setattr(Incremental, "run", spy_run)
    monkeypatch.setattr(occluder, "_naive", spy_naive)
    return done


def _close(a, b):
    return float((a - b).abs().max()) <= 1e-4 * float(b.abs().max())


@pytest.mark.parametrize("name", NAMES)
def test_fast_path_equals_full_passes(name, counted):
    torch.manual_seed(0)
    model = build(name)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        slow = occluded_outputs(model, x, BOXES, method="naive", report=False)
        assert slow.method == "naive" and counted == {"incremental": 0, "naive": len(BOXES)}
        counted["naive"] = 0
        fast = occluded_outputs(model, x, BOXES, method="incremental", batch_size=4, report=False)
    # the engine follows every architecture of the zoo, whole: no fallback, no exception
    assert fast.method == "incremental", fast.reason
    assert counted == fast.positions == {"incremental": len(BOXES), "naive": 0}
    assert _close(fast.outputs, slow.outputs)
    assert (slow.outputs != slow.outputs[0]).any()  # the occluder changes the outputs

    counted.update(incremental=0, naive=0)
    with torch.no_grad():
        small = occluded_outputs(model, x, BOXES, report=False)  # 1 position left after the probe
    assert small.method == "naive" and small.reason.startswith("too few positions for the engine to pay")
    assert counted == {"incremental": 0, "naive": len(BOXES)} and _close(small.outputs, slow.outputs)

    counted.update(incremental=0, naive=0)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(occluder, "PAYBACK", 0.0)  # the engine built however few positions are left
        auto = occluded_outputs(model, x, BOXES, report=False)  # the probe takes 8 of the 9
    assert _close(auto.outputs, slow.outputs)
    assert auto.method in ("incremental+naive", "naive"), auto.reason
    assert auto.positions["naive"] + auto.positions["incremental"] == len(BOXES) == counted["naive"] \
        + counted["incremental"] - (PROBE if counted["incremental"] else 0)
    if auto.method == "naive":  # the engine never ran, or ran on the probe only
        assert counted["incremental"] in (0, PROBE), auto.reason
    else:  # the probe both ways, the rest by the engine
        assert counted == {"incremental": len(BOXES), "naive": PROBE}
