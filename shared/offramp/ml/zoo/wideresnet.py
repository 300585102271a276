"""Multi-exit Wide ResNet WRN-d-k (Zagoruyko and Komodakis 2016), CIFAR layout, pre-activation
blocks; depth and width are settings. The last block is the final BN-ReLU."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from offramp.ml.zoo.base import HEAD_GRID, FeatureInfo, MultiExitNet, default_exits


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop = nn.Dropout(dropout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.drop(F.relu(self.bn2(y))))
        return y + self.short(o if not isinstance(self.short, nn.Identity) else x)


class BnRelu(nn.Sequential):
    def __init__(self, channels: int) -> None:
        super().__init__(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


def wideresnet(num_classes: int, exits: Sequence[int] | None = None, *, depth: int = 16,
               width: int = 4, dropout: float = 0.0, input_size: int = 32,
               embed_dim: int = 128, head_grid: int = HEAD_GRID) -> MultiExitNet:
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n+4 (16, 22, 28, 40), got {depth}")
    n = (depth - 4) // 6
    widths = [16 * width, 32 * width, 64 * width]
    blocks: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False)]
    info = [FeatureInfo("stem", 16, 1)]
    cin, reduction, stage_ends = 16, 1, []
    for si, cout in enumerate(widths):
        for i in range(n):
            stride = 2 if (i == 0 and si > 0) else 1
            reduction *= stride
            blocks.append(WideBlock(cin, cout, stride, dropout))
            info.append(FeatureInfo(f"group{si + 1}.{i}", cout, reduction))
            cin = cout
        stage_ends.append(len(blocks) - 1)
    blocks.append(BnRelu(cin))
    info.append(FeatureInfo("bn_relu", cin, reduction))
    last = len(blocks) - 1
    chosen = list(exits) if exits is not None else default_exits(stage_ends[:-1], last, 3)
    return MultiExitNet("wideresnet", blocks, info, chosen, num_classes, embed_dim,
                        {"depth": depth, "width": width, "dropout": dropout,
                         "input_size": input_size, "embed_dim": embed_dim, "exits": chosen},
                        head_grid)
