"""`zfnet layers | project`: Sec. 2 of the paper, the approach: the layer table of any model and the
projection of its units back to pixel space (Sec. 2.1: deconvnet, guided backprop, saliency)."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import ZfnetError
from .common import (
    add_model_args,
    command,
    emit_json,
    int_range,
    load_from_args,
    nonnegative_float,
    nonnegative_int,
    out_dir,
    positive_int,
    unit_address,
)

MAX_TABLE_SIZE = 2048  # the probing pass keeps every layer's output: bounded memory


def _layers_args(p):
    add_model_args(p)
    p.add_argument("--size", type=int_range(1, MAX_TABLE_SIZE), default=224,
                   help=f"input size in pixels, 1..{MAX_TABLE_SIZE} (default: %(default)s)")
    p.add_argument("--json", action="store_true")


@command("layers", "the layer table: channels, size, stride, receptive field per layer")(_layers_args)
def _layers(args):
    from ..inspect.layers import layer_table

    if args.weights == "default":
        args.weights = None  # the table depends on the architecture only: never download for it
    model = load_from_args(args)
    try:
        table = layer_table(model, args.size)
    except RuntimeError as e:  # the model's own ops refuse the input (too small for its kernels, ...)
        raise ZfnetError(f"--size {args.size}: {args.model} cannot run on a {args.size}x{args.size} input: "
                         f"{str(e).strip().splitlines()[0][:200]}") from e
    emit_json(table.to_json()) if args.json else print(table.format())
    return 0


def _project_args(p):
    add_model_args(p)
    p.add_argument("image", metavar="IMAGE", help="an image file")
    p.add_argument("--unit", action="append", type=unit_address, default=None, metavar="LAYER:CH[@Y,X]",
                   help="unit to project, repeatable: a feature map (conv5:17, or a module name such as "
                        "features.12:3) or one activation (conv5:17@3,4). Default: the strongest feature map "
                        "of the deepest conv feature layer")
    p.add_argument("--mode", default="deconv", choices=["deconv", "guided", "saliency"],
                   help="deconv = Zeiler & Fergus deconvnet (default); guided = guided backprop; "
                        "saliency = the plain gradient")
    p.add_argument("--backprop-norm", action="store_true",
                   help="backpropagate LRN instead of passing it through (deconv mode)")
    p.add_argument("--target", type=nonnegative_int, default=None, metavar="CLASS",
                   help="project an output class score instead of units (saliency mode: Simonyan et al.'s "
                        "saliency map, CS231n's data gradient); written as target_<CLASS>.png")
    p.add_argument("--score", default="logit", choices=["logit", "log_prob", "prob"],
                   help="the target's score: logit (default: before the softmax; a model ending in a softmax is "
                        "scored on its input), log_prob or prob")
    p.add_argument("--seed", default=None, choices=["activation", "one"],
                   help="what the backward pass starts from: activation (the paper's; default for units) or one "
                        "(Captum's; default for a target): a unit whose activation is 0 projects only with one")
    p.add_argument("--aggregate", action="store_true",
                   help="sum all --unit's into one objective: one picture, aggregate.png")
    p.add_argument("--smooth", default=None, choices=["smoothgrad", "smoothgrad_sq", "vargrad"],
                   help="average (smoothgrad), mean square (smoothgrad_sq) or variance (vargrad) over noisy copies")
    p.add_argument("--samples", type=positive_int, default=50, help="noisy copies for --smooth (default: %(default)s)")
    p.add_argument("--sigma", type=nonnegative_float, default=0.15,
                   help="noise std for --smooth, as a fraction of the image's range (default: %(default)s)")
    p.add_argument("--noise-seed", type=nonnegative_int, default=0,
                   help="seed of the --smooth noise (default: %(default)s)")
    p.add_argument("--out", type=out_dir, required=True, help="output folder: one PNG per unit, named after the unit, "
                   "and result.json (units, mode, the rule applied at each kind of op met, the exact config)")
    p.add_argument("--save-npy", action="store_true",
                   help="also write input.npy (the preprocessed input, 1x3xHxW float32) and <unit>.npy "
                        "(the raw projection, same shape)")
    p.epilog = ("PNG display: each projection is scaled by its own largest magnitude, symmetric about zero "
                "(0 = mid grey, +max = white, -max = black, per colour channel with one shared scale), as "
                "in the paper's figures; use --save-npy for the raw numbers.")


@command("project", "Sec. 2.1: project units back to pixel space (deconvnet, guided backprop, saliency)")(
    _project_args)
def _project(args):
    import numpy as np

    from ..core.results import atomic_path, write_json
    from ..data.images import Preprocess, load_image
    from ..engine.project import project, strongest_map
    from ..engine.rules import rules_on_path
    from ..inspect.layers import layer_table, parse_unit
    from ..present.render import save_png, signed_to_rgb

    image = load_image(args.image)  # ZfnetError naming the file if unreadable
    model = load_from_args(args)
    pre = Preprocess.for_model(model)
    param = next(model.parameters())
    x = pre(image).unsqueeze(0).to(param.device, param.dtype)
    table = layer_table(model, tuple(x.shape[-2:]))
    if args.target is not None and not args.unit:
        units, names = None, [f"target {args.target}"]
    else:
        units = [parse_unit(u, table) for u in args.unit] if args.unit else [strongest_map(model, x)]
        names = ["aggregate " + " + ".join(map(str, units))] if args.aggregate else [str(u) for u in units]
    proj = project(model, x, units, args.mode, backprop_norm=args.backprop_norm, seed=args.seed, target=args.target,
                   score=args.score, aggregate=args.aggregate, smooth=args.smooth, samples=args.samples,
                   sigma=args.sigma, noise_seed=args.noise_seed)
    proj = proj if units is None or args.aggregate else proj[0]  # (U, 3, H, W)
    slugs = [f"target_{args.target}"] if units is None else ["aggregate"] if args.aggregate else [u.slug for u in units]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save_npy(path, a):
        with atomic_path(path, suffix=".npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, a)

    if args.save_npy:
        save_npy(out / "input.npy", x.detach().cpu().float().numpy())
    rows = []
    for name, slug, p in zip(names, slugs, proj):
        save_png(signed_to_rgb(p), out / f"{slug}.png")
        if args.save_npy:
            save_npy(out / f"{slug}.npy", p.unsqueeze(0).detach().cpu().float().numpy())
        rows.append({"unit": name, "png": f"{slug}.png", "npy": f"{slug}.npy" if args.save_npy else None,
                     "max_abs": p.abs().max().item()})
        print(f"{name}: max |projection| {p.abs().max().item():.4g} -> {out / (slug + '.png')}")
    # a target is a score of the output: the whole forward pass is on its path
    path = [table.names()[-1]] if units is None else [u.layer for u in units]
    rules = rules_on_path(model, x, path, args.mode, backprop_norm=args.backprop_norm)
    write_json(out / "result.json", {
        "schema": 1, "mode": args.mode, "units": rows, "rules": rules,
        "config": {"model": args.model, "weights": args.weights, "image": str(args.image), "mode": args.mode,
                   "units": [str(u) for u in units] if units is not None else None, "target": args.target,
                   "score": args.score, "seed": args.seed, "aggregate": args.aggregate, "smooth": args.smooth,
                   "samples": args.samples, "sigma": args.sigma, "noise_seed": args.noise_seed,
                   "backprop_norm": args.backprop_norm,
                   "preprocess": {"preset": pre.preset, "resize": pre.resize, "size": pre.size}}})
    return 0
