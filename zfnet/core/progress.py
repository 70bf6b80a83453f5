"""One progress-bar convention for every long loop: a bar on a terminal or in a notebook, on stderr,
nothing in logs and pipes (so `--json` output and CI logs stay clean)."""

from __future__ import annotations


def progress_bar(iterable=None, *, total=None, desc: str = "", unit: str = "it", enabled: bool = True):
    """tqdm with our defaults: `enabled=False` silences it; otherwise it shows only where stderr is a TTY
    (tqdm's disable=None), and it is cleared when done."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=None if enabled else True, leave=False)
