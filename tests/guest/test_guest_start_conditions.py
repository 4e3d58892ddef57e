"""A real guest against a daemon started as a service manager starts it.

libvirt 9.0 starts the daemon with supplementary group 0 (and ``--fd``);
that used to get the request worker killed by its seccomp filter before
QEMU could connect (issue 13). One boot with the daemon started in the
"managed" state of tests/start_conditions.py: ``setpriv --groups=0,4,27``
with ambient capabilities, a service's environment, ``--fd``, umask 077,
blocked and ignored signals, a closed stdin and extra inherited fds. The
guest mounts the share, writes, reads back and lists; the host sees what
it wrote, in the modes it asked for.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import start_daemon
from tests.procfs import children
from tests.start_conditions import START_CONDITIONS, process_state

from .conftest import BOOTS, guest_dirs
from .harness import python_in_guest

pytestmark = pytest.mark.guest

PREFIX = "STARTED "
GUEST_SCRIPT = f"""
import json, os
with open("/mnt/from-guest", "w") as f:
    f.write("written by the guest")
os.chmod("/mnt/from-guest", 0o640)
os.mkdir("/mnt/dir", 0o750)
with open("/mnt/dir/inner", "w") as f:
    f.write("inner")
print({PREFIX!r} + json.dumps({{
    "read_back": open("/mnt/from-guest").read(),
    "host_file": open("/mnt/from-host").read(),
    "listing": sorted(os.listdir("/mnt")),
    "inner": open("/mnt/dir/inner").read(),
}}), flush=True)
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base, shared, run_dir = guest_dirs(tmp_path_factory, "guest-managed-start")
    (shared / "from-host").write_text("written by the host")
    d = start_daemon("ours", shared, "auto", run_dir=str(run_dir), startup_timeout=30.0, start="managed")
    try:
        deadline = time.monotonic() + 30     # --fd: the socket existed before the daemon did
        while "waiting for QEMU" not in d.log() and d.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        before = {pid: process_state(pid) for pid in [d.pid] + children(d.pid)}
        r = python_in_guest(d, GUEST_SCRIPT, PREFIX, base / "console.log")
    finally:
        d.stop()
    BOOTS.append(("ours", "auto, started 'managed'", r.guest.duration,
                  f"{json.dumps(r.record)}; console {base / 'console.log'}"))
    return {"run": r, "before": before, "shared": shared, "cmd": d.cmd}


def test_the_daemon_was_started_with_supplementary_groups(run):
    cond = START_CONDITIONS["managed"]
    assert cond.groups and 0 in cond.groups
    assert run["cmd"][:2] == ["setpriv", "--groups=" + ",".join(map(str, cond.groups))]
    # and none of its processes kept them: supervisor, hiprio, request-1, keeper
    assert len(run["before"]) == 4, run["before"]
    for pid, state in run["before"].items():
        assert state["Groups"] == "", (pid, state)


def test_the_guest_mounts_writes_and_reads(run):
    r = run["run"]
    assert r.record is not None and r.guest.exit_status == 0, r.guest.describe() + r.daemon_log[-3000:]
    assert r.record["read_back"] == "written by the guest"
    assert r.record["host_file"] == "written by the host"
    assert r.record["inner"] == "inner"
    assert r.record["listing"] == ["dir", "from-guest", "from-host"]


def test_the_host_sees_what_the_guest_wrote(run):
    shared = run["shared"]
    assert (shared / "from-guest").read_text() == "written by the guest"
    assert (shared / "from-guest").stat().st_mode & 0o777 == 0o640
    assert (shared / "dir").stat().st_mode & 0o777 == 0o750
    assert (shared / "dir" / "inner").read_text() == "inner"


def test_the_daemon_ended_cleanly(run):
    r = run["run"]
    assert r.daemon_exit == 0, r.daemon_log[-3000:]
    assert "SIGSYS" not in r.daemon_log and "Traceback" not in r.daemon_log, r.daemon_log[-3000:]
