"""Progress where rich draws nothing (a log file, docker logs): plain lines, now and then."""

from __future__ import annotations

import io
import sys

import pytest

from offramp.ml.progress import LineProgress, NoProgress, progress


def test_a_long_step_says_where_it_is_in_a_log_now_and_then() -> None:
    now = [0.0]
    out = io.StringIO()
    bar = LineProgress(out=out, every_s=15.0, clock=lambda: now[0])
    with bar:
        task = bar.add_task("backbone features", total=3000)
        for _ in range(30):  # 100 images a second, for 30 s
            now[0] += 1.0
            bar.update(task, advance=100)
        epochs = bar.add_task("train", total=2)
        bar.update(epochs, advance=1, description="train loss 0.512")
    lines = out.getvalue().splitlines()
    assert lines[:4] == ["backbone features: 0/3000 (0%), 0 s",
                         "backbone features: 1500/3000 (50%), 15 s",
                         "backbone features: 3000/3000 (100%), 30 s",
                         "train: 0/2 (0%), 0 s"]
    assert len(lines) == 4  # an epoch of two is neither done nor 15 s old


def test_progress_off_a_terminal_is_lines_and_off_is_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # a log file, not a terminal
    assert isinstance(progress(True), LineProgress)
    assert isinstance(progress(False), NoProgress)
