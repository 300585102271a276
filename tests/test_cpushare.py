"""Where services share cores: each pipeline stage yields the CPU to the ones after it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from offramp.system import stage_nices

PROBE = """
import json, os, threading
from offramp.cpushare import lower_priority
started = threading.Event()
threading.Thread(target=lambda: (started.set(), threading.Event().wait(5)), daemon=True).start()
started.wait()
problems = lower_priority(3)
group = open("/proc/self/autogroup").read().split()[-1] if os.path.exists("/proc/self/autogroup") \\
    else None
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
    if led["group"] is not None:
        assert led["group"] == "3"  # a session of its own: its group yields too
        own = Path("/proc/self/autogroup").read_text().split()[-1]
        member = _probe(new_session=False)
        assert member["group"] == own  # not the leader: the caller's session is left alone
        assert Path("/proc/self/autogroup").read_text().split()[-1] == own


def test_stage_nices_yield_to_later_stages() -> None:
    assert stage_nices([(1,), (2,), (3,)], 2) == [4, 2, 0]
    assert stage_nices([(1, 2), (3,)], 2) == [2, 0]
    assert stage_nices([(1,), (2,), (3,), (3,)], 2) == [4, 2, 0, 0]  # copies alike
    assert stage_nices([(1,)] * 3, 2) == [0, 0, 0]
    assert stage_nices([(1,), (2,), (3,)], 15) == [19, 15, 0]  # within what nice allows
    assert stage_nices([], 2) == []
