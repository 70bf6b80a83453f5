"""`zfnet report`: run the paper's experiments (and the CS231n notes') on one model and one image folder, and
write them up as one offline HTML page."""

from __future__ import annotations

from .common import (
    add_list_arg,
    add_model_args,
    command,
    emit_json,
    load_from_args,
    out_dir,
    positive_int,
    report_skipped,
)


def _report_args(p):
    add_model_args(p)
    p.add_argument("--data", default=None, help="image folder; class subfolders add Table 7 (default: the 202 "
                   "Caltech-101 demo photos shipped with zfnet)")
    p.add_argument("--out", type=out_dir, required=True,
                   help="report folder (index.html, report.json, one folder per step)")
    add_list_arg(p, "--only", default=None, help="steps to run (fig2_atlas, fig5_invariance, "
                   "fig6_diagnose, fig7_occlusion, table7_probes, tsne, activations, filters, inversion, fooling)")
    p.add_argument("--force", action="store_true", help="run every step again, also those already done")
    add_list_arg(p, "--atlas-layers", default=None, metavar="LAYER",
                 help="layers for Fig. 2 (default: three spread over the depth, within a budget)")
    p.add_argument("--few-images", type=positive_int, default=3,
                   help="images for Fig. 5 and Fig. 7 (default: %(default)s)")
    p.add_argument("--max-images", type=positive_int, default=400,
                   help="images for diagnose, activations and t-SNE, evenly spaced (default: %(default)s)")
    p.add_argument("--inversion-steps", type=positive_int, default=150, help="optimisation steps per reconstruction")
    p.add_argument("--json", action="store_true", help="print only report.json on stdout")
    p.epilog = ("Resumable: run the same command again and the steps already done are skipped (a step whose "
                "options changed, or that failed, runs again). A step that fails is reported in its section "
                "and the others go on; the exit status is then 1.")


@command("report", "the whole paper (and the CS231n notes) on your model and data, as one offline HTML page")(
    _report_args)
def _report(args):
    from ..data.samples import demo_dir
    from ..report.budget import Budgets
    from ..report.run import report

    model = load_from_args(args)
    budgets = Budgets(atlas_layers=args.atlas_layers,
                      few_images=args.few_images, data_images=args.max_images, inversion_steps=args.inversion_steps)
    state = report(model, args.data or str(demo_dir()), args.out, model_name=args.model, weights=args.weights,
                   budgets=budgets, only=args.only, force=args.force,
                   progress=not args.json)
    if args.json:
        emit_json(state)
    else:
        counts = {}
        for s in state["steps"]:
            counts[s["status"]] = counts.get(s["status"], 0) + 1
        print(f"report of {len(state['steps'])} steps (" + ", ".join(f"{v} {k}" for k, v in counts.items())
              + f"): {args.out}/index.html")
    report_skipped(state.get("skipped") or [])
    return 1 if any(s["status"] == "failed" for s in state["steps"]) else 0
