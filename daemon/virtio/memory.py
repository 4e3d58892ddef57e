"""Guest RAM as the vhost-user memory table describes it.

QEMU sends the table (SET_MEM_TABLE, forwarded by the supervisor as
MEM_TABLE): per region a guest-physical address (GPA), a size, QEMU's own
virtual address of the region (QVA, "userspace_addr") and the offset of the
region inside the fd it sends along. ``GuestMemory`` maps every fd the way
libvhost-user does (``size + mmap_offset`` bytes from offset 0, MAP_SHARED,
so hugepage alignment holds) and translates the two kinds of addresses the
worker sees (docs/protocol.md, "Memory table and address translation"):

- descriptor ``addr`` fields are GPAs: ``gpa_views`` (a buffer may straddle
  adjacent regions, so the answer is a list of views);
- ring addresses from SET_VRING_ADDR are QVAs: ``qva_view`` (one region).

Every address comes from the guest or QEMU, so every translation is bounds
checked and an address range that wraps past 2^64 is refused.

Lifetimes. A ``memoryview`` of an ``mmap`` pins it: ``mmap.close()`` raises
``BufferError`` while any view exists. Views handed out here are slices of
one base view per region, so they all share that region's single export.
Callers must ``release()`` the views they keep (``IoVec.release()``,
``VirtQueue.release()``) before or soon after ``close()``; views that are
simply dropped are released by reference counting. ``close()`` releases the
base views and closes every mapping it can; a mapping still pinned by a
caller's view stays mapped, safely, until that view goes (it is never
unmapped under a live view), and ``close()`` logs how many remained.

File descriptors: the fds received with the table are all closed by
``from_regions``. CPython's ``mmap`` object keeps a private dup of its fd
until the mapping is closed, so a mapped table holds one fd per region (at
most 8) — count them in a worker's RLIMIT_NOFILE.
"""

from __future__ import annotations

import mmap
import os

from daemon.log import get_logger

log = get_logger("virtio.memory")

U64_LIMIT = 1 << 64


class GuestMemoryError(Exception):
    """An address outside the memory table, or a table that cannot be mapped."""


class _Region:
    __slots__ = ("gpa", "gpa_end", "qva", "qva_end", "mm", "view")

    def __init__(self, gpa: int, size: int, qva: int, mm: mmap.mmap, view: memoryview):
        self.gpa = gpa
        self.gpa_end = gpa + size
        self.qva = qva
        self.qva_end = qva + size
        self.mm = mm
        self.view = view  # the region's bytes: mm[mmap_offset : mmap_offset+size]


class GuestMemory:
    """The mapped memory table of one SET_MEM_TABLE."""

    __slots__ = ("_regions", "_closed")

    def __init__(self, regions: list[_Region]):
        # sorted by GPA so a straddling buffer continues in the next entry
        self._regions = sorted(regions, key=lambda r: r.gpa)
        self._closed = False

    @classmethod
    def from_regions(cls, regions: list[tuple[int, int, int, int]], fds: list[int]) -> GuestMemory:
        """Map ``regions`` = [(gpa, size, qva, mmap_offset)], one fd each.

        Every fd in ``fds`` is closed before this returns or raises: the
        mappings keep the memory, the fds are not needed afterwards."""
        mapped: list[_Region] = []
        try:
            if len(regions) != len(fds):
                raise GuestMemoryError(f"{len(regions)} regions but {len(fds)} fds")
            for (gpa, size, qva, offset), fd in zip(regions, fds):
                mapped.append(_map_region(gpa, size, qva, offset, fd))
            _check_disjoint(mapped, "gpa", "gpa_end", "guest physical")
            _check_disjoint(mapped, "qva", "qva_end", "QEMU virtual")
        except BaseException:
            for region in mapped:
                _unmap(region)
            raise
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        return cls(mapped)

    # -- translation -------------------------------------------------------
    def gpa_views(self, gpa: int, length: int) -> list[memoryview]:
        """Views covering ``[gpa, gpa+length)``, one per region crossed.

        Zero-length ranges are valid anywhere and map to no view."""
        if length <= 0:
            if length == 0:
                return []
            raise GuestMemoryError(f"negative length {length}")
        end = gpa + length
        if gpa < 0 or end > U64_LIMIT:
            raise GuestMemoryError(f"GPA range {gpa:#x}+{length:#x} overflows 64 bits")
        for region in self._regions:
            if region.gpa <= gpa < region.gpa_end:
                if end <= region.gpa_end:  # the common case: one region
                    offset = gpa - region.gpa
                    return [region.view[offset:offset + length]]
                return self._straddling_views(gpa, end)
        raise GuestMemoryError(f"GPA {gpa:#x} is outside guest memory")

    def _straddling_views(self, gpa: int, end: int) -> list[memoryview]:
        views = []
        for region in self._regions:
            if region.gpa_end <= gpa:
                continue
            if region.gpa > gpa:
                break  # a hole between regions
            offset = gpa - region.gpa
            stop = min(end, region.gpa_end)
            views.append(region.view[offset:stop - region.gpa])
            gpa = stop
            if gpa == end:
                return views
        for view in views:
            view.release()
        raise GuestMemoryError(f"GPA {gpa:#x} (inside a buffer ending at {end:#x}) is outside guest memory")

    def qva_view(self, qva: int, length: int) -> memoryview:
        """One view of ``[qva, qva+length)``, which must lie in one region."""
        if length < 0:
            raise GuestMemoryError(f"negative length {length}")
        end = qva + length
        if qva < 0 or end > U64_LIMIT:
            raise GuestMemoryError(f"QVA range {qva:#x}+{length:#x} overflows 64 bits")
        for region in self._regions:
            if region.qva <= qva < region.qva_end:
                if end > region.qva_end:
                    raise GuestMemoryError(f"QVA range {qva:#x}+{length:#x} leaves its region")
                offset = qva - region.qva
                return region.view[offset:offset + length]
        raise GuestMemoryError(f"QVA {qva:#x} is outside guest memory")

    def largest_region(self) -> tuple[int, int, memoryview]:
        """(gpa, gpa_end, view) of the largest region, for a hot path that
        tries it first and bounds-checks itself (``VirtQueue``): slices of
        ``view`` follow the same lifetime rules; never release ``view``."""
        if not self._regions:
            raise GuestMemoryError("guest memory is closed")
        region = max(self._regions, key=lambda r: r.gpa_end - r.gpa)
        return region.gpa, region.gpa_end, region.view

    # -- lifetime ----------------------------------------------------------
    def close(self) -> None:
        """Unmap every region no caller's view still pins (see the module
        docstring); idempotent."""
        if self._closed:
            return
        self._closed = True
        pinned = sum(not _unmap(region) for region in self._regions)
        self._regions = []
        if pinned:
            log.warning("%d guest memory mapping(s) still referenced by views; "
                        "they unmap when those views are released", pinned)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _map_region(gpa: int, size: int, qva: int, offset: int, fd: int) -> _Region:
    if size <= 0:
        raise GuestMemoryError(f"region at GPA {gpa:#x} has size {size}")
    for name, start in (("GPA", gpa), ("QVA", qva)):
        if start < 0 or start + size > U64_LIMIT:
            raise GuestMemoryError(f"region {name} {start:#x}+{size:#x} overflows 64 bits")
    if offset < 0 or offset + size > U64_LIMIT:
        raise GuestMemoryError(f"region mmap_offset {offset:#x}+{size:#x} overflows 64 bits")
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_NORESERVE", 0x4000)
    try:
        mm = mmap.mmap(fd, size + offset, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError, OverflowError) as e:
        raise GuestMemoryError(f"cannot map region at GPA {gpa:#x} ({size:#x} bytes + offset {offset:#x}): "
                               f"{e}") from None
    return _Region(gpa, size, qva, mm, memoryview(mm)[offset:offset + size])


def _unmap(region: _Region) -> bool:
    """Release the base view and close the mapping; False if a caller's
    view still pins it (it then unmaps when the last view goes)."""
    region.view.release()
    try:
        region.mm.close()
    except BufferError:
        return False
    return True


def _check_disjoint(regions: list[_Region], start: str, end: str, what: str) -> None:
    ordered = sorted(regions, key=lambda r: getattr(r, start))
    for a, b in zip(ordered, ordered[1:]):
        if getattr(b, start) < getattr(a, end):
            raise GuestMemoryError(f"{what} ranges of two regions overlap at {getattr(b, start):#x}")
