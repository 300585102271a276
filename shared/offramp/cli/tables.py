"""The tables the training commands print: per-exit accuracy, a bundle's segments, and the
exits' thresholds with what they are expected to do."""

from __future__ import annotations

from rich.table import Table

from offramp.model.bundle import Bundle
from offramp.model.calibration import NEVER, Calibration


def accuracy_table(title: str, rows: dict[str, list[float]]) -> Table:
    k = max(len(v) for v in rows.values())
    table = Table(title=title)
    table.add_column("run")
    for i in range(k):
        table.add_column(f"exit {i + 1}", justify="right")
    for name, accs in rows.items():
        table.add_row(name, *[f"{a:.4f}" for a in accs])
    return table


def segments_table(bundle: Bundle) -> Table:
    m = bundle.manifest
    table = Table(title=f"bundle {m.name} ({bundle.root})")
    for col in ("segment", "blocks", "MFLOPs", "activation KiB", "file"):
        table.add_column(col)
    for s in m.segments:
        table.add_row(str(s.index), f"{s.first_block}-{s.last_block}", f"{s.flops / 1e6:.2f}",
                      f"{s.activation_bytes / 1024:.1f}", s.file)
    table.add_row("full", "all", f"{m.full_flops / 1e6:.2f}", "-", m.full_model)
    return table


def thresholds_table(calib: Calibration, criterion: str, thresholds: tuple[float, ...],
                     title: str) -> Table:
    out = calib.simulate(criterion, thresholds)
    table = Table(title=title)
    for col in ("exit", "threshold", "exit accuracy", "expected share"):
        table.add_column(col, justify="right")
    accs = calib.exit_accuracy()
    for k in range(calib.num_exits):
        thr = "always" if k == calib.num_exits - 1 else (
            "never" if thresholds[k] >= NEVER else f"{thresholds[k]:.4f}")
        table.add_row(str(k + 1), thr, f"{accs[k]:.4f}", f"{out.shares[k]:.3f}")
    table.caption = (f"expected accuracy {out.accuracy:.4f}; expected FLOPs per sample "
                     f"{out.flops_fraction:.3f} of the full model ({criterion})")
    return table
