"""The compiled virtqueue core against the pure-Python reference.

``outcome`` lays one input (format: ``image.py``) into guest RAM, drives a
VirtQueue class over it the way a worker does (pop until empty or
``VirtQueueError``, push every chain with its writable size, publish once)
and returns everything observable: per chain its head and the (file
offset, length) of each readable and writable view, the error message,
``last_avail_idx``, ``published_idx``, what ``publish`` returned, and the
bytes of the used ring (elements, used.idx, avail_event). ``compare`` runs
it for both classes on the same image and raises AssertionError on any
difference. Used by tests/unit/test_compiled_equivalence.py (hypothesis)
and by the fuzz target (every input, under ASan/UBSan in ``make fuzz-asan``).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

from tests.fuzz import image

ZERO = bytes(image.MEM_SIZE)
RINGS_END = image.USED_GPA + 4 + 8 * (1 << image.MAX_LOG2) + 2  # region 0 starts at file offset 0


def address(buf) -> int:
    """Virtual address of a writable buffer (mmap or memoryview)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def where(maps: list[tuple[int, int]], view: memoryview) -> tuple[int, int]:
    """(file offset, length) of a view into one of the daemon's mappings
    ``maps`` = [(base address, end)], each mapping from file offset 0."""
    addr = address(view)
    for base, end in maps:
        if base <= addr < end:
            return addr - base, len(view)
    raise AssertionError("a chain buffer outside every guest memory mapping")


class Image:
    """One memfd of guest RAM mapped by the harness and by ``GuestMemory``."""

    def __init__(self):
        from daemon.virtio.memory import GuestMemory
        self.memfd = os.memfd_create("differential-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, image.MEM_SIZE)
        self.ram = mmap.mmap(self.memfd, image.MEM_SIZE)
        self.data_len = 0
        self.mem = GuestMemory.from_regions(list(image.REGIONS), [os.dup(self.memfd) for _ in image.REGIONS])
        self.maps = []
        for region in self.mem._regions:
            base = address(region.mm)
            self.maps.append((base, base + len(region.mm)))

    def lay(self, lay: image.Layout) -> None:
        """Write the input's rings and data area into a zeroed RAM. Only the
        rings and the data area are ever written (by ``lay`` and the used
        ring stores), so only those are zeroed again: [0, RINGS_END) and
        the data the previous input left."""
        ram = self.ram
        ram[:RINGS_END] = ZERO[:RINGS_END]
        off = image.file_offset(image.DATA_GPA)
        ram[off:off + self.data_len] = ZERO[:self.data_len]
        self.data_len = len(lay.data)
        image.write(ram, lay)

    def where(self, view: memoryview) -> tuple[int, int]:
        return where(self.maps, view)

    def close(self) -> None:
        self.maps.clear()
        self.mem.close()
        self.ram.close()
        os.close(self.memfd)


def outcome(img: Image, lay: image.Layout, queue_class, error_class) -> list:
    img.lay(lay)
    seen: list = []
    q = queue_class(img.mem, lay.num, image.qva(image.DESC_GPA), image.qva(image.AVAIL_GPA),
                    image.qva(image.USED_GPA), lay.last_avail, lay.event_idx)
    try:
        for _ in range(lay.num + 1):
            try:
                chain = q.pop()
            except error_class as e:
                seen.append(("error", str(e)))
                break
            if chain is None:
                seen.append(("empty",))
                break
            rd, wr = chain.readable, chain.writable
            seen.append(("chain", chain.head, rd.size, [img.where(v) for v in rd.views],
                         wr.size, [img.where(v) for v in wr.views], q.last_avail_idx))
            q.push(chain.head, wr.size)
            chain.release()
        seen.append(("pending", q.pending, q.published_idx))
        seen.append(("publish", q.publish(), q.published_idx, q.pending, q.last_avail_idx))
        # a second batch, signalled or not by the guest's used_event (EVENT_IDX)
        struct.pack_into("<H", img.ram, image.AVAIL_GPA + 4 + 2 * lay.num, lay.avail_idx)
        q.push(lay.last_avail % lay.num, lay.used_idx)
        seen.append(("publish", q.publish(), q.published_idx, q.pending))
        seen.append(("used", q.used_heads(lay.used_idx, lay.num)))
    finally:
        q.release()
    used_at = image.file_offset(image.USED_GPA)
    seen.append(("ring", bytes(img.ram[used_at:used_at + lay.used_ring_bytes])))
    return seen


def compare(img: Image, data: bytes) -> list:
    """Both paths on the input ``data``; AssertionError on any difference.
    Returns the (common) outcome."""
    from daemon.virtio import compiled, virtqueue
    lay = image.Layout(data)
    pure = outcome(img, lay, virtqueue.VirtQueue, virtqueue.VirtQueueError)
    fast = outcome(img, lay, compiled.CompiledVirtQueue, virtqueue.VirtQueueError)
    if pure != fast:
        for a, b in zip(pure, fast):
            if a != b:
                raise AssertionError(f"compiled path differs from the reference:\n  pure     {a}\n  compiled {b}")
        raise AssertionError(f"compiled path differs from the reference: {len(pure)} vs {len(fast)} steps")
    return pure
