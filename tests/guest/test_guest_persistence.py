"""Persistent storage: what a guest fsynced survives SIGKILL of QEMU and the
daemon at the same moment.

The guest (tests/guest/persist_guest.py) writes files of known content and
fsyncs them; then either idles (the quiet case) or appends fsynced 64-byte
records to a log and reports each on the serial console once its fsync
returned (the load case). The host kills QEMU's and the daemon's process
groups with SIGKILL in one go (the load case at a random moment, 1-5 s into
the load) and reads the shared directory: every file whole, every record up
to the last one the console reported intact (what follows may be missing
or cut short). Cache modes: never, auto, and always with --writeback (the
guest holds written data in its page cache until fsync sends it). One boot
per case, ~15-25 s each on an idle machine.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time

import pytest

from .conftest import BOOTS, _start_daemon, guest_dirs
from .harness import process_tree
from .persist_guest import NFILES, RECORD, file_bytes, record
from .vm import BackgroundGuest, guest_path

pytestmark = [pytest.mark.guest, pytest.mark.usecase]

SCRIPT = guest_path(os.path.join(os.path.dirname(__file__), "persist_guest.py"))
SYNCED_RE = re.compile(r"@@SYNCED (\d+)@@")
TIMEOUT = 600

# (platform, cache, daemon options, under load)
CASES = [("a", "never", (), True), ("a", "auto", (), True), ("a", "always", ("--writeback",), True),
         ("a", "always", ("--writeback",), False), ("b", "auto", (), True)]


def kill_both(guest: BackgroundGuest, daemon) -> None:
    """SIGKILL QEMU's and the daemon's process groups, back to back."""
    targets = [guest.proc.pid, daemon.pid]
    for pgid in targets:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def survivors(tree, timeout: float) -> list:
    """The processes of ``tree`` still alive (not zombies) after up to
    ``timeout`` s (a pid namespace's init takes a moment to go)."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for pid, ppid, comm in tree:
            try:
                state = open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[1][0]
            except OSError:
                continue
            if state not in "ZX":
                left.append((pid, ppid, comm, state))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


@pytest.fixture(scope="module", params=CASES,
                ids=[f"{p}-{c}{''.join(x)}-{'load' if load else 'quiet'}" for p, c, x, load in CASES])
def run(request, tmp_path_factory):
    platform, cache, extra, load = request.param
    base, shared, run_dir = guest_dirs(tmp_path_factory, f"persist-{cache}-{platform}")
    os.chmod(shared, 0o777)
    d = _start_daemon("ours", shared, cache, run_dir, extra)
    delay = random.uniform(1.0, 5.0)
    g = BackgroundGuest(d.socket_path, f"export PYTHONDONTWRITEBYTECODE=1; python3 {SCRIPT} "
                        f"--dir /mnt{' --load' if load else ''}",
                        console_log=base / "console.log", smp=1, timeout=TIMEOUT,
                        platform=platform)
    try:
        started = g.wait_console("@@SYNCED 0@@" if load else "@@IDLE@@", TIMEOUT)
        if started:
            time.sleep(delay if load else 0.5)
        tree = process_tree(d.pid)
        kill_both(g, d)
        daemon_rc = d.wait(30)
        left = survivors(tree, 15)
        result = g.result(60)
    finally:
        g.kill()
        d.stop()
    console = result.console_text
    synced = [int(m) for m in SYNCED_RE.findall(console)]
    BOOTS.append(("ours", f"{cache}{''.join(' ' + x for x in extra)} persistence "
                  f"{'load' if load else 'quiet'}, platform {platform}", result.duration,
                  (f"killed {delay:.1f} s into the load, last record reported {max(synced, default=None)}; "
                   if load else "killed while idle; ") +
                  f"console {base / 'console.log'}"))
    return {"started": started, "console": console, "synced": synced, "shared": shared,
            "daemon_rc": daemon_rc, "left": left, "load": load, "guest": result,
            "log": d.log()}


def test_the_guest_got_going_and_was_killed(run):
    assert run["started"], run["guest"].describe()
    assert "@@FILES-SYNCED@@" in run["console"]
    assert run["guest"].exit_status is None  # no exit marker: killed
    assert run["daemon_rc"] == -signal.SIGKILL, run["log"][-2000:]
    assert run["left"] == [], run["left"]  # no worker outlives the supervisor
    if run["load"]:
        assert len(run["synced"]) >= 2 and run["synced"] == list(range(len(run["synced"])))


def test_every_fsynced_file_is_whole_on_the_host(run):
    files = run["shared"] / "files"
    for i in range(NFILES):
        data = (files / f"f{i:02d}").read_bytes()
        assert data == file_bytes(i), f"f{i:02d}: {len(data)} bytes, expected {len(file_bytes(i))}"


def test_every_record_reported_fsynced_is_intact(run):
    if not run["load"]:
        assert not (run["shared"] / "log").exists()
        return
    last = run["synced"][-1]
    data = (run["shared"] / "log").read_bytes()
    assert len(data) >= (last + 1) * RECORD, (len(data), last)
    for i in range(last + 1):
        assert data[i * RECORD:(i + 1) * RECORD] == record(i), f"record {i} of {last}"
    # past the last report: whole records in order, perhaps one cut short
    tail = data[(last + 1) * RECORD:]
    for j in range(0, len(tail), RECORD):
        want = record(last + 1 + j // RECORD)
        assert want.startswith(tail[j:j + RECORD]), f"record {last + 1 + j // RECORD} after the report"
