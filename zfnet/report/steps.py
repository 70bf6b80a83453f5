"""The experiments of the report, one step each: what it runs (the same library call, with the same files
written, as the command it records), the command that reproduces it, and when it does not apply.

Each step writes one result folder `OUT/<step>/` with its result.json; the report page reads only those.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..core.errors import ZfnetError
from ..core.results import save_npz, write_json
from ..data.images import Preprocess, list_images, load_image
from ..inspect.layers import feature_layers, layer_table
from .budget import Budgets

__all__ = ["Context", "Step", "plan"]


@dataclass
class Context:
    """Everything a step needs: the model (loaded once), how the user named it, the data and the budgets."""

    model: nn.Module
    model_name: str
    weights: str | None
    data: Path
    paths: list[Path]
    labels: list[int] | None
    classes: list[str] | None
    budgets: Budgets
    progress: bool = True
    pre: Preprocess = None

    def __post_init__(self):
        self.pre = self.pre or Preprocess.for_model(self.model)
        self._few: dict[int, list[Path]] = {}

    @property
    def model_args(self) -> list[str]:
        return ["--model", self.model_name, "--weights", str(self.weights or "none")]

    def config(self, **extra) -> dict:
        return {"model": self.model_name, "weights": self.weights, **extra}

    def few(self, n: int) -> list[Path]:
        """n decodable images spread evenly over the data (a file that cannot be read gives way to the next)."""
        if not self.paths or n < 1:
            return []
        if n in self._few:
            return self._few[n]
        spread = np.linspace(0, len(self.paths) - 1, min(n, len(self.paths))).round().astype(int).tolist()
        order = list(dict.fromkeys(spread + list(range(len(self.paths)))))
        out = []
        for i in order:
            try:
                load_image(self.paths[i])
            except ZfnetError:
                continue
            out.append(self.paths[i])
            if len(out) == n:
                break
        self._few[n] = sorted(out)
        return self._few[n]


@dataclass
class Step:
    name: str  # the result folder's name
    paper: str  # "Fig. 2", "Table 7", "CS231n"
    title: str
    commands: list[list[str]]  # argv of the commands that reproduce the result folder(s)
    run: Callable[[Context, Path], None]
    skip: str | None = None  # why the step does not apply to this model / data
    links: dict = field(default_factory=dict)  # extra pages in the folder ({"site": "index.html"})
    out: str = ""  # the report folder as the commands name it

    def key(self) -> str:
        """The commands with the report folder written OUT: what a resumed run compares to know that a
        finished step would run the same again (wherever the folder is)."""
        return " && ".join(shlex.join([a.replace(self.out, "OUT", 1) if self.out and a.startswith(self.out) else a
                                       for a in c]) for c in self.commands)


# ----------------------------------------------------------------------------------------------------
# The steps.
def _atlas(ctx: Context, folder: Path):
    from ..understanding.atlas import atlas

    b = ctx.budgets
    atlas(ctx.model, ctx.data, folder, b.atlas_layers, k=b.atlas_k, resume=True, progress=ctx.progress,
          model_name=ctx.model_name, weights=ctx.weights)


def _invariance(ctx: Context, folder: Path):
    from ..understanding.invariance import invariance, render_invariance

    files = [str(p) for p in ctx.few(ctx.budgets.few_images)]
    r = invariance(ctx.model, files, progress=ctx.progress)
    if not r.files:
        raise ZfnetError("no readable image for the invariance sweeps")
    render_invariance(r, folder / "invariance.png")
    render_invariance(r, folder / "invariance_raw.png", normalized=False)
    result = r.to_json()
    result["config"].update(ctx.config(images=files))
    write_json(folder / "result.json", result)


def _diagnose(ctx: Context, folder: Path):
    from ..training.diagnosis import diagnose

    diagnose(ctx.model, str(ctx.data), folder, max_images=ctx.budgets.data_images, progress=ctx.progress,
             config=ctx.config(data=str(ctx.data)))


def _occlusion(ctx: Context, folder: Path):
    from ..understanding.occlusion import occlusion, render_occlusion

    b = ctx.budgets
    rows = []
    for i, f in enumerate(ctx.few(b.few_images)):
        sub = folder / str(i)
        r = occlusion(ctx.model, f, size=b.occlusion_size, stride=b.occlusion_stride, progress=ctx.progress)
        arrays = dict(prob=r.prob, argmax_label=r.argmax_label, activity=r.activity,
                      pixel_attribution=r.pixel_attribution())
        if r.projection is not None:
            arrays["projection"] = r.projection
        save_npz(sub / "maps.npz", **arrays)
        render_occlusion(r, sub / "occlusion.png")
        result = r.to_json()
        result["config"].update(ctx.config(image=str(f)))
        write_json(sub / "result.json", result)
        rows.append({"folder": str(i), "file": str(f), "label": r.label, "label_name": r.label_name,
                     "clean_prob": r.clean_prob, "min_prob": float(r.prob.min()), "feature_map": r.feature_map,
                     "figure": f"{i}/occlusion.png"})
    write_json(folder / "result.json", {"schema": 1, "kind": "occlusion_set", "images": rows,
                                        "config": ctx.config(size=b.occlusion_size, stride=b.occlusion_stride)})


def _probes(ctx: Context, folder: Path):
    from ..engine.features import default_cache_dir
    from ..generalization.probes import run_probe

    b = ctx.budgets
    run_probe(ctx.model, ctx.data, folder, per_class=b.probe_per_class, folds=b.probe_folds,
              cache_dir=default_cache_dir(), progress=ctx.progress)


def _tsne(ctx: Context, folder: Path):
    from ..cs231n.codes import tsne
    from ..engine.features import default_cache_dir

    tsne(ctx.model, ctx.data, folder, max_images=ctx.budgets.data_images, cache_dir=default_cache_dir(),
         progress=ctx.progress, config=ctx.config())


def _spread(names: list[str], n: int = 3) -> list[str]:
    return list(dict.fromkeys(names[round(i * (len(names) - 1) / max(n - 1, 1))] for i in range(min(n, len(names)))))


def activation_layers(model: nn.Module) -> list[str]:
    return _spread(feature_layers(model))


def _activations(ctx: Context, folder: Path):
    from ..cs231n.activations import activations

    activations(ctx.model, ctx.data, folder, activation_layers(ctx.model), max_images=ctx.budgets.data_images,
                progress=ctx.progress, config=ctx.config(path=str(ctx.data)))


def filter_layers(model: nn.Module) -> list[str]:
    """The first conv layer and a spatial (k > 1) conv halfway through the depth."""
    modules = dict(model.named_modules())
    convs = [i.name for i in layer_table(model) if isinstance(modules.get(i.name), nn.Conv2d)]
    spatial = [n for n in convs[1:] if modules[n].kernel_size[0] * modules[n].kernel_size[1] > 1]
    return convs[:1] + ([spatial[len(spatial) // 2]] if spatial else [])


def _filters(ctx: Context, folder: Path):
    from ..cs231n.filters import filter_pictures

    filter_pictures(ctx.model, folder, filter_layers(ctx.model), max_channels=64, config=ctx.config())


def _inversion(ctx: Context, folder: Path):
    from ..cs231n.inversion import inversion

    b = ctx.budgets
    image = ctx.few(1)[0]
    inversion(ctx.model, image, folder, b.inversion_layers, steps=b.inversion_steps, progress=ctx.progress,
              config=ctx.config(image=str(image)))


def fooling_class(model: nn.Module, pre: Preprocess, seed: int = 0) -> int:
    """A seeded random class of the model (the class of the report's fooling image)."""
    p = next(model.parameters())
    with torch.no_grad():
        k = model(torch.zeros(1, 3, pre.size, pre.size, device=p.device, dtype=p.dtype)).reshape(1, -1).shape[1]
    return int(np.random.default_rng(seed).integers(k))


def _fooling(ctx: Context, folder: Path):
    from ..cs231n.fooling import fooling

    b = ctx.budgets
    files = [str(f) for f in ctx.few(b.fooling_images)]
    fooling(ctx.model, files, folder, method="pgd", eps=b.fooling_eps, steps=b.fooling_steps, targets="random",
            fooling_classes=[fooling_class(ctx.model, ctx.pre)], fooling_steps=b.fooling_image_steps,
            progress=ctx.progress,
            config=ctx.config(images=files))


def _eps(eps: float) -> str:
    v = eps * 255
    return f"{v:g}/255" if abs(v - round(v)) < 1e-9 else f"{eps:g}"


def plan(ctx: Context, out: Path) -> list[Step]:
    """The report's steps, in the paper's order, then the CS231n notes'."""
    b = ctx.budgets
    m = ctx.model_args
    data = str(ctx.data)

    def o(name):
        return str(out / name)

    few = [str(p) for p in ctx.few(b.few_images)]
    steps = [
        Step("fig2_atlas", "Fig. 2", "Top-9 activations of every feature map, projected by the deconvnet",
             [["zfnet", "atlas", *m, "--data", data, "--layers", ",".join(b.atlas_layers), "--k", str(b.atlas_k),
               "--out", o("fig2_atlas"), "--resume"]], _atlas, links={"site": "index.html"}),
        Step("fig5_invariance", "Fig. 5", "Invariance to translation, scale and rotation",
             [["zfnet", "invariance", *m, *few, "--out", o("fig5_invariance")]], _invariance,
             skip=None if few else "no readable image"),
        Step("fig6_diagnose", "Fig. 6", "First-layer filters, dead filters, frequency coverage, aliasing",
             [["zfnet", "diagnose", *m, "--data", data, "--max-images", str(b.data_images),
               "--out", o("fig6_diagnose")]], _diagnose),
        Step("fig7_occlusion", "Fig. 7", "Occlusion sensitivity",
             [["zfnet", "occlude", *m, f, "--size", str(b.occlusion_size), "--stride", str(b.occlusion_stride),
               "--out", o(f"fig7_occlusion/{i}")] for i, f in enumerate(few)], _occlusion,
             skip=None if few else "no readable image"),
        Step("table7_probes", "Table 7", "Linear probes on each layer's features (Caltech protocol)",
             [["zfnet", "probe", *m, "--data", data, "--per-class", str(b.probe_per_class),
               "--folds", str(b.probe_folds), "--out", o("table7_probes")]], _probes,
             skip=_probe_skip(ctx)),
        Step("tsne", "CS231n", "t-SNE of the codes of the penultimate layer",
             [["zfnet", "tsne", *m, "--data", data, "--max-images", str(b.data_images), "--out", o("tsne")]], _tsne,
             skip=None if len(ctx.paths) >= 4 else f"t-SNE needs at least 4 images, the data has {len(ctx.paths)}"),
        Step("activations", "CS231n", "Layer activations; dead and sparse channels",
             [["zfnet", "activations", *m, data, "--layers", ",".join(activation_layers(ctx.model)),
               "--max-images", str(b.data_images), "--out", o("activations")]], _activations),
        Step("filters", "CS231n", "Conv filters: the first layer in colour, a deeper layer per channel",
             [["zfnet", "filters", *m, "--layers", ",".join(filter_layers(ctx.model)), "--max-channels", "64",
               "--out", o("filters")]], _filters),
        Step("inversion", "CS231n", "Reconstructions from the codes of several layers (Mahendran & Vedaldi)",
             [["zfnet", "invert", *m, *few[:1], *(["--layers", ",".join(b.inversion_layers)]
                                                  if b.inversion_layers else []),
               "--steps", str(b.inversion_steps), "--out", o("inversion")]], _inversion,
             skip=None if few else "no readable image"),
        Step("fooling", "CS231n", "Fooling: targeted PGD adversarial examples and a fooling image",
             [["zfnet", "fool", *m, *[str(f) for f in ctx.few(b.fooling_images)], "--method", "pgd",
               "--eps", _eps(b.fooling_eps), "--steps", str(b.fooling_steps), "--target", "random",
               "--fooling-class", str(fooling_class(ctx.model, ctx.pre)), "--fooling-steps",
               str(b.fooling_image_steps), "--out", o("fooling")]], _fooling,
             skip=None if few else "no readable image"),
    ]
    for s in steps:
        s.out = str(out)
    return steps


def _probe_skip(ctx: Context) -> str | None:
    if not ctx.classes or ctx.labels is None:
        return "the data has no class subfolders (Table 7 trains a classifier per layer)"
    counts = np.bincount(np.asarray(ctx.labels), minlength=len(ctx.classes))
    if len(ctx.classes) < 2 or counts.min() < 2:
        few = [ctx.classes[i] for i in np.flatnonzero(counts < 2)[:5]]
        return ("Table 7 needs at least 2 classes with at least 2 images each"
                + (f" (too few: {', '.join(few)})" if few else ""))
    return None


def data_of(path) -> tuple[Path, list[Path], list[int] | None, list[str] | None]:
    paths, labels, classes = list_images(path)
    return Path(path), paths, labels, classes
