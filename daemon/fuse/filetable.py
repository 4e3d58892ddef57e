"""The guest's open files, shared by every request worker: fh → what it is.

With several request queues a guest process may OPEN a file through one
request worker and READ, lock or RELEASE it through another. So the fh the
guest gets names a slot of this table, in shared memory like the inode
table (``shared_mapping``), not an entry of one worker's dict:

- fh = generation << 24 | slot; generations come from one counter that is
  never reset, so an fh is never 0, never names two open files, and a stale
  fh (released, or from before INIT) is simply unknown: EBADF.
- a slot: generation (0 = free), nodeid, kind (file/dir), host open flags,
  owner word (peers.py: which worker holds the host fd, and its number),
  kept word (the same for the keeper's copy: workers/keeper.py).
- lock descriptions (locks.py: one open file description per inode and
  guest lock owner, carrying that owner's POSIX locks as OFD locks) are
  slots too (``KIND_LOCK``, keyed by nodeid and lock owner), so every queue
  locks, tests and unlocks on the same description. They are found by a
  scan of the used slots, and only when some exist (``_H_LOCKS``): one
  read on the RELEASE of a file nobody locks.
- ``released`` counts frees: a worker holding copies of fds compares it
  with what it saw last to learn, with one read, that it has copies to drop.

The host fds themselves stay in the processes: the opener owns its fd,
another worker copies it once with ``pidfd_getfd`` and keeps the copy
(handles.py), and the keeper process holds one more copy of each, so that
the open file outlives the death of every request worker that had it.
Mutations (alloc, free, reset) hold the table's lock, as the inode table
does (``LockedTable`` below: the extension's ``TableLock``, or a POSIX
record lock on the memfd; either way a holder's death frees it, and the
next locker then rebuilds the free list: ``DIRTY``); lookups read aligned
words without locking and check the generation after.
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import mmap
import os
import sys
import threading
from typing import Any

from daemon.config import pure_requested
from daemon.fuse.request import FUSEError
from daemon.log import get_logger

log = get_logger("fuse.filetable")

SLOT_BITS = 24
SLOT_MASK = (1 << SLOT_BITS) - 1
GEN_MASK = (1 << 40) - 1
MAX_CAPACITY = SLOT_MASK - 1

_H_GEN, _H_HIGH, _H_FREE, _H_LIVE, _H_DIRTY, _H_RELEASED, _H_LOCKS, _H_LOCK, _H_LOCK_IDS = range(9)
_HDR_WORDS = 10
# slot words; a lock description also has the guest's lock owner, and the
# guest pid of its last granted lock (GETLK) in the high half of _F_FLAGS
# (a lock description has no open flags); _F_KEPT: the keeper's owner word
_F_GEN, _F_NODE, _F_KIND, _F_FLAGS, _F_OWNER, _F_NEXT, _F_LOCK_OWNER, _F_KEPT = range(8)
_WORDS = 8
# _F_KIND of a lock description (handles.KIND_FILE = 1 and KIND_DIR = 2 are fhs)
KIND_LOCK = 3


def shared_mapping(name: str, size: int) -> tuple[int, mmap.mmap]:
    """An anonymous memfd of ``size`` bytes mapped MAP_SHARED: (fd, map).
    Made before the workers fork, so they all share the pages."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd, mm


def take_slot(hdr, free: int, high: int, slots, words: int, next_word: int, capacity: int) -> int:
    """Under the table's lock: the index of a free slot, the head of the
    free list (header word ``free``, linked through each slot's word
    ``next_word``) or else the first never used (header word ``high``);
    FUSEError(ENFILE) when all ``capacity`` are taken. Shared with the
    inode table."""
    s = hdr[free]
    if s:
        hdr[free] = slots[s * words + next_word]
        return s
    s = hdr[high]
    if s > capacity:
        raise FUSEError(errno.ENFILE)
    hdr[high] = s + 1
    return s


def shared_lock_kind() -> str:
    """How every process of this daemon locks its shared tables, decided
    once where a table is made (the supervisor, before the workers fork):
    ``"futex"`` (the extension's TableLock, no system call when free:
    _tablelock.h) when the extension is built and PYVIRTIOFSD_PURE is not
    set, else ``"record"`` (a POSIX record lock, ``fcntl.lockf``). Found
    without importing the extension: the supervisor never loads compiled
    code; the workers do, and take it only there."""
    if pure_requested():
        return "record"
    return "futex" if importlib.util.find_spec("daemon.fuse._fastops") is not None else "record"


class LockedTable:
    """Mutual exclusion for a table in shared memory (``self._fd`` its
    memfd, ``self._hdr`` its header words, ``self._tlock`` a thread lock):
    between processes, the extension's ``TableLock`` on header words
    ``_LOCK`` and ``_IDS`` (``"futex"``: a compare-and-swap when free, a
    futex sleep when not; a dead holder is found by the record lock it
    keeps on its own byte of the memfd, and taken over), or a POSIX record
    lock on byte 0 of the memfd (``"record"``: the kernel drops it when the
    holder dies); between threads of one process the thread lock (both
    are per process): the extension's ``ThreadLock`` (threading.Lock's
    interface, which the request path in C takes with a plain call:
    _threadlock.h) once the extension is loaded, as a worker does before
    it starts a thread (``prepare_lock``), else a threading.Lock.
    ``shared_lock_kind()`` picks one for the table's life. Header word
    ``_DIRTY`` is set while the lock is held; a locker that finds it set
    calls ``_repair()`` (a holder died mid-update).
    Without a memfd (``_fd`` < 0: private memory) only the thread lock is
    taken."""

    _DIRTY = 0
    _LOCK = 0           # header words of the TableLock: the lock word
    _IDS = 0            # and its id counter (set by the subclass)
    _fd = -1
    _tlock: Any                 # threading.Lock, or the extension's ThreadLock (_init_lock)
    _hdr: memoryview
    _lock_kind = "record"
    _table_lock: Any = None     # this process's TableLock (C, no stubs), made on first use

    def _init_lock(self, kind: str | None = None) -> None:
        """Choose the lock (``kind`` None: ``shared_lock_kind()``) and make
        the thread lock; after ``_fd`` and ``_hdr`` are set."""
        self._lock_kind = "none" if self._fd < 0 else kind or shared_lock_kind()
        compiled = sys.modules.get("daemon.fuse._fastops")
        self._tlock = threading.Lock() if compiled is None else compiled.ThreadLock()
        self._table_lock = None

    def lock_handle(self):
        """What the extension's FastOps locks the table with: its
        ``TableLock`` (``"futex"``), or the memfd of its record lock."""
        if self._lock_kind == "futex":
            return self._table_lock or self._make_table_lock()
        return self._fd

    def prepare_lock(self) -> None:
        """In a worker, before its new root and its first thread: load what
        ``_lock`` needs (the extension, for ``"futex"``, and its
        ThreadLock instead of the supervisor's threading.Lock). RuntimeError if it cannot be loaded
        (the supervisor found it built: a broken install)."""
        if self._lock_kind == "futex" and self._table_lock is None:
            self._make_table_lock()
        compiled = sys.modules.get("daemon.fuse._fastops")
        if compiled is not None and not isinstance(self._tlock, compiled.ThreadLock):
            # the supervisor (which never loads the extension) made a
            # threading.Lock; no thread of this new process holds it, and
            # nothing took it yet (FastOps is given it after this)
            self._tlock = compiled.ThreadLock()

    def _make_table_lock(self):
        try:
            from daemon.fuse import _fastops  # type: ignore[attr-defined]  # C; only workers lock this way
        except ImportError as e:
            raise RuntimeError(f"the shared tables lock with the extension's TableLock, which does not load: {e} "
                               f"(PYVIRTIOFSD_PURE=1 runs without it)") from None
        self._table_lock = _fastops.TableLock(self._hdr, self._LOCK, self._IDS, self._fd)
        return self._table_lock

    def _lock(self) -> None:
        self._tlock.acquire()
        try:
            kind = self._lock_kind
            if kind == "futex":
                (self._table_lock or self._make_table_lock()).acquire()
            elif kind == "record":
                fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, 0)
        except BaseException:
            self._tlock.release()
            raise
        hdr = self._hdr
        if hdr[self._DIRTY]:
            self._repair()
        hdr[self._DIRTY] = 1

    def _unlock(self) -> None:
        self._hdr[self._DIRTY] = 0
        try:
            kind = self._lock_kind
            if kind == "futex":
                self._table_lock.release()
            elif kind == "record":
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, 0)
        finally:
            self._tlock.release()

    def _close_lock(self) -> None:
        """Let go of the header (before the views are released: close)."""
        if self._table_lock is not None:
            self._table_lock.close()
            self._table_lock = None

    def _repair(self) -> None:
        raise NotImplementedError


class FileTable(LockedTable):
    """fh → (nodeid, kind, flags, owner word), shared; see the module doc."""

    def __init__(self, capacity: int, shared: bool = True, lock: str | None = None):
        """``shared`` False: private memory and no locking, for a worker
        alone (a session made without a shared table: tests). ``lock``:
        ``"futex"`` or ``"record"`` (LockedTable), None: the daemon's."""
        if not 1 <= capacity <= MAX_CAPACITY:
            raise ValueError(f"open-file table capacity must be 1..{MAX_CAPACITY}")
        self.capacity = capacity
        size = (_HDR_WORDS + (capacity + 1) * _WORDS) * 8
        if shared:
            self._fd, self._mm = shared_mapping("pyvirtiofsd-files", size)
        else:
            self._fd, self._mm = -1, mmap.mmap(-1, size)
        mv = memoryview(self._mm)
        self._hdr = mv[:_HDR_WORDS * 8].cast("Q")
        self.slots = mv[_HDR_WORDS * 8:].cast("Q")   # slot n, word w: [n * 8 + w]
        self._hdr[_H_HIGH] = 1
        self._init_lock(lock)

    # -- locking (LockedTable: _lock/_unlock) ------------------------------------
    _DIRTY, _LOCK, _IDS = _H_DIRTY, _H_LOCK, _H_LOCK_IDS

    def _repair(self) -> None:
        log.warning("open-file table: a process died while updating it; rebuilding the free list")
        hdr, q = self._hdr, self.slots
        free = live = locks = 0
        for s in range(hdr[_H_HIGH] - 1, 0, -1):
            if q[s * _WORDS + _F_GEN]:
                live += 1
                locks += q[s * _WORDS + _F_KIND] == KIND_LOCK
            else:
                q[s * _WORDS + _F_NEXT] = free
                free = s
        hdr[_H_FREE] = free
        hdr[_H_LIVE] = live
        hdr[_H_LOCKS] = locks
        hdr[_H_RELEASED] += 1

    # -- API -------------------------------------------------------------------------
    def alloc(self, nodeid: int, kind: int, flags: int, owner: int) -> int:
        """A new fh for an open file; FUSEError(ENFILE) when full."""
        self._lock()
        try:
            return self._alloc_locked(nodeid, kind, flags, owner)
        finally:
            self._unlock()

    def _alloc_locked(self, nodeid: int, kind: int, flags: int, owner: int, lock_owner: int = 0) -> int:
        hdr, q = self._hdr, self.slots
        s = take_slot(hdr, _H_FREE, _H_HIGH, q, _WORDS, _F_NEXT, self.capacity)
        base = s * _WORDS
        q[base + _F_NODE] = nodeid
        q[base + _F_KIND] = kind
        q[base + _F_FLAGS] = flags & 0xFFFFFFFF
        q[base + _F_OWNER] = owner
        q[base + _F_LOCK_OWNER] = lock_owner
        q[base + _F_KEPT] = 0
        gen = (hdr[_H_GEN] + 1) & GEN_MASK or 1
        hdr[_H_GEN] = gen
        q[base + _F_GEN] = gen       # live from here on
        hdr[_H_LIVE] += 1
        return gen << SLOT_BITS | s

    def alloc_lock(self, nodeid: int, lock_owner: int, owner: int) -> tuple[int, bool]:
        """The lock description of (nodeid, lock_owner): (id, created). An
        existing one wins (another queue made it first); else a new slot
        naming ``owner``'s fd. FUSEError(ENFILE) when full."""
        self._lock()
        try:
            found = self._find_lock(nodeid, lock_owner)
            if found:
                return found, False
            ident = self._alloc_locked(nodeid, KIND_LOCK, 0, owner, lock_owner)
            self._hdr[_H_LOCKS] += 1
            return ident, True
        finally:
            self._unlock()

    def find_lock(self, nodeid: int, lock_owner: int) -> int:
        """The id of (nodeid, lock_owner)'s lock description, 0 if none."""
        if not self._hdr[_H_LOCKS]:
            return 0
        return self._find_lock(nodeid, lock_owner)

    def _find_lock(self, nodeid: int, lock_owner: int) -> int:
        for ident, owner in self.locks_of(nodeid):
            if owner == lock_owner:
                return ident
        return 0

    def locks_of(self, nodeid: int) -> list[tuple[int, int]]:
        """[(id, lock owner)] of the lock descriptions on ``nodeid``."""
        if not self._hdr[_H_LOCKS]:
            return []
        q, out = self.slots, []
        for s in range(1, min(self._hdr[_H_HIGH], self.capacity + 1)):
            base = s * _WORDS
            gen = q[base + _F_GEN]
            if gen and q[base + _F_KIND] == KIND_LOCK and q[base + _F_NODE] == nodeid:
                lock_owner = q[base + _F_LOCK_OWNER]
                if q[base + _F_GEN] == gen:
                    out.append((gen << SLOT_BITS | s, lock_owner))
        return out

    def has_open(self, nodeid: int) -> bool:
        """Whether an fh (file or directory) is open on ``nodeid``."""
        q = self.slots
        for s in range(1, min(self._hdr[_H_HIGH], self.capacity + 1)):
            base = s * _WORDS
            if q[base + _F_GEN] and q[base + _F_NODE] == nodeid and q[base + _F_KIND] != KIND_LOCK:
                return True
        return False

    def open_on(self, nodeid: int) -> tuple[int, int] | None:
        """(fh, kind) of a live open file or directory on ``nodeid``, None
        if there is none (a scan: for the recovery of a lost inode fd only)."""
        q = self.slots
        for s in range(1, min(self._hdr[_H_HIGH], self.capacity + 1)):
            base = s * _WORDS
            gen = q[base + _F_GEN]
            if gen and q[base + _F_NODE] == nodeid and q[base + _F_KIND] != KIND_LOCK:
                kind = q[base + _F_KIND]
                if q[base + _F_GEN] == gen:
                    return gen << SLOT_BITS | s, kind
        return None

    @property
    def lock_count(self) -> int:
        return self._hdr[_H_LOCKS]

    def set_pid(self, ident: int, pid: int) -> None:
        """The guest pid of the last lock granted through a description."""
        if self.live(ident):
            # flags are 0 for a lock description, and never written after alloc
            self.slots[(ident & SLOT_MASK) * _WORDS + _F_FLAGS] = (pid & 0xFFFFFFFF) << 32

    def pid(self, ident: int) -> int:
        if not self.live(ident):
            return 0
        return self.slots[(ident & SLOT_MASK) * _WORDS + _F_FLAGS] >> 32

    def lookup(self, fh: int) -> tuple[int, int, int, int] | None:
        """(nodeid, kind, flags, owner word) of a live fh, else None."""
        s, gen = fh & SLOT_MASK, fh >> SLOT_BITS
        if not 1 <= s <= self.capacity or not gen:
            return None
        q, base = self.slots, s * _WORDS
        if q[base + _F_GEN] != gen:
            return None
        out = q[base + _F_NODE], q[base + _F_KIND], q[base + _F_FLAGS] & 0xFFFFFFFF, q[base + _F_OWNER]
        if q[base + _F_GEN] != gen:
            return None
        return out

    def claim(self, fh: int, owner: int) -> None:
        """Make ``owner`` the owner word of a live fh or lock description
        (a worker that copied its fd: the last to copy owns)."""
        s = fh & SLOT_MASK
        if not 1 <= s <= self.capacity or not owner:
            return
        self._lock()        # never into a slot freed and reused meanwhile
        try:
            base = s * _WORDS
            if self.slots[base + _F_GEN] == fh >> SLOT_BITS:
                self.slots[base + _F_OWNER] = owner
        finally:
            self._unlock()

    def kept(self, fh: int) -> int:
        """The keeper's owner word of a live fh or lock description, 0 if
        none (the keeper has not taken its copy yet, or it died)."""
        s = fh & SLOT_MASK
        if not 1 <= s <= self.capacity:
            return 0
        base = s * _WORDS
        word = self.slots[base + _F_KEPT]
        return word if self.slots[base + _F_GEN] == fh >> SLOT_BITS else 0

    def keep(self, fh: int, word: int) -> bool:
        """The keeper holds a copy of a live slot's fd: record its owner
        word; False (nothing written) if the slot died meanwhile."""
        return self.keep_many([(fh, word)])[0]

    def keep_many(self, kept: list[tuple[int, int]]) -> list[bool]:
        """``keep`` for each (fh, word), under one lock: one bool each."""
        out = []
        self._lock()        # never into a slot freed and reused meanwhile
        try:
            q, capacity = self.slots, self.capacity
            for fh, word in kept:
                s, gen = fh & SLOT_MASK, fh >> SLOT_BITS
                ok = 1 <= s <= capacity and gen != 0 and q[s * _WORDS + _F_GEN] == gen
                if ok:
                    q[s * _WORDS + _F_KEPT] = word
                out.append(ok)
        finally:
            self._unlock()
        return out

    def live(self, fh: int) -> bool:
        s = fh & SLOT_MASK
        return 1 <= s <= self.capacity and self.slots[s * _WORDS] == fh >> SLOT_BITS

    def free(self, fh: int) -> int:
        """RELEASE: free a live fh; the released count this free made (its
        ordinal, >= 1), 0 if it was not live (released meanwhile on another
        queue, or never existed)."""
        s, gen = fh & SLOT_MASK, fh >> SLOT_BITS
        if not 1 <= s <= self.capacity or not gen:
            return 0
        self._lock()
        try:
            hdr, q, base = self._hdr, self.slots, s * _WORDS
            if q[base + _F_GEN] != gen:
                return 0
            q[base + _F_GEN] = 0          # dead from here on
            q[base + _F_OWNER] = 0
            q[base + _F_KEPT] = 0
            if q[base + _F_KIND] == KIND_LOCK:
                hdr[_H_LOCKS] -= 1
            q[base + _F_NEXT] = hdr[_H_FREE]
            hdr[_H_FREE] = s
            hdr[_H_LIVE] -= 1
            hdr[_H_RELEASED] += 1
            return hdr[_H_RELEASED]
        finally:
            self._unlock()

    def reset(self) -> None:
        """INIT/DESTROY: every fh unknown from now on."""
        self._lock()
        try:
            hdr, q = self._hdr, self.slots
            for s in range(1, hdr[_H_HIGH]):
                q[s * _WORDS + _F_GEN] = 0
                q[s * _WORDS + _F_OWNER] = 0
                q[s * _WORDS + _F_KEPT] = 0
            hdr[_H_HIGH] = 1
            hdr[_H_FREE] = 0
            hdr[_H_LIVE] = 0
            hdr[_H_LOCKS] = 0
            hdr[_H_RELEASED] += 1
        finally:
            self._unlock()

    @property
    def released(self) -> int:
        """How many fhs were freed so far (one aligned read)."""
        return self._hdr[_H_RELEASED]

    def __len__(self) -> int:
        return self._hdr[_H_LIVE]

    def close(self) -> None:
        self._close_lock()
        self._hdr.release()
        self.slots.release()
        self._mm.close()
        if self._fd >= 0:
            os.close(self._fd)
