"""Which services serve the same model: bundle identities (``name@digest``, see
:attr:`offramp.model.bundle.Bundle.identity`) compared, without I/O.

Two services that name the same model but run different graphs (a bundle re-exported with
other cuts, on some nodes only) would exchange activations that the other side misreads; a
service whose model no worker serves would hold its frames for ever. Both are told here.
"""

from __future__ import annotations

from collections.abc import Mapping


def model_of(identity: str) -> str:
    """The model name of a bundle identity (``name@digest`` -> ``name``)."""
    return identity.rpartition("@")[0] or identity


def conflicts(own: str, theirs: str) -> bool:
    """Whether a peer serving ``theirs`` runs other graphs under the model name ``own`` has
    (both said, same name, another digest). An empty identity (a peer that does not say)
    conflicts with nothing."""
    return bool(own and theirs) and theirs != own and model_of(theirs) == model_of(own)


def unserved(own: str, workers: Mapping[str, str]) -> str | None:
    """Why no frame of bundle ``own`` can be served by the online workers ``workers`` (node ->
    the identity of the bundle it serves), or None: one of them serves it, one does not say
    (it may), or none is online yet (frames wait for one, as during a restart)."""
    if not workers or any(b in (own, "") for b in workers.values()):
        return None
    serve = ", ".join(f"{node} serves {b}" for node, b in sorted(workers.items())[:8])
    more = f" and {len(workers) - 8} more" if len(workers) > 8 else ""
    return (f"no segment-worker serves bundle {own}: {serve}{more} "
            "(start every service on the same bundle)")
