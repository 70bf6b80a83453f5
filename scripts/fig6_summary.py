"""Summary table of the CPU-scale Fig. 6 experiment: accuracy and diagnosis of each run (markdown)."""

import json
import sys
from pathlib import Path


def main(runs: Path) -> None:
    print("| run | epochs | val top-1 err % (10-crop) | val top-5 err % | dead conv1 | conv1 low / mid / high "
          "energy | layer-2 aliasing (own stride) | layer-2 power > 1/8 c/px | conv1 max/median RMS | "
          "conv2..5 max/median RMS |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---|")
    for run in sorted(runs.glob("*-clip*")):
        m = json.loads((run / "metrics.json").read_text())["epochs"][-1]
        d = json.loads((run / "diagnose" / "result.json").read_text())
        b, l2, dom = d["bands"], d["layer2"], d["domination"]
        deeper = " / ".join(f"{v:.2f}" for k, v in dom.items() if k != d["layer1"])
        print(f"| {run.name} | {m['epoch']} | {m['val_top1_err']:.1f} | {m['val_top5_err']:.1f} | "
              f"{len(d['dead'])}/{d['filters']} | {b['low']:.2f} / {b['mid']:.2f} / {b['high']:.2f} | "
              f"{l2.get('aliasing', float('nan')):.3f} | {l2.get('above_1_8', float('nan')):.3f} | "
              f"{dom[d['layer1']]:.2f} | {deeper} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/fig6-cpu"))
