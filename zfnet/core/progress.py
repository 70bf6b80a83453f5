"""One progress convention for every long loop, always on stderr (so `--json` stdout stays clean):

* on a terminal or in a notebook: a tqdm bar, cleared when done;
* elsewhere (logs, pipes, CI, `make demo > log`): plain lines, at most one every `ZFNET_PROGRESS_INTERVAL`
  seconds (default 10) and one when the loop ends, each naming the phase, n/N, rate and ETA:
  `zfnet: mine 64/202 img (32%), 21.3 img/s, ETA 0:06`.
"""

from __future__ import annotations

import os
import sys
import time

__all__ = ["progress_bar", "format_seconds"]


def format_seconds(s: float) -> str:
    """0:07, 3:25, 1:02:03 (h:mm:ss as a clock reads)."""
    s = int(round(max(s, 0.0)))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _interactive(stream) -> bool:
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):
        return False
    return "ipykernel" in sys.modules  # a notebook: tqdm.auto draws a widget


class _Lines:
    """The subset of tqdm's interface our loops use, printing occasional plain lines instead of a bar."""

    def __init__(self, iterable, total, desc, unit, stream, interval):
        self.iterable, self.desc, self.unit, self.stream, self.interval = iterable, desc, unit, stream, interval
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.postfix = total, 0, ""
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _line(self, final: bool) -> str:
        dt = time.monotonic() - self.start
        rate = self.n / dt if dt > 0 else 0.0
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        if final:
            tail = f" in {format_seconds(dt)}"
        elif self.total and rate > 0:
            tail = f", ETA {format_seconds((self.total - self.n) / rate)}"
        else:
            tail = ""
        post = f" [{self.postfix}]" if self.postfix else ""
        return f"zfnet: {self.desc} {count} {self.unit}{pct}, {rate:.3g} {self.unit}/s{tail}{post}"

    def _print(self, final: bool = False):
        try:
            print(self._line(final), file=self.stream, flush=True)
        except (OSError, ValueError):  # a closed pipe must not break the job
            pass
        self.last = time.monotonic()

    def update(self, n: int = 1):
        self.n += n
        if time.monotonic() - self.last >= self.interval and not (self.total and self.n >= self.total):
            self._print()

    def set_postfix_str(self, s: str = "", refresh: bool = True):
        self.postfix = str(s)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kw):
        items = {**(ordered_dict or {}), **kw}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str = "", refresh: bool = True):
        self.desc = desc

    def refresh(self):
        pass

    def close(self):
        if not self.closed:
            self.closed = True
            if self.n:
                self._print(final=True)


def progress_bar(iterable=None, *, total=None, desc: str = "", unit: str = "it", enabled: bool = True):
    """A progress reporter with tqdm's interface (update, set_postfix, set_description, close, iteration).

    `enabled=False` silences it (what `--json` and `progress=False` ask for); otherwise a tqdm bar on a
    terminal or notebook, plain lines on stderr anywhere else (see the module docstring).
    """
    from tqdm.auto import tqdm

    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if _interactive(sys.stderr):
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)
    try:
        interval = float(os.environ.get("ZFNET_PROGRESS_INTERVAL", "10"))
    except ValueError:
        interval = 10.0
    return _Lines(iterable, total, desc, unit, sys.stderr, interval)
