"""Multi-exit MobileNetV2 (Sandler et al. 2018) in plain torch; width multiplier and input size
are settings. For small inputs (<= 64 px) the stem and the second stage keep stride 1, the usual
CIFAR configuration."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from offramp.ml.zoo.base import HEAD_GRID, FeatureInfo, MultiExitNet, conv_bn, default_exits

# expansion t, channels c, repeats n, stride s
STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
          (6, 160, 3, 2), (6, 320, 1, 1)]


def _round(channels: float, divisor: int = 8) -> int:
    value = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return value + divisor if value < 0.9 * channels else value


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1, act=nn.ReLU6))
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   conv_bn(hidden, cout, 1, act=None)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


def mobilenetv2(num_classes: int, exits: Sequence[int] | None = None, *, width: float = 1.0,
                input_size: int = 32, embed_dim: int = 128,
                stem_stride: int | None = None, head_grid: int = HEAD_GRID) -> MultiExitNet:
    """``stem_stride`` defaults to 1 for small inputs (CIFAR layout) and 2 otherwise; 2 on a
    32 px input is about 4x cheaper, which the quick demo preset uses."""
    small = input_size <= 64
    stem_stride = stem_stride or (1 if small else 2)
    stem_c = _round(32 * width)
    blocks: list[nn.Module] = [conv_bn(3, stem_c, 3, stem_stride, act=nn.ReLU6)]
    reduction = stem_stride
    info = [FeatureInfo("stem", stem_c, reduction)]
    stage_ends = []
    cin = stem_c
    for si, (t, c, n, s) in enumerate(STAGES):
        cout = _round(c * width)
        stride = 1 if (small and si == 1) else s
        for i in range(n):
            st = stride if i == 0 else 1
            reduction *= st
            blocks.append(InvertedResidual(cin, cout, st, t))
            info.append(FeatureInfo(f"stage{si + 1}.{i}", cout, reduction))
            cin = cout
        stage_ends.append(len(blocks) - 1)
    last_c = _round(1280 * max(1.0, width))
    blocks.append(conv_bn(cin, last_c, 1, act=nn.ReLU6))
    info.append(FeatureInfo("conv_last", last_c, reduction))
    last = len(blocks) - 1
    chosen = list(exits) if exits is not None else [stage_ends[1], stage_ends[2], stage_ends[3], last]
    return MultiExitNet("mobilenetv2", blocks, info, chosen, num_classes, embed_dim,
                        {"width": width, "input_size": input_size, "embed_dim": embed_dim,
                         "stem_stride": stem_stride, "exits": chosen, "stage_ends": stage_ends},
                        head_grid)


__all__ = ["default_exits", "mobilenetv2"]
