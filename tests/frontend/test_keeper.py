"""A request worker's death loses no open file: the keeper (workers/keeper.py).

Each open file, directory handle and lock description is handed to the
keeper process when it is made; the replacement of a SIGKILLed request
worker copies it from there and serves the same fh on the same host open
file description (offset, locks, an unlinked file's data), and a nodeid
with an open file is served again through it. Only what the keeper alone
held when it died too is lost: EBADF on that fh, nothing else.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import time

import pytest

from tests.frontend.fuse_client import FuseClient, reply_errno
from tests.frontend.test_multiqueue import _host_can_lock, _workers, clients
from tests.frontend.vhost import VhostUserFrontend


@pytest.fixture(params=["plain", "systemd-unit"])
def one_queue(request, daemon_factory, shared_dir):
    """(daemon, client on the only request queue after INIT). Also started
    as the packaged systemd unit does: --request-queues 1 under a filter
    that refuses pidfd_getfd, so every copy comes from the keeper by its
    round trip (tests/start_conditions.py)."""
    d = daemon_factory("ours", shared_dir, start=request.param)
    fe = VhostUserFrontend(d.socket_path, ram_size=64 << 20)
    fe.realize()
    fe.start()
    q = FuseClient(fe)
    q.init()
    yield d, q
    fe.close()


def _kill(d, name: str) -> int:
    """SIGKILL the daemon's process ``name``; its replacement's pid."""
    victim = _workers(d.proc.pid)[name]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        new = _workers(d.proc.pid).get(name)
        if new is not None and new != victim:
            return new
        assert time.monotonic() < deadline, f"{name} was not replaced"
        time.sleep(0.05)


def test_the_only_request_worker_killed_with_files_open(one_queue, shared_dir):
    """One request queue, its worker SIGKILLed: its replacement reads and
    writes the same fhs (an unlinked file's too), lists on from the same
    directory cookie, and the POSIX lock taken before still holds."""
    d, q = one_queue
    assert "vfsd-keeper" in _workers(d.proc.pid)
    entry, opened = q.create(1, "gone", mode=0o644)
    gone_node, gone = entry.nodeid, opened.fh
    assert q.write(gone_node, gone, 0, b"unlinked but open") == 17
    q.unlink(1, "gone")
    (shared_dir / "locked").write_bytes(b"0123456789")
    node = q.lookup(1, "locked").nodeid
    fh = q.open(node, os.O_RDWR).fh
    q.setlk(node, fh, owner=0xA, start=0, end=9, type_=fcntl.F_WRLCK, pid=42)
    for i in range(300):
        (shared_dir / f"entry-{i:03d}-{'y' * 100}").touch()
    dfh = q.opendir(1).fh
    first = q.readdir(1, dfh, 0, size=4096)
    assert first and len(first) < 300
    assert not _host_can_lock(shared_dir / "locked")

    _kill(d, "vfsd-request-1")

    # the same fhs, served by the replacement
    assert q.read(gone_node, gone, 0, 100) == b"unlinked but open"
    assert q.write(gone_node, gone, 17, b"!") == 1
    assert q.read(gone_node, gone, 0, 100) == b"unlinked but open!"
    assert q.write(node, fh, 0, b"ABC") == 3
    assert (shared_dir / "locked").read_bytes() == b"ABC3456789"
    assert q.getattr(node, fh=fh).attr.size == 10
    # nodeids are not kept, but one with an open file is reopened through it
    assert q.getattr(node).attr.size == 10
    assert q.getattr(gone_node).attr.nlink == 0
    rest = q.readdir(1, dfh, first[-1].off, size=1 << 20)
    names = {e.name for e in first + rest} - {b".", b".."}
    assert len(names) == 301 and b"locked" in names
    # the lock description survived too: the lock holds, GETLK sees it
    assert not _host_can_lock(shared_dir / "locked")
    lk = q.getlk(node, fh, owner=0xB, start=0, end=9, type_=fcntl.F_RDLCK)
    assert (lk.type, lk.pid) == (fcntl.F_WRLCK, 42)
    q.flush(node, fh, lock_owner=0xA)          # close(2) of the locking process
    assert _host_can_lock(shared_dir / "locked")
    q.release(node, fh)
    q.release(gone_node, gone)
    q.releasedir(1, dfh)
    assert reply_errno(q.read, node, fh, 0, 1) == errno.EBADF
    assert d.proc.poll() is None


def test_opener_killed_before_any_other_queue_copied(daemon_factory, shared_dir):
    """Two queues: what only the dead worker had opened is served by the
    other queue (copied from the keeper), and by the dead one's replacement."""
    d = daemon_factory("ours", shared_dir)
    fe = VhostUserFrontend(d.socket_path, ram_size=64 << 20, num_request_queues=2)
    fe.realize()
    fe.start()
    try:
        q1, q2 = clients(fe)
        q1.init()
        q2.getattr(1)
        (shared_dir / "only2").write_bytes(b"opened on queue 2")
        node = q2.lookup(1, "only2").nodeid
        fh = q2.open(node, os.O_RDWR).fh
        _kill(d, "vfsd-request-2")
        assert q1.read(node, fh, 0, 6) == b"opened"
        assert q2.write(node, fh, 0, b"OPENED") == 6
        assert q2.read(node, fh, 0, 100) == b"OPENED on queue 2"
        q1.release(node, fh)
        assert reply_errno(q2.read, node, fh, 0, 1) == errno.EBADF
    finally:
        fe.close()


def test_keeper_killed_then_worker_killed(one_queue, shared_dir):
    """A new keeper gets every open file the live workers hold, so a worker
    killed after it loses nothing either. An fh that only the dead keeper
    held (its opener died before) is lost: EBADF, and nothing else breaks."""
    d, q = one_queue
    (shared_dir / "a").write_bytes(b"first")
    (shared_dir / "b").write_bytes(b"second")
    node_a = q.lookup(1, "a").nodeid
    node_b = q.lookup(1, "b").nodeid
    fh_a = q.open(node_a).fh
    fh_b = q.open(node_b).fh
    _kill(d, "vfsd-request-1")
    assert q.read(node_a, fh_a, 0, 5) == b"first"      # the replacement copies a, not b
    _kill(d, "vfsd-keeper")
    deadline = time.monotonic() + 20
    while "keeper restarted" not in d.log():    # logged once every worker re-sent its files
        assert time.monotonic() < deadline, d.log()[-2000:]
        time.sleep(0.05)
    # the new keeper got a from the replacement; b died with the old keeper
    _kill(d, "vfsd-request-1")
    assert q.read(node_a, fh_a, 0, 5) == b"first"
    assert reply_errno(q.read, node_b, fh_b, 0, 6) == errno.EBADF
    assert reply_errno(q.release, node_b, fh_b) == errno.EBADF
    q.release(node_a, fh_a)
    # the file system goes on: a fresh lookup and open work
    node = q.lookup(1, "b").nodeid
    fh = q.open(node).fh
    assert q.read(node, fh, 0, 6) == b"second"
    q.release(node, fh)
    assert d.proc.poll() is None
