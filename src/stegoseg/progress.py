"""Progress that reads well on a terminal and in a log file.

:func:`progress_bar` takes tqdm's arguments. With a bar wanted (``disable`` false) and a
terminal on stderr it is tqdm's bar. Otherwise a long stage (a bar that stays, ``leave``
true, with a known total) writes plain log lines instead of carriage-return updates: one
when it starts, one every 10% (at most one per 10 s), one at the end, each with the count,
the rate and the time left. Inner loops (``leave=False``) stay silent in a file.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Optional

from tqdm.auto import tqdm

log = logging.getLogger("stegoseg")


def on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
                 disable: bool = False, leave: bool = True, initial: int = 0, unit: str = "it", **kwargs):
    """tqdm's bar on a terminal, :class:`LogProgress` lines otherwise (see the module doc)."""
    if not disable and on_terminal():
        return tqdm(iterable, total=total, desc=desc, leave=leave, initial=initial, unit=unit, **kwargs)
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return LogProgress(iterable, total=total, desc=desc, silent=not leave or not total, initial=initial, unit=unit)


class LogProgress:
    """The part of tqdm's interface stegoseg uses, writing log lines (module doc)."""

    def __init__(self, iterable=None, total: Optional[int] = None, desc: str = "", silent: bool = False,
                 initial: int = 0, unit: str = "it", every: float = 0.1, min_seconds: float = 10.0):
        self.iterable, self.total, self.desc, self.silent, self.unit = iterable, total, desc, silent, unit
        self.n = self.start_n = initial
        self.every, self.min_seconds = every, min_seconds
        self.t0 = self.last = time.monotonic()
        self.next_mark = initial + every * total if total else None
        self.closed = False
        self.estimated = False  # the one early estimate of the stage's time (after a short warm-up)
        if not silent:
            log.info("%s: %d of %d %s to do", desc, total - initial, total, unit)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.silent or self.total is None or self.n >= self.total:
            return
        if not self.estimated and (now - self.t0 >= 2.0 or self.n - self.start_n >= 0.05 * self.total):
            self.estimated = True
            rate = (self.n - self.start_n) / max(now - self.t0, 1e-9)
            log.info("%s: %.2f %s/s so far: about %s for the %d %s", self.desc, rate, self.unit,
                     _duration((self.total - self.start_n) / rate if rate > 0 else float("nan")),
                     self.total - self.start_n, self.unit)
        if self.n >= self.next_mark and now - self.last >= self.min_seconds:
            self.last = now
            self.next_mark = self.n + self.every * self.total
            log.info("%s: %s", self.desc, self.status(now))

    def status(self, now: float) -> str:
        done = self.n - self.start_n
        elapsed = max(now - self.t0, 1e-9)
        rate = done / elapsed
        left = (self.total - self.n) / rate if rate > 0 and self.total else float("nan")
        return (f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%), {rate:.2f} {self.unit}/s, "
                f"{_duration(elapsed)} so far, about {_duration(left)} left")

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.silent and self.total:
            elapsed = time.monotonic() - self.t0
            log.info("%s: done, %d %s in %s", self.desc, self.n - self.start_n, self.unit, _duration(elapsed))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")
