"""Inode identity: the ``InodeTable`` every process of one daemon shares.

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

Each request worker's O_PATH fds of these inodes are its ``InodeCache``
(inodecache.py).

Memory: an anonymous ``memfd_create`` file mapped ``MAP_SHARED`` by the
supervisor *before* it forks the workers, so every worker shares the pages
without naming anything in the file system. Not
``multiprocessing.shared_memory``: in Python 3.11 it registers every segment
with a resource-tracker helper process (which unlinks it, with a warning,
when *any* process using it exits) and it is a named ``/dev/shm`` object that
stays behind when the daemon is killed. A memfd has no name, needs no
tracker and vanishes with its last mapping. Pages are touched lazily, so a
table sized for a million inodes costs only what is used.

Locking (filetable.LockedTable): every mutation holds the table's lock,
one of two kinds fixed for the table's life. With the extension built (and
no PYVIRTIOFSD_PURE), its ``TableLock`` (_tablelock.h): a compare-and-swap
of a header word when free, a futex sleep when not, no system call
uncontended; each process keeps a POSIX record lock on a byte of its own
(``LIVE_BASE + id``) for life, so a waiter finds a dead holder and takes
its lock over. Otherwise a classic POSIX record lock (``fcntl.lockf``) on
byte 0 of the memfd. Either way the lock is per *process* (forked children
do not inherit record locks; a child takes its own id) and a worker
killed while holding it cannot deadlock the others. (OFD locks would be
wrong here: the open file description is shared across fork, so all
processes would be one owner.) A process-local ``threading.Lock`` adds
mutual exclusion between threads of one process. Never open or close
another fd on the memfd in a process: closing *any* fd of the file
releases the process's POSIX locks (the liveness byte included).

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

import mmap
import os

from daemon.fuse.filetable import MAX_CAPACITY as MAX_FILES
from daemon.fuse.filetable import FileTable, LockedTable, shared_mapping, take_slot
from daemon.log import get_logger

log = get_logger("fuse.inodes")

MAGIC = 0x31544E49534F4950  # "PIOSINT1"
RING = 4096  # freed-nodeid ring entries
HANDLE_MAX = 64  # bytes of ``struct file_handle`` (header included) kept per slot

# header words (u64)
_H_MAGIC, _H_CAPACITY, _H_GEN, _H_HIGH, _H_FREE, _H_LIVE, _H_RING_W, _H_DIRTY, \
    _H_EPOCH, _H_ROOT, _H_SESSION, _H_LOCK, _H_LOCK_IDS = range(13)
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

    def __init__(self, capacity: int, open_files: int = 0, lock: str | None = None):
        """``open_files``: also make the shared open-file table
        (``self.files``, filetable.py) with that many fhs; INIT and DESTROY
        reset it with the nodeids. 0: none (each session makes its own).
        ``lock``: how both tables lock, ``"futex"`` or ``"record"``
        (filetable.LockedTable); None: ``shared_lock_kind()``."""
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
        self.files = FileTable(min(open_files, MAX_FILES), lock=lock) if open_files else None
        mv = memoryview(self._mm)
        self._hdr = mv[:slots_off].cast("Q")
        # slot n's word w is self._q[n * _SLOT_WORDS + w]
        self._q = mv[slots_off:hash_off].cast("Q")
        self._hash = mv[hash_off:ring_off].cast("I")
        self._ring = mv[ring_off:size].cast("I")
        self._slot_bytes = mv[slots_off:hash_off]
        self._hash_bytes = mv[hash_off:ring_off]
        self._slots_off, self._hash_off = slots_off, hash_off
        self._init_lock(lock)
        hdr = self._hdr
        hdr[_H_MAGIC] = MAGIC
        hdr[_H_CAPACITY] = capacity
        hdr[_H_HIGH] = 2

    # -- locking (LockedTable: _lock/_unlock) ----------------------------------
    _DIRTY, _LOCK, _IDS = _H_DIRTY, _H_LOCK, _H_LOCK_IDS

    def prepare_lock(self) -> None:
        super().prepare_lock()
        if self.files is not None:
            self.files.prepare_lock()

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
        self._close_lock()
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
