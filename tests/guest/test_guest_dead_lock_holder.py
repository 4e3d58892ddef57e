"""A process that died holding a shared table's lock, mid-update, does not
stall a real guest (platform a, one boot, ~1 min).

The shared inode table and open-file table lock with the extension's
TableLock (docs/compiled.md, "The table lock without a system call"): a
dead holder's lock is taken over by the next locker once the holder's
liveness byte is free, and DIRTY makes that locker repair the table. The
unit tests kill a holder in a test process; here the daemon is the real
one and the guest keeps using it: while the guest waits (after it made
200 files and opened one), the host forks, for each of the two tables, a
child that maps the table's memfd (through the request worker's
/proc/PID/fd), takes its TableLock, sets DIRTY as a worker does before an
update, and is SIGKILLed. The lock words then hold dead ids with DIRTY
set, exactly as after a worker killed in the middle of an update.

Asserted: the guest's cold lookups, reads, creates, the fh it opened
before, its listing and unlinks all work, with no error; both tables were
repaired (the daemon's warnings); no worker died or was restarted.
"""

from __future__ import annotations

import mmap
import os
import signal
from pathlib import Path

import pytest

from daemon.fuse import filetable, inodes
from daemon.fuse.filetable import FileTable
from daemon.fuse.inodes import InodeTable
from tests import procfs

from .conftest import _start_daemon, guest_dirs
from .harness import json_record
from .lockholder_guest import FILES, NEW, PREFIX
from .vm import guest_path, run_guest

pytestmark = pytest.mark.guest

SCRIPT = Path(__file__).with_name("lockholder_guest.py")
TABLES = {  # memfd name: (its header's words, the table class: where DIRTY and the lock are)
    "pyvirtiofsd-inodes": (inodes._HDR_WORDS, InodeTable),
    "pyvirtiofsd-files": (filetable._HDR_WORDS, FileTable),
}
REPAIRED = ("inode table: a process died while updating it",
            "open-file table: a process died while updating it")


def _memfd_paths(pid: int) -> dict[str, str]:
    """The tables' memfds among ``pid``'s fds: name -> /proc/PID/fd/N."""
    out = {}
    for fd, target in procfs.fd_targets(pid).items():
        for name in TABLES:
            if target.startswith(f"/memfd:{name} "):
                out[name] = f"/proc/{pid}/fd/{fd}"
    return out


def _die_holding(path: str, words: int, table: type) -> int:
    """Fork a child that maps the memfd at ``path``, takes its TableLock,
    sets DIRTY and is SIGKILLed: the child's lock id, once it is gone."""
    from daemon.fuse import _fastops  # the workers' lock; the supervisor never loads it

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:    # pragma: no cover - the child, killed
        try:
            os.close(r)
            fd = os.open(path, os.O_RDWR)
            mm = mmap.mmap(fd, words * 8, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            hdr = memoryview(mm).cast("Q")
            lock = _fastops.TableLock(hdr, table._LOCK, table._IDS, fd)
            lock.acquire()
            hdr[table._DIRTY] = 1           # an update begun, never finished
            os.write(w, lock.id.to_bytes(4, "little"))
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    os.close(w)
    ident = int.from_bytes(os.read(r, 4), "little")
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return ident


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base, shared, run_dir = guest_dirs(tmp_path_factory, "guest-dead-lock-holder")
    d = _start_daemon("ours", shared, "auto", run_dir)
    sync = base / "sync"
    sync.mkdir()
    held: dict[str, int] = {}
    workers: dict[str, set[int]] = {}     # the daemon's children by name, each time watch looked

    def watch():
        for name, pid in procfs.children_by_comm(d.proc.pid).items():
            workers.setdefault(name, set()).add(pid)
        if (sync / "ready").exists() and not held:
            pid = procfs.children_by_comm(d.proc.pid)["vfsd-request-1"]
            paths = _memfd_paths(pid)
            assert set(paths) == set(TABLES), paths
            for name, path in paths.items():
                words, table = TABLES[name]
                held[name] = _die_holding(path, words, table)
            (sync / "held").touch()
        if d.proc.poll() is not None:
            return f"daemon exited with {d.proc.returncode}"
        return None

    try:
        guest = run_guest(d.socket_path, f"python3 {guest_path(SCRIPT)}", timeout=600,
                          console_log=base / "console.log", abort_if=watch, sync_dir=sync)
    finally:
        d.stop(10)
    record = None
    for line in guest.output.splitlines():
        if line.startswith(PREFIX):
            record = json_record(line, PREFIX)
    return record, held, workers, guest, d.log()


def test_the_guest_works_on_after_the_holders_died(run):
    record, held, _workers, guest, log = run
    assert set(held) == set(TABLES) and all(held.values()), held
    assert record is not None, f"no result from the guest\n{guest.describe()}\ndaemon log:\n{log[-3000:]}"
    assert record["errors"] == []
    assert record["looked"] == FILES
    assert record["made"] == NEW
    assert record["kept"] is True
    assert record["listed"] == FILES + NEW and record["left"] == FILES


def test_both_tables_were_repaired_and_no_worker_died(run):
    _record, _held, workers, _guest, log = run
    for warning in REPAIRED:
        assert warning in log, log[-3000:]
    # the same processes throughout: none died and none was replaced
    assert {"vfsd-request-1", "vfsd-hiprio", "vfsd-keeper"} <= set(workers), workers
    assert all(len(pids) == 1 for name, pids in workers.items() if name.startswith("vfsd-")), workers
    assert "restarted" not in log and "killed by" not in log and "exited with" not in log, log[-3000:]
