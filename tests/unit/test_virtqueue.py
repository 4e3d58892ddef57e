"""VirtQueue against rings built here the way a guest driver builds them.

``GuestDriver`` is the driver side: one memfd of guest RAM presented as two
adjacent regions (so buffers can straddle them), the split-ring layout of
virtio 1.x written with its own struct code, and the used ring read back.
It is written from the spec (docs/protocol.md, "The split virtqueue"), not from virtqueue.py.
"""

from __future__ import annotations

import mmap
import os
import signal
import struct

import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.virtio import compiled
from daemon.virtio import virtqueue as pure
from daemon.virtio.memory import GuestMemory
from daemon.virtio.virtqueue import (MAX_QUEUE_SIZE, Chain, VirtQueue, VirtQueueError,
                                     vring_need_event)

NEXT, WRITE, INDIRECT = 1, 2, 4
RAM_SIZE = 0x40000
SPLIT_GPA = 0x20000            # region 0: [0, SPLIT), region 1: [SPLIT, RAM_SIZE)
QVA_BASE = 0x7F00_1000_0000    # where "QEMU" mapped the memfd
DESC_GPA, AVAIL_GPA, USED_GPA = 0x1000, 0x2000, 0x3000
TABLE_GPA = 0x6000             # scratch for indirect tables
BUFFER_GPA = 0x8000            # buffers are bump-allocated from here
OUTSIDE_GPA = 0x100000         # in no region


# every test here runs against the pure-Python reference and the compiled core
IMPLEMENTATIONS = [pure.VirtQueue] + ([compiled.CompiledVirtQueue] if compiled.EXTENSION_BUILT else [])


@pytest.fixture(autouse=True, params=IMPLEMENTATIONS, ids=lambda cls: cls.__name__)
def implementation(request, monkeypatch):
    """The VirtQueue class GuestDriver.queue and the tests build."""
    monkeypatch.setattr(sys.modules[__name__], "VirtQueue", request.param)
    return request.param


class GuestDriver:
    """The guest side of one split virtqueue of size ``num``."""

    def __init__(self, num: int = 8, last_avail_idx: int = 0, used_idx: int = 0):
        self.num = num
        self.fd = os.memfd_create("vq-test-ram")
        os.ftruncate(self.fd, RAM_SIZE)
        self.ram = mmap.mmap(self.fd, RAM_SIZE)
        self.avail_idx = last_avail_idx
        self.next_desc = 0
        self.next_buffer = BUFFER_GPA
        self.next_table = TABLE_GPA
        self.set_avail_idx(last_avail_idx)
        struct.pack_into("<H", self.ram, USED_GPA + 2, used_idx)

    # memory table as vhost-user describes it: (gpa, size, qva, mmap_offset)
    def regions(self) -> list[tuple[int, int, int, int]]:
        return [(0, SPLIT_GPA, QVA_BASE, 0),
                (SPLIT_GPA, RAM_SIZE - SPLIT_GPA, QVA_BASE + SPLIT_GPA, SPLIT_GPA)]

    def memory(self) -> GuestMemory:
        return GuestMemory.from_regions(self.regions(), [os.dup(self.fd), os.dup(self.fd)])

    def queue(self, mem: GuestMemory, last_avail_idx: int = 0, event_idx: bool = False) -> VirtQueue:
        return VirtQueue(mem, self.num, QVA_BASE + DESC_GPA, QVA_BASE + AVAIL_GPA,
                         QVA_BASE + USED_GPA, last_avail_idx, event_idx)

    def close(self) -> None:
        self.ram.close()
        os.close(self.fd)

    # -- buffers and descriptors ---------------------------------------------
    def buffer(self, data: bytes | int, gpa: int | None = None) -> int:
        """Place ``data`` (or zeroes of that size) in guest RAM; its GPA."""
        if isinstance(data, int):
            data = bytes(data)
        if gpa is None:
            gpa = self.next_buffer
            self.next_buffer += (len(data) + 15) & ~15
        self.ram[gpa:gpa + len(data)] = data
        return gpa

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
                   table: int = DESC_GPA) -> None:
        struct.pack_into("<QIHH", self.ram, table + 16 * index, addr, length, flags, nxt)

    def chain_descs(self, parts: list[tuple[int, int, int]], table: int, first: int) -> list[int]:
        """Write (addr, len, flags) descriptors linked by NEXT from ``first``."""
        indices = list(range(first, first + len(parts)))
        for k, (addr, length, flags) in enumerate(parts):
            last = k == len(parts) - 1
            self.write_desc(indices[k], addr, length, flags | (0 if last else NEXT),
                            0 if last else indices[k + 1], table)
        return indices

    def add(self, readable: list[bytes], writable: list[int], indirect: bool = False) -> int:
        """Offer a request: readable buffers with content, writable buffer
        sizes. Returns the head descriptor index."""
        parts = [(self.buffer(d), len(d), 0) for d in readable]
        parts += [(self.buffer(n), n, WRITE) for n in writable]
        if indirect:
            table = self.next_table
            self.next_table += 16 * len(parts)
            self.chain_descs(parts, table, 0)
            head = self.alloc_descs(1)
            self.write_desc(head, table, 16 * len(parts), INDIRECT)
        else:
            head = self.alloc_descs(len(parts))
            self.chain_descs(parts, DESC_GPA, head)
        self.offer(head)
        return head

    def alloc_descs(self, n: int) -> int:
        assert self.next_desc + n <= self.num, "test ran out of descriptors"
        first = self.next_desc
        self.next_desc += n
        return first

    def offer(self, head: int, publish: bool = True) -> None:
        struct.pack_into("<H", self.ram, AVAIL_GPA + 4 + 2 * (self.avail_idx % self.num), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        struct.pack_into("<H", self.ram, AVAIL_GPA + 2, idx)

    # -- the used ring ----------------------------------------------------------
    def used_idx(self) -> int:
        return struct.unpack_from("<H", self.ram, USED_GPA + 2)[0]

    def used_elem(self, i: int) -> tuple[int, int]:
        return struct.unpack_from("<II", self.ram, USED_GPA + 4 + 8 * (i % self.num))

    def avail_event(self) -> int:
        return struct.unpack_from("<H", self.ram, USED_GPA + 4 + 8 * self.num)[0]

    def set_used_event(self, value: int) -> None:
        struct.pack_into("<H", self.ram, AVAIL_GPA + 4 + 2 * self.num, value)


@pytest.fixture
def driver():
    d = GuestDriver()
    yield d
    d.close()


@pytest.fixture
def mem(driver):
    m = driver.memory()
    yield m
    m.close()


def pop_error(driver, mem) -> str:
    with pytest.raises(VirtQueueError) as info:
        driver.queue(mem).pop()
    return str(info.value)


def stream(iov) -> bytes:
    return iov.read(0, iov.size)


# -- well-formed chains ------------------------------------------------------------

def test_empty_ring_pops_nothing(driver, mem):
    assert driver.queue(mem).pop() is None


def test_direct_chain_gives_readable_and_writable_streams(driver, mem):
    head = driver.add([b"header-40".ljust(40, b"."), b"args"], [16, 64])
    q = driver.queue(mem)
    chain = q.pop()
    assert isinstance(chain, Chain) and chain.head == head
    assert stream(chain.readable) == b"header-40".ljust(40, b".") + b"args"
    # the two writable buffers are adjacent in guest memory: one view
    assert chain.writable.size == 80 and len(chain.writable.views) == 1
    chain.writable.write(10, b"reply-straddles-two-buffers")
    second = driver.next_buffer - ((64 + 15) & ~15)
    assert driver.ram[second:second + 10 + 27 - 16] == b"reply-straddles-two-buffers"[6:]
    assert q.pop() is None
    assert q.last_avail_idx == 1


def test_indirect_chain(driver, mem):
    head = driver.add([b"H" * 40, b"A" * 16], [16, 104], indirect=True)
    chain = driver.queue(mem).pop()
    assert chain.head == head
    assert stream(chain.readable) == b"H" * 40 + b"A" * 16
    assert chain.writable.size == 120


def test_indirect_descriptor_write_flag_is_ignored(driver, mem):
    data = driver.buffer(b"payload")
    driver.chain_descs([(data, 7, 0)], TABLE_GPA, 0)
    driver.write_desc(0, TABLE_GPA, 16, INDIRECT | WRITE)
    driver.offer(0)
    chain = driver.queue(mem).pop()
    assert stream(chain.readable) == b"payload" and chain.writable.size == 0


def test_direct_descriptors_then_indirect_as_last(driver, mem):
    first = driver.buffer(b"direct-")
    second = driver.buffer(b"indirect")
    out = driver.buffer(8)
    driver.chain_descs([(second, 8, 0), (out, 8, WRITE)], TABLE_GPA, 0)
    driver.write_desc(0, first, 7, NEXT, 1)
    driver.write_desc(1, TABLE_GPA, 32, INDIRECT)
    driver.offer(0)
    chain = driver.queue(mem).pop()
    assert stream(chain.readable) == b"direct-indirect"
    assert chain.writable.size == 8


def test_buffer_straddling_two_regions(driver, mem):
    gpa = driver.buffer(b"left-half|right-half", gpa=SPLIT_GPA - 10)
    driver.write_desc(0, gpa, 20, 0)
    driver.offer(0)
    chain = driver.queue(mem).pop()
    assert [len(v) for v in chain.readable.views] == [10, 10]
    assert stream(chain.readable) == b"left-half|right-half"


def test_indirect_table_straddling_two_regions(driver, mem):
    table = SPLIT_GPA - 16  # first entry in region 0, second in region 1
    a, b = driver.buffer(b"one"), driver.buffer(b"two")
    driver.chain_descs([(a, 3, 0), (b, 3, 0)], table, 0)
    driver.write_desc(0, table, 32, INDIRECT)
    driver.offer(0)
    assert stream(driver.queue(mem).pop().readable) == b"onetwo"


def test_chain_of_exactly_num_descriptors(driver, mem):
    parts = [(driver.buffer(bytes([65 + i])), 1, 0) for i in range(driver.num)]
    driver.chain_descs(parts, DESC_GPA, 0)
    driver.offer(0)
    assert stream(driver.queue(mem).pop().readable) == b"ABCDEFGH"


def test_zero_length_descriptors_are_accepted_and_contribute_nothing(driver, mem):
    data = driver.buffer(b"data")
    # zero-length buffers may carry any address, even one outside memory
    driver.chain_descs([(OUTSIDE_GPA, 0, 0), (data, 4, 0), (2**64 - 1, 0, WRITE),
                        (driver.buffer(4), 4, WRITE)], DESC_GPA, 0)
    driver.offer(0)
    chain = driver.queue(mem).pop()
    assert stream(chain.readable) == b"data" and chain.writable.size == 4
    assert len(chain.readable.views) == 1 and len(chain.writable.views) == 1


def test_chain_with_no_writable_part(driver, mem):
    driver.add([b"F" * 48], [])  # a hiprio FORGET
    chain = driver.queue(mem).pop()
    assert chain.readable.size == 48 and chain.writable.size == 0


def test_several_chains_in_order(driver, mem):
    heads = [driver.add([bytes([i]) * 4], [4]) for i in range(3)]
    q = driver.queue(mem)
    popped = [q.pop() for _ in range(3)]
    assert [c.head for c in popped] == heads
    assert [stream(c.readable) for c in popped] == [b"\0" * 4, b"\1" * 4, b"\2" * 4]
    assert q.pop() is None


def test_avail_index_wraps_around_u16():
    d = GuestDriver(num=4, last_avail_idx=0xFFFE)
    try:
        with d.memory() as m:
            heads = [d.add([b"x"], []) for _ in range(3)]
            q = d.queue(m, last_avail_idx=0xFFFE)
            assert [q.pop().head for _ in range(3)] == heads
            assert q.pop() is None and q.last_avail_idx == 1
            q.release()
    finally:
        d.close()


def test_pop_resumes_at_last_avail_idx(driver, mem):
    driver.add([b"old"], [])
    driver.add([b"new"], [])
    chain = driver.queue(mem, last_avail_idx=1).pop()
    assert stream(chain.readable) == b"new"


# -- used ring -----------------------------------------------------------------------

def test_push_is_invisible_until_publish(driver, mem):
    q = driver.queue(mem)
    for _ in range(3):
        driver.add([b"r"], [8])
    chains = [q.pop() for _ in range(3)]
    for c in chains:
        q.push(c.head, 5)
    assert driver.used_idx() == 0 and q.pending == 3
    assert q.publish() is True
    assert driver.used_idx() == 3 and q.pending == 0
    assert [driver.used_elem(i) for i in range(3)] == [(c.head, 5) for c in chains]


def test_publish_without_push_asks_for_no_call(driver, mem):
    q = driver.queue(mem)
    assert q.publish() is False
    driver.add([b"r"], [])
    q.push(q.pop().head, 0)
    assert q.publish() is True
    assert q.publish() is False
    assert driver.used_idx() == 1 and driver.used_elem(0) == (0, 0)


def test_used_index_resumes_from_guest_memory_and_wraps():
    d = GuestDriver(num=4, last_avail_idx=0xFFFF, used_idx=0xFFFF)
    try:
        with d.memory() as m:
            q = d.queue(m, last_avail_idx=0xFFFF)
            d.add([b"a"], [])
            d.add([b"b"], [])
            for _ in range(2):
                q.push(q.pop().head, 7)
            q.publish()
            assert d.used_idx() == 1
            assert d.used_elem(0xFFFF) == (0, 7) and d.used_elem(0) == (1, 7)
            q.release()
    finally:
        d.close()


def test_used_idx_is_stored_as_one_16_bit_access(driver, mem, monkeypatch):
    """used.idx must not go through struct.pack_into (it zeroes first)."""
    import daemon.virtio.virtqueue as vq
    stores = []

    class Recording:
        def __init__(self, real):
            self.real = real

        def pack_into(self, buf, offset, *values):
            stores.append(offset)
            return self.real.pack_into(buf, offset, *values)

    monkeypatch.setattr(vq, "USED_ELEM", Recording(vq.USED_ELEM))
    monkeypatch.setattr(sys.modules[__name__], "VirtQueue", pure.VirtQueue)  # the Python stores
    q = driver.queue(mem)
    driver.add([b"x"], [])
    q.push(q.pop().head, 0)
    q.publish()
    assert stores == [4]  # the element only; idx (offset 2) went another way
    assert driver.used_idx() == 1


# -- EVENT_IDX ---------------------------------------------------------------------

def test_vring_need_event():
    assert vring_need_event(0, 1, 0)          # crossed event 0
    assert not vring_need_event(5, 3, 0)      # not yet at 5
    assert vring_need_event(5, 6, 3)
    assert not vring_need_event(2, 6, 3)      # passed before old
    assert vring_need_event(0xFFFF, 1, 0xFFFE)  # wrap-around


def test_event_idx_writes_avail_event_after_every_pop(driver, mem):
    q = driver.queue(mem, event_idx=True)
    driver.add([b"a"], [])
    driver.add([b"b"], [])
    q.pop()
    assert driver.avail_event() == 1
    q.pop()
    assert driver.avail_event() == 2
    assert q.pop() is None and driver.avail_event() == 2


def test_kick_after_lets_the_guest_queue_n_before_it_kicks(driver, mem):
    """kick_after(n): the guest's vring_need_event is false for the first
    n - 1 chains it adds past those popped and true for the n-th."""
    q = driver.queue(mem, event_idx=True)
    driver.add([b"a"], [])
    q.pop()
    assert q.kick_after(4) is False and driver.avail_event() == 1 + 3
    kicks = [vring_need_event(driver.avail_event(), new, new - 1) for new in range(2, 7)]
    assert kicks == [False, False, False, True, False]  # only adding entry 4 (new idx 5)
    driver.add([b"b"], [])
    assert q.kick_after(1) is True and driver.avail_event() == 1  # back to a kick per chain; one waits
    assert q.pop() is not None and q.kick_after(4) is False
    # without EVENT_IDX it only tells whether a chain waits
    plain = driver.queue(mem, last_avail_idx=2)
    assert plain.kick_after(4) is False
    driver.add([b"c"], [])
    assert plain.kick_after(4) is True


def test_event_idx_start_writes_avail_event(driver, mem):
    struct.pack_into("<H", driver.ram, USED_GPA + 4 + 8 * driver.num, 3)  # stale
    driver.queue(mem, last_avail_idx=9, event_idx=True)
    assert driver.avail_event() == 9


def test_event_idx_publish_calls_only_when_used_event_is_crossed(driver, mem):
    q = driver.queue(mem, event_idx=True)
    for _ in range(4):
        driver.add([b"a"], [])
    driver.set_used_event(2)   # "call me when entry 2 is used"
    q.push(q.pop().head, 0)
    assert q.publish() is True  # the first publish always calls
    q.push(q.pop().head, 0)
    assert q.publish() is False  # used 1 → 2: entry 2 not used yet
    q.push(q.pop().head, 0)
    assert q.publish() is True   # 2 → 3 crosses event 2
    q.push(q.pop().head, 0)
    assert q.publish() is False


# -- malformed rings and chains: every one is a VirtQueueError ----------------------

def test_descriptor_loop(driver, mem):
    driver.write_desc(0, driver.buffer(1), 1, NEXT, 1)
    driver.write_desc(1, driver.buffer(1), 1, NEXT, 0)
    driver.offer(0)
    assert "loop" in pop_error(driver, mem)


def test_descriptor_pointing_at_itself(driver, mem):
    driver.write_desc(3, driver.buffer(1), 1, NEXT, 3)
    driver.offer(3)
    assert "loop" in pop_error(driver, mem)


def test_chain_longer_than_queue(driver, mem):
    # every descriptor chained to the next and the last back to the first:
    # num + 1 descriptors would be visited
    for i in range(driver.num):
        driver.write_desc(i, driver.buffer(1), 1, NEXT, (i + 1) % driver.num)
    driver.offer(0)
    assert "longer than" in pop_error(driver, mem)


def test_indirect_chain_longer_than_its_table(driver, mem):
    driver.write_desc(0, driver.buffer(1), 1, NEXT, 1, table=TABLE_GPA)
    driver.write_desc(1, driver.buffer(1), 1, NEXT, 0, table=TABLE_GPA)
    driver.write_desc(0, TABLE_GPA, 32, INDIRECT)
    driver.offer(0)
    assert "loop" in pop_error(driver, mem)


def test_next_out_of_range(driver, mem):
    driver.write_desc(0, driver.buffer(1), 1, NEXT, driver.num)
    driver.offer(0)
    assert "next index" in pop_error(driver, mem)


def test_indirect_next_out_of_range(driver, mem):
    driver.write_desc(0, driver.buffer(1), 1, NEXT, 2, table=TABLE_GPA)  # table has 2 entries
    driver.write_desc(0, TABLE_GPA, 32, INDIRECT)
    driver.offer(0)
    assert "next index" in pop_error(driver, mem)


def test_head_out_of_range(driver, mem):
    driver.offer(driver.num)
    assert "head index" in pop_error(driver, mem)


def test_nested_indirect(driver, mem):
    inner = TABLE_GPA + 0x100
    driver.write_desc(0, driver.buffer(1), 1, 0, table=inner)
    driver.write_desc(0, inner, 16, INDIRECT, table=TABLE_GPA)
    driver.write_desc(0, TABLE_GPA, 16, INDIRECT)
    driver.offer(0)
    assert "nested" in pop_error(driver, mem)


def test_indirect_with_next(driver, mem):
    driver.write_desc(0, driver.buffer(1), 1, 0, table=TABLE_GPA)
    driver.write_desc(0, TABLE_GPA, 16, INDIRECT | NEXT, 1)
    driver.write_desc(1, driver.buffer(1), 1, 0)
    driver.offer(0)
    assert "with NEXT" in pop_error(driver, mem)


@pytest.mark.parametrize("length", [8, 17, 40])
def test_indirect_length_not_multiple_of_16(driver, mem, length):
    driver.write_desc(0, TABLE_GPA, length, INDIRECT)
    driver.offer(0)
    assert "indirect table length" in pop_error(driver, mem)


def test_indirect_length_zero(driver, mem):
    driver.write_desc(0, TABLE_GPA, 0, INDIRECT)
    driver.offer(0)
    assert "indirect table length" in pop_error(driver, mem)


def test_indirect_table_outside_memory(driver, mem):
    driver.write_desc(0, OUTSIDE_GPA, 32, INDIRECT)
    driver.offer(0)
    assert "outside" in pop_error(driver, mem)


def test_indirect_table_larger_than_next_can_address(driver, mem):
    driver.write_desc(0, 0, 16 * 65537, INDIRECT)
    driver.offer(0)
    assert "indirect table length" in pop_error(driver, mem)


def test_indirect_table_of_more_than_1024_entries(driver, mem):
    """Regression (hostile guest): tables up to 65536 entries were walked, so
    a ring of 1024 such chains held the worker for seconds per batch, past
    the supervisor's answer timeout. 1024 (VIRTQUEUE_MAX_SIZE) is the cap."""
    table = 0x30000
    for i in range(1024):
        driver.write_desc(i, driver.buffer(1) if i == 0 else 0, 1 if i == 0 else 0,
                          NEXT if i < 1023 else 0, i + 1, table=table)
    driver.write_desc(0, table, 16 * 1024, INDIRECT)
    driver.write_desc(1, table, 16 * 1025, INDIRECT)
    driver.offer(0)
    driver.offer(1)
    q = driver.queue(mem)
    assert q.pop().readable.size == 1
    with pytest.raises(VirtQueueError, match="indirect table length"):
        q.pop()


def test_address_outside_regions(driver, mem):
    driver.write_desc(0, OUTSIDE_GPA, 16, 0)
    driver.offer(0)
    assert "outside" in pop_error(driver, mem)


def test_buffer_running_past_the_last_region(driver, mem):
    driver.write_desc(0, RAM_SIZE - 8, 16, WRITE)
    driver.offer(0)
    assert "outside" in pop_error(driver, mem)


def test_address_plus_length_overflows_64_bits(driver, mem):
    driver.write_desc(0, 2**64 - 8, 16, 0)
    driver.offer(0)
    assert "overflows" in pop_error(driver, mem)


def test_writable_before_readable(driver, mem):
    driver.chain_descs([(driver.buffer(4), 4, WRITE), (driver.buffer(4), 4, 0)], DESC_GPA, 0)
    driver.offer(0)
    assert "readable descriptor after a writable" in pop_error(driver, mem)


def test_zero_length_writable_before_readable(driver, mem):
    driver.chain_descs([(driver.buffer(4), 0, WRITE), (driver.buffer(4), 4, 0)], DESC_GPA, 0)
    driver.offer(0)
    assert "readable descriptor after a writable" in pop_error(driver, mem)


def test_writable_before_readable_inside_indirect_table(driver, mem):
    driver.chain_descs([(driver.buffer(4), 4, WRITE), (driver.buffer(4), 4, 0)], TABLE_GPA, 0)
    driver.write_desc(0, TABLE_GPA, 32, INDIRECT)
    driver.offer(0)
    assert "readable descriptor after a writable" in pop_error(driver, mem)


def test_avail_idx_jump_larger_than_queue(driver, mem):
    driver.set_avail_idx(driver.num + 1)
    assert "jumped" in pop_error(driver, mem)


def test_avail_idx_jump_of_exactly_num_is_fine(driver, mem):
    for i in range(driver.num):
        driver.write_desc(i, driver.buffer(1), 1, 0)
        driver.offer(i, publish=False)
    driver.set_avail_idx(driver.num)
    q = driver.queue(mem)
    assert [q.pop().head for _ in range(driver.num)] == list(range(driver.num))


@pytest.mark.parametrize("num", [0, 3, 6, MAX_QUEUE_SIZE * 2])
def test_queue_size_must_be_a_power_of_two_up_to_32768(mem, num):
    with pytest.raises(VirtQueueError, match="queue size"):
        VirtQueue(mem, num, QVA_BASE + DESC_GPA, QVA_BASE + AVAIL_GPA, QVA_BASE + USED_GPA, 0, False)


@pytest.mark.parametrize("desc,avail,used", [(DESC_GPA + 8, AVAIL_GPA, USED_GPA),
                                             (DESC_GPA, AVAIL_GPA + 1, USED_GPA),
                                             (DESC_GPA, AVAIL_GPA, USED_GPA + 2)])
def test_misaligned_ring(mem, desc, avail, used):
    with pytest.raises(VirtQueueError, match="misaligned"):
        VirtQueue(mem, 8, QVA_BASE + desc, QVA_BASE + avail, QVA_BASE + used, 0, False)


def test_ring_outside_memory(mem):
    with pytest.raises(VirtQueueError, match="outside"):
        VirtQueue(mem, 8, 0x1000, QVA_BASE + AVAIL_GPA, QVA_BASE + USED_GPA, 0, False)


def test_ring_straddling_regions_is_refused(mem):
    # rings are translated as QVAs and must sit in one region
    with pytest.raises(VirtQueueError, match="outside"):
        VirtQueue(mem, 8, QVA_BASE + SPLIT_GPA - 64, QVA_BASE + AVAIL_GPA, QVA_BASE + USED_GPA, 0, False)


def test_last_avail_idx_must_be_u16(mem):
    with pytest.raises(VirtQueueError, match="u16"):
        VirtQueue(mem, 8, QVA_BASE + DESC_GPA, QVA_BASE + AVAIL_GPA, QVA_BASE + USED_GPA, 0x10000, False)


# -- lifetimes -----------------------------------------------------------------------

def test_released_queue_and_chains_let_memory_unmap(driver):
    m = driver.memory()
    q = driver.queue(m)
    driver.add([b"r"], [4])
    chain = q.pop()
    chain.release()
    q.release()
    maps = [r.mm for r in m._regions]
    m.close()
    assert all(mm.closed for mm in maps)


# -- property: random rings never raise anything else, never hang -----------------

class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _mostly(common: list[int], rare: list[int]) -> st.SearchStrategy[int]:
    """Mostly one of ``common``, sometimes one of ``rare``. (``sampled_from``
    picks evenly; ``one_of`` over integer ranges leans to the boundaries.)"""
    return st.sampled_from(common * 4 + rare)


ADDRESSES = st.one_of(
    _mostly([BUFFER_GPA, BUFFER_GPA + 0x100, TABLE_GPA, TABLE_GPA + 16, DESC_GPA, SPLIT_GPA - 8],
            [RAM_SIZE - 16, OUTSIDE_GPA, 2**64 - 8, 0]),
    _mostly([BUFFER_GPA], [0]), st.integers(0, 2**64 - 1))
LENGTHS = st.one_of(_mostly([0, 1, 15, 16, 32, 48, 64, 4096], [17, 2**32 - 16, 2**32 - 1]),
                    _mostly([16], [1]), st.integers(0, 2**32 - 1))
FLAGS = _mostly(list(range(8)), [8, 0xFFF8, 0xFFFF])
INDICES = _mostly(list(range(8)), [8, 9, 0x8000, 0xFFFF])
DESCRIPTORS = st.tuples(ADDRESSES, LENGTHS, FLAGS, INDICES)


@pytest.fixture(scope="module")
def fuzz_driver():
    d = GuestDriver(num=8)
    m = d.memory()
    yield d, m
    m.close()
    d.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(desc=st.lists(DESCRIPTORS, min_size=8, max_size=8),
       table=st.lists(DESCRIPTORS, min_size=0, max_size=8),
       heads=st.lists(INDICES, min_size=8, max_size=8),
       last=st.integers(0, 0xFFFF),
       ahead=_mostly(list(range(9)), [9, 100, 0x8000, 0xFFFF]),
       event_idx=st.booleans())
def test_random_rings_raise_only_virtqueue_error(fuzz_driver, desc, table, heads, last, ahead, event_idx):
    d, m = fuzz_driver
    for i, (addr, length, flags, nxt) in enumerate(desc):
        d.write_desc(i, addr, length, flags, nxt)
    d.ram[TABLE_GPA:TABLE_GPA + 128] = bytes(128)
    for i, (addr, length, flags, nxt) in enumerate(table):
        d.write_desc(i, addr, length, flags, nxt, table=TABLE_GPA)
    for i, head in enumerate(heads):
        struct.pack_into("<H", d.ram, AVAIL_GPA + 4 + 2 * i, head)
    d.set_avail_idx((last + ahead) & 0xFFFF)
    q = d.queue(m, last_avail_idx=last, event_idx=event_idx)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        for _ in range(d.num + 2):
            try:
                chain = q.pop()
            except VirtQueueError:
                break
            if chain is None:
                break
            assert 0 <= chain.head < d.num
            for view in chain.readable.views + chain.writable.views:
                assert 0 < len(view)  # zero-length buffers are never listed
            q.push(chain.head, 0)
            chain.release()
        q.publish()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        q.release()



def test_only_adjacent_buffers_merge(driver, mem):
    """Descriptor boundaries carry no meaning: adjacent buffers become one
    view, a gap (or a backwards jump) starts a new one; the streams are the
    same either way."""
    base = driver.next_buffer
    driver.next_buffer += 4096
    hdr = driver.buffer(b"H" * 40, base)
    args = driver.buffer(b"A" * 8, base + 40)           # adjacent: merged
    out_hdr = driver.buffer(16, base + 64)              # gap after args
    page1 = driver.buffer(32, base + 80)                # adjacent to out_hdr
    page0 = driver.buffer(32, base + 1024)              # a gap
    page2 = driver.buffer(32, base + 1024 - 32)         # before page0: not merged
    parts = [(hdr, 40, 0), (args, 8, 0), (out_hdr, 16, WRITE), (page1, 32, WRITE),
             (page0, 32, WRITE), (page2, 32, WRITE)]
    head = driver.alloc_descs(len(parts))
    driver.chain_descs(parts, DESC_GPA, head)
    driver.offer(head)
    chain = driver.queue(mem).pop()
    assert stream(chain.readable) == b"H" * 40 + b"A" * 8
    assert [len(v) for v in chain.readable.views] == [48]
    assert [len(v) for v in chain.writable.views] == [48, 32, 32]
    chain.writable.write(0, bytes(range(112)))
    assert driver.ram[base + 64:base + 112] == bytes(range(48))
    assert driver.ram[base + 1024:base + 1056] == bytes(range(48, 80))
    assert driver.ram[base + 992:base + 1024] == bytes(range(80, 112))


# -- the indirect-table fast path (VirtQueue._walk_table) ------------------------------
def _linux_table(draw_lengths, readable_n, gaps, base):
    """(addr, len, flags, next) entries as virtqueue_add_split writes them."""
    entries, addr = [], base
    n = len(draw_lengths)
    for i, length in enumerate(draw_lengths):
        flags = (WRITE if i >= readable_n else 0) | (NEXT if i < n - 1 else 0)
        entries.append([addr, length, flags, i + 1])
        addr += length + gaps[i]
    return entries


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.sampled_from([1, 16, 40, 1024]), min_size=1, max_size=64),
       readable_frac=st.floats(0, 1),
       gaps=st.lists(_mostly([0], [8, 1024]), min_size=64, max_size=64),
       base=_mostly([BUFFER_GPA] * 3, [SPLIT_GPA - 64, SPLIT_GPA + 0x100, RAM_SIZE - 64, OUTSIDE_GPA,
                                       2**64 - 16]),
       edits=st.one_of(st.just([]), st.lists(
           st.tuples(st.integers(0, 63), st.integers(0, 3),
                     st.one_of(st.integers(0, 2**16 - 1), st.sampled_from([0, 2**32 - 1, 2**63]))),
           min_size=1, max_size=2)))
def test_indirect_fast_path_matches_the_general_walk(fuzz_driver, monkeypatch, lengths, readable_frac,
                                                      gaps, base, edits):
    """Whatever the table holds, the fast path gives the chain the general
    walk gives (same buffers, same merging) or defers to it, so errors
    are the general walk's too."""
    d, m = fuzz_driver
    readable_n = int(len(lengths) * readable_frac)
    entries = _linux_table(lengths, readable_n, gaps, base)
    for i, field, value in edits:  # perturb an address, length, flags or next
        if i < len(entries):
            entries[i][field] = (entries[i][0] + value) % 2**64 if field == 0 else \
                value & (0xFFFFFFFF if field == 1 else 0xFFFF)
    d.ram[TABLE_GPA:TABLE_GPA + 16 * 64] = bytes(16 * 64)
    for i, (addr, length, flags, nxt) in enumerate(entries):
        d.write_desc(i, addr % 2**64, length & 0xFFFFFFFF, flags, nxt, table=TABLE_GPA)
    d.write_desc(0, TABLE_GPA, 16 * len(entries), INDIRECT)
    struct.pack_into("<H", d.ram, AVAIL_GPA + 4, 0)

    def walk():
        q = d.queue(m)
        try:
            return [(bytes(v), len(v)) for v in q.chain_at(0).readable.views], \
                   [(bytes(v), len(v)) for v in q.chain_at(0).writable.views], None
        except VirtQueueError as e:
            return None, None, str(e)
        finally:
            q.release()

    fast = walk()
    with monkeypatch.context() as patch:  # undone before the next example
        patch.setattr(VirtQueue, "_walk_table", lambda self, head, table: None)
        general = walk()
    assert general == fast


def test_indirect_fast_path_is_taken_for_the_linux_layout(driver, mem, monkeypatch):
    """A 1 MiB READ's shape: header and args, then the out header and 256
    pages; the fast path decodes it (the general walk is never entered
    past the head) and merges what is adjacent."""
    monkeypatch.setattr(sys.modules[__name__], "VirtQueue", pure.VirtQueue)  # pure.py's own fast path
    calls = []
    real = VirtQueue._walk_table
    monkeypatch.setattr(VirtQueue, "_walk_table", lambda self, h, t: calls.append(h) or real(self, h, t))
    driver.next_buffer = BUFFER_GPA
    head = driver.add([b"h" * 40, b"a" * 24], [16] + [64] * 256, indirect=True)
    chain = driver.queue(mem).pop()
    assert calls == [head]
    assert chain.readable.size == 64 and chain.writable.size == 16 + 64 * 256
    assert stream(chain.readable) == b"h" * 40 + b"a" * 24
    assert [len(v) for v in chain.writable.views] == [16 + 64 * 256]  # bump-allocated: adjacent
