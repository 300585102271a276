"""The multi-exit network every zoo model is: an ordered list of blocks, exits after some.

Vocabulary (docs/algorithms.md): a *block* is the smallest cuttable unit; *exit k* is a small head
after some block; *segment k* is the blocks between exit k-1 and exit k plus head k. Each block
has a :class:`FeatureInfo` (channels and reduction), timm-style, which is what cut points and
exit heads are chosen from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class FeatureInfo:
    name: str
    channels: int
    reduction: int


HEAD_GRID = 2  # the grid conv exit heads pool to (ExitHead); 1 in models saved before it


class ExitHead(nn.Module):
    """pool + linear (+ one strided depthwise-separable conv first for early, high-resolution
    features: it sees more than a global average of them, at a few percent of the segment's
    cost; a full 3x3 conv there cost more than every other head together). Such a head pools
    to a ``grid`` x ``grid`` map, not to one vector: a global average of early features keeps
    which strokes there are but not where, and an early exit needs both (grid 2 raised the
    first exit of the mnv2-digits preset from 77% to 95% validation accuracy).

    Every head, the final one included, maps to an embedding of the same size ``embed_dim``
    (so feature-difference distances are defined between exits) and then to logits.
    """

    def __init__(self, channels: int, num_classes: int, embed_dim: int, *, conv: bool,
                 grid: int = 1) -> None:
        super().__init__()
        width = channels
        self.conv: nn.Module = nn.Identity()
        self.grid = grid if conv else 1
        if conv:
            width = max(channels * 2, 64)
            self.conv = nn.Sequential(
                nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False),
                nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width),
                nn.ReLU(inplace=True))
        self.embed = nn.Linear(width * self.grid * self.grid, embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes)
        self.embed_dim = embed_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits, hidden); ``hidden`` is the pre-logit vector (not normalised)."""
        h = F.relu(self.embed(torch.flatten(self._pool(self.conv(x)), 1)))
        return self.classifier(h), h

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """Average to ``grid`` x ``grid``. Where the map divides evenly this is a plain average
        pool with the kernel written out: ONNX export cannot size an adaptive pool whose input's
        spatial size it lost track of (EfficientNet's early blocks), and the values are the
        same."""
        g = self.grid
        h, w = int(x.shape[2]), int(x.shape[3])
        if g > 1 and h % g == 0 and w % g == 0:
            return F.avg_pool2d(x, (h // g, w // g))
        return F.adaptive_avg_pool2d(x, g)


class MultiExitNet(nn.Module):
    """Blocks plus exit heads. ``forward`` returns every exit's (logits, hidden)."""

    def __init__(self, arch: str, blocks: Sequence[nn.Module], feature_info: Sequence[FeatureInfo],
                 exits: Sequence[int], num_classes: int, embed_dim: int = 128,
                 config: dict[str, object] | None = None, head_grid: int = HEAD_GRID) -> None:
        super().__init__()
        if len(blocks) != len(feature_info):
            raise ValueError("one FeatureInfo per block")
        last = len(blocks) - 1
        outside = sorted(e for e in set(exits) if not 0 <= e <= last)
        if outside:
            raise ValueError(f"exit blocks must be in 0..{last} (the last, {last}, always "
                             f"carries one), got {', '.join(map(str, outside))}")
        exits = sorted(set(exits) | {last})
        if not 2 <= len(exits) <= 8:
            raise ValueError(f"a multi-exit model has 2..8 exits, got {len(exits)}")
        self.arch = arch
        self.config = {**(config or {}), "head_grid": head_grid}
        self.blocks = nn.ModuleList(blocks)
        self.feature_info = list(feature_info)
        self.exit_blocks = exits
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.heads = nn.ModuleList(
            ExitHead(feature_info[b].channels, num_classes, embed_dim,
                     conv=feature_info[b].reduction <= 2 and b != last, grid=head_grid)
            for b in exits)

    @property
    def num_exits(self) -> int:
        return len(self.exit_blocks)

    def forward_blocks(self, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
        for block in self.blocks[first:last + 1]:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        outs = []
        first = 0
        for head, b in zip(self.heads, self.exit_blocks, strict=True):
            x = self.forward_blocks(x, first, b)
            outs.append(head(x))
            first = b + 1
        return outs


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
            act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True) if act in (nn.ReLU, nn.ReLU6) else act())
    return nn.Sequential(*layers)


def default_exits(stage_ends: Sequence[int], last: int, count: int = 4) -> list[int]:
    """Spread ``count`` exits (the final one included) over the stage ends."""
    candidates = [s for s in stage_ends if s < last]
    if len(candidates) <= count - 1:
        return [*candidates, last]
    step = len(candidates) / (count - 1)
    picks = [candidates[min(len(candidates) - 1, round(step * (i + 1)) - 1)] for i in range(count - 1)]
    return [*sorted(set(picks)), last]
