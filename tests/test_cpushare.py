"""Where services share cores: each pipeline stage yields the CPU to the ones after it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from offramp.local.system import stage_nices
from offramp.node.cpushare import autogroup_nice

pytestmark = pytest.mark.tier("broker")

PROBE = """
import json, os, threading
from pathlib import Path
from offramp.node.cpushare import autogroup_nice, lower_priority
started = threading.Event()
threading.Thread(target=lambda: (started.set(), threading.Event().wait(5)), daemon=True).start()
started.wait()
problems = lower_priority(3)
group = autogroup_nice(Path("/proc/self/autogroup"))
nices = [os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")]
print(json.dumps({"problems": problems, "nices": nices, "group": group}))
"""


def _probe(new_session: bool) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, start_new_session=new_session, timeout=30)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_lower_priority_reaches_every_thread_and_its_own_session_only() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    led = _probe(new_session=True)
    assert led["problems"] == []
    assert led["nices"] == [min(19, base + 3)] * 2  # the main thread and the one started first
    if led["group"] is not None:  # autogroup on: a session of its own has a group that yields
        assert led["group"] == 3
    # not the leader: the caller's session group is left alone, and a caller in the root group
    # (no setsid anywhere above it, as under many CI runners and containers) has none to lower
    own = autogroup_nice(Path("/proc/self/autogroup"))
    member = _probe(new_session=False)
    assert member["problems"] == []
    assert member["group"] == own
    assert autogroup_nice(Path("/proc/self/autogroup")) == own


def test_autogroup_nice_reads_the_kernel_forms(tmp_path: Path) -> None:
    group = tmp_path / "autogroup"
    assert autogroup_nice(group) is None  # no autogroup support
    group.write_text("")
    assert autogroup_nice(group) is None  # the root group: nothing of the session's to lower
    group.write_text("/autogroup-6333 nice 4\n")
    assert autogroup_nice(group) == 4
    group.write_text("/autogroup-6333 nice -3\n")
    assert autogroup_nice(group) == -3
    group.write_text("something else\n")
    with pytest.raises(ValueError, match="unexpected"):
        autogroup_nice(group)


def test_stage_nices_yield_to_later_stages() -> None:
    assert stage_nices([(1,), (2,), (3,)], 2) == [4, 2, 0]
    assert stage_nices([(1, 2), (3,)], 2) == [2, 0]
    assert stage_nices([(1,), (2,), (3,), (3,)], 2) == [4, 2, 0, 0]  # copies alike
    assert stage_nices([(1,)] * 3, 2) == [0, 0, 0]
    assert stage_nices([(1,), (2,), (3,)], 15) == [19, 15, 0]  # within what nice allows
    assert stage_nices([], 2) == []
