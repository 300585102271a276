"""``offramp models`` and ``offramp datasets``: what the zoo and the data loaders offer."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from offramp.ml.data import DATASETS, FASHION_DIR
from offramp.ml.flops import count_flops
from offramp.ml.zoo import REGISTRY, create_model, options


@dataclass(frozen=True)
class ExitPoint:
    block: int  # the block index --exits takes
    name: str
    default: bool  # one of the model's default exits
    flops: int  # FLOPs of the blocks up to and including this one, per sample
    activation_bytes: int  # float32 bytes of this block's output, per sample (a cut's payload)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    input_size: int
    options: dict[str, object]
    total_flops: int
    points: list[ExitPoint]


def describe_model(name: str, input_size: int | None = None) -> ModelInfo:
    """Every stage end of ``name`` (the places an exit and a cut can go) at ``input_size``."""
    opts = options(name)
    size = int(input_size or opts.get("input_size") or 32)  # type: ignore[call-overload]
    model = create_model(name, 10, input_size=size).eval()
    stage_ends = [int(b) for b in model.config.get("stage_ends", [])]  # type: ignore[attr-defined]
    last = len(model.blocks) - 1
    candidates = sorted({*stage_ends, *model.exit_blocks, last})
    x = torch.zeros(1, 3, size, size)
    points, first, h = [], 0, x
    with torch.no_grad():
        for b in candidates:
            h = model.forward_blocks(h, first, b)
            first = b + 1
            flops = count_flops(model.blocks, partial(model.forward_blocks, x, 0, b))
            points.append(ExitPoint(b, model.feature_info[b].name, b in model.exit_blocks, flops,
                                    int(h.numel()) * 4))
    return ModelInfo(name, size, {k: v for k, v in opts.items() if k != "input_size"},
                     points[-1].flops, points)


def models() -> list[str]:
    return sorted(REGISTRY)


@dataclass(frozen=True)
class DatasetRow:
    name: str
    description: str
    folder: str
    present: str


def datasets() -> list[DatasetRow]:
    rows = []
    for info in DATASETS.values():
        if info.name == "digits":
            present = "yes (in scikit-learn)"
        elif info.name == "fashion-mnist":
            present = "yes" if FASHION_DIR.is_dir() else "no: apt-get install dataset-fashion-mnist"
        else:
            present = "-"
        rows.append(DatasetRow(info.name, info.description, info.folder or "-", present))
    return rows
