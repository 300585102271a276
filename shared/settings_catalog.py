"""Every service's settings class and variable prefix, for ``offramp settings`` and the docs."""

from __future__ import annotations

from typing import Any


def catalog() -> dict[str, tuple[type[Any], str]]:
    from offramp.services.admission_controller.service import PREFIX as A
    from offramp.services.admission_controller.service import AdmissionSettings
    from offramp.services.exit_arbiter.service import PREFIX as E
    from offramp.services.exit_arbiter.service import ArbiterSettings
    from offramp.services.priority_scheduler.service import PREFIX as P
    from offramp.services.priority_scheduler.service import SchedulerSettings
    from offramp.services.segment_worker.service import PREFIX as W
    from offramp.services.segment_worker.service import WorkerSettings

    return {
        "admission-controller": (AdmissionSettings, A),
        "segment-worker": (WorkerSettings, W),
        "exit-arbiter": (ArbiterSettings, E),
        "priority-scheduler": (SchedulerSettings, P),
    }
