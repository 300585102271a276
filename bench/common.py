"""Helpers every benchmark uses: percentiles and writing bench/results/<name>.json."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def rate(step: Callable[[], object], batch: int, seconds: float, warmup: int = 3) -> float:
    """Images per second of ``step`` (one batch of ``batch`` each), run for ``seconds`` after
    ``warmup`` runs."""
    for _ in range(warmup):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n * batch / (time.perf_counter() - t0)


def percentile_ms(samples_s: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(samples_s) * 1000.0, q)), 4)


def write_result(name: str, payload: dict[str, Any]) -> None:
    """Write bench/results/<name>.json and print it as the last line of output."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
           **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, separators=(",", ":")))
