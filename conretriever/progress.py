"""Progress a user can see, in a terminal and in a log file.

On a terminal (stderr is a TTY) long work shows a tqdm bar. When stderr is a file or a pipe
(``bash scripts/train_eval_llm_retriever.sh > run.log 2>&1``, a cluster job, CI), a bar would
write nothing readable, so :class:`Progress` writes a plain line instead, at most every
``interval`` seconds (default 30; ``CONRETRIEVER_PROGRESS_SECONDS`` changes it) and once at the
end::

    train: 12/30 (40%) loss=0.8123 acc=0.75 | 0.21 it/s, elapsed 57 s, ETA 85 s

The line goes to stderr, flushed, so it interleaves correctly with logging output.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator

DEFAULT_INTERVAL_S = 30.0


def _interval() -> float:
    try:
        return float(os.environ.get("CONRETRIEVER_PROGRESS_SECONDS", DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S


def _seconds(value: float) -> str:
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


class Progress:
    """A progress bar on a TTY, timed progress lines otherwise; ``enabled=False`` is silent.

    ``total`` may be None (unknown); ``initial`` counts work already done (a resumed run): it
    is shown but not used for the rate.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        *,
        enabled: bool = True,
        initial: int = 0,
        unit: str = "it",
        interval: float | None = None,
        stream=None,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled = enabled
        self.n = initial
        self._initial = initial
        self._printed = initial  # the count shown by the last plain line
        self._postfix: dict[str, object] = {}
        self._stream = stream or sys.stderr
        self._start = time.monotonic()
        self._last = self._start
        self._interval = _interval() if interval is None else interval
        self._bar = None
        self._closed = False
        if enabled and self._stream.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self._stream)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last >= self._interval:
            self._line()

    def set_postfix(self, **values) -> None:
        self._postfix = values
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def line(self) -> str:
        """The plain progress line (what a log file gets)."""
        elapsed = time.monotonic() - self._start
        done = self.n - self._initial
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total:
            head = f"{self.desc}: {self.n}/{self.total} ({100 * self.n / self.total:.0f}%)"
        else:
            head = f"{self.desc}: {self.n} {self.unit}"
        post = " ".join(f"{k}={v}" for k, v in self._postfix.items())
        tail = f"{rate:.3g} {self.unit}/s, elapsed {_seconds(elapsed)}"
        if self.total and rate > 0 and self.n < self.total:
            tail += f", ETA {_seconds((self.total - self.n) / rate)}"
        return f"{head}{' ' + post if post else ''} | {tail}"

    def _line(self) -> None:
        self._last = time.monotonic()
        self._printed = self.n
        print(self.line(), file=self._stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.n > self._printed:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable, desc: str, *, total: int | None = None, enabled: bool = True,
          unit: str = "it", stream=None) -> Iterator:  # fmt: skip
    """Iterate ``items`` with a :class:`Progress` (total from ``len(items)`` when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with Progress(total, desc, enabled=enabled, unit=unit, stream=stream) as bar:
        for item in items:
            yield item
            bar.update(1)
