"""The device side of a virtio 1.x split virtqueue (docs/protocol.md, "The split virtqueue").

The guest (driver) owns the descriptor table and the avail ring, we own the
used ring. ``pop`` takes the next available descriptor chain and returns it
as two byte streams, the device-readable and the device-writable part
(descriptor boundaries carry no meaning, docs/protocol.md, "Request layout"); ``push`` writes a
used element and ``publish`` makes every pushed element visible with a single
``used.idx`` store.

Everything in the rings is guest-controlled and read at most once per use.
A chain that breaks the rules raises ``VirtQueueError``; the ring is then
unusable (the guest driver is broken or hostile) and the caller stops
serving it. Rules enforced (spec "Message Framing"/"Indirect Descriptors"):

- a head or ``next`` index must be inside its table (ring size, or the
  indirect table's length);
- a chain is at most as long as its table (longer means a ``next`` loop);
- INDIRECT only as the last descriptor of a direct chain (usually the
  head), never inside an indirect table, never together with NEXT; the
  table length is a non-zero multiple of 16 and at most 1024 entries
  (QEMU's and libvhost-user's VIRTQUEUE_MAX_SIZE; Linux never sends more than
  its queue size, at most 1024 with QEMU 7.2: a bigger table only buys a
  hostile guest seconds of CPU per batch); the WRITE flag of the INDIRECT
  descriptor itself is ignored;
- all device-readable descriptors precede all device-writable ones;
- every buffer lies inside the memory table (no 64-bit wrap-around);
  zero-length descriptors are allowed and contribute nothing;
- ``avail.idx`` never runs more than ``num`` entries ahead of us.

Shared-memory stores: ``struct.pack_into`` zeroes its target before
writing it, so a guest reading concurrently can see a torn ``used.idx``.
``used.idx``, ``avail.idx``, the flags and the event fields are read and
written through ``memoryview.cast('H')`` views: one native 16-bit access
each (x86-64 is little-endian like virtio 1.x; the module refuses to load
on a big-endian host). Used *elements* may use ``pack_into``: the guest
reads them only after ``used.idx`` moves past them.

EVENT_IDX (bit 29), offered by the supervisor where ``EVENT_IDX_SUPPORTED``:
with it the guest kicks and expects calls only when the event fields say
so, and two orderings need a store→load fence that CPython does not have
(write ``avail_event`` then re-read ``avail.idx``; write ``used.idx`` then
read ``used_event``). ``_full_barrier`` provides one on x86-64 through a
locked instruction in libc; elsewhere EVENT_IDX is neither offered nor
accepted. Without
EVENT_IDX, ``publish`` asks for a call after every non-empty batch and
ignores ``avail.flags`` (NO_INTERRUPT is a SHOULD NOT, so calling anyway is
spec-legal), which needs no fence at all.
"""

from __future__ import annotations

import ctypes
import operator
import os
import struct
import sys

from daemon.virtio.iovec import IoVec
from daemon.virtio.memory import GuestMemory, GuestMemoryError

if sys.byteorder != "little":  # pragma: no cover - x86-64 and arm64 hosts only
    raise ImportError("virtqueue.py stores ring fields in native byte order: little-endian hosts only")

# struct vring_desc { le64 addr; le32 len; le16 flags; le16 next; };
DESC = struct.Struct("<QIHH")
# struct vring_used_elem { le32 id; le32 len; };
USED_ELEM = struct.Struct("<II")

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4

VIRTIO_RING_F_EVENT_IDX = 29
MAX_QUEUE_SIZE = 32768
MAX_INDIRECT_ENTRIES = 1024  # VIRTQUEUE_MAX_SIZE (QEMU, libvhost-user)


class VirtQueueError(Exception):
    """The ring or a chain in it is malformed: stop serving this ring."""


class Chain:
    """One popped request: its head index (for ``push``) and its two streams."""

    __slots__ = ("head", "readable", "writable")

    def __init__(self, head: int, readable: IoVec, writable: IoVec):
        self.head = head
        self.readable = readable
        self.writable = writable

    def release(self) -> None:
        """Drop the views into guest memory (see memory.py on lifetimes)."""
        self.readable.release()
        self.writable.release()


class VirtQueue:
    """A running split virtqueue over ``GuestMemory``."""

    __slots__ = ("mem", "num", "event_idx", "last_avail_idx",
                 "_mask", "_desc", "_avail", "_used", "_used_elems",
                 "_used_idx", "_published_idx", "_signalled_used", "_signalled_valid",
                 "_avail_event_slot", "_used_event_slot", "_hot")

    def __init__(self, mem: GuestMemory, num: int, desc_qva: int, avail_qva: int, used_qva: int,
                 last_avail_idx: int, event_idx: bool):
        if num <= 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
            raise VirtQueueError(f"queue size {num} is not a power of 2 up to {MAX_QUEUE_SIZE}")
        if desc_qva % 16 or avail_qva % 2 or used_qva % 4:
            raise VirtQueueError(f"misaligned ring: desc {desc_qva:#x} avail {avail_qva:#x} used {used_qva:#x}")
        if not 0 <= last_avail_idx <= 0xFFFF:
            raise VirtQueueError(f"avail index {last_avail_idx} is not a u16")
        if event_idx and _full_barrier is None:
            raise VirtQueueError(f"EVENT_IDX needs a store-load fence, not available on {os.uname().machine}")
        self.mem = mem
        self.num = num
        self.event_idx = bool(event_idx)
        self.last_avail_idx = last_avail_idx
        self._mask = num - 1
        event_bytes = 2 if event_idx else 0
        views = []
        try:
            self._hot = mem.largest_region()
            views.append(mem.qva_view(desc_qva, 16 * num))
            views.append(mem.qva_view(avail_qva, 4 + 2 * num + event_bytes).cast("H"))
            used = mem.qva_view(used_qva, 4 + 8 * num + event_bytes)
            views.append(used)
            views.append(used.cast("H"))
        except GuestMemoryError as e:
            for view in views:
                view.release()
            raise VirtQueueError(f"ring outside guest memory: {e}") from None
        self._desc = views[0]
        # u16 arrays: avail = [flags, idx, ring[num], used_event]
        #             used  = [flags, idx, (id, len) x num as 4 u16 each, avail_event]
        self._avail = views[1]
        self._used_elems = views[2]
        self._used = views[3]
        self._used_event_slot = 2 + num
        self._avail_event_slot = 2 + 4 * num
        # the used index we own; resume from what the guest memory says
        # (libvhost-user does the same at SET_VRING_ADDR)
        self._used_idx = self._published_idx = self._used[1]
        self._signalled_used = self._used_idx
        self._signalled_valid = False
        if self.event_idx:
            # a stale avail_event (from before a stop, or left by a worker
            # that died polling: fuse/_poll.h) could tell the guest not to
            # kick for entries we have not seen
            self._used[self._avail_event_slot] = last_avail_idx
        else:
            # likewise VRING_USED_F_NO_NOTIFY, the one used.flags bit: the
            # compiled wait loop sets it while it polls
            self._used[0] = 0

    # -- the driver -> device direction -------------------------------------
    def pop(self) -> Chain | None:
        """The next available chain, or None when the guest has offered no
        more. VirtQueueError if the ring or the chain is malformed."""
        last = self.last_avail_idx
        avail = self._avail
        avail_idx = avail[1]
        if avail_idx == last:
            if not self.event_idx:
                return None
            # we wrote avail_event = last at the previous pop; the guest may
            # have published a new entry without seeing it: look again after
            # a full fence (docs/protocol.md, "Ordering and Python's hazards")
            _full_barrier()
            avail_idx = avail[1]
            if avail_idx == last:
                return None
        if (avail_idx - last) & 0xFFFF > self.num:
            raise VirtQueueError(f"avail index jumped from {last} to {avail_idx} (queue size {self.num})")
        head = avail[2 + (last & self._mask)]
        last = (last + 1) & 0xFFFF
        self.last_avail_idx = last
        if self.event_idx:
            self._used[self._avail_event_slot] = last
        if head >= self.num:
            raise VirtQueueError(f"head index {head} out of range (queue size {self.num})")
        try:
            return self._walk(head)
        except GuestMemoryError as e:
            raise VirtQueueError(f"chain {head}: {e}") from None

    def _walk(self, head: int) -> Chain:
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        readable_size = writable_size = 0
        # most buffers lie in the largest region: bounds-check against it
        # inline and leave the general case (other regions, straddling,
        # out of range) to GuestMemory.gpa_views
        hot_start, hot_end, hot_view = self._hot
        gpa_views = self.mem.gpa_views
        unpack = DESC.unpack_from
        table: memoryview | bytes = self._desc
        size = self.num
        in_indirect = False
        seen_writable = False
        index = head
        budget = size  # descriptors this table may still contribute
        # adjacent buffers in the hot region are merged into one view (a run
        # [r_start, r_end) / [w_start, w_end), hot_view offsets; end -1 = no
        # run): fewer views to build here and fewer iovecs for preadv/pwritev
        # when the guest's pages are contiguous
        r_start = r_end = w_start = w_end = -1
        while True:
            if budget == 0:
                raise VirtQueueError(f"chain {head} is longer than its table ({size}): a descriptor loop")
            budget -= 1
            addr, length, flags, nxt = unpack(table, index << 4)
            if flags & DESC_F_INDIRECT:
                if in_indirect:
                    raise VirtQueueError(f"chain {head}: nested indirect descriptor")
                if flags & DESC_F_NEXT:
                    raise VirtQueueError(f"chain {head}: indirect descriptor with NEXT")
                if length == 0 or length & 15 or length > MAX_INDIRECT_ENTRIES * 16:
                    raise VirtQueueError(f"chain {head}: indirect table length {length}")
                if hot_start <= addr and addr + length <= hot_end:
                    table = hot_view[addr - hot_start:addr - hot_start + length]
                    if index == head and length > _SMALL_TABLE:
                        chain = self._walk_table(head, table)
                        if chain is not None:
                            return chain
                else:
                    parts = gpa_views(addr, length)
                    table = parts[0] if len(parts) == 1 else b"".join(parts)  # rare: straddles regions
                size = budget = length >> 4
                in_indirect = True
                index = 0
                continue
            if flags & DESC_F_WRITE:
                seen_writable = True
                if length:
                    if hot_start <= addr and addr + length <= hot_end:
                        off = addr - hot_start
                        if off == w_end:
                            w_end += length
                        else:
                            if w_end >= 0:
                                writable.append(hot_view[w_start:w_end])
                            w_start, w_end = off, off + length
                    else:
                        if w_end >= 0:
                            writable.append(hot_view[w_start:w_end])
                            w_end = -1
                        writable += gpa_views(addr, length)
                    writable_size += length
            elif seen_writable:
                raise VirtQueueError(f"chain {head}: device-readable descriptor after a writable one")
            elif length:
                if hot_start <= addr and addr + length <= hot_end:
                    off = addr - hot_start
                    if off == r_end:
                        r_end += length
                    else:
                        if r_end >= 0:
                            readable.append(hot_view[r_start:r_end])
                        r_start, r_end = off, off + length
                else:
                    if r_end >= 0:
                        readable.append(hot_view[r_start:r_end])
                        r_end = -1
                    readable += gpa_views(addr, length)
                readable_size += length
            if not flags & DESC_F_NEXT:
                if r_end >= 0:
                    readable.append(hot_view[r_start:r_end])
                if w_end >= 0:
                    writable.append(hot_view[w_start:w_end])
                return Chain(head, _iovec(readable, readable_size), _iovec(writable, writable_size))
            if nxt >= size:
                raise VirtQueueError(f"chain {head}: next index {nxt} out of range ({size})")
            index = nxt

    def _walk_table(self, head: int, table: memoryview) -> Chain | None:
        """The chain of an indirect table laid out the way the Linux driver
        writes it (virtqueue_add_split): entry i's ``next`` is i + 1, the
        device-readable entries first, NEXT on all but the last, every
        buffer non-empty and inside the hot region. Checked and decoded with
        list operations that run in C, instead of ``_walk``'s loop over
        each of the up to 257 entries of a 1 MiB READ or WRITE. None if the
        table is laid out in any other way: ``_walk`` then decides, so
        every rule (and every error) stays in one place."""
        n = len(table) >> 4
        halves = table.cast("H")
        # the last entry's next is meaningless (no NEXT flag)
        if halves[7:8 * n - 8:8].tolist() != _sequential(n - 1):
            return None
        flags = halves[6::8].tolist()
        readable_n = flags.count(DESC_F_NEXT)
        writable_n = n - readable_n
        if writable_n:
            expect = [DESC_F_NEXT] * readable_n + [DESC_F_NEXT | DESC_F_WRITE] * (writable_n - 1)
            expect.append(DESC_F_WRITE)
        else:
            expect = [DESC_F_NEXT] * (readable_n - 1)
            expect.append(0)
        if flags != expect:
            return None
        addrs = table.cast("Q")[0::2].tolist()
        lengths = table.cast("I")[2::4].tolist()
        hot_start, hot_end, hot_view = self._hot
        # max(addr) + max(len) bounds every addr + len: conservative, exact
        # checks are _walk's
        if min(addrs) < hot_start or max(addrs) + max(lengths) > hot_end or 0 in lengths:
            return None
        ends = list(map(_add, addrs, lengths))
        # merge runs of adjacent buffers (contiguous guest pages) into one view
        readable = _views(hot_view, hot_start, addrs[:readable_n], ends[:readable_n])
        writable = _views(hot_view, hot_start, addrs[readable_n:], ends[readable_n:])
        return Chain(head, _iovec(readable, sum(lengths[:readable_n])),
                     _iovec(writable, sum(lengths[readable_n:])))

    # -- the device -> driver direction -------------------------------------
    def push(self, head: int, written: int) -> None:
        """Queue a used element: ``written`` bytes went into chain ``head``'s
        writable part. Not visible to the guest before ``publish``."""
        slot = self._used_idx & self._mask
        USED_ELEM.pack_into(self._used_elems, 4 + 8 * slot, head, written)
        self._used_idx = (self._used_idx + 1) & 0xFFFF

    def publish(self) -> bool:
        """Store ``used.idx`` once for everything pushed; True if the guest
        should now be signalled (call eventfd)."""
        new = self._used_idx
        if new == self._published_idx:
            return False  # nothing pushed since the last publish
        self._used[1] = new  # one 16-bit store: never torn
        self._published_idx = new
        if not self.event_idx:
            self._signalled_used = new
            return True
        _full_barrier()
        old = self._signalled_used
        valid = self._signalled_valid
        self._signalled_used = new
        self._signalled_valid = True
        if not valid:
            return True
        return vring_need_event(self._avail[self._used_event_slot], new, old)

    def kick_after(self, n: int) -> bool:
        """With EVENT_IDX, ask the guest to kick once ``n`` chains are
        available beyond those popped (``pop`` leaves it at 1: the next
        one). Returns whether a chain is available already, looked at after
        a full fence as ``pop`` does: the guest may have published it
        without seeing the new value, and then kicks for nothing. Without
        EVENT_IDX it only says whether a chain is available."""
        if self.event_idx:
            self._used[self._avail_event_slot] = (self.last_avail_idx + n - 1) & 0xFFFF
            _full_barrier()
        return self._avail[1] != self.last_avail_idx

    @property
    def pending(self) -> int:
        """Used elements pushed but not yet published."""
        return (self._used_idx - self._published_idx) & 0xFFFF

    # -- worker restart: answering a dead worker's chains (workers/progress.py) --
    @property
    def published_idx(self) -> int:
        """``used.idx`` as last stored (the guest has seen everything before it)."""
        return self._published_idx

    def used_heads(self, start: int, count: int) -> list[int]:
        """Heads of the used elements at used indexes ``start`` ..
        ``start + count - 1`` (at most ``num``), as stored in the used ring."""
        elems, mask = self._used_elems, self._mask
        return [USED_ELEM.unpack_from(elems, 4 + 8 * ((start + i) & mask))[0]
                for i in range(min(count, self.num))]

    def chain_at(self, head: int) -> Chain:
        """Chain ``head`` walked again (one a dead worker had popped), with
        every check ``pop`` makes. VirtQueueError if it is malformed."""
        if not 0 <= head < self.num:
            raise VirtQueueError(f"head index {head} out of range (queue size {self.num})")
        try:
            return self._walk(head)
        except GuestMemoryError as e:
            raise VirtQueueError(f"chain {head}: {e}") from None

    def release(self) -> None:
        """Drop the ring views so the guest memory can be unmapped. The queue
        is unusable afterwards."""
        for view in (self._used, self._used_elems, self._avail, self._desc):
            view.release()


def _iovec(views: list[memoryview], size: int) -> IoVec:
    """IoVec(views) without re-summing the lengths we already added up."""
    iov = _new_iovec(IoVec)
    iov.views = views
    iov.size = size
    return iov


_new_iovec = object.__new__
_add = operator.add

# tables up to this many bytes (16 entries) are cheaper to walk one by one
# than to decode with _walk_table's fixed cost of list building
_SMALL_TABLE = 16 * 16
_SEQUENTIAL: dict[int, list[int]] = {}


def _sequential(n: int) -> list[int]:
    """[1, 2, .. n]: the ``next`` fields of a sequential table's first n
    entries (built once per length the guest uses)."""
    seq = _SEQUENTIAL.get(n)
    if seq is None:
        seq = _SEQUENTIAL[n] = list(range(1, n + 1))
    return seq


def _views(hot_view: memoryview, hot_start: int, addrs: list[int], ends: list[int]) -> list[memoryview]:
    """Views of [addr, end) ranges in the hot region, adjacent ones merged."""
    if not addrs:
        return []
    if addrs[1:] == ends[:-1]:  # one contiguous run (compared in C)
        return [hot_view[addrs[0] - hot_start:ends[-1] - hot_start]]
    views = []
    start = addrs[0]
    prev_end = ends[0]
    for a, e in zip(addrs[1:], ends[1:]):
        if a != prev_end:
            views.append(hot_view[start - hot_start:prev_end - hot_start])
            start = a
        prev_end = e
    views.append(hot_view[start - hot_start:prev_end - hot_start])
    return views


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """virtio_ring.h: has the index crossed ``event_idx`` going from old to new?"""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


def _make_full_barrier():
    """A store→load fence: on x86-64 any locked instruction is one, and
    glibc's ``pthread_spin_lock`` is a ``lock decl``. None elsewhere."""
    if os.uname().machine not in ("x86_64", "AMD64"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: libc (and libpthread) are loaded
        lock_fn, unlock_fn = libc.pthread_spin_lock, libc.pthread_spin_unlock
    except (OSError, AttributeError):
        return None
    spin = ctypes.c_int(1)  # 1 = unlocked in glibc
    ref = ctypes.byref(spin)

    def full_barrier() -> None:
        lock_fn(ref)
        unlock_fn(ref)

    return full_barrier


_full_barrier = _make_full_barrier()
# The supervisor offers EVENT_IDX only where a VirtQueue can honour it.
EVENT_IDX_SUPPORTED = _full_barrier is not None
