"""Multi-exit ResNets in plain torch: CIFAR-style ResNet-20/56 (He et al. 2016, section 4.2) and
ImageNet-style ResNet-18/50. Each residual block is a cuttable block; exits default to the
stage ends."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from offramp.ml.zoo.base import HEAD_GRID, FeatureInfo, MultiExitNet, conv_bn, default_exits


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.a = conv_bn(cin, planes, 3, stride)
        self.b = conv_bn(planes, planes, 3, 1, act=None)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != planes:
            self.short = conv_bn(cin, planes, 1, stride, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.b(self.a(x)) + self.short(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        out = planes * 4
        self.body = nn.Sequential(conv_bn(cin, planes, 1), conv_bn(planes, planes, 3, stride),
                                  conv_bn(planes, out, 1, act=None))
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != out:
            self.short = conv_bn(cin, out, 1, stride, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.short(x))


@dataclass(frozen=True)
class _Layout:
    """A ResNet's shape: its stem, then stages of ``depths[i]`` blocks of ``widths[i]``
    planes (the first of each stage after the first halving the resolution)."""

    block: type[BasicBlock] | type[Bottleneck]
    depths: Sequence[int]
    widths: Sequence[int]
    stem: nn.Module
    stem_info: FeatureInfo


def _build(arch: str, layout: _Layout, num_classes: int, exits: Sequence[int] | None,
           embed_dim: int, config: dict[str, object], head_grid: int) -> MultiExitNet:
    block, depths, widths, stem_info = layout.block, layout.depths, layout.widths, layout.stem_info
    blocks: list[nn.Module] = [layout.stem]
    info = [stem_info]
    cin, reduction, stage_ends = stem_info.channels, stem_info.reduction, []
    for si, (n, planes) in enumerate(zip(depths, widths, strict=True)):
        for i in range(n):
            stride = 2 if (i == 0 and si > 0) else 1
            reduction *= stride
            blocks.append(block(cin, planes, stride))
            cin = planes * block.expansion
            info.append(FeatureInfo(f"stage{si + 1}.{i}", cin, reduction))
        stage_ends.append(len(blocks) - 1)
    last = len(blocks) - 1
    chosen = list(exits) if exits is not None else default_exits(stage_ends, last, len(depths))
    return MultiExitNet(arch, blocks, info, chosen, num_classes, embed_dim,
                        {**config, "embed_dim": embed_dim, "exits": chosen}, head_grid)


def resnet_cifar(depth: int, num_classes: int, exits: Sequence[int] | None = None, *,
                 input_size: int = 32, embed_dim: int = 64, head_grid: int = HEAD_GRID) -> MultiExitNet:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    layout = _Layout(BasicBlock, [n, n, n], [16, 32, 64], conv_bn(3, 16),
                     FeatureInfo("stem", 16, 1))
    return _build(f"resnet{depth}", layout, num_classes, exits, embed_dim,
                  {"depth": depth, "input_size": input_size}, head_grid)


def resnet_imagenet(depth: int, num_classes: int, exits: Sequence[int] | None = None, *,
                    input_size: int = 224, embed_dim: int = 128,
                    head_grid: int = HEAD_GRID) -> MultiExitNet:
    layouts: dict[int, tuple[type[BasicBlock] | type[Bottleneck], list[int]]] = {
        18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
        50: (Bottleneck, [3, 4, 6, 3])}
    if depth not in layouts:
        raise ValueError(f"ImageNet ResNet depth must be one of {sorted(layouts)}, got {depth}")
    block, depths = layouts[depth]
    stem = nn.Sequential(conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1))
    layout = _Layout(block, depths, [64, 128, 256, 512], stem, FeatureInfo("stem", 64, 4))
    return _build(f"resnet{depth}", layout, num_classes, exits, embed_dim,
                  {"depth": depth, "input_size": input_size}, head_grid)
