"""Ring progress records (daemon/workers/progress.py): whatever instruction
a worker dies at, its successor answers exactly the chains the guest still
waits for, each once."""

from __future__ import annotations

import errno
import os

import pytest

from daemon.fuse.abi import IN_HEADER, OUT_HEADER, Opcode
from daemon.virtio.iovec import IoVec
from daemon.workers import progress as prog


class FakeQueue:
    """What in_flight needs of a VirtQueue: size, used.idx, the used ring."""

    def __init__(self, num=8, published_idx=0, last_avail_idx=0):
        self.num = num
        self.published_idx = published_idx
        self.last_avail_idx = last_avail_idx
        self.used = {}                        # used index -> head

    def used_heads(self, start, count):
        return [self.used[(start + i) & 0xFFFF] for i in range(count)]


class Worker:
    """Replays what WorkerLoop stores, step by step."""

    def __init__(self, rp, index=1):
        self.words, self.popped = rp.record(index)
        self.q = FakeQueue()
        prog.reset(self.words, self.q)
        self.pushed = []
        self.slots = {}

    def pop(self, head):
        self.q.last_avail_idx = (self.q.last_avail_idx + 1) & 0xFFFF
        self.popped[(self.q.last_avail_idx - 1) & prog.POPPED_MASK] = head
        self.words[prog.AVAIL] = self.q.last_avail_idx

    def defer(self, head):
        self.slots[head] = prog.add_deferred(self.words, head)

    def push(self, head):
        self.pushed.append(head)

    def publish(self, answered=(), stop_after=None):
        """The WorkerLoop._publish steps; ``stop_after`` = die after step n."""
        w = self.words
        steps = [
            lambda: w.__setitem__(prog.PUB_FROM, self.q.published_idx),
            self._store_used_idx,
            lambda: w.__setitem__(prog.DONE, self.q.last_avail_idx),
            lambda: [w.__setitem__(self.slots.pop(h), prog.EMPTY) for h in answered],
            lambda: w.__setitem__(prog.PUB_FROM, self.q.published_idx),
        ]
        for n, step in enumerate(steps):
            if stop_after is not None and n == stop_after:
                return
            step()

    def _store_used_idx(self):
        for head in self.pushed:
            self.q.used[self.q.published_idx] = head
            self.q.published_idx = (self.q.published_idx + 1) & 0xFFFF
        self.pushed = []

    def successor_sees(self):
        """What a replacement started at the published AVAIL would answer."""
        q = FakeQueue(self.q.num, self.q.published_idx, self.words[prog.AVAIL])
        q.used = self.q.used
        return prog.in_flight(self.words, self.popped, q)


@pytest.fixture
def worker():
    return Worker(prog.RingProgress(2, shared=False))


def test_fresh_record_has_nothing_in_flight(worker):
    assert worker.successor_sees() == []


def test_popped_chains_are_in_flight_until_published(worker):
    for head in (5, 6, 7):
        worker.pop(head)
    assert worker.successor_sees() == [5, 6, 7]
    worker.push(5)
    worker.push(6)
    worker.push(7)
    worker.publish()
    assert worker.successor_sees() == []


@pytest.mark.parametrize("died_after", range(5))
def test_death_at_any_step_of_a_publish(died_after):
    w = Worker(prog.RingProgress(2, shared=False))
    for head in (5, 6, 7):
        w.pop(head)
    w.push(5)
    w.defer(6)                  # a SETLKW that waits
    w.push(7)
    w.publish(stop_after=died_after)
    published = died_after >= 2          # used.idx stored
    assert w.successor_sees() == ([6] if published else [5, 6, 7])
    assert w.successor_sees() == w.successor_sees()     # normalising is idempotent


@pytest.mark.parametrize("died_after", range(5))
def test_death_while_publishing_a_deferred_completion(died_after):
    w = Worker(prog.RingProgress(2, shared=False))
    w.pop(3)
    w.defer(3)
    w.pop(4)
    w.push(4)
    w.publish()
    assert w.successor_sees() == [3]
    w.push(3)                   # the lock was granted
    w.publish(answered=[3], stop_after=died_after)
    assert w.successor_sees() == ([] if died_after >= 2 else [3])


def test_a_reused_head_in_flight_again_is_answered(worker):
    worker.pop(5)
    worker.push(5)
    worker.publish()
    worker.pop(5)               # the guest got it back and sent a new request on it
    assert worker.successor_sees() == [5]


def test_heads_outside_the_ring_and_duplicates_are_ignored(worker):
    worker.pop(2)
    worker.pop(2)
    worker.pop(100)             # a hostile record or guest: head >= num
    worker.defer(2)
    assert worker.successor_sees() == [2]


def test_wraparound_of_the_avail_index():
    w = Worker(prog.RingProgress(2, shared=False))
    w.q.last_avail_idx = 0xFFFE
    w.q.published_idx = 0xFFFF
    prog.reset(w.words, w.q)
    for head in (1, 2, 3):
        w.pop(head)
    assert w.words[prog.AVAIL] == 1
    assert w.successor_sees() == [1, 2, 3]
    w.push(1)
    w.push(2)
    w.defer(3)
    w.publish(stop_after=2)     # used.idx wraps too
    assert w.successor_sees() == [3]


def test_deferred_slots_are_bounded(worker):
    for head in range(prog.MAX_DEFERRED):
        assert prog.add_deferred(worker.words, head) >= 0
    assert prog.add_deferred(worker.words, 99) == -1


def test_records_are_independent_and_avail_is_a_u16():
    rp = prog.RingProgress(3, shared=False)
    words, _ = rp.record(2)
    words[prog.AVAIL] = 0x1_0005
    assert rp.avail(2) == 5 and rp.avail(1) == 0
    with pytest.raises(IndexError):
        rp.record(3)


class Chain:
    def __init__(self, readable: bytes, writable: int):
        self.readable = IoVec([memoryview(bytearray(readable))])
        self.out = bytearray(writable)
        self.writable = IoVec([memoryview(self.out)] if writable else [])


def request(opcode, unique=0x1122334455667788):
    return IN_HEADER.pack(40, opcode, unique, 1, 0, 0, 0, 0, 0)


def test_fail_chain_writes_an_eio_header_with_the_requests_unique():
    c = Chain(request(Opcode.GETATTR), 104)
    assert prog.fail_chain(c) == 16
    assert OUT_HEADER.unpack_from(c.out) == (16, -errno.EIO, 0x1122334455667788)
    assert bytes(c.out[16:]) == bytes(88)


@pytest.mark.parametrize("readable,writable", [
    (request(Opcode.FORGET), 0),            # hiprio FORGET: no writable part
    (request(Opcode.FORGET), 16),           # FORGET with room for a reply still gets none
    (request(Opcode.GETATTR), 15),          # no room for a header
    (request(Opcode.GETATTR)[:12], 16),     # too short to hold a unique
])
def test_fail_chain_without_a_reply(readable, writable):
    c = Chain(readable, writable)
    assert prog.fail_chain(c) == 0
    assert bytes(c.out) == bytes(writable)


def test_shared_records_are_seen_by_a_forked_child():
    rp = prog.RingProgress(2)
    pid = os.fork()
    if pid == 0:
        words, popped = rp.record(1)
        popped[0] = 9
        words[prog.AVAIL] = 1
        os._exit(0)
    os.waitpid(pid, 0)
    assert rp.avail(1) == 1 and rp.record(1)[1][0] == 9
