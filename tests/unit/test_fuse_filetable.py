"""The shared open-file table (daemon/fuse/filetable.py) and fd copies
between processes (daemon/fuse/peers.py)."""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import os
import socket

import pytest

from daemon.fuse import credentials
from daemon.fuse.filetable import KIND_LOCK, SLOT_BITS, FileTable
from daemon.fuse.peers import Peers, owner_word
from daemon.fuse.request import FUSEError


# both ways the table may lock (filetable.LockedTable): the extension's
# TableLock when it is built, the POSIX record lock always
LOCK_KINDS = ["record"] + (["futex"] if importlib.util.find_spec("daemon.fuse._fastops") else [])


@pytest.fixture(params=LOCK_KINDS)
def table(request):
    t = FileTable(4, lock=request.param)
    yield t
    t.close()


def test_fh_names_one_open_file_forever(table):
    fh = table.alloc(7, 1, os.O_RDWR, owner_word(3, 12))
    assert fh and fh >> SLOT_BITS
    assert table.lookup(fh) == (7, 1, os.O_RDWR, owner_word(3, 12))
    assert table.free(fh)
    assert table.lookup(fh) is None and not table.live(fh)
    assert not table.free(fh)                       # a second RELEASE: not live
    again = table.alloc(8, 2, 0, 0)                 # same slot, new generation
    assert again & ((1 << SLOT_BITS) - 1) == fh & ((1 << SLOT_BITS) - 1)
    assert again != fh and table.lookup(fh) is None


def test_bounded_and_bogus_fhs(table):
    fhs = [table.alloc(2, 1, 0, 0) for _ in range(4)]
    with pytest.raises(FUSEError) as e:
        table.alloc(2, 1, 0, 0)
    assert e.value.errno == errno.ENFILE
    for bogus in (0, 1, 5, (1 << 64) - 1, (1 << SLOT_BITS) - 1, fhs[0] + (1 << SLOT_BITS)):
        assert table.lookup(bogus) is None and not table.live(bogus) and not table.free(bogus)
    released = table.released
    table.reset()
    assert table.released > released and len(table) == 0
    assert all(table.lookup(fh) is None for fh in fhs)


def test_lock_descriptions_keyed_by_inode_and_owner(table):
    fh = table.alloc(5, 1, 0, 0)
    assert table.find_lock(5, 0xA) == 0 and table.lock_count == 0
    ident, created = table.alloc_lock(5, 0xA, owner_word(1, 40))
    assert created and table.find_lock(5, 0xA) == ident and table.lock_count == 1
    assert table.alloc_lock(5, 0xA, owner_word(2, 41)) == (ident, False)   # first one wins
    other, _ = table.alloc_lock(6, 0xA, 0)
    assert table.locks_of(5) == [(ident, 0xA)]
    assert table.lookup(ident)[1] == KIND_LOCK
    table.set_pid(ident, 1234)
    assert table.pid(ident) == 1234
    assert table.has_open(5) and not table.has_open(6)      # a lock is not an open fh
    table.free(fh)
    assert not table.has_open(5)
    table.free(ident)
    assert table.find_lock(5, 0xA) == 0 and table.pid(ident) == 0
    table.free(other)
    assert table.lock_count == 0


def test_a_dead_lock_holder_is_repaired():
    t = FileTable(4)
    try:
        fh = t.alloc(1, 1, 0, 0)
        t._hdr[4] = 1                     # _H_DIRTY: a holder died mid-update
        t.free(fh)
        assert t.alloc(1, 1, 0, 0) and len(t) == 1
    finally:
        t.close()


def test_borrow_copies_the_owners_fd(tmp_path):
    """pidfd_getfd from another process: the copy is the owner's open file."""
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        parent.close()
        fd = os.open(path, os.O_RDONLY)
        os.lseek(fd, 4, os.SEEK_SET)
        child.send(str(fd).encode())
        child.recv(1)                     # wait until copied
        os._exit(0)
    child.close()
    try:
        fd = int(parent.recv(16))
        peers = Peers()
        peers.set_self(1)
        assert not peers.shared and peers.borrow(owner_word(2, fd)) == -1   # unknown serial
        peers.add(2, os.pidfd_open(pid))
        assert peers.shared
        assert peers.borrow(owner_word(1, fd)) == -1      # our own serial: nothing to copy
        assert peers.borrow(owner_word(2, 999)) == -1     # no such fd there
        copy = peers.borrow(owner_word(2, fd))
        try:
            assert os.read(copy, 3) == b"456"             # the same open file: its offset
        finally:
            os.close(copy)
        parent.send(b"x")
        os.waitpid(pid, 0)
        assert peers.borrow(owner_word(2, fd)) == -1      # owner gone
        peers.close()
    finally:
        parent.close()
        credentials.keep_dumpable(False)     # Peers.add turned it on for this process


def test_kept_word_lives_and_dies_with_its_slot(table):
    """The keeper's word (workers/keeper.py) is written only into a live
    slot, read only while that slot lives, and gone once it is freed."""
    fh = table.alloc(7, 1, os.O_RDONLY, owner_word(3, 12))
    assert table.kept(fh) == 0
    assert table.keep(fh, owner_word(9, 40))
    assert table.kept(fh) == owner_word(9, 40)
    assert table.lookup(fh) == (7, 1, os.O_RDONLY, owner_word(3, 12))   # the owner is unchanged
    assert table.open_on(7) == (fh, 1) and table.open_on(8) is None
    assert table.free(fh)
    assert table.kept(fh) == 0 and not table.keep(fh, owner_word(9, 41))
    again = table.alloc(7, 2, 0, 0)          # the slot reused: no word left over
    assert again & 0xFFFFFF == fh & 0xFFFFFF and table.kept(again) == 0
    assert not table.keep(0, 1) and table.kept(1 << 30) == 0


def test_lock_pid_beside_the_flags(table):
    """A lock description's guest pid shares the flags word (it has no
    open flags): neither disturbs what lookup reports."""
    ident, created = table.alloc_lock(5, 0xA, owner_word(2, 30))
    assert created
    table.set_pid(ident, 0xFFFFFFFF)
    assert table.pid(ident) == 0xFFFFFFFF
    assert table.lookup(ident) == (5, KIND_LOCK, 0, owner_word(2, 30))
    assert table.open_on(5) is None          # a lock description is not an open file


class _CountingLock:
    """A TableLock's stand-in that counts what the table asks of it."""

    def __init__(self, real, calls):
        self.real, self.calls = real, calls

    def acquire(self):
        self.calls.append(fcntl.LOCK_EX)
        return self.real.acquire()

    def release(self):
        self.calls.append(fcntl.LOCK_UN)
        self.real.release()

    def close(self):
        self.real.close()


@pytest.mark.parametrize("kind", LOCK_KINDS)
def test_keep_many_records_live_slots_only_under_one_lock(monkeypatch, kind):
    """The keeper records a whole drain's KEEPs at once (workers/keeper.py):
    live slots get their word, dead, reused, bogus and zero ids nothing,
    and the table's lock is taken once for all of them."""
    table = FileTable(4, lock=kind)    # shared: a memfd and its lock
    try:
        live = table.alloc(7, 1, os.O_RDONLY, 0)
        dead = table.alloc(8, 1, os.O_RDONLY, 0)
        table.free(dead)
        reused = table.alloc(9, 1, os.O_RDONLY, 0)       # dead's slot, a new generation
        assert reused & 0xFFFFFF == dead & 0xFFFFFF
        calls = []
        if kind == "futex":
            table._table_lock = _CountingLock(table._table_lock, calls)
        else:
            real = fcntl.lockf
            monkeypatch.setattr(fcntl, "lockf", lambda *a: (calls.append(a[1]), real(*a))[1])
        got = table.keep_many([(live, owner_word(9, 40)), (dead, owner_word(9, 41)), (0, 1),
                               (1 << 30, 2), (5 << 24 | 9, 3), (reused, owner_word(9, 42))])
        assert got == [True, False, False, False, False, True]
        assert calls == [fcntl.LOCK_EX, fcntl.LOCK_UN]
        assert table.kept(live) == owner_word(9, 40) and table.kept(reused) == owner_word(9, 42)
        assert table.keep_many([]) == []
    finally:
        table.close()
