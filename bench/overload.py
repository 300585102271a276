"""``make bench-overload``: goodput under overload from cameras that do not slow down.

The system as ``offramp up --workers 2`` runs it (the demo bundle, default settings, its own
plan), and cameras that publish PNG frames open-loop (:mod:`bench.camera`: separate processes,
plain paho clients, QoS 1, frame ids as correlation data, paced by the clock alone).

1. Capacity: a ladder of rates, 10 s each, until the system is saturated (over 5% of a step's
   frames refused, one never answered, or a p99 latency of ``ok`` answers over 1 s); the
   capacity is the most ``ok`` answers per second any step got.
2. 1x, 2x and 5x that rate for 60 s each (``OFFRAMP_BENCH_OVERLOAD_S``). For each second, the
   ``ok`` answers, the refusals (``dropped``), the other answers, and the frames sent that
   second that were never answered; per phase, the CPU seconds of each service, the broker,
   the cameras and this process, which reads the answers.
3. 2x and 5x again with cameras that follow the pace (``control/pace/<source>``): they skip
   the frames above it instead of sending them.

Keys: ``goodput_at_2x`` and ``goodput_at_5x`` (``ok`` answers/s over the phase / the same at
1x), ``answered_at_2x`` and ``answered_at_5x`` (frames with an outcome under their own id /
frames sent), ``ok_p99_ms_at_2x`` (camera's send to the answer's arrival); with the pace
followed, ``goodput_at_2x_paced`` and ``goodput_at_5x_paced``, ``dropped_share_at_2x_paced``
and ``..._5x_paced`` (``dropped`` answers / frames sent) and ``uplink_share_at_2x_paced`` and
``..._5x_paced`` (frames sent / frames the cameras had). Rates are over the
whole phase, from its first frame sent to its last answer. Each camera process sends up to
MAX_CAMERA_FPS; ``sending_fps`` says what the cameras achieved, since on two cores they compete
with the system they load: ``cameras_core_share`` is the share of the machine's CPU the
cameras and the answer reader took in each phase, and ``goodput_per_system_core_at_2x`` and
``..._5x`` are the ``ok`` answers per CPU second of the system itself (services and broker)
over the same at 1x: what refusing costs the system, apart from the cores the cameras take
from it. ``admission_core_ms_per_frame``: the admission-controller's CPU per frame sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Conditions, percentile_ms, write_result
from offramp.bus import Bus, Topics
from offramp.local.client import png_bytes, wait_for_plan, wait_for_workers
from offramp.local.system import LocalSystem
from offramp.ml.build import Recipe, build, preset
from offramp.ml.data import load_digits
from offramp.model.bundle import Bundle
from offramp.settings import BusSettings
from offramp.wire.result import REFUSAL

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2
LADDER = (400, 800, 1200, 1600, 2000, 2500, 3000, 4000, 5000)
STEP_S = 10.0
PHASE_S = float(os.environ.get("OFFRAMP_BENCH_OVERLOAD_S", "60"))
SETTLE_S = 15.0  # after the last frame of a phase, for its last answers
MAX_CAMERA_FPS = 2500  # per camera process
FACTORS = (1, 2, 5)
CORES = os.cpu_count() or 1
LOAD_GENERATOR = ("cameras", "bench_reader")  # processes of the bench, not of the system
SATURATED = 0.05  # share of a ladder step's frames refused that says the system is saturated


@dataclass
class Phase:
    """What one run of the cameras sent and got back."""

    rate: float
    sent: dict[str, float] = field(default_factory=dict)  # frame id -> wall time sent
    skipped: int = 0  # frames the cameras had and skipped for the pace
    # frame id, status, error (why it was not served), arrival
    answers: list[tuple[str, str, str, float]] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        first = min(self.sent.values(), default=0.0)
        last_sent = max(self.sent.values(), default=first)
        outcome: dict[str, tuple[str, float]] = {}
        repeated = 0
        why: Counter[str] = Counter()
        for fid, status, error, at in self.answers:
            if fid not in self.sent:  # a late answer of an earlier phase
                continue
            if fid in outcome:
                repeated += 1
            else:
                outcome[fid] = (status, at)
                if status != "ok":
                    why[error] += 1
        own = list(outcome)
        status = Counter(s for s, _ in outcome.values())
        end = max((at for _, at in outcome.values()), default=last_sent)
        span = max(end - first, 1e-9)
        ok_ms = [outcome[f][1] - self.sent[f] for f in own if outcome[f][0] == "ok"]
        return {"offered_fps": self.rate, "sent": len(self.sent), "skipped": self.skipped,
                "uplink_share": round(len(self.sent) / max(1, len(self.sent) + self.skipped), 4),
                "dropped_share": round(status["dropped"] / max(1, len(self.sent)), 4),
                "sending_fps": round(len(self.sent) / max(last_sent - first, 1e-9), 1),
                "span_s": round(span, 2), "answered_share": round(len(own) / max(1, len(self.sent)), 5),
                "never_answered": len(self.sent) - len(own), "answered_twice": repeated,
                "status": dict(status), "not_served": dict(why), "ok_fps": round(status["ok"] / span, 1),
                "dropped_fps": round(status["dropped"] / span, 1),
                "p50_ok_ms": percentile_ms(ok_ms, 50) if ok_ms else None,
                "p99_ok_ms": percentile_ms(ok_ms, 99) if ok_ms else None,
                "per_second": self.per_second(first, outcome),
                "cpu_s": {k: round(v, 2) for k, v in self.cpu_s.items()}}

    def per_second(self, first: float, outcome: dict[str, tuple[str, float]]
                   ) -> list[dict[str, int]]:
        """Answers by the second they arrived in; never-answered frames by the second sent."""
        rows: dict[int, Counter[str]] = defaultdict(Counter)
        for status, at in outcome.values():
            rows[int(at - first)]["ok" if status == "ok" else
                                  "refused" if status == "dropped" else "other"] += 1
        for fid, at in self.sent.items():
            if fid not in outcome:
                rows[int(at - first)]["never"] += 1
        return [{"s": s, **rows[s]} for s in range(max(rows, default=-1) + 1)]


def outcomes(payload: bytes, now: float) -> list[tuple[str, str, str, float]]:
    """(frame id, status, error, arrival) of each frame a result or refusal answers. The JSON
    is read as it comes, without building per-frame results (:func:`offramp.wire.
    read_results` does that, checked): this process reads thousands of answers a second on
    the cores the system under test runs on."""
    obj = json.loads(payload)
    if obj.get("kind") == REFUSAL:
        return [(fid, "dropped", reason, now) for reason, ids in obj["frames"].items()
                for fid in ids]
    return [(obj["frame_id"], obj["status"], obj.get("error") or "", now)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def service_pids(system: LocalSystem) -> dict[str, int]:
    """The process id of every service of ``system`` by node name, and of its broker."""
    pids = {m.node: m.proc.pid for m in (system.group.members if system.group else [])
            if m.proc is not None}
    if system.broker is not None and system.broker.pid:
        pids["broker"] = system.broker.pid
    return pids


def demo_bundle() -> Bundle:
    recipe: Recipe = preset("demo")
    bundle, _ = build(recipe, ROOT / "bundles" / "demo", progress=True)
    return bundle


def frames_file(folder: Path) -> Path:
    """The demo's test digits as PNG files' bytes, for the cameras to cycle through."""
    images = load_digits().test.images
    path = folder / "frames.npz"
    np.savez(path, payloads=np.array([png_bytes(im) for im in images], dtype=object))
    return path


async def run_phase(system: LocalSystem, rate: float, seconds: float, frames: Path,
                    folder: Path, tag: str, follow: bool = False) -> Phase:
    phase = Phase(rate)
    topics = Topics(system.prefix)
    cameras = max(1, math.ceil(rate / MAX_CAMERA_FPS))
    async with Bus(BusSettings(broker_url=system.url), f"bench-overload-{tag}") as bus:
        await bus.wait_connected(10)
        await wait_for_workers(bus, topics, system.workers, 60)
        await wait_for_plan(bus, topics, 60)  # its segments loaded: the steady state
        results = await bus.subscribe(topics.results_all(), qos=1, maxsize=2_000_000)
        answered: set[str] = set()

        async def read() -> None:
            async for msg in results:
                got = outcomes(msg.payload, time.time())
                phase.answers.extend(got)
                answered.update(fid for fid, *_ in got)

        reader = asyncio.create_task(read())
        pids = service_pids(system)
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        reader_before = cpu_seconds(os.getpid())
        port = system.url.rsplit(":", 1)[1]
        procs = [await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.camera", "--port", port, "--prefix", system.prefix,
            "--source", "cam-1", "--rate", str(rate / cameras), "--seconds", str(seconds),
            "--frames", str(frames), "--id-prefix", f"{tag}c{k}-",
            "--sent", str(folder / f"{tag}c{k}.npy"),
            *(["--follow-rate", "--share", str(1 / cameras)] if follow else []),
            stdout=asyncio.subprocess.DEVNULL, cwd=ROOT) for k in range(cameras)]
        cams = 0.0  # read while they run: the last half second of each is not counted
        while any(p.returncode is None for p in procs):
            with contextlib.suppress(OSError):
                cams = sum(cpu_seconds(p.pid) for p in procs if p.returncode is None) or cams
            await asyncio.sleep(0.5)
        if any(p.returncode for p in procs):
            raise SystemExit(f"bench-overload: a camera failed ({[p.returncode for p in procs]})")
        for k in range(cameras):
            sent = np.load(folder / f"{tag}c{k}.npy")
            phase.skipped += int(np.isnan(sent).sum())
            phase.sent.update({f"{tag}c{k}-{n}": float(t) for n, t in enumerate(sent)
                               if not np.isnan(t)})
        deadline = time.monotonic() + SETTLE_S  # the last answers, or a second one to some
        while time.monotonic() < deadline and len(answered) < len(phase.sent):  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        phase.cpu_s = {k: cpu_seconds(p) - before[k] for k, p in pids.items()}
        phase.cpu_s["cameras"] = cams
        phase.cpu_s["bench_reader"] = cpu_seconds(os.getpid()) - reader_before
        reader.cancel()
    return phase


def _ok_per_core(phase: dict[str, Any]) -> float:
    """``ok`` answers per CPU second of the system itself (services and broker; not the
    cameras nor the answer reader, which on this machine share its cores)."""
    cpu = sum(v for k, v in phase["cpu_s"].items() if k not in LOAD_GENERATOR)
    return float(phase["status"].get("ok", 0)) / max(cpu, 1e-9)


def main() -> None:
    conditions = Conditions.now()
    bundle = demo_bundle()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp, \
            LocalSystem(bundle, WORKERS, env={"OFFRAMP_LOG_LEVEL": "warning"}) as system:
        folder = Path(tmp)
        frames = frames_file(folder)
        ladder: list[dict[str, Any]] = []
        for i, rate in enumerate(LADDER):
            step = asyncio.run(run_phase(system, rate, STEP_S, frames, folder, f"l{i}")).summary()
            ladder.append({k: v for k, v in step.items() if k != "per_second"})
            print("ladder", ladder[-1], flush=True)
            if step["status"].get("dropped", 0) > SATURATED * step["sent"] \
                    or step["never_answered"] or (step["p99_ok_ms"] or 1e9) > 1000:
                break
        else:
            raise SystemExit(f"bench-overload: not saturated at {LADDER[-1]} frames/s")
        capacity = round(max(step["ok_fps"] for step in ladder))
        for factor in FACTORS:
            phase = asyncio.run(run_phase(system, factor * capacity, PHASE_S, frames, folder,
                                          f"x{factor}"))
            results[f"{factor}x"] = phase.summary()
            print(f"{factor}x", {k: v for k, v in results[f"{factor}x"].items()
                                 if k != "per_second"}, flush=True)
        for factor in FACTORS[1:]:
            phase = asyncio.run(run_phase(system, factor * capacity, PHASE_S, frames, folder,
                                          f"p{factor}", follow=True))
            results[f"{factor}x_paced"] = phase.summary()
            print(f"{factor}x paced", {k: v for k, v in results[f"{factor}x_paced"].items()
                                       if k != "per_second"}, flush=True)
        codes = system.stop()
    ok1 = results["1x"]["ok_fps"]
    paced = {f"{key}_at_{f}x_paced": results[f"{f}x_paced"][field_] for f in FACTORS[1:]
             for key, field_ in (("dropped_share", "dropped_share"),
                                 ("uplink_share", "uplink_share"))}
    paced.update({f"goodput_at_{f}x_paced": round(results[f"{f}x_paced"]["ok_fps"] / ok1, 3)
                  for f in FACTORS[1:]})
    per_core = {f"goodput_per_system_core_at_{f}x": round(_ok_per_core(results[f"{f}x"])
                                                         / _ok_per_core(results["1x"]), 3)
                for f in FACTORS[1:]}
    write_result("overload", {
        "workers": WORKERS, "bundle": bundle.name, "capacity_fps": capacity,
        "ladder": ladder, "phases": results,
        "goodput_at_2x": round(results["2x"]["ok_fps"] / ok1, 3),
        "goodput_at_5x": round(results["5x"]["ok_fps"] / ok1, 3),
        "answered_at_2x": results["2x"]["answered_share"],
        "answered_at_5x": results["5x"]["answered_share"],
        "ok_p99_ms_at_2x": results["2x"]["p99_ok_ms"],
        **paced,
        **per_core,
        "admission_core_ms_per_frame": {
            f"{f}x": round(1000 * results[f"{f}x"]["cpu_s"]["admission-1"]
                           / results[f"{f}x"]["sent"], 4) for f in FACTORS},
        "cameras_core_share": {
            f"{f}x": round((results[f"{f}x"]["cpu_s"]["cameras"] + results[f"{f}x"]["cpu_s"]
                            ["bench_reader"]) / (results[f"{f}x"]["span_s"] * CORES), 3)
            for f in FACTORS},
        "cameras_kept_up": {f"{f}x": round(results[f"{f}x"]["sending_fps"]
                                           / results[f"{f}x"]["offered_fps"], 3)
                            for f in FACTORS},
        "services_stopped_cleanly": all(c == 0 for c in codes.values()),
        "goals": {"goodput_at_2x": ">= 0.9", "goodput_at_5x": ">= 0.8",
                  "answered_at_2x": "1.0", "answered_at_5x": "1.0",
                  "ok_p99_ms_at_2x": "<= 1000", "dropped_share_at_2x_paced": "< 0.01"},
    }, conditions)


if __name__ == "__main__":
    main()
