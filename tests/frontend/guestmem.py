"""Guest RAM for the vhost-user test frontend.

QEMU 7.2 with ``-object memory-backend-memfd,id=mem,size=S,share=on`` on the
``pc`` machine backs all of guest RAM with one memfd and presents it to a
vhost-user backend as two regions (docs/protocol.md, "Memory table and address translation"):

    {gpa 0x0,     size 0xa0000,        mmap_offset 0x0}
    {gpa 0xc0000, size S - 0xc0000,    mmap_offset 0xc0000}

Each region is sent with its own fd (SCM_RIGHTS duplicates of the same memfd)
and carries a QEMU virtual address ("QVA", ``userspace_addr``): the address
of the region inside QEMU's own mapping of the memfd. We fake a QEMU mapping
base so QVAs look like real userspace pointers; ring addresses in
SET_VRING_ADDR are QVAs, descriptor addresses are GPAs.

Memory hot-plug (a later SET_MEM_TABLE with one more region) is modelled by
``add_region``, which backs the new region by its own memfd, as a new
``memory-backend-memfd`` object would be.

This module is written independently of ``daemon.virtio``: it is part of the
test oracle.
"""

from __future__ import annotations

import bisect
import dataclasses
import mmap
import os
import struct

PAGE = 4096
# QEMU maps guest RAM somewhere like this in its own address space.
FAKE_QEMU_MAP_BASE = 0x7F3A_0000_0000
LOW_REGION_SIZE = 0xA0000  # 640 KiB below the VGA hole
HIGH_REGION_GPA = 0xC0000  # after the VGA/option ROM hole


class GuestMemoryError(Exception):
    """An address outside every region, or an allocator failure."""


@dataclasses.dataclass
class Region:
    gpa: int
    size: int
    qva: int
    mmap_offset: int
    fd: int  # the memfd backing this region (shared by regions of one backend)
    mm: mmap.mmap  # mapping of the whole memfd from offset 0

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def packed(self) -> bytes:
        """The 32-byte VhostUserMemoryRegion."""
        return struct.pack("<QQQQ", self.gpa, self.size, self.qva, self.mmap_offset)


class _Allocator:
    """First-fit allocator over one region's GPA range, with coalescing."""

    def __init__(self, start: int, end: int):
        self.free: list[tuple[int, int]] = [(start, end)]  # sorted, disjoint
        self.used: dict[int, int] = {}  # gpa -> size

    def alloc(self, size: int, align: int) -> int | None:
        size = max(size, 1)
        for i, (s, e) in enumerate(self.free):
            a = (s + align - 1) & ~(align - 1)
            if a + size <= e:
                del self.free[i]
                parts = []
                if s < a:
                    parts.append((s, a))
                if a + size < e:
                    parts.append((a + size, e))
                self.free[i:i] = parts
                self.used[a] = size
                return a
        return None

    def release(self, gpa: int) -> None:
        size = self.used.pop(gpa)
        s, e = gpa, gpa + size
        i = bisect.bisect_left(self.free, (s, e))
        # merge with the previous and next free ranges
        if i > 0 and self.free[i - 1][1] == s:
            s = self.free[i - 1][0]
            i -= 1
            del self.free[i]
        if i < len(self.free) and self.free[i][0] == e:
            e = self.free[i][1]
            del self.free[i]
        self.free.insert(i, (s, e))


class GuestMemory:
    """Guest RAM as memfd(s), QEMU ``pc`` layout, with a buffer allocator."""

    def __init__(self, ram_size: int = 128 << 20, qva_base: int = FAKE_QEMU_MAP_BASE):
        if ram_size <= HIGH_REGION_GPA + PAGE:
            raise ValueError("ram_size too small")
        self.regions: list[Region] = []
        self._memfds: list[int] = []
        self._maps: list[mmap.mmap] = []
        self._allocs: dict[int, _Allocator] = {}  # region gpa -> allocator
        self._casts: dict[tuple[int, str], memoryview] = {}  # (region gpa, format) -> cast view
        self._next_qva = qva_base
        fd, mm = self._new_backing("guest-ram", ram_size)
        qva = self._take_qva(ram_size)
        self._add(Region(0, LOW_REGION_SIZE, qva, 0, fd, mm))
        self._add(
            Region(HIGH_REGION_GPA, ram_size - HIGH_REGION_GPA, qva + HIGH_REGION_GPA,
                   HIGH_REGION_GPA, fd, mm)
        )
        # Leave the first page of each region unused: a GPA of 0 in a
        # descriptor is more likely a bug than a buffer.
        for a in self._allocs.values():
            a.alloc(PAGE, PAGE)

    # -- construction --------------------------------------------------------
    def _new_backing(self, name: str, size: int) -> tuple[int, mmap.mmap]:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._memfds.append(fd)
        self._maps.append(mm)
        return fd, mm

    def _take_qva(self, size: int) -> int:
        qva = self._next_qva
        self._next_qva += (size + (1 << 30) + 0xFFFFF) & ~0xFFFFF  # keep gaps
        return qva

    def _add(self, r: Region) -> None:
        self.regions.append(r)
        self.regions.sort(key=lambda x: x.gpa)
        self._allocs[r.gpa] = _Allocator(r.gpa, r.end)

    def add_region(self, gpa: int, size: int) -> Region:
        """Hot-plug: a new region backed by its own memfd (send a new
        SET_MEM_TABLE afterwards)."""
        for r in self.regions:
            if gpa < r.end and r.gpa < gpa + size:
                raise ValueError("overlapping region")
        fd, mm = self._new_backing(f"guest-ram-{gpa:#x}", size)
        r = Region(gpa, size, self._take_qva(size), 0, fd, mm)
        self._add(r)
        self._allocs[r.gpa].alloc(PAGE, PAGE)
        return r

    # -- vhost-user presentation ----------------------------------------------
    def table(self) -> tuple[bytes, list[int]]:
        """SET_MEM_TABLE payload (8 + 32n bytes, as QEMU sends it) and one fd per region."""
        payload = struct.pack("<II", len(self.regions), 0) + b"".join(
            r.packed() for r in self.regions
        )
        return payload, [r.fd for r in self.regions]

    # -- translation -------------------------------------------------------
    def region_of(self, gpa: int, length: int = 1) -> Region:
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.end:
                return r
        raise GuestMemoryError(f"gpa {gpa:#x}+{length:#x} is not inside one region")

    def qva(self, gpa: int) -> int:
        r = self.region_of(gpa)
        return r.qva + (gpa - r.gpa)

    def gpa_of_qva(self, qva: int) -> int:
        for r in self.regions:
            if r.qva <= qva < r.qva + r.size:
                return r.gpa + (qva - r.qva)
        raise GuestMemoryError(f"qva {qva:#x} is not inside a region")

    def _off(self, gpa: int, length: int) -> tuple[Region, int]:
        r = self.region_of(gpa, length)
        return r, r.mmap_offset + (gpa - r.gpa)

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of [gpa, gpa+length) (must lie in one region).
        Release it (``with`` or ``.release()``) before ``close``."""
        r, off = self._off(gpa, length)
        return memoryview(r.mm)[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        r, off = self._off(gpa, length)
        return r.mm[off:off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        r, off = self._off(gpa, len(data))
        r.mm[off:off + len(data)] = data

    def fill(self, gpa: int, length: int, byte: int) -> None:
        self.write(gpa, bytes([byte]) * length)

    def _cast(self, r: Region, fmt: str) -> memoryview:
        v = self._casts.get((r.gpa, fmt))
        if v is None:
            v = memoryview(r.mm).cast(fmt)
            self._casts[r.gpa, fmt] = v
        return v

    def store_u16(self, gpa: int, value: int) -> None:
        """One 16-bit store (no tearing; never struct.pack_into for ring indices)."""
        if gpa & 1:
            raise GuestMemoryError("unaligned u16")
        r, off = self._off(gpa, 2)
        self._cast(r, "H")[off >> 1] = value & 0xFFFF

    def load_u16(self, gpa: int) -> int:
        if gpa & 1:
            raise GuestMemoryError("unaligned u16")
        r, off = self._off(gpa, 2)
        return self._cast(r, "H")[off >> 1]

    def u16_accessor(self, gpa: int) -> tuple[memoryview, int]:
        """(cast('H') view, element index) for hot-path ring index access."""
        return self.accessor(gpa, "H")

    def accessor(self, gpa: int, fmt: str) -> tuple[memoryview, int]:
        """(view of ``gpa``'s region cast to ``fmt`` -- "H", "I" or "Q" --,
        the element index of ``gpa``) for hot loops that load and store
        whole aligned words (one store each: no tearing)."""
        size = struct.calcsize(fmt)
        r, off = self._off(gpa, size)
        if off % size:
            raise GuestMemoryError(f"gpa {gpa:#x} is not aligned for {fmt!r}")
        return self._cast(r, fmt), off // size

    # -- allocation ----------------------------------------------------------
    def alloc(self, size: int, align: int = 16, region_gpa: int | None = None) -> int:
        """Allocate guest memory; by default from the large region (then any)."""
        if region_gpa is not None:
            order = [region_gpa]
        else:
            big = max(self.regions, key=lambda r: r.size).gpa
            order = [big] + [r.gpa for r in self.regions if r.gpa != big]
        for g in order:
            a = self._allocs[g].alloc(size, align)
            if a is not None:
                return a
        raise GuestMemoryError(f"out of guest memory allocating {size} bytes")

    def free(self, gpa: int) -> None:
        for r in self.regions:
            if r.gpa <= gpa < r.end:
                self._allocs[r.gpa].release(gpa)
                return
        raise GuestMemoryError(f"free of unknown gpa {gpa:#x}")

    # -- lifetime --------------------------------------------------------------
    def close(self) -> None:
        for v in self._casts.values():
            v.release()
        self._casts.clear()
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:  # a caller still holds a view; leave it to GC
                pass
        self._maps.clear()
        for fd in self._memfds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._memfds.clear()
