"""``make bench-links``: a 224x224 model over shaped links, per codec, exits closed and open.

The bundle: EfficientNet-Lite0 with its ImageNet weights, exits trained on Fashion-MNIST at
224x224 (frozen backbone, 3,000 training images, 8 epochs: ``offramp build`` with
``RECIPE_ARGS``; built once, about half an hour here, and cached under bundles/bench),
with exits after blocks 3, 8, 11 and 17 and a segment ending at each. ``offramp build``
measures raw, fp16 and int8 at every cut; autoencoders (ratios 4 and 8, 3,000 training
images, 3 epochs) are trained at the two cuts that cross links: 294 KiB per frame raw after
segment 1, 61 KiB after segment 2. (A cut after block 1, 784 KiB, would make the links matter
even more; 294 KiB already makes ``fe`` and ``wifi`` the bottleneck here.) Each pinned codec's
accuracy is measured with it at both cuts at once (1,000 validation images), since that is
what a run sends.

The network: ``offramp netbed`` with two worker namespaces, every link (the gateway's, where
the broker runs, and each worker's) shaped to ``gbe``, ``fe`` and ``wifi`` in both directions.
As in MDI-Exit, the source's box computes the first segment itself: ``gw-1`` runs segment 1
in the gateway's namespace, ``worker-1`` segment 2 and ``worker-2`` segments 3 and 4, each
hosting only those (the plan is not followed). Every activation crosses two shaped links
(to the broker, from it).

Per link, exits closed and open (the arbiter's calibrated thresholds), and codec (raw, fp16,
int8, ae, auto): a camera on the host keeps up to ``WINDOW`` frames in flight (closed loop: a
new frame as each is answered; fewer where they would queue more than ``QUEUE_S`` before the
link) over Fashion-MNIST test images; after twice that many answers, for ``SECONDS`` it counts
answers, their latency and accuracy, and the bytes each link carried
(the qdiscs' own counters).

- throughput (frames/s), latency p50/p99 (ms), accuracy over the frames answered;
- the busiest link (most bytes per frame, either direction), the link-bound limit (its rate
  in bytes/s over those bytes per frame), and ``link_efficiency`` = throughput / limit where
  the link is the bottleneck: where the limit is below what the same configuration reaches
  at ``gbe`` (its compute ceiling here);
- ``ae_gain_wifi``: at ``wifi`` with exits closed, throughput with the autoencoders (ratio 4
  at both cuts) over raw, with their accuracy loss beside it (the claim holds within 1 point);
- ``auto_vs_best``: the automatic choice over the best fixed codec whose loss is within the
  budget (1 point), the worst over links and exit settings.

Needs root (network namespaces). The figures are this 2-core machine's: every process shares
its cores, so compute bounds the fast links.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import Conditions, percentile_ms, write_result
from offramp.bus import Bus, Topics
from offramp.cli.recipe_args import add_recipe_options, recipe_from_args
from offramp.local.client import envelope, wait_for_workers
from offramp.local.netbed import PROFILES, Plan, netns_exec
from offramp.local.netbed_run import Running, running
from offramp.ml.build import Recipe, build, load_data, load_trained
from offramp.ml.data import Split, limit, load_fashion_mnist
from offramp.model.bundle import Bundle, load_bundle
from offramp.settings import BusSettings
from offramp.wire import read_results

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "bundles" / "bench" / "links-224"
LINKS = ("gbe", "fe", "wifi")
CODECS = ("raw", "fp16", "int8", "ae", "auto")
ASSIGNMENT = [(1,), (2,), (3, 4)]  # gw-1 (the source's box), worker-1, worker-2
CUTS = (1, 2)  # the cuts that cross links in ASSIGNMENT (cut 3 stays inside worker-2)
RATIOS = (4, 8)  # the autoencoders at each of them
AE_TRAIN, AE_EPOCHS = 3000, 3  # training images and epochs per autoencoder
VAL_SAMPLES = 1000  # validation images the codecs' accuracy is measured on
MAX_LOSS = 1.0  # accuracy points the automatic choice may give up (the worker's default)
# Frames in flight: enough to keep every stage busy at the link's rate (16 left fe with fp16 at
# 0.73 of its limit and wifi with the autoencoders at 0.79; 32 gave fe 0.88), but no more than
# queue QUEUE_S before the link: with 32 raw frames (5 s) queued before wifi, the busiest link
# carried 2.5 times the bytes per answered frame and throughput fell to 0.37 of the 16-frame run.
WINDOW = 32
QUEUE_S = 1.5
SECONDS = float(os.environ.get("OFFRAMP_BENCH_LINKS_SECONDS", "15"))
# Sweeps over every configuration, one after the other; a configuration's figures are the
# mean of its runs (the compute-bound runs here vary by about 10% from one to the next).
REPEATS = int(os.environ.get("OFFRAMP_BENCH_LINKS_REPEATS", "2"))
# The admission-controller's progress timeout: 32 raw frames queue about 5 s before a wifi link,
# and the bench measures throughput, so a frame is not dispatched again while it waits.
PROGRESS_TIMEOUT_S = 30
PREFIX = "offramp/v1"


RECIPE_ARGS = ["--preset", "effnet-fashion", "--input-size", "224", "--exits", "3,8,11,17",
               "--train-limit", "3000", "--epochs", "8", "--name", "fashion-effnet-224"]


def recipe() -> Recipe:
    """The bundle's recipe, as ``offramp build`` takes it (the same command builds it)."""
    p = argparse.ArgumentParser()
    add_recipe_options(p)
    return recipe_from_args(p.parse_args(RECIPE_ARGS))


def ensure_bundle() -> Bundle:
    """The bench's bundle, built (about half an hour on 2 cores), with every cut's wire codecs
    measured and autoencoders trained at the cuts that cross links (about 20 minutes), once."""
    from offramp.ml.compress import (
        compare_codecs,
        export_autoencoder,
        record_codecs,
        record_wire_codecs,
        train_autoencoder,
    )

    r = recipe()
    bundle, _ = build(r, BUNDLE, progress=True)
    model = load_trained(bundle.path("model.pt"))
    data = load_data(r)
    if any(not bundle.codec_accuracy(c) for c in range(1, bundle.num_segments)):
        record_wire_codecs(model, bundle, data, samples=VAL_SAMPLES)  # built before build did
    for cut in CUTS:
        missing = [q for q in RATIOS if f"ae-r{q}" not in bundle.codec_accuracy(cut)]
        aes = {}
        for ratio in missing:
            print(f"autoencoder ratio {ratio} at cut {cut}", flush=True)
            enc, dec = train_autoencoder(model, bundle, limit(data, AE_TRAIN), cut, ratio,
                                         epochs=AE_EPOCHS)
            export_autoencoder(bundle, cut, ratio, enc, dec)
            aes[ratio] = (enc, dec)
        if aes:
            record_codecs(bundle, cut, compare_codecs(model, bundle, data, cut, aes,
                                                      samples=VAL_SAMPLES))
    return load_bundle(BUNDLE)


@torch.no_grad()
def chain_accuracy(bundle: Bundle) -> dict[str, float]:
    """Final-exit validation accuracy (VAL_SAMPLES images) with each pinned codec at every
    cut in CUTS at once, as a run sends it: what the codecs lose together (the bundle records
    each cut alone). ``ae`` is the smallest ratio, what ``OFFRAMP_WORKER_CODEC=ae`` sends."""
    from offramp.ml.train import to_tensors
    from offramp.model.sessions import make_session
    from offramp.wire import Tensor

    model = load_trained(bundle.path("model.pt")).eval()
    data = load_data(recipe())
    x, y = to_tensors(Split(data.val.images[:VAL_SAMPLES], data.val.labels[:VAL_SAMPLES]),
                      bundle.manifest.input)
    ends = [bundle.segment(c).last_block for c in CUTS]

    def through(codec: str, cut: int, a: torch.Tensor) -> torch.Tensor:
        if codec == "raw":
            return a
        if codec == "ae":
            spec = bundle.autoencoders_at(cut)[0]
            enc, dec = (make_session(bundle.path(f)) for f in (spec.encoder, spec.decoder))
            latent = enc.run(None, {"act": a.numpy()})[0].astype(np.float16).astype(np.float32)
            return torch.from_numpy(dec.run(None, {"latent": latent})[0])
        return torch.from_numpy(Tensor.encode(a.numpy(), codec).to_numpy())  # type: ignore[arg-type]

    out = {}
    for codec in ("raw", "fp16", "int8", "ae"):
        hits = 0
        for s in range(0, len(y), 100):
            a, first = x[s:s + 100], 0
            for cut, end in zip(CUTS, ends, strict=True):
                a = through(codec, cut, model.forward_blocks(a, first, end))
                first = end + 1
            logits = model.heads[-1](model.forward_blocks(a, first, model.exit_blocks[-1]))[0]
            hits += int((logits.argmax(-1) == y[s:s + 100]).sum())
        out[codec] = round(hits / len(y), 4)
    return out


# -- one configuration -----------------------------------------------------------------------
@dataclass
class Window:
    sent: dict[str, float] = field(default_factory=dict)
    latency_s: list[float] = field(default_factory=list)
    correct: int = 0
    answered: int = 0
    other: int = 0  # answered, not ok


async def closed_loop(url: str, window: int, images: np.ndarray, labels: np.ndarray,
                      measure: Any) -> tuple[Window, float]:
    """Keep ``window`` frames in flight; measure from the answer to twice as many for SECONDS.
    Returns the window and its length; ``measure(start|stop)`` brackets it (link counters)."""
    topics = Topics(PREFIX)
    settings = BusSettings(broker_url=url, topic_prefix=PREFIX, publish_timeout_s=30)
    async with Bus(settings, f"bench-links-{os.getpid()}") as bus:
        await bus.wait_connected(30)
        await wait_for_workers(bus, topics, len(ASSIGNMENT), 180)
        results = await bus.subscribe(topics.results("cam-1"), qos=1, maxsize=10_000)
        ingest = topics.ingest("cam-1")
        w = Window()
        next_frame = 0
        started = stop_at = 0.0

        async def send() -> None:
            nonlocal next_frame
            i = next_frame % len(images)
            fid = f"f{next_frame}-{i}"
            next_frame += 1
            w.sent[fid] = time.monotonic()
            await bus.publish(ingest, envelope(fid, image=images[i]), qos=1)

        for _ in range(window):
            await send()
        seen = 0
        while True:
            msg = await asyncio.wait_for(results.get(), 120)
            now = time.monotonic()
            for r in read_results(msg.payload):  # one, or a refusal's frames
                seen += 1
                if seen == 2 * window:  # the frames sent before the codec was chosen are out
                    measure("start")
                    started, stop_at = now, now + SECONDS
                elif started and now <= stop_at:
                    sent = w.sent.get(r.frame_id)
                    if r.status == "ok" and sent is not None:
                        w.answered += 1
                        w.latency_s.append(now - sent)
                        w.correct += int(r.label == labels[int(r.frame_id.split("-")[1])])
                    else:
                        w.other += 1
                if started and now > stop_at:
                    measure("stop")
                    return w, now - started
                await send()


def link_counters(plan: Plan) -> dict[str, int]:
    """Bytes each shaped link direction carried so far (the tbf qdiscs' own counters)."""
    out = {}
    for node in plan.nodes:
        for direction, cmd in (
                ("up", [*netns_exec(node.namespace), "tc", "-s", "qdisc", "show", "dev", "eth0"]),
                ("down", [*netns_exec(plan.hub), "tc", "-s", "qdisc", "show", "dev",
                          node.hub_link])):
            text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            out[f"{node.name}:{direction}"] = int(text.split(" Sent ")[1].split()[0])
    return out


def frames_in_flight(bundle: Bundle, link: str, codec: str) -> int:
    """WINDOW, or as many frames as the link carries in QUEUE_S at the codec's bytes per frame
    over the crossing cuts (``auto``: the smallest codec within the budget, its choice on a
    slow link), at least 8."""
    def per_cut(cut: int) -> int:
        if codec == "auto":
            return bundle.wire_bytes(cut, MAX_LOSS)
        return bundle.codec_bytes(cut)[f"ae-r{min(RATIOS)}" if codec == "ae" else codec]

    per_frame = sum(per_cut(c) for c in CUTS)
    return max(8, min(WINDOW, int(QUEUE_S * PROFILES[link] * 1e6 / 8 / per_frame)))


def run_config(bundle: Bundle, link: str, exits: str, codec: str, images: np.ndarray,
               labels: np.ndarray) -> dict[str, Any]:
    plan = Plan("oflb", workers=2, mbps=PROFILES[link], subnet="10.75.0")
    env = {"OFFRAMP_ARBITER_DISABLE_EXITS": "true" if exits == "closed" else "false",
           "OFFRAMP_LOG_LEVEL": "info",
           "OFFRAMP_ADMISSION_PROGRESS_TIMEOUT_S": str(PROGRESS_TIMEOUT_S)}
    worker_env = {"OFFRAMP_WORKER_FOLLOW_PLAN": "false", "OFFRAMP_WORKER_CODEC": codec,
                  "OFFRAMP_WORKER_CODEC_MAX_LOSS": str(MAX_LOSS)}
    counters: dict[str, dict[str, int]] = {}
    window = frames_in_flight(bundle, link, codec)

    def measure(when: str) -> None:
        counters[when] = link_counters(plan)

    with tempfile.TemporaryDirectory(prefix="bench-links-") as tmp, running(
            plan, bundle, Path(tmp), prefix=PREFIX, assignment=ASSIGNMENT, on_gateway=1,
            env=env, worker_env=worker_env) as system:
        w, seconds = asyncio.run(closed_loop(system.broker.url, window, images, labels,
                                             measure))
        chosen = _chosen(system, Path(tmp))
    carried = {k: counters["stop"][k] - counters["start"][k] for k in counters["stop"]}
    busiest = max(carried, key=lambda k: carried[k])
    per_frame = carried[busiest] / max(1, w.answered)
    limit_fps = PROFILES[link] * 1e6 / 8 / per_frame if per_frame else float("inf")
    fps = w.answered / seconds
    row = {"link": link, "exits": exits, "codec": codec, "window": window,
           "throughput_fps": round(fps, 3),
           "latency_p50_ms": percentile_ms(w.latency_s, 50) if w.latency_s else None,
           "latency_p99_ms": percentile_ms(w.latency_s, 99) if w.latency_s else None,
           "accuracy": round(w.correct / w.answered, 4) if w.answered else None,
           "frames": w.answered, "correct": w.correct, "not_ok": w.other,
           "busiest_link": busiest, "busiest_bytes": carried[busiest],
           "bytes_per_frame": round(per_frame), "link_limit_fps": round(limit_fps, 3),
           "chosen": chosen}
    print(json.dumps(row), flush=True)
    return row


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's runs as one row: mean throughput (each run's beside it), median
    latencies, accuracy over every frame answered, bytes per frame on the busiest link."""
    frames = sum(r["frames"] for r in runs)
    first = runs[0]
    busiest = max({r["busiest_link"] for r in runs},
                  key=lambda k: sum(r["busiest_link"] == k for r in runs))
    per_frame = sum(r["busiest_bytes"] for r in runs) / max(1, frames)
    chosen: dict[str, list[str]] = {}
    for r in runs:
        for node, picks in r["chosen"].items():
            chosen.setdefault(node, [])
            chosen[node] += [p for p in picks if p not in chosen[node]]
    return {"link": first["link"], "exits": first["exits"], "codec": first["codec"],
            "window": first["window"],
            "throughput_fps": round(float(np.mean([r["throughput_fps"] for r in runs])), 3),
            "throughput_fps_runs": [r["throughput_fps"] for r in runs],
            "latency_p50_ms": _median([r["latency_p50_ms"] for r in runs]),
            "latency_p99_ms": _median([r["latency_p99_ms"] for r in runs]),
            "accuracy": round(sum(r["correct"] for r in runs) / frames, 4) if frames else None,
            "frames": frames, "not_ok": sum(r["not_ok"] for r in runs),
            "busiest_link": busiest, "bytes_per_frame": round(per_frame),
            "link_limit_fps": round(PROFILES[first["link"]] * 1e6 / 8 / per_frame, 3)
            if per_frame else float("inf"), "chosen": chosen}


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(float(np.median(known)), 1) if known else None


def _chosen(system: Running, logdir: Path) -> dict[str, list[str]]:
    """The codecs each worker logged choosing (``codec_chosen``), by worker."""
    out: dict[str, list[str]] = {}
    for name in system.assignment:
        path = logdir / f"{name}.log"
        for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
            if '"codec_chosen"' in line:
                rec = json.loads(line)
                out.setdefault(name, []).append(f"cut{rec['cut']}:{rec['codec']}")
    return out


# -- the figures -----------------------------------------------------------------------------
def figures(rows: list[dict[str, Any]], accuracy: dict[str, float]) -> dict[str, Any]:
    """The issue's figures from the runs; ``accuracy``: each pinned codec's validation accuracy
    at every crossing cut at once (:func:`chain_accuracy`)."""
    by = {(r["link"], r["exits"], r["codec"]): r for r in rows}
    for r in rows:
        ceiling = by[("gbe", r["exits"], r["codec"])]["throughput_fps"]
        r["link_bound"] = r["link"] != "gbe" and r["link_limit_fps"] < ceiling
        r["link_efficiency"] = (round(r["throughput_fps"] / r["link_limit_fps"], 3)
                                if r["link_bound"] else None)
    bound = [r["link_efficiency"] for r in rows if r["link_bound"]]
    loss = {c: round(100 * (accuracy["raw"] - a), 2) for c, a in accuracy.items()}
    ae = by[("wifi", "closed", "ae")]["throughput_fps"] / by[("wifi", "closed", "raw")][
        "throughput_fps"]
    allowed = [c for c in ("raw", "fp16", "int8", "ae") if loss[c] <= MAX_LOSS]
    auto = {}
    for link in LINKS:
        for exits in ("closed", "open"):
            best = max(by[(link, exits, c)]["throughput_fps"] for c in allowed)
            auto[f"{link}_{exits}"] = round(by[(link, exits, "auto")]["throughput_fps"] / best, 3)
    return {"link_efficiency": round(min(bound), 3) if bound else None,
            "link_efficiency_mean": round(float(np.mean(bound)), 3) if bound else None,
            "link_bound_configs": len(bound),
            "ae_gain_wifi": round(ae, 3), "ae_loss_points": loss["ae"],
            "codec_loss_points": loss,
            "auto_vs_best": min(auto.values()), "auto_vs_best_each": auto,
            "codecs_within_budget": allowed,
            "goals": {"link_efficiency": ">= 0.8", "ae_gain_wifi": ">= 4 within 1 point",
                      "auto_vs_best": ">= 0.9"}}


def main() -> None:
    conditions = Conditions.now()
    if os.geteuid() != 0:
        raise SystemExit("bench-links needs root (network namespaces and tc)")
    bundle = ensure_bundle()
    data = load_fashion_mnist(size=28, splits=("test",))
    images, labels = data.test.images[:2000], data.test.labels[:2000]
    runs = []
    for repeat in range(REPEATS):
        for link in LINKS:
            for exits in ("closed", "open"):
                for codec in CODECS:
                    runs.append({"repeat": repeat, **run_config(bundle, link, exits, codec,
                                                                 images, labels)})
    rows = [combine([r for r in runs if (r["link"], r["exits"], r["codec"]) == key])
            for key in dict.fromkeys((r["link"], r["exits"], r["codec"]) for r in runs)]
    accuracy = chain_accuracy(bundle)
    write_result("links", {
        "bundle": bundle.name, "input": "224x224", "cuts": list(CUTS),
        "activation_bytes_raw": {c: bundle.segment(c).activation_bytes for c in CUTS},
        "codec_accuracy_val": {c: bundle.codec_accuracy(c) for c in CUTS},
        "codec_accuracy_chain_val": accuracy, "window_max": WINDOW, "queue_s": QUEUE_S,
        "seconds": SECONDS,
        "repeats": REPEATS,
        "assignment": {"gw-1": [1], "worker-1": [2], "worker-2": [3, 4]},
        **figures(rows, accuracy), "configs": rows, "runs": runs}, conditions)


if __name__ == "__main__":
    main()
