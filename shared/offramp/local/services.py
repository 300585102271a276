"""The services installed beside this library, found through the entry-point group
``offramp.services``: each service distribution registers its :class:`ServiceSpec` there, so
the library never imports a service, and a new one is registered in its own ``pyproject.toml``.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from offramp.errors import OfframpError
from offramp.node.entry import ENTRY_POINTS, ServiceSpec


def _entries() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in sorted(entry_points(group=ENTRY_POINTS), key=lambda e: e.name)}


def service_modules() -> dict[str, str]:
    """Service name -> the module ``python -m`` runs, without importing any service."""
    return {name: ep.value.split(":", 1)[0].split(".", 1)[0] for name, ep in _entries().items()}


def service_specs() -> dict[str, ServiceSpec[Any]]:
    """Service name -> its spec (imports each service, and so what it depends on)."""
    out: dict[str, ServiceSpec[Any]] = {}
    for name, ep in _entries().items():
        spec = ep.load()
        if not isinstance(spec, ServiceSpec) or spec.name != name:
            raise OfframpError(f"entry point {name} = {ep.value} in group {ENTRY_POINTS} is not "
                               f"the ServiceSpec of a service named {name}")
        out[name] = spec
    return out
