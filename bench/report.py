"""``make report``: docs/reproduction.md and its plots (docs/reproduction/*.png), generated from
the committed bench results: the three papers' claims side by side with offramp's figures.

Each claim names the result file and key it reads, the paper's setting and figure (as
docs/algorithms.md records them), offramp's setting and figure with the spread of the runs
that file holds, what differs and why, and a plot. A result file that is missing leaves its
claims "not measured", with the command that measures them. ``python -m bench.report --out
DIR`` writes somewhere else (the tests regenerate the page and compare it with the committed
one, so the page cannot drift from the results).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import report_plots

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FIGURES = "reproduction"  # the plots' folder, beside the page


@dataclass(frozen=True)
class Figure:
    """One measured figure of a claim, read from a result file."""

    label: str
    value: float | None  # None: not measured
    spread: str  # the runs behind it, in words
    goal: str
    met: bool | None


@dataclass(frozen=True)
class Claim:
    key: str
    title: str
    method: str
    goal: str
    paper: str
    setting: str
    differs: str
    figures: tuple[Figure, ...]
    plot: str  # PNG file name under FIGURES ('' : none)
    source: str  # the make target that measures it


def load(results: Path, name: str) -> dict[str, Any] | None:
    """A result file's figures; None where it is missing (its claims are 'not measured')."""
    path = results / f"{name}.json"
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SystemExit(f"bench.report: {path} cannot be read as a result file: {exc}") from None
    if not isinstance(doc, dict):
        raise SystemExit(f"bench.report: {path} holds no object of figures")
    return doc


def _get(doc: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


def _fig(label: str, value: Any, spread: str, goal: str,
         ok: Callable[[float], bool | None]) -> Figure:
    """``ok``: whether a value meets the goal (None: a figure shown for comparison only)."""
    v = float(value) if isinstance(value, int | float) else None
    return Figure(label, v, spread, goal, None if v is None else ok(v))


def _runs(values: list[float] | None, fmt: str) -> str:
    if not values:
        return "one run"
    return f"{len(values)} runs: " + ", ".join(fmt.format(v) for v in values)


def _repeated(label: str, doc: dict[str, Any] | None, key: str, fmt: str, goal: str,
              ok: Callable[[float], bool | None]) -> Figure:
    """A figure a bench measured several times: the median under ``key``, its runs under
    ``key``_runs."""
    return _fig(label, _get(doc, key), _runs(_get(doc, f"{key}_runs"), fmt), goal, ok)


def _capacity_gain(control: dict[str, Any] | None) -> str:
    """What the exits did to each model's unthrottled capacity in the run behind the page: the
    most the rate strategy can turn into served frames."""
    parts = []
    for name, doc in (("digits", control), ("Fashion-MNIST", _get(control, "fashion"))):
        closed, opened = _get(doc, "capacity_no_exits_fps"), _get(doc, "capacity_exits_fps")
        if closed and opened:
            parts.append(f"{name} {closed:g} -> {opened:g} frames/s ({opened / closed:.2f}x)")
    if not parts:
        return ""
    return (" Unthrottled, the exits raised the capacity (`capacity_search` in control.json): "
            + ", ".join(parts) + "; on the two shared cores, the compute the bench slows down "
            "is not all that a frame costs.")


def _seeds(distree: dict[str, Any] | None, se_key: str, runs_key: str | None) -> str:
    if distree is None:
        return "not run"
    seeds = _get(distree, "budget", "seeds")
    runs = _get(distree, runs_key) if runs_key else None
    return (f"{seeds} seeds, +/- {_get(distree, se_key)} (s.e.)"
            + (": " + ", ".join(f"{v:+.2f}" for v in runs) if runs else ""))


def _sweep_budget(distree: dict[str, Any] | None) -> str:
    budget = _get(distree, "budget")
    if not budget:
        return ""
    gains = [(r["setting"], r["gain_by_exit"][0]) for r in _get(distree, "settings") or []
             if "gain_by_exit" in r]
    up = [name for name, g in gains if g["points"] > 2 * (g["se_points"] or 0)]
    down = [name for name, g in gains if g["points"] < -2 * (g["se_points"] or 0)]
    return (f" The sweep's budget: {budget['epochs']} epochs on {budget['train_images']:,} "
            f"training images, {budget['seeds']} seeds, {budget['test_images']:,} test images. "
            f"Of its {len(gains)} settings, {len(up)} raise exit 1 by more than two standard "
            f"errors and {len(down)} lower it by as much"
            + (f" ({'; '.join(down)})" if down else "") + ".")


def claims(r: dict[str, dict[str, Any] | None]) -> list[Claim]:
    control, exits, links, pipeline = r["control"], r["exits"], r["links"], r["pipeline"]
    distree = r["distree"]
    return [
        Claim("rate", "More frames at a fixed accuracy", "MDI-Exit", ">= 2x",
              "Jetson Nano nodes, MobileNetV2 and ResNet-50: more data processed at a fixed "
              "accuracy (the summary gives no single factor).",
              "3 worker processes slowed 2x, 4x and 8x on 2 CPU cores, a loopback broker; "
              "offered 3x the capacity without exits (found by a search that raises the offer "
              "until a run cannot keep up); exits at the final accuracy - 1 point against exits "
              "closed, both under the `rate` strategy. Each repeat runs both, back to back.",
              "Emulated nodes on one machine share its two cores and one broker, where the "
              "paper's nodes have their own; the models are trained here on digits and "
              "Fashion-MNIST." + _capacity_gain(control),
              (_repeated("digits, MobileNetV2 32x32", control,
                         "rate_gain_at_fixed_accuracy", "{:.3f}", ">= 2", lambda v: v >= 2.0),
               _repeated("Fashion-MNIST, EfficientNet-Lite0 96x96", control,
                         "fashion_rate_gain_at_fixed_accuracy", "{:.3f}", ">= 2", lambda v: v >= 2.0)),
              "mdi_exit_load.png", "make bench-control"),
        Claim("accuracy", "Higher accuracy at a fixed rate", "MDI-Exit", ">= +10 points",
              "As above: higher accuracy at a fixed data rate.",
              "The same nodes at 1.5x the capacity without exits: accuracy over every offered "
              "frame (a dropped frame counts as wrong), the `threshold` strategy against the "
              "same thresholds fixed.",
              "Accuracy is counted over offered frames, so shedding costs accuracy; the paper's "
              "exact accounting could not be read from its summary.",
              (_repeated("digits (points)", control,
                         "accuracy_gain_at_fixed_rate", "{:.2f}", ">= +10", lambda v: v >= 10),
               _repeated("Fashion-MNIST (points)", control,
                         "fashion_accuracy_gain_at_fixed_rate", "{:.2f}", ">= +10", lambda v: v >= 10)),
              "mdi_exit_load.png", "make bench-control"),
        Claim("priority", "High-priority latency cut", "PA-MDI", ">= 0.75 (paper: up to 0.753)",
              "Five Jetson Xavier over about 20 Mbit/s Wi-Fi: the time-sensitive source's mean "
              "inference time fell by up to 75.3% against AR-MDI and 73.2% against MS-MDI.",
              "As in the paper, several sources share the nodes and one is time-sensitive: one "
              "source of priority 8 and three of priority 1 at equal rates, together 1.5x the "
              "capacity with exits, on the 3 emulated nodes: 1 - (the high one's mean latency, "
              "priority-aware) / (the same with all weights equal). Beside it, the same with "
              "one source of each priority, where the time-sensitive source is half the load.",
              "The baseline is offramp with equal weights, not AR-MDI or MS-MDI; three emulated "
              "nodes over loopback, where the paper had five devices and a slow shared link. "
              "The cut depends on the time-sensitive source's share of the load: what it waits "
              "behind with priorities is mostly its own frames and the micro-batch running "
              "when it arrives, which priorities cannot remove.",
              (_repeated("digits, 4 sources", control,
                         "priority_latency_reduction", "{:.3f}", ">= 0.75", lambda v: v >= 0.75),
               _repeated("Fashion-MNIST, 4 sources", control,
                         "fashion_priority_latency_reduction", "{:.3f}", ">= 0.75", lambda v: v >= 0.75),
               _repeated("digits, 2 sources", control,
                         "priority_latency_reduction_two_sources", "{:.3f}", "(for comparison)",
                         lambda v: None),
               _repeated("Fashion-MNIST, 2 sources", control,
                         "fashion_priority_latency_reduction_two_sources", "{:.3f}",
                         "(for comparison)", lambda v: None)),
              "pa_mdi_latency.png", "make bench-control"),
        Claim("compute", "Compute cut within 1 point", "DistrEE", "<= 0.6 of the FLOPs",
              "WideResNet on CIFAR-10, simulated: accuracy within about 2 points of full "
              "execution with roughly a quarter less computation.",
              "Mean FLOPs per frame / the full model's at the thresholds chosen on the "
              "validation split for the final accuracy - 1 point, on the test split.",
              "Other models and data (MobileNetV2 from scratch and EfficientNet-Lite0 with "
              "ImageNet weights on Fashion-MNIST), a 1-point budget where the paper allows "
              "about 2.",
              (_fig("MobileNetV2, Fashion-MNIST", _get(exits, "flops_fraction",
                                                       "mnv2-fashion/joint"),
                    "one training run", "<= 0.6", lambda v: v <= 0.6),
               _fig("EfficientNet-Lite0, Fashion-MNIST",
                    _get(exits, "flops_fraction", "effnet-fashion/joint"),
                    "one training run", "<= 0.6", lambda v: v <= 0.6)),
              "distree_exits.png", "make bench-exits"),
        Claim("joint", "Joint training lifts exit 1", "DistrEE", ">= +2 points",
              "Distillation and feature transfer raise the early exits' accuracy by several "
              "points over training each exit on labels alone.",
              "Exit 1's test accuracy on Fashion-MNIST trained jointly against cross-entropy "
              "only. The sweep: a MobileNetV2 (width 0.5) trained under each setting of the "
              "distillation weight, temperature and feature-transfer weight (one at a time "
              "around the defaults) and under cross-entropy only, with the same seeds, images "
              "and initial weights; a gain is the mean of the seeds' paired differences. "
              "Beside it, one full-length MobileNetV2 (width 1.0, every training image) jointly "
              "trained, and taught by a separately trained model, against cross-entropy only.",
              "The sweep trains a smaller network on a subset for a few epochs (one full-length "
              "run takes about 100 minutes on this machine's 2 cores). Its best setting is the "
              "best of several on few seeds, so its gain leans high; the defaults were chosen "
              "beforehand. The full-length runs are one pair each, with the binomial standard "
              "error of the difference." + _sweep_budget(distree),
              (_fig(f"sweep, best setting ({_get(distree, 'best_setting')}) (points)",
                    _get(distree, "fashion_joint_exit1_gain_points"),
                    _seeds(distree, "fashion_joint_exit1_gain_se_points",
                           "fashion_joint_exit1_gain_points_runs"),
                    ">= +2", lambda v: v >= 2),
               _fig("sweep, the defaults (points)", _get(distree, "default_exit1_gain_points"),
                    _seeds(distree, "default_exit1_gain_se_points", None),
                    ">= +2", lambda v: v >= 2),
               _fig("full length, joint - cross-entropy only (points)",
                    _get(exits, "fashion_mnv2_joint_exit1_gain_points"),
                    f"one run each, +/- {_get(exits, 'fashion_mnv2_joint_exit1_gain_se_points')}"
                    " (s.e.)", ">= +2", lambda v: v >= 2),
               _fig("full length, taught - cross-entropy only (points)",
                    _get(exits, "fashion_mnv2_taught_exit1_gain_points"),
                    f"one run each, +/- {_get(exits, 'fashion_mnv2_taught_exit1_gain_se_points')}"
                    " (s.e.)", ">= +2", lambda v: v >= 2)),
              "distree_sweep.png", "make bench-distree and make bench-exits"),
        Claim("autoencoder", "Autoencoder on a slow link", "MDI-Exit", ">= 4x within 1 point",
              "Autoencoders at the cuts compress the activations sent between devices.",
              "EfficientNet-Lite0 224x224 on Fashion-MNIST over `offramp netbed` namespaces, "
              "every link shaped to 20 Mbit/s, exits closed: frames/s with the ratio-4 "
              "autoencoders against raw tensors, and the accuracy they cost.",
              "Links are shaped with tbf on one machine (no loss, no jitter: this kernel has "
              "no netem).",
              (_fig("frames/s, ae / raw on Wi-Fi", _get(links, "ae_gain_wifi"),
                    f"{_get(links, 'repeats') or 1} runs per configuration",
                    ">= 4", lambda v: v >= 4),
               _fig("accuracy cost (points)", _get(links, "ae_loss_points"),
                    "1,000 validation images", "<= 1", lambda v: v <= 1)),
              "links_codecs.png", "make bench-links"),
        Claim("system", "Serving faster than one session of the plain model", "offramp",
              ">= 1.5x with exits, within 1 point",
              "(offramp's own goal: the reason to split a model and let frames leave early.)",
              "EfficientNet-Lite0 224x224 on Fashion-MNIST, exits from `offramp import` "
              "trained on all 55,000 training images, 4 segments on 3 worker processes against "
              "one ONNX Runtime session with a thread per core, same run, same 2 cores.",
              "CPU only; the session is the strongest baseline on this machine. The model is "
              "the bench's 224x224 bundle, whose own final head was trained on 3,000 images "
              "(its recipe); the imported exits were trained on 55,000, so here they are more "
              "accurate than the final exit and the thresholds let nearly every frame leave at "
              "exit 1 (a negative accuracy cost). The figure shows what strong early exits buy, "
              "not a trade of accuracy for speed; with a final head trained on every image the "
              "exits would keep fewer frames.",
              (_fig("frames/s, offramp with exits / one session",
                    _get(pipeline, "effnet_224", "system_vs_monolithic"),
                    _runs(_get(pipeline, "effnet_224", "system_vs_monolithic_runs"), "{:.3f}"),
                    ">= 1.5", lambda v: v >= 1.5),
               _fig("accuracy cost (points)",
                    None if _get(pipeline, "effnet_224", "accuracy_drop") is None
                    else 100 * _get(pipeline, "effnet_224", "accuracy_drop"),
                    "the same runs", "<= 1", lambda v: v <= 1)),
              "story.png", "make bench-pipeline"),
    ]


def _value(f: Figure) -> str:
    if f.value is None:
        return "not measured"
    return f"{f.value:.3f}".rstrip("0").rstrip(".")


def _met(f: Figure) -> str:
    return {None: "-", True: "met", False: "**not met**"}[f.met]


def render(cs: list[Claim], r: dict[str, dict[str, Any] | None]) -> str:
    lines = ["# The papers' claims, reproduced", "",
             "Generated by `make report` from `bench/results/*.json` (do not edit: run the "
             "benchmarks, then `make report`). Every figure names the run it comes from; the "
             "papers' figures are as docs/algorithms.md records them.", "",
             "| claim | method | goal | offramp | runs | |", "|---|---|---|---|---|---|"]
    for c in cs:
        for f in c.figures:
            lines.append(f"| {c.title}: {f.label} | {c.method} | {f.goal} | {_value(f)} | "
                         f"{f.spread} | {_met(f)} |")
    lines += ["", "The result files:", ""]
    for name, doc in sorted(r.items()):
        if doc is None:
            lines.append(f"- `{name}.json`: missing")
            continue
        machine = doc.get("machine", {})
        unmet = doc.get("unmet_conditions") or []
        lines.append(f"- `{name}.json`: {doc.get('when', '?')}, commit "
                     f"{doc.get('commit', 'not recorded')}, {machine.get('cpus', '?')} cores, "
                     f"load average before {machine.get('loadavg_before', 'not recorded')}"
                     + (f"; **load conditions not met**: {'; '.join(unmet)}" if unmet else ""))
    for c in cs:
        lines += ["", f"## {c.title} ({c.method}; goal {c.goal})", "",
                  f"**Paper.** {c.paper}", "", f"**offramp.** {c.setting}", ""]
        for f in c.figures:
            lines.append(f"- {f.label}: {_value(f)} ({f.spread}); goal {f.goal}: {_met(f)}")
        lines += ["", f"**What differs.** {c.differs}", "",
                  "Measured by " + " and ".join(f"`{t}`" for t in c.source.split(" and ")) + "."]
        if c.plot and r.get(PLOTS[c.plot][0]) is not None:
            lines += ["", f"![{c.title}]({FIGURES}/{c.plot})"]
    return "\n".join(lines) + "\n"


PLOTS: dict[str, tuple[str, Callable[[dict[str, Any], Path], None]]] = {
    "mdi_exit_load.png": ("control", report_plots.mdi_exit_load),
    "pa_mdi_latency.png": ("control", report_plots.pa_mdi_latency),
    "distree_exits.png": ("exits", report_plots.distree_exits),
    "distree_sweep.png": ("distree", report_plots.distree_sweep),
    "links_codecs.png": ("links", report_plots.links_codecs),
    "live_system.png": ("pipeline", report_plots.live_system),
    "story.png": ("pipeline", report_plots.story),
}


def generate(results: Path, out: Path, *, plots: bool = True) -> Path:
    """Write ``out``/reproduction.md (and its plots unless ``plots`` is false); return the
    page's path."""
    r = {name: load(results, name)
         for name in ("control", "distree", "exits", "links", "pipeline")}
    cs = claims(r)
    text = render(cs, r)
    live = r["pipeline"] is not None
    if live:
        text += ("\n## The running system\n\nWhere frames left the system with exits open, and "
                 "the latency of digits frames at 50% and 90% of the system's capacity "
                 "(`make bench-pipeline`).\n\n"
                 f"![the running system]({FIGURES}/live_system.png)\n")
    out.mkdir(parents=True, exist_ok=True)
    page = out / "reproduction.md"
    page.write_text(text)
    if plots:
        (out / FIGURES).mkdir(exist_ok=True)
        for png, (name, draw) in PLOTS.items():
            doc = r[name]
            if doc is not None:
                print(f"drawing {FIGURES}/{png}", flush=True)
                draw(doc, out / FIGURES / png)
    return page


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS,
                   help=f"the bench result files (default: {RESULTS.relative_to(ROOT)})")
    p.add_argument("--out", type=Path, default=ROOT / "docs",
                   help="where reproduction.md and its plots go (default: docs)")
    p.add_argument("--no-plots", action="store_true", help="write the page only")
    args = p.parse_args(argv)
    page = generate(args.results, args.out, plots=not args.no_plots)
    print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
