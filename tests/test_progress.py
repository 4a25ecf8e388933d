"""Progress reaches a log file as plain, timed lines (a terminal gets a tqdm bar instead)."""

from __future__ import annotations

import io
import re

from conretriever.progress import Progress, track


def test_log_file_gets_timed_lines_with_rate_and_eta(monkeypatch):
    stream = io.StringIO()  # not a TTY, like a redirected stderr
    clock = iter(float(t) for t in range(0, 1000, 10))  # every call: 10 s later
    monkeypatch.setattr("conretriever.progress.time.monotonic", lambda: next(clock))
    bar = Progress(5, "train", interval=25, stream=stream, unit="steps")
    for step in range(5):
        bar.set_postfix(loss=f"{1.0 / (step + 1):.3f}")
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert 2 <= len(lines) <= 3  # every ~25 s of 50, plus the final line, never a duplicate
    assert re.match(r"train: \d/5 \(\d+%\) loss=\S+ \| \S+ steps/s, elapsed \d+ s, ETA \d+ s$",
                    lines[0])  # fmt: skip
    assert lines[-1].startswith("train: 5/5 (100%) loss=0.200 |") and "ETA" not in lines[-1]


def test_disabled_and_unknown_total():
    quiet = io.StringIO()
    with Progress(3, "x", enabled=False, stream=quiet) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""
    stream = io.StringIO()
    with Progress(None, "convert", stream=stream, interval=0, unit="rows") as bar:
        bar.update(7)
    assert stream.getvalue().startswith("convert: 7 rows |")


def test_resumed_run_shows_its_position_but_rates_only_new_work():
    stream = io.StringIO()
    bar = Progress(10, "train", initial=6, stream=stream, interval=1e9)
    bar.update(1)
    bar.close()
    assert stream.getvalue().startswith("train: 7/10 (70%)")


def test_track_wraps_an_iterable():
    stream = io.StringIO()
    items = list(range(4))
    assert list(track(items, "mine", stream=stream, unit="rows")) == items
    assert stream.getvalue().startswith("mine: 4/4 (100%) |")
