"""Progress a user can follow: tqdm bars on a terminal, plain lines when the output goes to a file.

Every long loop (decoding, the dump, each epoch, evaluation) goes through `track`: on a terminal it is a tqdm
bar; when stderr is not a terminal (a log file, a batch job) it is a plain line at most every `LINE_EVERY_S`
seconds and one at the end, saying what, how far, how fast and for how long. `say` writes the one line per
epoch and per stage. All of it goes to stderr (stdout keeps the results), from rank 0 only under torchrun.
`softcache -q` silences it (`-v` adds log messages beside it, see cli.py).
"""
from __future__ import annotations

import os
import sys
import time
from typing import TypeVar
from collections.abc import Callable, Iterable, Iterator

from tqdm import tqdm

T = TypeVar("T")

QUIET, NORMAL = 0, 1
LINE_EVERY_S = 30.0  # without a terminal: the longest silence inside one loop


class _State:
    level = NORMAL


def set_level(level: int) -> None:
    _State.level = level


def level() -> int:
    return _State.level


def _main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def interactive() -> bool:
    """Whether stderr is a terminal (tqdm bars) rather than a file or a pipe (plain lines)."""
    return sys.stderr.isatty()


def say(message: str) -> None:
    """One progress line on stderr, written above any tqdm bar."""
    if _State.level >= NORMAL and _main_rank():
        tqdm.write(message, file=sys.stderr)


def rate(count: float, seconds: float, unit: str) -> str:
    """`1,234 images/s`; below one a second, the seconds each takes (`12.5 s/batch`), not `0 batch/s`."""
    if seconds <= 0 or count <= 0:
        return f"- {unit}/s"
    per_second = count / seconds
    return f"{per_second:,.0f} {unit}/s" if per_second >= 1 else f"{seconds / count:,.1f} s/{unit.rstrip('s')}"


def track(items: Iterable[T], *, what: str, total: int | None = None, unit: str = "batch",
          count: Callable[[T], int] | None = None, amount: int | None = None, amount_unit: str | None = None,
          final: bool = False) -> Iterator[T]:
    """`items`, reporting progress: a tqdm bar on a terminal; otherwise a line every `LINE_EVERY_S` seconds
    ("what: 12,000/50,000 samples (24%), 800 samples/s, 15 s elapsed", each item counting `count(item)`
    `amount_unit`s out of `amount`, or 1 `unit` out of `total`), and with `final` a last line at the end."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    show = _State.level >= NORMAL and _main_rank()
    if show and interactive():
        yield from tqdm(items, total=total, desc=what, unit=unit, leave=False, file=sys.stderr)
        return
    units, goal = (amount_unit or unit), (amount if count is not None else total)
    started = last = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += count(item) if count is not None else 1
        now = time.perf_counter()
        if show and now - last >= LINE_EVERY_S:
            last = now
            how_far = f"{done:,}/{goal:,} {units} ({100 * done / goal:.0f}%)" if goal else f"{done:,} {units}"
            say(f"{what}: {how_far}, {rate(done, now - started, units)}, {now - started:,.0f} s elapsed")
    if show and final:
        elapsed = time.perf_counter() - started
        say(f"{what}: {done:,} {units} in {elapsed:,.1f} s ({rate(done, elapsed, units)})")
