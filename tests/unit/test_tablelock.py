"""The shared tables' lock without a system call (daemon/fuse/_tablelock.h,
filetable.LockedTable): mutual exclusion between processes, a dead
holder's lock taken over (and the table repaired), ids per process, the
choice between it and the POSIX record lock."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import signal
import time

import pytest

from daemon.fuse import filetable
from daemon.fuse.filetable import FileTable
from daemon.fuse.inodes import InodeTable
from tests.unit.killed import in_child

_fastops = pytest.importorskip("daemon.fuse._fastops", reason="the extension is not built (pure install)")

LIVE_BASE = 1 << 40     # _tablelock.h's LOCK_LIVE_BASE


class Area:
    """A memfd of two pages, its header words, and TableLocks on it."""

    def __init__(self):
        self.fd, self.mm = filetable.shared_mapping("test-tablelock", 2 * mmap.PAGESIZE)
        self.words = memoryview(self.mm).cast("Q")
        self.locks = []

    def lock(self, **kw):
        lock = _fastops.TableLock(self.words[:8], 0, 1, self.fd, **kw)
        self.locks.append(lock)
        return lock

    def close(self):
        for lock in self.locks:
            lock.close()
        self.words.release()
        self.mm.close()
        os.close(self.fd)


@pytest.fixture
def area():
    a = Area()
    yield a
    a.close()


def _held_elsewhere(area, hold: float | None) -> tuple[int, int]:
    """A child that takes a TableLock of ``area`` and keeps it ``hold``
    seconds (None: until it kills itself, lock held): its (pid, id), once
    it holds the lock."""
    r, w = os.pipe()

    def holder():
        lock = area.lock()
        lock.acquire()
        os.write(w, bytes([lock.id]))
        if hold is None:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(hold)
        lock.release()

    pid = in_child(holder)
    os.close(w)                     # a child that fails early: EOF, not a hang
    got = os.read(r, 1)
    os.close(r)
    assert got, "the holder failed before it held the lock"
    return pid, got[0]


def _status(pid: int) -> int:
    return os.waitpid(pid, 0)[1]


def test_a_free_lock_is_taken_and_given_back(area):
    lock = area.lock()
    assert lock.id == 0 and lock.holder == 0          # no id before the first lock
    assert lock.acquire() is False                    # not a takeover
    assert lock.id == 1 and lock.holder == 1 and area.words[0] == 1
    lock.release()
    assert lock.holder == 0 and area.words[0] == 0
    assert lock.acquire() is False and lock.id == 1   # the same id for the process's life
    lock.release()
    assert area.words[1] == 1                         # one id taken from the counter


def test_the_id_is_kept_alive_by_a_record_lock_on_its_byte(area):
    """What a waiter looks at: byte LIVE_BASE + id of the memfd is locked by
    the holder's process for as long as it lives."""
    lock = area.lock()
    lock.acquire()
    lock.release()
    byte = LIVE_BASE + lock.id          # (in the child, lock.id is 0: not its id)
    r, w = os.pipe()

    def probe():
        os.close(r)
        try:
            fcntl.lockf(area.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, byte)
            os.write(w, b"free")
        except OSError as e:
            assert e.errno in (errno.EAGAIN, errno.EACCES)
            os.write(w, b"held")

    pid = in_child(probe)
    os.close(w)
    assert os.read(r, 4) == b"held"
    assert _status(pid) == 0
    os.close(r)


def test_a_forked_child_takes_its_own_id(area):
    """Record locks are not inherited: a child of a process that has an id
    takes a new one (never the parent's, which its liveness byte would
    not vouch for)."""
    lock = area.lock()
    lock.acquire()
    lock.release()
    r, w = os.pipe()

    def child():
        assert lock.id == 0                         # not the parent's any more
        lock.acquire()
        os.write(w, bytes([lock.id, lock.holder]))
        lock.release()

    pid = in_child(child)
    os.close(w)                     # a child that fails early: EOF, not a hang
    assert os.read(r, 2) == bytes([2, 2])
    assert _status(pid) == 0 and lock.id == 1 and area.words[1] == 2
    os.close(r)


def test_processes_exclude_each_other(area):
    """Three processes add to one word under the lock, with no other
    ordering: no increment is lost."""
    n = 3000

    def work():
        lock = area.lock()
        for _ in range(n):
            lock.acquire()
            v = area.words[4]
            for _ in range(3):
                pass
            area.words[4] = v + 1
            lock.release()

    pids = [in_child(work) for _ in range(3)]
    assert [_status(p) for p in pids] == [0, 0, 0]
    assert area.words[4] == 3 * n and area.words[0] == 0


def test_a_waiter_sleeps_until_a_live_holder_lets_go(area):
    """A holder keeping the lock for 0.3 s (well past the 20 ms after which
    a waiter looks at the holder's byte) is alive: the waiter waits, takes
    nothing over, and gets the lock once it is given."""
    pid, _ = _held_elsewhere(area, 0.3)
    lock = area.lock()
    start = time.monotonic()
    t0 = os.times()
    assert lock.acquire() is False
    waited, cpu = time.monotonic() - start, os.times()
    assert waited > 0.2 and lock.takeovers == 0
    # asleep, not spinning: far less CPU than the wait
    assert (cpu.user - t0.user) + (cpu.system - t0.system) < waited / 2
    lock.release()
    assert _status(pid) == 0


def test_giving_the_lock_back_wakes_a_sleeper(area):
    """A sleeping waiter is woken by the release (FUTEX_WAKE, WAITERS set),
    not by its sleep's limit: with that limit at 30 s it still gets the
    lock right after a 0.2 s hold."""
    pid, _ = _held_elsewhere(area, 0.2)
    lock = area.lock(wait_ms=30000)
    start = time.monotonic()
    assert lock.acquire() is False
    assert time.monotonic() - start < 10
    lock.release()
    assert _status(pid) == 0


def test_a_dead_holders_lock_is_taken_over_once(area):
    """A holder killed with the lock: the next locker finds its byte free
    after its sleep and takes the lock over (acquire says so); the word
    then names the new holder, with WAITERS (others may sleep)."""
    pid, dead = _held_elsewhere(area, None)
    assert os.WIFSIGNALED(_status(pid))
    lock = area.lock()
    assert lock.holder == dead
    assert lock.acquire() is True and lock.takeovers == 1
    assert lock.holder == lock.id != dead and area.words[0] & 0x80000000
    lock.release()
    assert area.words[0] == 0
    assert lock.acquire() is False and lock.takeovers == 1
    lock.release()


def test_two_waiters_one_takeover(area):
    """Two processes wait for a dead holder: one takes over, the other
    waits for it, and each gets the lock once."""
    pid, _ = _held_elsewhere(area, None)
    assert os.WIFSIGNALED(_status(pid))

    def wait_for_it():
        mine = area.lock()
        took = mine.acquire()
        area.words[5] += 1
        area.words[6] += took
        time.sleep(0.05)
        mine.release()

    pids = [in_child(wait_for_it) for _ in range(2)]
    assert [_status(p) for p in pids] == [0, 0]
    assert area.words[5] == 2 and area.words[6] == 1 and area.words[0] == 0


def test_waiting_for_its_own_id_is_an_error(area):
    """The thread lock keeps a process from waiting for itself; without it
    (two TableLocks of one process on one word) that is EDEADLK, not a
    hang and not a takeover of its own lock."""
    first, second = area.lock(), area.lock()
    first.acquire()
    with pytest.raises(OSError) as e:
        second.acquire()
    assert e.value.errno == errno.EDEADLK and first.holder == first.id
    first.release()


def test_bad_arguments(area):
    with pytest.raises(ValueError):
        _fastops.TableLock(area.words[:8], 0, 0, area.fd)         # one word for both
    with pytest.raises(ValueError):
        _fastops.TableLock(area.words[:8], 0, 8, area.fd)         # past the header
    with pytest.raises(ValueError):
        _fastops.TableLock(area.words[:8], 0, 1, -1)
    with pytest.raises(ValueError):
        _fastops.TableLock(area.words[:8], 0, 1, area.fd, wait_ms=0)
    with pytest.raises(BufferError):
        _fastops.TableLock(b"\0" * 64, 0, 1, area.fd)             # not writable
    lock = area.lock()
    lock.close()
    with pytest.raises(OSError) as e:
        lock.acquire()
    assert e.value.errno == errno.EBADF


@pytest.mark.parametrize("pure, kind", [("1", "record"), ("", "futex"), ("0", "futex")])
def test_the_daemon_locks_one_way(monkeypatch, pure, kind):
    """The extension's lock unless PYVIRTIOFSD_PURE; the supervisor finds
    the extension without loading it."""
    monkeypatch.setenv("PYVIRTIOFSD_PURE", pure)
    assert filetable.shared_lock_kind() == kind
    t = InodeTable(8, open_files=4)
    try:
        assert t._lock_kind == t.files._lock_kind == kind
        assert t._table_lock is None                   # nothing loaded before a worker asks
        t.prepare_lock()
        assert (t._table_lock is not None) == (kind == "futex") == (t.files._table_lock is not None)
        assert t.lock_handle() == (t._table_lock if kind == "futex" else t._fd)
    finally:
        t.close()
    private = FileTable(4, shared=False)
    assert private._lock_kind == "none" and private.lock_handle() == -1
    private.close()


def test_a_takeover_repairs_the_inode_table():
    """A worker killed mid-update under the TableLock: the next locker takes
    the lock over, finds DIRTY and rebuilds the index, as after a record
    lock the kernel dropped."""
    table = InodeTable(64, lock="futex")
    try:
        table.reset(0xFD00, 2)
        before = [table.ref(5, i)[0] for i in range(10)]
        r, w = os.pipe()

        def hold_and_die():
            table._lock()
            table._hash[table._find(5, 3)[0]] = 0     # half-done: one index entry gone
            os.write(w, b"x")
            os.kill(os.getpid(), signal.SIGKILL)

        pid = in_child(hold_and_die)
        os.close(w)
        assert os.read(r, 1) == b"x"
        assert os.WIFSIGNALED(_status(pid))
        assert table.ref(5, 3) == (before[3], table.get(before[3])[0], False)
        assert table._table_lock.takeovers == 1
        assert [table.ref(5, i)[0] for i in range(10)] == before
        os.close(r)
    finally:
        table.close()
