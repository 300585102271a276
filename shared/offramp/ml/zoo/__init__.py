"""The model zoo and its registry: ``create_model(name, num_classes, exits=..., **cfg)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from offramp.ml.zoo.base import ExitHead, FeatureInfo, MultiExitNet
from offramp.ml.zoo.efficientnet import efficientnet_lite0
from offramp.ml.zoo.mobilenetv2 import mobilenetv2
from offramp.ml.zoo.resnet import resnet_cifar, resnet_imagenet
from offramp.ml.zoo.wideresnet import wideresnet

Factory = Callable[..., MultiExitNet]

# Bumped when a model built from the same configuration gets different layers or weights, so
# that recipes cached or checkpointed before are trained again (2: conv exit heads pool to a
# grid; load_trained still rebuilds a model saved under 1).
ZOO_VERSION = 2

REGISTRY: dict[str, Factory] = {
    "efficientnet_lite0": efficientnet_lite0,
    "mobilenetv2": mobilenetv2,
    "resnet20": partial(resnet_cifar, 20),
    "resnet56": partial(resnet_cifar, 56),
    "resnet18": partial(resnet_imagenet, 18),
    "resnet50": partial(resnet_imagenet, 50),
    "wideresnet": wideresnet,
    "wrn16_4": partial(wideresnet, depth=16, width=4),
}


def create_model(name: str, num_classes: int, exits: Sequence[int] | None = None,
                 **cfg: Any) -> MultiExitNet:
    """Build a zoo model; ``exits`` are block indices (the last block always carries one)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; one of {', '.join(sorted(REGISTRY))}")
    factory = REGISTRY[name]
    accepted = options(name)
    unknown = sorted(set(cfg) - set(accepted))
    if unknown:
        raise ValueError(f"{name} has no option {', '.join(unknown)}; its options: "
                         f"{', '.join(f'{k}={v}' for k, v in accepted.items())}")
    for key, value in cfg.items():
        _check_option(name, key, value, accepted[key])
    model = factory(num_classes, exits, **cfg)
    model.config["name"] = name
    return model


def _check_option(model: str, key: str, value: object, default: object) -> None:
    """A setting of the type its default has (an integer stands for a float); ValueError
    naming the option otherwise, before the factory fails on it in its own words."""
    kinds = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    want = type(default)
    if want not in kinds:
        return  # None or a structure: the factory checks it
    ok = (isinstance(value, want) and (want is bool or not isinstance(value, bool))) or (
        want is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise ValueError(f"{model} option {key} takes {kinds[want]} (default {default!r}), "
                         f"got {value!r}")


def options(name: str) -> dict[str, object]:
    """A zoo model's settings and their defaults (the keyword-only arguments of its factory)."""
    factory = REGISTRY[name]
    bound = dict(factory.keywords) if isinstance(factory, partial) else {}
    target = factory.func if isinstance(factory, partial) else factory
    params = inspect.signature(target).parameters.values()
    return {p.name: p.default for p in params
            if p.kind is p.KEYWORD_ONLY and p.name not in bound}


__all__ = ["REGISTRY", "ZOO_VERSION", "ExitHead", "FeatureInfo", "MultiExitNet", "create_model", "options"]
