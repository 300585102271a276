"""Queue discipline on a worker (docs/algorithms.md 3.2): weighted priority with ageing.

The next task served is the one with the highest urgency ``gamma * (1 + age / tau)``: a task of
higher priority overtakes, and a waiting task's urgency grows without bound, so a low-priority
task is never starved (after ``tau * (gamma_high / gamma_low - 1)`` seconds it outranks a fresh
high-priority one).
"""

from __future__ import annotations


def urgency(priority: float, age_s: float, ageing_s: float) -> float:
    return priority * (1.0 + max(0.0, age_s) / ageing_s)
