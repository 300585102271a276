"""Helpers the benchmarks share: rates, percentiles, writing bench/results/<name>.json, and
what both pipeline benchmarks measure (one session of the whole model, a run's summary)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from offramp.model.bundle import Bundle
from offramp.model.sessions import FullModelRunner
from offramp.wire import Result

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


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _commit() -> str:
    """The commit the benchmark ran on, ``-dirty`` after it when files differ from it."""
    root = RESULTS.parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True, check=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git checkout)"
    return f"{head}-dirty" if dirty else head


@dataclass(frozen=True)
class Conditions:
    """What a run starts under, taken before its first measurement and written beside its
    figures: the commit, the time, and the machine's load average (1, 5 and 15 minutes: a
    load left by a test or another benchmark shows there)."""

    commit: str
    started: str
    loadavg: tuple[float, ...]

    @classmethod
    def now(cls) -> Conditions:
        return cls(_commit(), _utc(), tuple(round(v, 2) for v in os.getloadavg()))


def write_result(name: str, payload: dict[str, Any], conditions: Conditions) -> None:
    """Write bench/results/<name>.json and print it as the last line of output."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "when": _utc(), "started": conditions.started,
           "commit": conditions.commit,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "loadavg_before": list(conditions.loadavg),
                       "loadavg_after": [round(v, 2) for v in os.getloadavg()]},
           **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, separators=(",", ":")))


def monolithic_rate(bundle: Bundle, x: np.ndarray, threads: int,
                    batches: tuple[int, ...] = (16, 32)) -> float:
    """Frames/s of the whole model in one session, at the best of ``batches`` (each timed
    over half of ``x``: about 20 s a call at 3 threads here)."""
    runner = FullModelRunner(bundle, threads=threads)
    half = x[:len(x) // 2]
    best = 0.0
    for batch in batches:
        for i in range(3):
            runner.run(half[i * batch:(i + 1) * batch])
        t0, n = time.perf_counter(), 0
        for start in range(0, len(half), batch):
            runner.run(half[start:start + batch])
            n += len(half[start:start + batch])
        best = max(best, n / (time.perf_counter() - t0))
    return best


@dataclass
class Run:
    results: list[Result]
    start: float  # wall-clock time of the first frame sent
    end: float  # ... of the last result's arrival


def summarise(run: Run, labels: dict[str, int]) -> dict[str, Any]:
    results = run.results
    ok = [r for r in results if r.status == "ok"]
    lat = [r.latency_ms["total"] / 1000 for r in ok]
    return {"frames": len(results), "status": dict(Counter(r.status for r in results)),
            "fps": round(len(results) / (run.end - run.start), 1),
            "fill_s": round(min(r.ts for r in results) - run.start, 3),
            "accuracy": round(sum(labels[r.frame_id] == r.label for r in ok) / max(1, len(ok)), 4),
            "exit_shares": {str(k): round(v / max(1, len(ok)), 3) for k, v in
                            sorted(Counter(r.exit_index for r in ok).items())},
            "latency_p50_ms": percentile_ms(lat, 50), "latency_p99_ms": percentile_ms(lat, 99)}
