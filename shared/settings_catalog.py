"""Every service's settings class and variable prefix, for ``offramp settings`` and the docs.

Derived from :data:`offramp.launcher.SERVICES`: each service module exposes ``SETTINGS`` and
``PREFIX``, so a new service is registered in one place.
"""

from __future__ import annotations

import importlib
from typing import Any

from offramp.launcher import SERVICES


def catalog() -> dict[str, tuple[type[Any], str]]:
    out = {}
    for name, module in SERVICES.items():
        service = importlib.import_module(f"{module}.service")
        out[name] = (service.SETTINGS, service.PREFIX)
    return out
