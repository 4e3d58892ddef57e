"""The shared tables' thread lock in C (daemon/fuse/_threadlock.h,
filetable.LockedTable): threading.Lock's behaviour where the tables and
tests use it, a blocking acquire that lets other threads run and signal
handlers interrupt it, the tables' choice of it, and C's use of it (and
of a threading.Lock, the fallback) on the request path."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from daemon.fuse import abi
from daemon.fuse.abi import Opcode
from daemon.fuse.filetable import FileTable
from daemon.fuse.inodes import InodeTable

_fastops = pytest.importorskip("daemon.fuse._fastops", reason="the extension is not built (pure install)")


def test_it_behaves_as_threading_lock_does():
    lock = _fastops.ThreadLock()
    assert not lock.locked()
    assert lock.acquire() is True and lock.locked()
    assert lock.acquire(False) is False and lock.acquire(blocking=False) is False
    lock.release()
    assert not lock.locked()
    with pytest.raises(RuntimeError, match="release unlocked lock"):
        lock.release()
    with lock:
        assert lock.locked()
    assert not lock.locked()
    with pytest.raises(TypeError):
        _fastops.ThreadLock(1)
    with pytest.raises(TypeError):
        lock.acquire(True, 5)


def test_a_blocked_acquire_lets_other_threads_run_and_gets_the_lock():
    lock = _fastops.ThreadLock()
    lock.acquire()
    got: list[float] = []
    waiter = threading.Thread(target=lambda: got.append(lock.acquire() and time.monotonic()))
    waiter.start()
    spun = 0
    end = time.monotonic() + 0.3
    while time.monotonic() < end:       # Python runs here while the waiter waits: the GIL is free
        spun += 1
    assert waiter.is_alive() and not got
    released = time.monotonic()
    lock.release()
    waiter.join(5)
    assert got and got[0] >= released and lock.locked()
    assert spun > 1000
    lock.release()


def test_a_signal_handler_interrupts_a_blocked_acquire():
    lock = _fastops.ThreadLock()
    holder_has_it, done = threading.Event(), threading.Event()

    def holder():
        lock.acquire()
        holder_has_it.set()
        done.wait(10)
        lock.release()

    class Interrupted(Exception):
        pass

    def handler(*_):
        raise Interrupted

    t = threading.Thread(target=holder)
    t.start()
    holder_has_it.wait(5)
    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        start = time.monotonic()
        with pytest.raises(Interrupted):
            lock.acquire()
        assert time.monotonic() - start < 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        done.set()
        t.join(5)
    assert not lock.locked()


@pytest.mark.parametrize("make", [lambda: InodeTable(64, open_files=8, lock="futex"),
                                  lambda: FileTable(8, lock="futex")], ids=["inodes", "files"])
def test_a_worker_s_tables_take_it_in_place_of_the_supervisor_s_threading_lock(make):
    """The supervisor never loads the extension, so its tables get a
    threading.Lock; prepare_lock (a worker, before its first thread)
    swaps in a ThreadLock, once: a second call keeps the same object."""
    table = make()
    try:
        assert isinstance(table._tlock, _fastops.ThreadLock)    # made where the extension is loaded
        table._tlock = threading.Lock()                         # as the supervisor makes it
        table.prepare_lock()
        lock = table._tlock
        assert isinstance(lock, _fastops.ThreadLock)
        table.prepare_lock()
        assert table._tlock is lock
        files = getattr(table, "files", None)
        if files is not None:
            assert isinstance(files._tlock, _fastops.ThreadLock)
    finally:
        table.close()


def _lookup(vr, name: bytes, unique: int) -> int:
    arg = name + b"\0"
    return vr.submit([abi.IN_HEADER.pack(40 + len(arg), Opcode.LOOKUP, unique, 1, 0, 0, 1, 0, 0), arg],
                     [16, abi.ENTRY_OUT.size])


@pytest.mark.parametrize("kind", ["ThreadLock", "threading.Lock"])
def test_c_serves_a_lookup_under_either_lock_and_declines_while_python_holds_it(tmp_path, monkeypatch, kind):
    """A cold LOOKUP in C (the wait loop's rig: the compiled queue and ops
    even under PYVIRTIOFSD_PURE=1) takes the inode table's thread lock
    without waiting and gives it back; held by Python (another thread of
    the worker), C declines the chain (left for Python to pop), answered
    once the lock is let go."""
    from tests.unit.waitrig import Rig

    def prepare(session):
        if kind == "threading.Lock":
            session.cache.table._tlock = threading.Lock()

    monkeypatch.chdir(tmp_path)
    rig = Rig(str(tmp_path), False, prepare=prepare)
    try:
        loop, ring, vr, fast = rig.loop, rig.ring, rig.vr, rig.fast
        table = loop.session.cache.table
        assert isinstance(table._tlock, _fastops.ThreadLock if kind == "ThreadLock" else type(threading.Lock()))
        for name in (b"a", b"b"):
            (tmp_path / name.decode()).write_bytes(b"")
        served = fast.served
        head = _lookup(vr, b"a", 11)
        loop._serve(ring)
        assert fast.served == served + 1 and not table._tlock.locked()
        assert abi.OUT_HEADER.unpack(vr.read_writable(head, 16))[1] == 0
        vr.harvest()
        vr.free(head)
        table._tlock.acquire()
        try:
            head = _lookup(vr, b"b", 13)
            assert fast.batch(ring.queue.core, ring.words, ring.popped, 16) == -1    # the next chain is Python's
            assert table._tlock.locked()
        finally:
            table._tlock.release()
        loop._serve(ring)                       # let go: answered (by C again)
        assert fast.served == served + 2
        reply = vr.read_writable(head, 16 + abi.ENTRY_OUT.size)
        assert abi.OUT_HEADER.unpack(reply[:16])[1] == 0
        assert not table._tlock.locked()
    finally:
        rig.close()
