"""Counting multiply-accumulates of convolutions and linear layers with forward hooks.

FLOPs are reported as 2 x MACs. Batch norm, activations and additions are left out (they are a
few percent of a CNN's work); the same counter is used for segments and the whole model, so the
ratios the calibration reports are consistent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def count_flops(module: nn.Module, run: Callable[[], object]) -> int:
    """FLOPs (2 x MACs) of one call of ``run``, counting convs and linears inside ``module``,
    per sample of the batch ``run`` uses."""
    total = 0
    batch = 1

    def conv_hook(m: nn.Conv2d, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total, batch
        batch = out.shape[0]
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += out.numel() * k

    def linear_hook(m: nn.Linear, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total, batch
        batch = out.shape[0]
        total += out.numel() * m.in_features

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return 2 * total // max(1, batch)
