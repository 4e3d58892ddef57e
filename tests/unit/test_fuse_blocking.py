"""FSYNC and FSYNCDIR on helper threads (daemon/fuse/blocking.py), driven
through FuseSession.handle with a host fsync that blocks until released."""

import errno
import os
import threading

import pytest

from daemon.fuse import abi, blocking
from daemon.fuse.abi import Opcode
from daemon.fuse.handles import KIND_FILE
from tests.procfs import fd_count, settled_fd_count
from tests.unit.fusereq import entry_nodeid


class SlowSync:
    """Stands in for os.fsync/os.fdatasync: each call blocks until
    ``release()``; records which one ran on which fd."""

    def __init__(self, error: int = 0):
        self.gate = threading.Event()
        self.calls: list[tuple[str, int]] = []
        self.running = threading.Semaphore(0)
        self.error = error

    def make(self, name):
        def sync(fd):
            self.calls.append((name, fd))
            self.running.release()
            assert self.gate.wait(10), "never released"
            if self.error:
                raise OSError(self.error, os.strerror(self.error))
        return sync

    def wait_running(self, n=1):
        for _ in range(n):
            assert self.running.acquire(timeout=10), "the sync call never started"

    def release(self):
        self.gate.set()


@pytest.fixture
def slow(monkeypatch):
    s = SlowSync()
    monkeypatch.setattr(os, "fsync", s.make("fsync"))
    monkeypatch.setattr(os, "fdatasync", s.make("fdatasync"))
    yield s
    s.release()


@pytest.fixture
def node(fuse, share):
    (share / "f").write_bytes(b"data")
    return entry_nodeid(fuse.call(Opcode.LOOKUP, 1, b"f\0", abi.ENTRY_OUT.size).ok())


def fsync(fuse, nodeid, fh, flags=0, opcode=Opcode.FSYNC):
    return fuse.submit(opcode, nodeid, abi.FSYNC_IN.pack(fh, flags), 0)


def open_fds() -> int:
    return fd_count(os.getpid())


def test_fsync_runs_on_a_helper_while_other_requests_are_served(fuse, node, slow):
    fh, _ = fuse.open(node, os.O_RDWR)
    before = open_fds()
    pending = fsync(fuse, node, fh)
    slow.wait_running()
    assert pending.reply() is None and fuse.session.has_pending()
    # the queue goes on: a read and a getattr are answered meanwhile
    assert fuse.read(node, fh, 0, 4).ok() == b"data"
    assert fuse.call(Opcode.GETATTR, node, abi.GETATTR_IN.pack(0, 0, 0), abi.ATTR_OUT.size).error == 0
    # the helper syncs its own dup of the fh's fd
    (name, fd), = slow.calls
    assert name == "fsync" and fd != fuse.session.handles.get(fh, KIND_FILE).fd
    assert open_fds() == before + 1
    slow.release()
    assert fuse.wait(pending).error == 0
    assert not fuse.session.has_pending() and open_fds() == before


def test_fdatasync_flag_and_fsyncdir(fuse, node, slow):
    fh, _ = fuse.open(node, os.O_RDWR)
    dfh = fuse.opendir(1)
    a = fsync(fuse, node, fh, abi.FUSE_FSYNC_FDATASYNC)
    b = fsync(fuse, 1, dfh, opcode=Opcode.FSYNCDIR)
    slow.wait_running(2)
    assert sorted(name for name, _ in slow.calls) == ["fdatasync", "fsync"]
    slow.release()
    assert fuse.wait(a).error == 0 and fuse.wait(b).error == 0


def test_a_failing_sync_is_answered_with_its_errno(fuse, node, slow):
    slow.error = errno.EIO
    fh, _ = fuse.open(node, os.O_RDWR)
    pending = fsync(fuse, node, fh)
    slow.release()
    assert fuse.wait(pending).error == errno.EIO


def test_release_while_the_sync_runs_closes_nothing_it_uses(fuse, node, slow):
    fh, _ = fuse.open(node, os.O_RDWR)
    before = open_fds()
    pending = fsync(fuse, node, fh)
    slow.wait_running()
    fuse.release(node, fh).ok()
    (_, fd), = slow.calls
    os.fstat(fd)  # the helper's dup is still open
    assert open_fds() == before  # fh's fd closed, the dup still held
    slow.release()
    assert fuse.wait(pending).error == 0
    assert open_fds() == before - 1
    with pytest.raises(OSError):
        os.fstat(fd)


def test_at_most_max_threads_then_calls_queue(fuse, node, slow):
    fh, _ = fuse.open(node, os.O_RDWR)
    n = blocking.MAX_THREADS + 2
    pending = [fsync(fuse, node, fh) for _ in range(n)]
    slow.wait_running(blocking.MAX_THREADS)
    assert fuse.session._blocking.threads == blocking.MAX_THREADS
    assert len(slow.calls) == blocking.MAX_THREADS  # the rest wait for a thread
    slow.release()
    assert [fuse.wait(p).error for p in pending] == [0] * n
    assert len(slow.calls) == n
    # the threads are reused, not started again
    again = fsync(fuse, node, fh)
    assert fuse.wait(again).error == 0 and fuse.session._blocking.threads == blocking.MAX_THREADS


def test_cancel_answers_eintr_and_the_late_result_is_dropped(fuse, node, slow):
    fh, _ = fuse.open(node, os.O_RDWR)
    before = open_fds()
    pending = fsync(fuse, node, fh)
    slow.wait_running()
    done = fuse.session.cancel_all()  # VRING_STOP, SHUTDOWN
    assert [t for t, _ in done] == [pending.unique] and pending.reply().error == errno.EINTR
    slow.release()
    # the helper closes its dup when the call returns
    assert settled_fd_count(os.getpid(), before) == before
    assert fuse.session.retry() == [] and not fuse.session.has_pending()


def test_without_a_helper_thread_the_sync_runs_inline(fuse, node, monkeypatch):
    """A worker that cannot start a thread (RLIMIT_NPROC, seccomp) still
    answers FSYNC, synchronously."""
    def no_thread(*args, **kw):
        raise RuntimeError("can't start new thread")
    monkeypatch.setattr(blocking.threading.Thread, "start", no_thread)
    fh, _ = fuse.open(node, os.O_RDWR)
    assert fsync(fuse, node, fh).reply().error == 0
    assert not fuse.session.has_pending()


def test_past_max_deferred_the_sync_runs_inline(fuse, node, slow, monkeypatch):
    """A worker's restart record holds MAX_DEFERRED deferred requests per
    ring: past that many, FSYNC is answered at once (synchronously), so
    every request a replacement might owe is one it can answer."""
    from daemon.fuse import session as session_module
    monkeypatch.setattr(session_module, "MAX_DEFERRED", 2)
    fh, _ = fuse.open(node, os.O_RDWR)
    waiting = [fsync(fuse, node, fh) for _ in range(2)]
    slow.wait_running(2)
    assert all(p.reply() is None for p in waiting)
    slow.release()  # the third runs on this thread: let it through
    assert fsync(fuse, node, fh).reply().error == 0
    assert [fuse.wait(p).error for p in waiting] == [0, 0]


def test_session_close_closes_the_wakeup_fd(connect):
    fuse = connect()
    session = fuse.session
    fd = session.wakeup_fd
    os.fstat(fd)
    session.close()
    assert session.wakeup_fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
