"""tests/perf/footprint.py's interpreter floor (what it counts, not how fast)."""

from __future__ import annotations

import time

from tests.perf import footprint


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" in f.read()
    except FileNotFoundError:
        return True


def test_interpreter_floor_is_three_processes_and_cleans_up():
    mem = footprint.interpreter_floor(settle=0.2)
    pids = [p for p, _comm, _pss, _rss in mem["processes"]]
    assert len(pids) == 3
    # PSS splits the pages the three share, so it is below their summed RSS
    assert 0 < mem["uss"] < mem["pss"] < mem["rss"]
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in pids):
        assert time.monotonic() < deadline, "floor processes left running"
        time.sleep(0.05)
