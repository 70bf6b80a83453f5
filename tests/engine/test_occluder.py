"""How occlusion chooses between full forward passes and the incremental engine (zfnet.engine.occluder): the
engine is built only where the positions left can pay for it, what earlier images taught is kept per model,
the trace is made once per model, and full passes record every tracked value even when two share a layer.

Time is a stand-in clock: each image through the model's own forward costs COST seconds, the engine nothing,
so every decision here follows from the rule, never from this machine's speed."""

import gc
import weakref

import pytest
import torch
import torch.nn as nn

import zfnet.engine.graph as graph
import zfnet.engine.occluder as occ
from zfnet.engine.incremental import Incremental
from zfnet.engine.occluder import PROBE, occluded_outputs

COST = 1.0  # stand-in seconds per image of a forward pass of the whole model


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 5, 2, 2), nn.Conv2d(8, 8, 3, 1, 1)
        self.act, self.pool, self.fc = nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.act(self.c2(self.act(self.c1(x))))), 1))


@pytest.fixture
def clock(monkeypatch):
    """occ.time.perf_counter -> a stand-in clock that the model's own forward advances by COST per image and
    the engine by state["engine"] per position; counts of engine builds and fx traces."""
    # the engine's seconds per position and per batch
    state = {"now": 0.0, "builds": 0, "traces": 0, "engine": COST / 2, "engine_batch": 0.0}

    class _Time:
        @staticmethod
        def perf_counter():
            return state["now"]

        process_time = perf_counter

    monkeypatch.setattr(occ, "time", _Time)
    build, trace = Incremental.build.__func__, graph._Tracer.trace

    def counted_build(cls, *args, **kwargs):
        state["builds"] += 1
        return build(cls, *args, **kwargs)

    def counted_trace(tracer, *args, **kwargs):
        state["traces"] += 1
        return trace(tracer, *args, **kwargs)

    monkeypatch.setattr(Incremental, "build", classmethod(counted_build))
    monkeypatch.setattr(graph._Tracer, "trace", counted_trace)
    run = Incremental.run

    def engine_run(engine, boxes, locations=None):
        state["now"] += state["engine_batch"] + state["engine"] * len(boxes)
        return run(engine, boxes, locations)

    monkeypatch.setattr(Incremental, "run", engine_run)
    return state


def _model(state):
    torch.manual_seed(0)
    m = _Net().double().eval()

    def tick(module, args):  # the whole model's forward; the engine calls its submodules, never this
        state["now"] += COST * len(args[0])

    m.register_forward_pre_hook(tick)
    return m


def _boxes(n_rows, n_cols, side=32, size=8):
    """n_rows x n_cols occluders of size x size spread over the image."""
    def starts(n):
        return [round(i * (side - size) / max(n - 1, 1)) for i in range(n)]

    return [(y, y + size, x, x + size) for y in starts(n_rows) for x in starts(n_cols)]


def _image(seed=1):
    torch.manual_seed(seed)
    return torch.randn(1, 3, 32, 32, dtype=torch.float64)


def _naive(m, x, boxes):
    return occluded_outputs(m, x, boxes, method="naive", report=False).outputs


def test_a_job_of_few_positions_never_builds_the_engine(clock, capsys):
    m, x = _model(clock), _image()
    # 12 positions: 8 in the probe, 4 left at COST each; trying the engine is expected to cost a build
    # (about 2 forward passes of the image) and its run of the 8 probe positions; it is tried where the
    # passes left take 3 times that: 4 < 30
    boxes = _boxes(3, 4)
    ran = occluded_outputs(m, x, boxes)
    assert clock["builds"] == 0 and clock["traces"] == 0
    assert ran.method == "naive" and ran.positions == {"incremental": 0, "naive": 12}
    assert ran.reason.startswith("too few positions for the engine to pay: the 4 full passes left take about 4 s, "
                                 "building the engine and timing it on the probe about 10 s (estimated")
    assert capsys.readouterr().err.strip() == f"zfnet: occlusion by full forward passes: {ran.reason}"
    assert torch.allclose(ran.outputs, _naive(m, x, boxes), rtol=1e-12)

    few = occluded_outputs(m, x, boxes[:PROBE - 2], report=False)  # all of them in the probe
    assert few.reason == f"too few positions for the engine to pay: all {PROBE - 2} were computed by the full " \
                         f"passes of the probe"
    assert clock["builds"] == 0 and few.positions == {"incremental": 0, "naive": PROBE - 2}


def test_a_long_job_builds_the_engine_where_it_wins(clock):
    m, x = _model(clock), _image()
    boxes = _boxes(7, 7)  # 41 left after the probe: more than 3 tries of about 10 s
    ran = occluded_outputs(m, x, boxes, report=False)
    assert clock["builds"] == 1 and clock["traces"] == 1
    assert ran.method == "incremental+naive" and ran.positions == {"incremental": 49 - PROBE, "naive": PROBE}
    assert ran.reason.startswith("2.00x the speed of full passes in batches of 41 (timed on 8 probe positions)")
    assert torch.allclose(ran.outputs, _naive(m, x, boxes), rtol=1e-10)


def test_a_second_image_reuses_the_trace_and_what_the_first_measured(clock):
    m = _model(clock)
    boxes = _boxes(7, 7)
    first = occluded_outputs(m, _image(1), boxes, report=False)
    assert clock["builds"] == 1 and clock["traces"] == 1 and first.method == "incremental+naive"
    second = occluded_outputs(m, _image(2), boxes, report=False)  # another image, same model and shape
    assert clock["builds"] == 2 and clock["traces"] == 1  # the engine is per image; the trace is not
    assert torch.allclose(second.outputs, _naive(m, _image(2), boxes), rtol=1e-10)
    occluded_outputs(m, _image(3), boxes, method="incremental", report=False)
    assert clock["traces"] == 1

    m.c2 = nn.Conv2d(8, 8, 3, 1, 1).double()  # a new submodule: the kept trace is stale
    again = occluded_outputs(m, _image(1), boxes, method="incremental", report=False)
    assert clock["traces"] == 2 and again.method == "incremental"
    assert torch.allclose(again.outputs, _naive(m, _image(1), boxes), rtol=1e-10)


def test_the_engines_cost_per_batch_is_spread_over_the_batches_it_will_run(clock):
    """The engine pays a fixed cost per batch (a Python call per graph node): 4 s + 0.25 s per position here,
    1.25 s per position over the probe's 8 (slower than full passes), 4 / 41 + 0.25 = 0.35 s in the one
    batch of 41 the rest runs in (2.88x faster). The probe times one position, then seven, and predicts."""
    m = _model(clock)
    clock.update(engine=COST / 4, engine_batch=4 * COST)
    ran = occluded_outputs(m, _image(), _boxes(7, 7), report=False)
    assert ran.method == "incremental+naive" and ran.positions == {"incremental": 41, "naive": PROBE}
    assert ran.reason.startswith("2.88x the speed of full passes in batches of 41 (timed on 8 probe positions)")
    clock.update(engine_batch=12 * COST)  # 12 / 41 + 0.25 = 0.54 s: still faster
    assert occluded_outputs(m, _image(2), _boxes(7, 7), report=False).reason.startswith("1.84x")
    clock.update(engine_batch=40 * COST)  # 40 / 41 + 0.25 = 1.23 s: slower
    slower = occluded_outputs(m, _image(3), _boxes(7, 7), report=False)
    assert slower.method == "naive" and slower.reason.startswith("the incremental engine ran at 0.82x")


def test_an_engine_measured_slower_is_not_built_again_for_the_next_image(clock):
    m = _model(clock)
    boxes = _boxes(7, 7)
    clock["engine"] = 2 * COST  # the engine: twice the time of a full pass per position
    first = occluded_outputs(m, _image(1), boxes, report=False)
    assert first.method == "naive" and first.reason.startswith("the incremental engine ran at 0.50x the speed")
    assert clock["builds"] == 1
    second = occluded_outputs(m, _image(2), boxes, report=False)
    assert clock["builds"] == 1 and second.method == "naive"
    assert second.reason.startswith("the engine would not pay: it ran at 0.50x the speed of full passes on an "
                                    "earlier image of this model")


def test_the_kept_trace_does_not_keep_the_model_alive(clock):
    m = _model(clock)
    occluded_outputs(m, _image(), _boxes(7, 7), report=False)
    assert clock["traces"] == 1 and m in graph._TRACES and m in occ._SEEN
    gone = weakref.ref(m)
    del m
    gc.collect()
    assert gone() is None


def test_the_full_pass_layout_is_decided_once_per_model_and_shape(monkeypatch):
    m, x = _Net().eval(), _image().float()
    rows = []
    naive = occ._naive

    def spy(model, x, boxes, *args):
        rows.append(len(boxes))
        return naive(model, x, boxes, *args)

    monkeypatch.setattr(occ, "_naive", spy)
    boxes = _boxes(2, 3)
    first = occluded_outputs(m, x, boxes, method="naive", batch_size=4, report=False)
    assert rows == [5, 2]  # a clean copy rides along the first batch: channels last gives the model's answer
    rows.clear()
    second = occluded_outputs(m, x, boxes, method="naive", batch_size=4, report=False)
    assert rows == [4, 2]
    assert torch.allclose(first.outputs, second.outputs, rtol=1e-5)


def test_full_passes_record_two_values_of_one_layer():
    """A layer tracked twice (its channel totals, and its values at one position): both are recorded. Checked
    against the layer's output computed by hand on each occluded copy."""
    torch.manual_seed(0)
    m = _Net().double().eval()
    x = _image()
    boxes = _boxes(3, 3)
    for method in ("naive", "incremental"):
        ran = occluded_outputs(m, x, boxes, tracks=["c2", "c2", "act#2"], locations=[None, (5, 7), (1, 2)],
                               method=method, report=False)
        for k, (y0, y1, x0, x1) in enumerate(boxes):
            xo = x.clone()
            xo[:, :, y0:y1, x0:x1] = 0
            with torch.no_grad():
                v = m.c2(m.act(m.c1(xo)))[0]
            for got, want in zip([t[k] for t in ran.tracks], [v.sum((1, 2)), v[:, 5, 7], v.relu()[:, 1, 2]]):
                assert torch.allclose(got, want, rtol=1e-10), method
