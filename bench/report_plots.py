"""The plots of docs/reproduction.md, drawn with matplotlib from the bench results (each
function takes the parsed result files it draws and the PNG path to write)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure  # without pyplot: no backend, no global figure registry

MBITS = {"gbe": 1000.0, "fe": 100.0, "wifi": 20.0}  # offramp.local.netbed's link profiles
COLOURS = {"closed": "#8c8c8c", "open": "#1f77b4", "adaptive": "#2ca02c", "fixed": "#c7c7c7",
           "aware": "#d62728", "blind": "#8c8c8c"}


def _figure(size: tuple[float, float], rows: int, cols: int, **kw: Any) -> tuple[Figure, Any]:
    fig = Figure(figsize=size)
    return fig, fig.subplots(rows, cols, **kw)


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp in the file


def _bars(ax: Axes, groups: list[str], series: dict[str, list[float]], *, fmt: str = "{:.0f}",
          colours: dict[str, str] | None = None) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per series, values written on
    the bars."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=name,
                      color=(colours or COLOURS).get(name.split(" ")[0]))
        ax.bar_label(bars, [fmt.format(v) for v in values], fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.legend(fontsize=8)


def mdi_exit_load(control: dict[str, Any], path: Path) -> None:
    """Served rate and accuracy over every offered frame, exits closed and open at the
    rate-control load and fixed and adaptive thresholds at the threshold-control load, for
    each model the bench ran."""
    models = [("digits", control), *([("fashion", control["fashion"])]
                                     if "fashion" in control else [])]
    fig, (rate_ax, acc_ax) = _figure((10, 3.8), 1, 2)
    groups = [name for name, _ in models]
    runs = {"closed exits": lambda m: m["rate"]["exits_closed"],
            "open exits": lambda m: m["rate"]["exits_open"],
            "fixed thresholds": lambda m: m["threshold"]["fixed"],
            "adaptive thresholds": lambda m: m["threshold"]["adaptive"]}
    _bars(rate_ax, groups, {k: [f(m)["served_fps"] for _, m in models]
                            for k, f in runs.items()})
    rate_ax.set_ylabel("served frames/s")
    rate_ax.set_title("served rate (closed/open: rate load; fixed/adaptive: threshold load)",
                      fontsize=9)
    _bars(acc_ax, groups, {k: [100 * f(m)["accuracy_offered"] for _, m in models]
                           for k, f in runs.items()}, fmt="{:.1f}")
    acc_ax.set_ylabel("% of offered frames answered correctly")
    acc_ax.set_title("accuracy over every offered frame (a dropped frame is wrong)", fontsize=9)
    _save(fig, path)


def pa_mdi_latency(control: dict[str, Any], path: Path) -> None:
    """Mean latency per priority class, priority-aware against priority-blind, in each setting
    the bench ran (several sources, and two)."""
    models = [("digits", control), *([("fashion", control["fashion"])]
                                     if "fashion" in control else [])]
    fig, axes = _figure((5 * len(models), 3.6), 1, len(models), squeeze=False)
    for ax, (name, m) in zip(axes[0], models, strict=True):
        settings = [m[k] for k in ("priority", "priority_two_sources") if k in m]
        groups = [(f"{c}\n({p.get('sources', 2)} sources)", p, c)
                  for p in settings for c in p["aware_ms"]]
        _bars(ax, [g for g, _, _ in groups],
              {"aware": [p["aware_ms"][c] for _, p, c in groups],
               "blind": [p["blind_ms"][c] for _, p, c in groups]})
        ax.set_ylabel("mean latency, ms")
        ax.set_title(f"{name}: together 1.5x the capacity with exits; urgent priority 8, "
                     "bulk 1", fontsize=8)
    _save(fig, path)


def distree_exits(exits: dict[str, Any], path: Path) -> None:
    """Per-exit test accuracy by training method, and each model's operating point (mean
    FLOPs share and realised accuracy at final - 1 point) beside its final exit's."""
    models = exits["models"]
    bases = sorted({k.split("/")[0] for k in models})
    fig, axes = _figure((3.4 * (len(bases) + 1), 3.6), 1, len(bases) + 1)
    for ax, base in zip(axes[:-1], bases, strict=True):
        for key, m in models.items():
            if key.split("/")[0] == base:
                acc = [100 * a for a in m["per_exit_test_accuracy"]]
                ax.plot(range(1, len(acc) + 1), acc, marker="o", label=key.split("/")[1])
        ax.set_title(base, fontsize=9)
        ax.set_xlabel("exit")
        ax.set_ylabel("test accuracy, %")
        ax.legend(fontsize=7)
    ops = axes[-1]
    for key, m in models.items():
        if curve := m.get("curve"):  # recorded by bench-exits from this version on
            ops.plot([p["flops_fraction"] for p in curve], [100 * p["accuracy"] for p in curve],
                     linewidth=1, label=key)
        point = m.get("confidence")
        if point:
            ops.scatter(point["flops_fraction"], 100 * point["realised_test_accuracy"], s=18)
            ops.annotate(key, (point["flops_fraction"], 100 * point["realised_test_accuracy"]),
                         fontsize=6)
    ops.axvline(0.6, color="#999999", linestyle=":", linewidth=1)
    ops.set_xlim(0, 1)
    ops.set_xlabel("mean FLOPs / full model")
    ops.set_ylabel("realised test accuracy, %")
    ops.set_title("operating points at final - 1 point (goal: left of 0.6)", fontsize=9)
    if any(m.get("curve") for m in models.values()):
        ops.legend(fontsize=6)
    _save(fig, path)


def distree_sweep(distree: dict[str, Any], path: Path) -> None:
    """Each setting's gain over cross-entropy only under the same seed, in points: at exit 1
    with every seed's difference and the mean's standard error, and the mean at every exit."""
    rows = [r for r in distree["settings"] if "gain_by_exit" in r]
    fig, (one, every) = _figure((10, 3.8), 1, 2)
    ys = range(len(rows))
    first = [r["gain_by_exit"][0] for r in rows]
    one.errorbar([g["points"] for g in first], ys, xerr=[g["se_points"] or 0 for g in first],
                 fmt="o", color=COLOURS["open"], capsize=3, label="mean +/- s.e.")
    for y, g in zip(ys, first, strict=True):
        one.scatter(g["runs"], [y] * len(g["runs"]), s=10, color=COLOURS["closed"], zorder=3)
    one.axvline(0, color="#444444", linewidth=0.8)
    one.axvline(2, color="#999999", linestyle=":", linewidth=1, label="goal +2")
    one.set_yticks(list(ys), [r["setting"] for r in rows], fontsize=7)
    one.set_xlabel("exit 1: accuracy over cross-entropy only, points (dots: seeds)")
    one.legend(fontsize=7)
    for r in rows:
        gains = [g["points"] for g in r["gain_by_exit"]]
        every.plot(range(1, len(gains) + 1), gains, marker="o", linewidth=1, label=r["setting"])
    every.axhline(0, color="#444444", linewidth=0.8)
    every.set_xticks(range(1, len(rows[0]["gain_by_exit"]) + 1))
    every.set_xlabel("exit")
    every.set_ylabel("mean gain over seeds, points")
    every.legend(fontsize=6)
    budget = distree.get("budget", {})
    fig.suptitle(f"{distree.get('model', '')}, {distree.get('dataset', '')}: "
                 f"{budget.get('seeds', '?')} seeds, {budget.get('epochs', '?')} epochs on "
                 f"{budget.get('train_images', 0):,} images", fontsize=9)
    _save(fig, path)


def links_codecs(links: dict[str, Any], path: Path) -> None:
    """Frames/s against the links' bandwidth, one line per codec, exits closed and open."""
    fig, axes = _figure((10, 3.8), 1, 2, sharey=True)
    for ax, exits in zip(axes, ("closed", "open"), strict=True):
        codecs = sorted({c["codec"] for c in links["configs"] if c["exits"] == exits})
        for codec in codecs:
            rows = sorted((MBITS[c["link"]], c["throughput_fps"], c["throughput_fps_runs"])
                          for c in links["configs"]
                          if c["exits"] == exits and c["codec"] == codec)
            xs = [r[0] for r in rows]
            ax.plot(xs, [r[1] for r in rows], marker="o", label=codec)
            ax.vlines(xs, [min(r[2]) for r in rows], [max(r[2]) for r in rows], linewidth=3,
                      alpha=0.3)
        ax.set_xscale("log")
        ax.set_xlabel("every link's bandwidth, Mbit/s")
        ax.set_title(f"exits {exits}", fontsize=9)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("frames/s (bar: the runs' range)")
    _save(fig, path)


def live_system(pipeline: dict[str, Any], path: Path) -> None:
    """Where frames left the running system (exits open, saturated runs) and, on digits,
    how long they took at 50% and 90% of its capacity."""
    runs = [("digits 32x32", pipeline.get("exits_open"))]
    if imported := pipeline.get("effnet_224", {}).get("imported"):
        runs.append(("EfficientNet 224x224", imported["exits_open"]))
    runs = [(name, r) for name, r in runs if r]
    fig, (shares, lat) = _figure((10, 3.6), 1, 2)
    exits = sorted({int(k) for _, r in runs for k in r["exit_shares"]})
    _bars(shares, [f"exit {k}" for k in exits],
          {name: [100 * r["exit_shares"].get(str(k), 0.0) for k in exits] for name, r in runs},
          fmt="{:.0f}", colours={})
    shares.set_ylabel("% of frames")
    shares.set_title("exit shares (the arbiter's thresholds)", fontsize=9)
    loads = pipeline.get("latency_at_load", {})
    _bars(lat, [f"{k} of capacity" for k in loads],
          {q: [v[f"{q}_ms"] for v in loads.values()] for q in ("p50", "p99")}, colours={})
    lat.set_ylabel("ms, camera to answer")
    lat.set_title("digits 32x32: latency at a steady load, exits open", fontsize=9)
    _save(fig, path)


def story(pipeline: dict[str, Any], path: Path) -> None:
    """Frames/s of one ONNX Runtime session of the plain model against offramp with exits
    closed and open, on the same cores."""
    rows = [("digits 32x32", pipeline["monolithic_fps"]["2_threads"],
             pipeline["exits_closed"]["fps"], pipeline["exits_open"]["fps"])]
    e = pipeline.get("effnet_224", {})
    if imported := e.get("imported"):
        rows.append(("EfficientNet-Lite0 224x224", e["monolithic_fps"],
                     imported["exits_closed"]["fps"], imported["exits_open"]["fps"]))
    fig, axes = _figure((4.6 * len(rows), 3.6), 1, len(rows), squeeze=False)
    for ax, (name, mono, closed, opened) in zip(axes[0], rows, strict=True):
        bars = ax.bar(["one session", "offramp\nexits closed", "offramp\nexits open"],
                      [mono, closed, opened], color=["#8c8c8c", "#9ecae1", "#1f77b4"])
        ax.bar_label(bars, [f"{v:.0f}" for v in (mono, closed, opened)], fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("frames/s, 2 CPU cores")
    _save(fig, path)
