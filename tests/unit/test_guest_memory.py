"""GuestMemory: mapping the vhost-user memory table and translating addresses."""

from __future__ import annotations

import errno
import mmap
import os

import pytest

from daemon.virtio.memory import GuestMemory, GuestMemoryError

QVA = 0x7F3A_0000_0000
MB = 1 << 20


def memfd(size: int, name: str = "gm-test") -> int:
    fd = os.memfd_create(name)
    os.ftruncate(fd, size)
    pattern = bytes(range(256)) * (size // 256)
    os.pwrite(fd, pattern, 0)
    return fd


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        assert e.errno == errno.EBADF
        return False
    return True


def mappings_of(name: str) -> int:
    with open("/proc/self/maps") as f:
        return sum(f"/memfd:{name} " in line for line in f)


@pytest.fixture
def ram():
    """1 MiB of "guest RAM" in one memfd, byte i holding i % 256."""
    fd = memfd(MB)
    yield fd
    os.close(fd)


def pc_layout(fd: int):
    """QEMU's pc machine: [0, 640K) and [768K, 1M) of one memfd (a hole between)."""
    regions = [(0, 0xA0000, QVA, 0), (0xC0000, MB - 0xC0000, QVA + 0xC0000, 0xC0000)]
    return regions, [os.dup(fd), os.dup(fd)]


@pytest.fixture
def pc(ram):
    mem = GuestMemory.from_regions(*pc_layout(ram))
    yield mem
    mem.close()


def joined(views) -> bytes:
    return b"".join(bytes(v) for v in views)


def expected(offset: int, length: int) -> bytes:
    return bytes((offset + i) % 256 for i in range(length))


# -- translation ---------------------------------------------------------------

def test_gpa_in_first_region(pc):
    views = pc.gpa_views(0x1234, 100)
    assert len(views) == 1 and bytes(views[0]) == expected(0x1234, 100)


def test_gpa_in_second_region_uses_its_mmap_offset(pc):
    assert joined(pc.gpa_views(0xC0010, 16)) == expected(0xC0010, 16)


def test_views_write_through_to_the_fd(pc, ram):
    pc.gpa_views(0xC1000, 4)[0][:] = b"DATA"
    assert os.pread(ram, 4, 0xC1000) == b"DATA"


def test_gpa_range_ending_exactly_at_region_end(pc):
    assert joined(pc.gpa_views(0xA0000 - 8, 8)) == expected(0xA0000 - 8, 8)


def test_gpa_straddling_adjacent_regions_of_different_fds():
    high, low = memfd(0x10000), memfd(0x10000)
    os.pwrite(high, b"second", 0)
    mem = GuestMemory.from_regions([(0x10000, 0x10000, QVA + 0x10000, 0),
                                    (0, 0x10000, QVA, 0)], [high, low])  # unsorted on purpose
    try:
        views = mem.gpa_views(0x10000 - 4, 10)
        assert [len(v) for v in views] == [4, 6]
        assert bytes(views[0]) == expected(0xFFFC, 4)
        assert bytes(views[1]) == b"second"
        for v in views:
            v.release()
        # the fds are closed: from_regions took them
        assert not is_open(high) and not is_open(low)
    finally:
        mem.close()


def test_gpa_straddling_three_regions():
    fds = [memfd(0x1000) for _ in range(3)]
    mem = GuestMemory.from_regions([(i * 0x1000, 0x1000, QVA + i * 0x1000, 0) for i in range(3)], fds)
    try:
        assert [len(v) for v in mem.gpa_views(0x800, 0x2000)] == [0x800, 0x1000, 0x800]
    finally:
        mem.close()


def test_gpa_in_the_hole_between_regions(pc):
    with pytest.raises(GuestMemoryError, match="outside"):
        pc.gpa_views(0xB0000, 1)


def test_gpa_range_running_into_the_hole(pc):
    with pytest.raises(GuestMemoryError, match="outside"):
        pc.gpa_views(0xA0000 - 8, 16)


def test_gpa_past_the_end(pc):
    with pytest.raises(GuestMemoryError, match="outside"):
        pc.gpa_views(MB, 1)
    with pytest.raises(GuestMemoryError, match="outside"):
        pc.gpa_views(MB - 1, 2)


def test_gpa_range_overflowing_64_bits(pc):
    with pytest.raises(GuestMemoryError, match="overflows"):
        pc.gpa_views(2**64 - 1, 2)


def test_region_at_the_top_of_the_address_space():
    fd = memfd(0x1000)
    top = 2**64 - 0x1000
    mem = GuestMemory.from_regions([(top, 0x1000, QVA, 0)], [fd])
    try:
        assert joined(mem.gpa_views(2**64 - 16, 16)) == expected(0xFF0, 16)
        with pytest.raises(GuestMemoryError):
            mem.gpa_views(2**64 - 16, 17)
    finally:
        mem.close()


def test_zero_length_is_valid_anywhere(pc):
    assert pc.gpa_views(0xB0000, 0) == []
    assert pc.gpa_views(2**64 - 1, 0) == []


def test_negative_arguments_are_refused(pc):
    with pytest.raises(GuestMemoryError):
        pc.gpa_views(-1, 4)
    with pytest.raises(GuestMemoryError):
        pc.gpa_views(0, -4)
    with pytest.raises(GuestMemoryError):
        pc.qva_view(QVA, -1)


def test_qva_translation(pc):
    assert bytes(pc.qva_view(QVA + 0x10, 8)) == expected(0x10, 8)
    assert bytes(pc.qva_view(QVA + 0xC0000 + 0x20, 8)) == expected(0xC0020, 8)


def test_qva_range_must_stay_in_one_region():
    a, b = memfd(0x1000), memfd(0x1000)
    mem = GuestMemory.from_regions([(0, 0x1000, QVA, 0), (0x1000, 0x1000, QVA + 0x1000, 0)], [a, b])
    try:
        with pytest.raises(GuestMemoryError, match="leaves its region"):
            mem.qva_view(QVA + 0xFF0, 32)
    finally:
        mem.close()


def test_qva_outside_and_overflowing(pc):
    with pytest.raises(GuestMemoryError, match="outside"):
        pc.qva_view(0x1000, 8)  # a GPA is not a QVA
    with pytest.raises(GuestMemoryError, match="overflows"):
        pc.qva_view(2**64 - 4, 8)


# -- building the table: every fd closed, whatever happens ---------------------

def test_fds_are_closed_after_mapping(ram):
    regions, fds = pc_layout(ram)
    mem = GuestMemory.from_regions(regions, fds)
    assert not any(is_open(fd) for fd in fds)
    mem.close()


@pytest.mark.parametrize("regions", [
    [(0, 2 * MB, QVA, 0)],                                   # larger than the file
    [(0, 0x1000, QVA, MB)],                                  # offset past the file end
    [(0, 0, QVA, 0)],                                        # empty region
    [(2**64 - 0x1000, 0x2000, QVA, 0)],                      # GPA wraps
    [(0, 0x1000, 2**64 - 0x800, 0)],                         # QVA wraps
    [(0, 0x2000, QVA, 0), (0x1000, 0x1000, QVA + 0x10000, 0)],  # GPAs overlap
    [(0, 0x1000, QVA, 0), (0x1000, 0x1000, QVA + 0x800, 0)],    # QVAs overlap
], ids=["too-large", "offset-past-end", "empty", "gpa-wraps", "qva-wraps", "gpa-overlap", "qva-overlap"])
def test_bad_table_is_refused_and_its_fds_closed(ram, regions):
    fds = [os.dup(ram) for _ in regions]
    with pytest.raises(GuestMemoryError):
        GuestMemory.from_regions(regions, fds)
    assert not any(is_open(fd) for fd in fds)


def test_region_and_fd_counts_must_match(ram):
    fds = [os.dup(ram), os.dup(ram)]
    with pytest.raises(GuestMemoryError, match="fds"):
        GuestMemory.from_regions([(0, 0x1000, QVA, 0)], fds)
    assert not any(is_open(fd) for fd in fds)


def test_a_refused_table_unmaps_what_it_had_mapped():
    fd = memfd(MB, "gm-refused")
    try:
        fds = [os.dup(fd), os.dup(fd)]
        with pytest.raises(GuestMemoryError):
            GuestMemory.from_regions([(0, 0x1000, QVA, 0), (0x800, 0x1000, QVA + MB, 0)], fds)
        assert mappings_of("gm-refused") == 0
    finally:
        os.close(fd)


# -- lifetimes ---------------------------------------------------------------------

def test_close_unmaps_everything():
    fd = memfd(MB, "gm-close")
    mem = GuestMemory.from_regions(*pc_layout(fd))
    os.close(fd)
    views = mem.gpa_views(0x100, 8) + [mem.qva_view(QVA, 8)]
    assert mappings_of("gm-close") == 2
    for v in views:
        v.release()
    mem.close()
    assert mem.closed and mappings_of("gm-close") == 0
    with pytest.raises(GuestMemoryError):
        mem.gpa_views(0x100, 8)
    mem.close()  # idempotent


def test_a_view_kept_past_close_stays_valid_until_released(caplog):
    fd = memfd(MB, "gm-pinned")
    mem = GuestMemory.from_regions(*pc_layout(fd))
    os.close(fd)
    kept = mem.gpa_views(0x10, 4)[0]
    mem.close()  # must not raise BufferError
    assert "still referenced" in caplog.text
    assert bytes(kept) == expected(0x10, 4)  # never unmapped under a live view
    assert mappings_of("gm-pinned") == 1     # the other region is gone
    kept.release()
    import gc
    gc.collect()
    assert mappings_of("gm-pinned") == 0


def test_mapping_is_shared_with_other_mappers(pc, ram):
    other = mmap.mmap(ram, MB)
    try:
        other[0x2000:0x2004] = b"ping"
        assert bytes(pc.gpa_views(0x2000, 4)[0]) == b"ping"
    finally:
        other.close()
