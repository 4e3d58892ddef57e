"""Inode identity: the shared ``InodeTable`` and each worker's ``InodeCache``.

The guest names files by *nodeid*. A nodeid stands for one host inode,
identified by ``(st_dev, st_ino)``, from the reply that first told the guest
about it (LOOKUP, MKDIR, READDIRPLUS...) until the guest FORGETs it, and the
daemon must count lookups exactly as the kernel does (docs/protocol.md, "Lookup counts").

``InodeTable`` holds that state for every process of one daemon:

- nodeid = slot index; slot 1 is the share's root (pinned, generation 0, as
  the kernel wants for FUSE_ROOT_ID); nodeid 0 is never valid.
- a slot: generation, refcount, dev, ino, free-list link, and optionally the
  inode's file handle (``name_to_handle_at``) so a worker that never looked
  the inode up (a restarted worker, a second request worker) can reopen it.
- an open-addressing hash index (dev, ino) → slot (linear probing, deletion
  by backward shift, so no tombstones) — two processes looking up the same
  inode, or two hard links, always get one nodeid.
- generations come from one 64-bit counter that is never reset, not even by
  ``reset()``: (nodeid, generation) is unique over the table's life, and a
  generation alone tells a worker whether a nodeid still means what it
  cached.
- a ring of freed nodeids with a monotonic write cursor: a worker passes the
  cursor it last saw to ``freed_since`` to learn which of its cached O_PATH
  fds to close. More than ``RING`` frees since (or a ``reset``) is reported
  as an overflow, and the worker then checks every fd it holds.
- bounded: ``capacity`` nodeids (root included); one more is ENFILE.

Memory: an anonymous ``memfd_create`` file mapped ``MAP_SHARED`` by the
supervisor *before* it forks the workers, so every worker shares the pages
without naming anything in the file system. Not
``multiprocessing.shared_memory``: in Python 3.11 it registers every segment
with a resource-tracker helper process (which unlinks it, with a warning,
when *any* process using it exits) and it is a named ``/dev/shm`` object that
stays behind when the daemon is killed. A memfd has no name, needs no
tracker and vanishes with its last mapping. Pages are touched lazily, so a
table sized for a million inodes costs only what is used.

Locking: every mutation holds a classic POSIX record lock (``fcntl.lockf``)
on byte 0 of the memfd. Those locks belong to the *process*: forked children
do not inherit them (parent and children exclude each other), and the
kernel drops them when the holder dies, so a worker killed while holding
the lock cannot deadlock the others. (OFD locks would be wrong here: the
open file description is shared across fork, so all processes would be
one owner.) A process-local ``threading.Lock`` adds mutual exclusion
between threads of one process, which POSIX locks do not give. Never open
or close another fd on the memfd in a process: closing *any* fd of the file
releases the process's POSIX locks.

A holder that dies mid-update may leave the index half shifted or the free
list short: the ``DIRTY`` word is set while the lock is held, and the next
locker that finds it set rebuilds the index and the free list from the
slots (the slots themselves are written so that a slot is live exactly when
its generation word is non-zero, written last on insert and first on free).

Readers do not lock: ``generation()``/``get()`` read aligned 64-bit words
(one load each on x86-64, as the used-ring index store in virtio/), and a
generation match is all a worker needs to trust its cached fd.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
import threading
from typing import Callable

from daemon.fuse.filetable import MAX_CAPACITY as MAX_FILES
from daemon.fuse.filetable import FileTable, LockedTable, shared_mapping, take_slot
from daemon.fuse.request import FUSEError
from daemon.log import get_logger

log = get_logger("fuse.inodes")

MAGIC = 0x31544E49534F4950  # "PIOSINT1"
RING = 4096  # freed-nodeid ring entries
HANDLE_MAX = 64  # bytes of ``struct file_handle`` (header included) kept per slot

# header words (u64)
_H_MAGIC, _H_CAPACITY, _H_GEN, _H_HIGH, _H_FREE, _H_LIVE, _H_RING_W, _H_DIRTY, \
    _H_EPOCH, _H_ROOT, _H_SESSION = range(11)
_HDR_WORDS = 16
# slot words (u64): generation, refcount, dev, ino, next free, handle length,
# owner word (fuse/peers.py: which request worker holds the inode's O_PATH fd,
# and its number there), then HANDLE_MAX bytes of handle
_S_GEN, _S_REF, _S_DEV, _S_INO, _S_NEXT, _S_HLEN, _S_OWNER, _S_HANDLE = range(8)
_SLOT_WORDS = _S_HANDLE + HANDLE_MAX // 8
_U64 = (1 << 64) - 1


def _home(dev: int, ino: int, mask: int) -> int:
    """Where (dev, ino) starts probing in the index. Inodes created together
    get neighbouring numbers on the usual file systems: each run of 64 such
    numbers shares one 256-byte stretch of the index (one page touched, not
    64 scattered ones: the index is sized for a million inodes and every
    page a process touches is memory it pays for), and the runs are
    scattered by a multiplicative hash so that no pattern of numbers piles
    up in one place."""
    h = (((ino >> 6) * 0x9E3779B97F4A7C15) ^ (dev * 0xC2B2AE3D27D4EB4F)) & _U64
    return (((h ^ (h >> 31)) << 6) | (ino & 63)) & mask


class InodeTable(LockedTable):
    """Shared nodeid ↔ (dev, ino) table with lookup counts (see module doc).

    Create it in the parent before forking; use it from any process.
    """

    def __init__(self, capacity: int, open_files: int = 0):
        """``open_files``: also make the shared open-file table
        (``self.files``, filetable.py) with that many fhs; INIT and DESTROY
        reset it with the nodeids. 0: none (each session makes its own)."""
        if capacity < 2:
            raise ValueError("an inode table needs room for the root and one inode")
        if capacity >= 1 << 31:
            raise ValueError("capacity too large")
        self.capacity = capacity
        hsize = 1
        while hsize < 2 * (capacity + 1):
            hsize <<= 1
        self._hmask = hsize - 1
        slots_off = _HDR_WORDS * 8
        hash_off = slots_off + (capacity + 1) * _SLOT_WORDS * 8
        ring_off = hash_off + hsize * 4
        size = ring_off + RING * 4
        self._fd, self._mm = shared_mapping("pyvirtiofsd-inodes", size)
        self.files = FileTable(min(open_files, MAX_FILES)) if open_files else None
        mv = memoryview(self._mm)
        self._hdr = mv[:slots_off].cast("Q")
        # slot n's word w is self._q[n * _SLOT_WORDS + w]
        self._q = mv[slots_off:hash_off].cast("Q")
        self._hash = mv[hash_off:ring_off].cast("I")
        self._ring = mv[ring_off:size].cast("I")
        self._slot_bytes = mv[slots_off:hash_off]
        self._hash_bytes = mv[hash_off:ring_off]
        self._slots_off, self._hash_off = slots_off, hash_off
        self._tlock = threading.Lock()
        hdr = self._hdr
        hdr[_H_MAGIC] = MAGIC
        hdr[_H_CAPACITY] = capacity
        hdr[_H_HIGH] = 2

    # -- locking (LockedTable: _lock/_unlock) ----------------------------------
    _DIRTY = _H_DIRTY

    def _repair(self) -> None:
        """Rebuild the index, the free list and the live count from the
        slots after a lock holder died mid-update."""
        log.warning("inode table: a process died while updating it; rebuilding the index")
        q, hdr, hmask = self._q, self._hdr, self._hmask
        self._zero_range(self._hash_off, len(self._hash_bytes))
        free = 0
        live = 0
        high = min(hdr[_H_HIGH], self.capacity + 1)
        for s in range(high - 1, 1, -1):
            base = s * _SLOT_WORDS
            if q[base + _S_GEN]:
                self._hash_insert(s, q[base + _S_DEV], q[base + _S_INO], hmask)
                live += 1
            else:
                q[base + _S_NEXT] = free
                free = s
        if hdr[_H_ROOT]:
            self._hash_insert(1, q[_SLOT_WORDS + _S_DEV], q[_SLOT_WORDS + _S_INO], hmask)
        hdr[_H_FREE] = free
        hdr[_H_LIVE] = live
        # workers must re-check every fd they hold
        hdr[_H_RING_W] += RING + 1

    def _zero_range(self, offset: int, nbytes: int) -> None:
        """Zero ``nbytes`` of the table at ``offset``. Whole pages are given
        back to the memfd (MADV_REMOVE punches a hole: they read as zeros
        and cost no memory until written again), so a reset of a table
        sized for a million inodes does not make every process that shares
        it pay for 16 MiB of zeros; only the ragged edges are written."""
        end = offset + nbytes
        first = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        mv = memoryview(self._mm)
        try:
            if last > first:
                try:
                    self._mm.madvise(mmap.MADV_REMOVE, first, last - first)
                except OSError:
                    first = last = offset  # not possible here: write the zeros
                _zero(mv[offset:first], first - offset)
                _zero(mv[last:end], end - last)
            else:
                _zero(mv[offset:end], nbytes)
        finally:
            mv.release()

    # -- hash index ------------------------------------------------------------
    def _find(self, dev: int, ino: int) -> tuple[int, int]:
        """(index position, slot) of (dev, ino); slot 0 and the free position
        where it would go when absent."""
        h, q, mask = self._hash, self._q, self._hmask
        i = _home(dev, ino, mask)
        while True:
            s = h[i]
            if not s:
                return i, 0
            base = s * _SLOT_WORDS
            if q[base + _S_INO] == ino and q[base + _S_DEV] == dev:
                return i, s
            i = (i + 1) & mask

    def _hash_insert(self, slot: int, dev: int, ino: int, mask: int) -> None:
        h = self._hash
        i = _home(dev, ino, mask)
        while h[i]:
            i = (i + 1) & mask
        h[i] = slot

    def _hash_remove(self, slot: int) -> None:
        h, q, mask = self._hash, self._q, self._hmask
        base = slot * _SLOT_WORDS
        i = _home(q[base + _S_DEV], q[base + _S_INO], mask)
        while h[i] != slot:
            if not h[i]:  # pragma: no cover - index out of step with slots
                return
            i = (i + 1) & mask
        j = i
        while True:
            j = (j + 1) & mask
            t = h[j]
            if not t:
                break
            tb = t * _SLOT_WORDS
            k = _home(q[tb + _S_DEV], q[tb + _S_INO], mask)
            # t may move into the hole at i unless its home lies cyclically in (i, j]
            if (i < k <= j) if i <= j else (k > i or k <= j):
                continue
            h[i] = t
            i = j
        h[i] = 0

    # -- API ---------------------------------------------------------------------
    def reset(self, root_dev: int, root_ino: int) -> None:
        """Start a new session (INIT, DESTROY): forget every nodeid, make
        nodeid 1 the root (dev, ino). Workers see an overflow in
        ``freed_since`` and drop every fd they cached."""
        self._lock()
        try:
            hdr = self._hdr
            high = min(hdr[_H_HIGH], self.capacity + 1)
            # zero the slots that were ever used, then the index
            self._zero_range(self._slots_off, high * _SLOT_WORDS * 8)
            self._zero_range(self._hash_off, len(self._hash_bytes))
            q = self._q
            base = _SLOT_WORDS
            q[base + _S_DEV] = root_dev
            q[base + _S_INO] = root_ino
            q[base + _S_REF] = 1
            hdr[_H_ROOT] = 1
            self._hash_insert(1, root_dev, root_ino, self._hmask)
            hdr[_H_HIGH] = 2
            hdr[_H_FREE] = 0
            hdr[_H_LIVE] = 0
            hdr[_H_EPOCH] += 1
            hdr[_H_RING_W] += RING + 1
        finally:
            self._unlock()

    def ref(self, dev: int, ino: int, handle: bytes = b"", owner: int = 0) -> tuple[int, int, bool]:
        """+1 lookup on (dev, ino), inserting it if unknown.

        Returns (nodeid, generation, inserted). The root is found as nodeid
        1, generation 0 (its count is pinned). ``handle`` (a ``struct
        file_handle`` as bytes, at most HANDLE_MAX) and ``owner`` (the
        inserting worker's owner word for its fd, peers.py) are stored only
        on insertion. FUSEError(ENFILE) when the table is full.
        """
        self._lock()
        try:
            _, s = pos_slot = self._find(dev, ino)
            q = self._q
            if s:
                base = s * _SLOT_WORDS
                if s != 1:
                    q[base + _S_REF] += 1
                return s, q[base + _S_GEN], False
            hdr = self._hdr
            s = take_slot(hdr, _H_FREE, _H_HIGH, q, _SLOT_WORDS, _S_NEXT, self.capacity)
            base = s * _SLOT_WORDS
            q[base + _S_REF] = 1
            q[base + _S_DEV] = dev
            q[base + _S_INO] = ino
            q[base + _S_NEXT] = 0
            q[base + _S_OWNER] = owner
            self._store_handle(base, handle)
            gen = hdr[_H_GEN] + 1
            hdr[_H_GEN] = gen
            q[base + _S_GEN] = gen  # live from here on
            self._hash[pos_slot[0]] = s
            hdr[_H_LIVE] += 1
            return s, gen, True
        finally:
            self._unlock()

    def _store_handle(self, base: int, handle: bytes) -> None:
        n = len(handle)
        if not n or n > HANDLE_MAX:
            self._q[base + _S_HLEN] = 0
            return
        off = (base + _S_HANDLE) * 8
        self._slot_bytes[off:off + n] = handle
        self._q[base + _S_HLEN] = n

    def set_handle(self, nodeid: int, generation: int, handle: bytes) -> None:
        """Attach a file handle to a live nodeid (no-op if it changed)."""
        if not 2 <= nodeid <= self.capacity or len(handle) > HANDLE_MAX:
            return
        self._lock()
        try:
            base = nodeid * _SLOT_WORDS
            if self._q[base + _S_GEN] == generation:
                self._store_handle(base, handle)
        finally:
            self._unlock()

    def unref(self, nodeid: int, nlookup: int) -> None:
        """FORGET: -nlookup on nodeid; frees it at 0. The root, unknown or
        free nodeids and nlookup 0 are ignored (FORGET has no reply)."""
        if nodeid < 2 or nodeid > self.capacity or nlookup <= 0:
            return
        self._lock()
        try:
            self._unref_locked(nodeid, nlookup)
        finally:
            self._unlock()

    def unref_many(self, pairs) -> None:
        """BATCH_FORGET: ``unref`` for each (nodeid, nlookup), one lock."""
        self._lock()
        try:
            cap = self.capacity
            for nodeid, nlookup in pairs:
                if 2 <= nodeid <= cap and nlookup > 0:
                    self._unref_locked(nodeid, nlookup)
        finally:
            self._unlock()

    def _unref_locked(self, nodeid: int, nlookup: int) -> None:
        q = self._q
        base = nodeid * _SLOT_WORDS
        if not q[base + _S_GEN]:
            return
        refs = q[base + _S_REF]
        if nlookup < refs:
            q[base + _S_REF] = refs - nlookup
            return
        hdr = self._hdr
        q[base + _S_GEN] = 0  # dead from here on
        self._hash_remove(nodeid)
        q[base + _S_REF] = 0
        q[base + _S_HLEN] = 0
        q[base + _S_OWNER] = 0
        q[base + _S_NEXT] = hdr[_H_FREE]
        hdr[_H_FREE] = nodeid
        hdr[_H_LIVE] -= 1
        w = hdr[_H_RING_W]
        self._ring[w % RING] = nodeid
        hdr[_H_RING_W] = w + 1

    def get(self, nodeid: int) -> tuple[int, int, int, int] | None:
        """(generation, dev, ino, refcount) of a live nodeid, else None."""
        if nodeid == 1:
            if not self._hdr[_H_ROOT]:
                return None
        elif not 2 <= nodeid <= self.capacity:
            return None
        q = self._q
        base = nodeid * _SLOT_WORDS
        gen = q[base + _S_GEN]
        if not gen and nodeid != 1:
            return None
        dev, ino, refs = q[base + _S_DEV], q[base + _S_INO], q[base + _S_REF]
        if q[base + _S_GEN] != gen:
            return None  # freed (and maybe reused) while we read
        return gen, dev, ino, refs

    def generation(self, nodeid: int) -> int:
        """The generation of a live nodeid ≥ 2, 0 if it is not live."""
        if not 2 <= nodeid <= self.capacity:
            return 0
        return self._q[nodeid * _SLOT_WORDS]

    def owner(self, nodeid: int) -> int:
        """The owner word of a nodeid >= 2 (peers.py), 0 if none. Read
        the generation before and after: it is only valid in between."""
        if not 2 <= nodeid <= self.capacity:
            return 0
        return self._q[nodeid * _SLOT_WORDS + _S_OWNER]

    def claim(self, nodeid: int, generation: int, owner: int) -> None:
        """Make ``owner`` the owner word of a live (nodeid, generation)."""
        if 2 <= nodeid <= self.capacity and owner:
            base = nodeid * _SLOT_WORDS
            if self._q[base + _S_GEN] == generation:
                self._q[base + _S_OWNER] = owner

    def disown(self, nodeid: int, owner: int) -> None:
        """Clear the owner word if it is ``owner`` (a worker about to close
        the fd it names while the nodeid lives on). Only the owner ever
        writes its own word, so this read-then-write cannot clear another's."""
        if 2 <= nodeid <= self.capacity and owner:
            i = nodeid * _SLOT_WORDS + _S_OWNER
            if self._q[i] == owner:
                self._q[i] = 0

    def handle(self, nodeid: int, generation: int) -> bytes:
        """The file handle stored for (nodeid, generation), b"" if none."""
        if not 2 <= nodeid <= self.capacity:
            return b""
        base = nodeid * _SLOT_WORDS
        n = self._q[base + _S_HLEN]
        if not n or n > HANDLE_MAX:
            return b""
        off = (base + _S_HANDLE) * 8
        blob = bytes(self._slot_bytes[off:off + n])
        if self._q[base + _S_GEN] != generation:
            return b""
        return blob

    def freed_since(self, cursor: int) -> tuple[list[int], int, bool]:
        """Nodeids freed since ``cursor`` (a value this method returned, or 0
        for a fresh worker): (nodeids, new cursor, overflowed). When
        overflowed the list is empty and the caller must re-check every
        nodeid it caches (more than RING frees, or a reset, happened)."""
        hdr = self._hdr
        w = hdr[_H_RING_W]
        if w == cursor:
            return [], cursor, False
        if w < cursor or w - cursor > RING:
            return [], w, True
        ring = self._ring
        out = [ring[i % RING] for i in range(cursor, w)]
        if hdr[_H_RING_W] - cursor > RING:  # overwritten while we copied
            return [], hdr[_H_RING_W], True
        return out, w, False

    @property
    def cursor(self) -> int:
        """The freed-ring write cursor (compare with a worker's to skip work)."""
        return self._hdr[_H_RING_W]

    @property
    def epoch(self) -> int:
        """How many times ``reset`` ran (each INIT/DESTROY)."""
        return self._hdr[_H_EPOCH]

    @property
    def session(self) -> int:
        """The FUSE session every request worker serves: the epoch of the
        INIT that started it, or 0 when none is live (before INIT, after
        DESTROY). One word, so reading it needs no lock."""
        return self._hdr[_H_SESSION]

    def begin_session(self, root_dev: int, root_ino: int) -> int:
        """INIT on any request queue: a fresh table, and a new session
        number the other request workers adopt on their next request."""
        self.reset(root_dev, root_ino)
        if self.files is not None:
            self.files.reset()
        self._hdr[_H_SESSION] = epoch = self._hdr[_H_EPOCH]
        return epoch

    def end_session(self, root_dev: int, root_ino: int) -> None:
        """DESTROY: every nodeid forgotten and no session live."""
        self._hdr[_H_SESSION] = 0
        self.reset(root_dev, root_ino)
        if self.files is not None:
            self.files.reset()

    def __len__(self) -> int:
        """Live nodeids, the root not counted."""
        return self._hdr[_H_LIVE]

    def close(self) -> None:
        """Unmap and close (tests; workers just exit)."""
        for view in (self._hdr, self._q, self._hash, self._ring, self._slot_bytes,
                     self._hash_bytes):
            view.release()
        self._mm.close()
        os.close(self._fd)
        if self.files is not None:
            self.files.close()


_ZEROS = bytes(1 << 20)


def _zero(view: memoryview, nbytes: int) -> None:
    """Zero the first nbytes of a byte view, 1 MiB at a time."""
    for start in range(0, nbytes, len(_ZEROS)):
        n = min(len(_ZEROS), nbytes - start)
        view[start:start + n] = _ZEROS[:n] if n < len(_ZEROS) else _ZEROS


# -- file handles ------------------------------------------------------------------
_AT_EMPTY_PATH = 0x1000
_MAX_HANDLE_SZ = 128
_libc = ctypes.CDLL(None, use_errno=True)
_name_to_handle_at = _libc.name_to_handle_at
_name_to_handle_at.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                               ctypes.POINTER(ctypes.c_int), ctypes.c_int)
_name_to_handle_at.restype = ctypes.c_int
_open_by_handle_at = _libc.open_by_handle_at
_open_by_handle_at.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int)
_open_by_handle_at.restype = ctypes.c_int


def file_handle(fd: int) -> bytes:
    """``struct file_handle`` of the file an fd refers to, b"" if the file
    system cannot export it (or it is larger than we keep)."""
    buf = ctypes.create_string_buffer(8 + _MAX_HANDLE_SZ)
    ctypes.c_uint32.from_buffer(buf).value = _MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    if _name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), _AT_EMPTY_PATH) != 0:
        return b""
    n = 8 + ctypes.c_uint32.from_buffer(buf).value
    return buf.raw[:n] if n <= HANDLE_MAX else b""


def open_by_handle(mount_fd: int, handle: bytes) -> int:
    """O_PATH fd of the inode ``handle`` names (OSError if it cannot)."""
    fd = _open_by_handle_at(mount_fd, handle, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


_O_LOOKUP = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class InodeCache:
    """One request worker's nodeid → (generation, O_PATH fd) map.

    Every fd is validated against the shared table on use (one 64-bit read),
    so a nodeid freed and reused by another process is never confused with
    what this worker cached.

    ``max_fds`` (only with ``use_handles``): the most fds kept. Past it,
    ``reap`` closes the oldest-cached fds of inodes that have a file handle
    in the table, down to 7/8 of the bound, and ``fd`` reopens them by
    handle when the guest names them again. So a guest may know many more
    inodes than RLIMIT_NOFILE allows fds (a ``find`` over a large tree), at
    the cost of an ``open_by_handle_at`` on the next use of an evicted one.
    Inodes without a handle (another file system under the share) stay.
    Eviction runs only in ``reap``, between batches, never while a handler
    may still hold an fd it got from ``fd``. An evicted inode that was
    unlinked on the host since is gone with its last fd: ESTALE.
    """

    def __init__(self, table: InodeTable, use_handles: bool = True,
                 close_fds: Callable[[list[int]], None] | None = None, max_fds: int | None = None,
                 peers=None):
        self.table = table
        # the other request workers (peers.py): a nodeid another worker
        # looked up is served with a copy of its fd
        self.peers = peers
        self._slots = table._q
        self.root_fd = -1
        self._root_dev = -1
        self._fds: dict[int, tuple[int, int]] = {}
        self._cursor = table.cursor
        self._use_handles = use_handles
        # open_by_handle_at wants a real (not O_PATH) fd on the file system
        self._mount_fd = -1
        # how reap() closes the fds of forgotten inodes: the session hands
        # them to a helper thread (the last close of an unlinked file frees
        # its blocks on the host, which can wait for the disk)
        self._close_fds = close_fds or close_all
        self.max_fds = max_fds if use_handles and max_fds else 0  # 0: unbounded
        self.evicted = 0  # fds closed by the bound (for tests and the log)
        # nodeid -> a new O_PATH fd through an open file on it, or -1
        # (HandleTable.inode_fd): a nodeid whose fd died with its worker
        # is served again while the guest has the file open
        self.through_open_file: Callable[[int], int] | None = None

    def __len__(self) -> int:
        return len(self._fds)

    # -- sessions ------------------------------------------------------------------
    def reset(self, root_fd: int) -> None:
        """Drop every cached fd (the table was reset); nodeid 1 = root_fd,
        which the caller keeps owning."""
        self.clear()
        self.root_fd = root_fd
        self._root_dev = os.fstat(root_fd).st_dev
        self._cursor = self.table.cursor
        if self._use_handles:
            try:
                self._mount_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                                         dir_fd=root_fd)
            except OSError as e:
                log.info("share root not readable (%s): no reopening by file handle", e)

    def clear(self) -> None:
        """Close every cached fd (DESTROY, worker exit)."""
        if self._mount_fd >= 0:
            _close(self._mount_fd)
            self._mount_fd = -1
        fds, self._fds = self._fds, {}
        for _gen, fd in fds.values():
            _close(fd)

    # -- resolution ---------------------------------------------------------------
    def fd(self, nodeid: int) -> int:
        """The O_PATH fd of a live nodeid; FUSEError(ESTALE) for nodeid 0,
        unknown, forgotten or reused nodeids (and nodes this worker cannot
        reopen)."""
        if nodeid == 1:
            if self.root_fd < 0:
                raise FUSEError(errno.ESTALE)
            return self.root_fd
        e = self._fds.get(nodeid)
        # only valid nodeids are ever cached, so no bounds check: slot word 0
        # is the generation (InodeTable.generation, inlined for GETATTR's sake)
        if e is not None and self._slots[nodeid * _SLOT_WORDS] == e[0]:
            return e[1]
        return self._reopen(nodeid)

    def _reopen(self, nodeid: int) -> int:
        old = self._fds.pop(nodeid, None)
        if old is not None:
            _close(old[1])
        info = self.table.get(nodeid)
        if info is None or nodeid == 1:
            raise FUSEError(errno.ESTALE)
        gen, dev, ino, _refs = info
        if self.peers is not None and self.peers.shared:
            fd = self._borrow(nodeid, gen, dev, ino)
            if fd >= 0:
                return fd
        if self.through_open_file is not None:
            fd = self._through_open_file(nodeid, gen, dev, ino)
            if fd >= 0:
                return fd
        handle = self.table.handle(nodeid, gen) if self._use_handles else b""
        if not handle or self._mount_fd < 0:
            raise FUSEError(errno.ESTALE)
        try:
            fd = open_by_handle(self._mount_fd, handle)
        except OSError:
            raise FUSEError(errno.ESTALE) from None
        try:
            st = os.fstat(fd)
        except OSError:
            _close(fd)
            raise
        if st.st_dev != dev or st.st_ino != ino or self.table.generation(nodeid) != gen:
            _close(fd)
            raise FUSEError(errno.ESTALE)
        self._fds[nodeid] = (gen, fd)
        return fd

    def _borrow(self, nodeid: int, gen: int, dev: int, ino: int) -> int:
        """A copy of the owner's fd of (nodeid, gen) (peers.py), cached;
        -1 if there is no live owner."""
        table = self.table
        word = table.owner(nodeid)
        if not word or table.generation(nodeid) != gen:
            return -1
        try:
            fd = self.peers.borrow(word)
        except OSError as e:
            log.warning("cannot copy inode fd from another request worker: %s", e)
            return -1
        if fd < 0:
            return -1
        if table.owner(nodeid) != word:        # another owner meanwhile: maybe not its fd
            _close(fd)
            return -1
        return self._keep_copy(nodeid, gen, dev, ino, fd)   # the last to copy owns

    def _through_open_file(self, nodeid: int, gen: int, dev: int, ino: int) -> int:
        """The inode's fd reopened through an open file on it, cached (and
        owned, for the other workers); -1 if none is open or it is not
        (dev, ino) any more."""
        assert self.through_open_file is not None
        fd = self.through_open_file(nodeid)
        return self._keep_copy(nodeid, gen, dev, ino, fd) if fd >= 0 else -1

    def _keep_copy(self, nodeid: int, gen: int, dev: int, ino: int, fd: int) -> int:
        """Cache ``fd`` (taken over) as (nodeid, gen)'s, and own it for the
        other workers, if it is inode (dev, ino) and the nodeid still means
        it; else close it: -1."""
        try:
            st = os.fstat(fd)
        except OSError:
            _close(fd)
            return -1
        table = self.table
        if st.st_dev != dev or st.st_ino != ino or table.generation(nodeid) != gen:
            _close(fd)
            return -1
        self._fds[nodeid] = (gen, fd)
        if self.peers is not None:
            table.claim(nodeid, gen, self.peers.mine(fd))
        return fd

    def lookup(self, parent_fd: int, name) -> tuple[int, int, os.stat_result]:
        """Open ``name`` (one validated component) in the parent with
        O_PATH|O_NOFOLLOW, +1 lookup on its inode: (nodeid, generation, st).
        OSError from the host, FUSEError(ENFILE) when the table is full."""
        fd = os.open(name, _O_LOOKUP, dir_fd=parent_fd)
        try:
            st = os.fstat(fd)
            return self.adopt(fd, st)
        except BaseException:
            _close(fd)
            raise

    def adopt(self, fd: int, st: os.stat_result) -> tuple[int, int, os.stat_result]:
        """+1 lookup on the inode of ``fd`` (an O_PATH fd this call takes
        over: kept in the cache or closed). (nodeid, generation, st)."""
        peers = self.peers
        nodeid, gen, inserted = self.table.ref(st.st_dev, st.st_ino,
                                               owner=peers.mine(fd) if peers is not None else 0)
        if nodeid == 1:
            _close(fd)
            return 1, 0, st
        if inserted and self._use_handles and st.st_dev == self._root_dev:
            handle = file_handle(fd)
            if handle:
                self.table.set_handle(nodeid, gen, handle)
        e = self._fds.get(nodeid)
        if e is not None:
            if e[0] == gen:
                _close(fd)
                return nodeid, gen, st
            _close(e[1])
        self._fds[nodeid] = (gen, fd)
        if not inserted and peers is not None and peers.shared:
            # the last worker to look an inode up owns it: an owner that
            # died leaves nodeids the others can still serve after the
            # guest's next lookup (a borrower checks dev/ino: a word left
            # in a reused slot is never taken for another inode)
            self.table.claim(nodeid, gen, peers.mine(fd))
        return nodeid, gen, st

    # -- forgotten nodeids -----------------------------------------------------------
    def reap(self) -> int:
        """Close the fds of nodeids freed (by FORGET, in any process) since
        the last call, and trim the cache to ``max_fds``. Returns how many
        fds of freed nodeids were closed."""
        table = self.table
        if self.max_fds and len(self._fds) > self.max_fds:
            self._trim()
        if table.cursor == self._cursor:
            return 0
        freed, self._cursor, overflow = table.freed_since(self._cursor)
        fds = self._fds
        candidates = list(fds) if overflow else freed
        doomed = []
        for nodeid in candidates:
            e = fds.get(nodeid)
            if e is not None and table.generation(nodeid) != e[0]:
                del fds[nodeid]
                doomed.append(e[1])
        if doomed:
            self._close_fds(doomed)
        return len(doomed)

    def _trim(self) -> None:
        """Close the oldest-cached fds that can be reopened by handle until
        7/8 of ``max_fds`` are left; the others move to the back."""
        fds, table = self._fds, self.table
        target = self.max_fds - self.max_fds // 8
        excess = len(fds) - target
        doomed: list[int] = []
        kept: list[int] = []
        for nodeid, e in fds.items():
            if len(doomed) >= excess:
                break
            if table.generation(nodeid) != e[0] or table.handle(nodeid, e[0]):
                doomed.append(nodeid)  # stale (reap would close it) or reopenable
            else:
                kept.append(nodeid)
        closing = [fds.pop(nodeid)[1] for nodeid in doomed]
        if self.peers is not None:
            for nodeid, fd in zip(doomed, closing):
                table.disown(nodeid, self.peers.mine(fd))
        for nodeid in kept:  # looked at: not first in line next time
            fds[nodeid] = fds.pop(nodeid)
        if closing:
            if not self.evicted:
                log.info("more than %d inode fds: closing the oldest, reopened by file handle "
                         "when used again", self.max_fds)
            self.evicted += len(closing)
            self._close_fds(closing)


def inode_fd_budget(max_fds: int | None) -> int:
    """The ``max_fds`` bound for a request worker: ``max_fds`` if given,
    else a quarter of this process's RLIMIT_NOFILE (open files may take
    half, see handles.open_file_budget; the rest is headroom for the
    lookups of one batch and a request's temporary fds), at least 64."""
    if max_fds:
        return max_fds
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(64, soft // 4)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        _close(fd)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
