"""Table 3: ZFNet with layers removed or resized, every variant trained with the same recipe.

`ablate(cfg, variants)` trains each variant of zfnet.models.networks.TABLE3_VARIANTS into `cfg.out/<variant>`
(each resumable, as any `zfnet train` run) and tabulates the final errors as the paper does: train
top-1, val top-1, val top-5.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from ..core.errors import ZfnetError
from ..core.results import atomic_path, write_json
from ..models.networks import TABLE3_VARIANTS
from .recipe import TrainConfig, main

__all__ = ["ablate", "format_table"]


def ablate(cfg: TrainConfig, variants: list[str] | None = None) -> dict:
    """Train every variant with `cfg`'s recipe; returns (and writes to cfg.out) result.json + table.md."""
    variants = list(variants or TABLE3_VARIANTS)
    unknown = [v for v in variants if v not in TABLE3_VARIANTS]
    if unknown:
        raise ZfnetError(f"unknown Table 3 variant(s) {unknown}; known: {', '.join(TABLE3_VARIANTS)}")
    out = Path(cfg.out)
    rows = []
    for v in variants:
        removed = {f"{k}{n}" for n in TABLE3_VARIANTS[v].get("remove", ()) for k in ("conv", "fc")}
        ones = tuple(n for n in cfg.bias_one if n not in removed)
        if ones != cfg.bias_one:
            print(f"zfnet: {v} has no {', '.join(sorted(set(cfg.bias_one) - set(ones)))}: its other biases start at 1",
                  file=sys.stderr)
        run = dataclasses.replace(cfg, model=v, out=str(out / v), bias_one=ones)
        history = main(run)["epochs"]
        last = history[-1] if history else {}
        rows.append({"variant": v, "changes": TABLE3_VARIANTS[v], "epochs": last.get("epoch"),
                     "train_top1_err": last.get("train_top1_err"), "val_top1_err": last.get("val_top1_err"),
                     "val_top5_err": last.get("val_top5_err"), "val_crops": last.get("val_crops"),
                     "run": str(out / v)})
    result = {"schema": 1, "config": dataclasses.asdict(cfg), "variants": rows}
    write_json(out / "result.json", result)
    with atomic_path(out / "table.md") as tmp:
        Path(tmp).write_text(format_table(rows) + "\n", encoding="utf-8")
    return result


def format_table(rows: list[dict]) -> str:
    """Markdown, one row per variant (train top-1 is the running error of the last epoch, with dropout)."""
    def f(v):
        return "-" if v is None else f"{v:.1f}"

    lines = ["| variant | epochs | train top-1 err % | val top-1 err % | val top-5 err % |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['epochs']} | {f(r['train_top1_err'])} | {f(r['val_top1_err'])} | "
              f"{f(r['val_top5_err'])} |" for r in rows]
    return "\n".join(lines)
