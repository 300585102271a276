"""Lower a process's share of the CPU where services share cores.

Linux gives every session its own scheduling group when autogroup is on (the default on
desktop and most server kernels), and ``offramp up`` starts each service in a session of its
own. The kernel then shares the cores equally between the services, whatever their threads'
nice values, so a pipeline's cheap first stages get as much CPU as its costly last one, race
ahead and leave it to finish alone. Lowering the priority of the thread *and* of the session
group is what takes effect in both cases. Raising priority back needs privileges, so this only
ever lowers it.
"""

from __future__ import annotations

import os
from pathlib import Path

NICEST = 19


def lower_priority(step: int, proc: Path = Path("/proc/self")) -> list[str]:
    """Add ``step`` to the nice value of every thread of this process (threads started later
    inherit it) and, if this process leads its session, of the session's autogroup. Returns
    what could not be done (empty: all of it)."""
    if step <= 0:
        return []
    problems = []
    tasks = proc / "task"
    tids = [int(t) for t in os.listdir(tasks)] if tasks.is_dir() else [0]
    for tid in tids:
        try:
            current = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, min(NICEST, current + step))
        except OSError as exc:
            problems.append(f"thread {tid}: {exc.strerror}")
    # the group is the whole session's: only its leader (a service started in a session of its
    # own, as offramp up does) may speak for it, not a worker run from someone's shell
    group = proc / "autogroup"
    if os.getsid(0) == os.getpid():
        try:
            nice = autogroup_nice(group)
            if nice is not None:
                group.write_text(str(min(NICEST, nice + step)))
        except (OSError, ValueError) as exc:
            problems.append(f"autogroup: {exc}")
    return problems


def autogroup_nice(group: Path) -> int | None:
    """The nice value of the autogroup that ``group`` (a ``/proc/<pid>/autogroup`` file)
    describes, or None where there is none to lower: no autogroup support, or a process in the
    root group (a session that never called setsid, as in many containers), which the kernel
    shows as an empty file."""
    try:
        text = group.read_text()
    except FileNotFoundError:
        return None
    if not text.strip():
        return None
    fields = text.split()  # "/autogroup-42 nice 0"
    if len(fields) != 3 or fields[1] != "nice":
        raise ValueError(f"unexpected {group} content {text.strip()!r}")
    return int(fields[2])
