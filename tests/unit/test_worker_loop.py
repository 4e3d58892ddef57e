"""The worker loop in a forked process, driven over a real Channel pair.

The test plays both the supervisor (channel requests, answers checked) and
the guest (rings in a memfd built by ``GuestDriver``, kick and call
eventfds). The FUSE session is a fake with the ``FuseSession`` interface:
it echoes the readable bytes into the writable part, and can defer.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import struct
import threading
import time

import pytest

from daemon.fuse import abi
from daemon.fuse.abi import Opcode
from daemon.workers.channel import (ANSWER, FRAME, VRING_CALL, VRING_START, VRING_STOP, Channel,
                                    Msg, encode_mem_table)
from daemon.virtio.virtqueue import VIRTIO_RING_F_EVENT_IDX, vring_need_event
from daemon.workers.bells import ReapBells
from daemon.workers.loop import WorkerLoop
from tests import procfs
from tests.unit.test_virtqueue import (AVAIL_GPA, DESC_GPA, NEXT, QVA_BASE, USED_GPA, GuestDriver)

RING = 1
TIMEOUT = 5.0


class EchoSession:
    """FuseSession's interface: ``handle`` answers b"ECHO:" + request;
    b"DEFER..." requests are deferred; ``retry`` completes b"DEFER" ones on
    its third call ("LATE"), never b"DEFER-FOREVER"; ``cancel_all``
    answers "INTR". b"WAKE" requests are finished by a "helper thread"
    50 ms later, which writes ``wakeup_fd``: ``retry`` answers them
    ("WOKE") only once ``drain_wakeup`` was called, as a blocking call
    (FSYNC) goes."""

    meter = None           # no --metrics-socket

    def __init__(self):
        self.pending = []  # (token, writable, forever)
        self.retries = 0
        self.waking = []   # (token, writable)
        self.woken = False
        self.wakeup_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def drain_wakeup(self):
        os.eventfd_read(self.wakeup_fd)
        self.woken = True

    def handle(self, readable, writable, token):
        data = readable.read(0, readable.size)
        if data.startswith(b"WAKE"):
            self.waking.append((token, writable))
            threading.Timer(0.05, os.eventfd_write, (self.wakeup_fd, 1)).start()
            return None
        if data.startswith(b"DEFER"):
            self.pending.append((token, writable, data.startswith(b"DEFER-FOREVER")))
            return None
        reply = (b"ECHO:" + data)[:writable.size]
        writable.write(0, reply)
        return len(reply)

    def has_pending(self):
        return bool(self.pending or self.waking)

    def retry(self):
        if self.woken:
            done, self.waking, self.woken = [(t, w.write(0, b"WOKE")) for t, w in self.waking], [], False
            return done
        self.retries += 1
        if self.retries < 3:
            return []
        done = [(token, writable.write(0, b"LATE")) for token, writable, forever in self.pending if not forever]
        self.pending = [p for p in self.pending if p[2]]
        return done

    def cancel_all(self):
        done = [(token, writable.write(0, b"INTR")) for token, writable, _ in self.pending]
        self.pending = []
        return done

    def reap(self):
        return 0


class FreedCursor:
    """The inode table's freed cursor, as the hiprio loop reads it."""

    cursor = 0


class ReapingSession(EchoSession):
    """An EchoSession whose b"FREE" requests move its table's freed cursor
    (as a FORGET to zero does) and whose ``reap`` writes ``reaped``, an
    eventfd the test reads (the worker is another process)."""

    def __init__(self, reaped: int):
        super().__init__()
        self.inodes = FreedCursor()
        self.reaped = reaped

    def handle(self, readable, writable, token):
        if readable.read(0, readable.size).startswith(b"FREE"):
            self.inodes.cursor += 1
        return super().handle(readable, writable, token)

    def reap(self):
        os.eventfd_write(self.reaped, 1)
        return 0


class Worker:
    """A forked WorkerLoop and the supervisor's end of its channel."""

    def __init__(self, rings=(RING,), progress=None, coalesce=None, bells=None, session=EchoSession):
        supervisor_end, worker_end = Channel.pair()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            status = 2
            try:
                supervisor_end.close()
                status = WorkerLoop(worker_end, session(), rings, progress=progress,
                                    coalesce=coalesce, bells=bells).run()
            finally:
                os._exit(status)
        worker_end.close()
        supervisor_end.sock.settimeout(TIMEOUT)
        self.channel = supervisor_end
        self.pid = pid
        self.status = None
        self.rusage = None

    def request(self, msg: Msg, payload: bytes = b"", fds=()) -> tuple[int, int]:
        self.channel.send(msg, payload, list(fds))
        return self.channel.expect_answer()

    def wait(self) -> int:
        deadline = time.monotonic() + TIMEOUT
        while self.status is None:
            pid, status, rusage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                self.status, self.rusage = os.waitstatus_to_exitcode(status), rusage
            elif time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise AssertionError("worker did not exit")
            else:
                time.sleep(0.01)
        return self.status

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def kill(self) -> None:
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            self.wait()
        self.channel.close()


class Guest:
    """A GuestDriver plus the ring's kick and call eventfds."""

    def __init__(self, num: int = 8):
        self.driver = GuestDriver(num)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)

    def close(self) -> None:
        self.driver.close()
        os.close(self.kick)
        os.close(self.call)

    def mem_table(self) -> tuple[bytes, list[int]]:
        regions = self.driver.regions()
        return encode_mem_table(regions), [self.driver.fd] * len(regions)

    def vring_start(self, index: int = RING, last_avail_idx: int = 0, num: int | None = None,
                    flags: int = 0, features: int = 0) -> bytes:
        return VRING_START.pack(index, num or self.driver.num, QVA_BASE + DESC_GPA, QVA_BASE + AVAIL_GPA,
                                QVA_BASE + USED_GPA, last_avail_idx, flags, features)

    def wait_call(self, fd: int | None = None) -> int:
        """Wait for the worker's call; the eventfd's counter."""
        fd = self.call if fd is None else fd
        ready = select.select([fd], [], [], TIMEOUT)[0]
        assert ready, "no call from the worker"
        return os.eventfd_read(fd)

    def no_call(self, fd: int | None = None, wait: float = 0.1) -> bool:
        return not select.select([self.call if fd is None else fd], [], [], wait)[0]

    def used(self) -> list[tuple[int, int]]:
        d = self.driver
        return [d.used_elem(i) for i in range(d.used_idx())]

    def reply(self, written: int, buffer_gpa: int) -> bytes:
        return bytes(self.driver.ram[buffer_gpa:buffer_gpa + written])


@pytest.fixture
def guest():
    g = Guest()
    yield g
    g.close()


@pytest.fixture
def worker():
    w = Worker()
    yield w
    w.kill()


@pytest.fixture
def running(worker, guest):
    """A worker serving vring 1 with memory and a call fd."""
    assert worker.request(Msg.MEM_TABLE, *guest.mem_table()) == (0, 0)
    assert worker.request(Msg.VRING_CALL, VRING_CALL.pack(RING, 1), [guest.call]) == (0, 0)
    assert worker.request(Msg.VRING_START, guest.vring_start(), [guest.kick]) == (0, 0)
    return worker


def last_writable_gpa(guest: Guest, size: int) -> int:
    return guest.driver.next_buffer - ((size + 15) & ~15)


# -- serving ------------------------------------------------------------------------

def test_kick_is_served_and_the_guest_called(running, guest):
    head = guest.driver.add([b"hello"], [32])
    out = last_writable_gpa(guest, 32)
    os.eventfd_write(guest.kick, 1)
    assert guest.wait_call() == 1
    assert guest.used() == [(head, 10)]
    assert guest.reply(10, out) == b"ECHO:hello"


def test_one_call_for_a_batch(running, guest):
    heads = [guest.driver.add([bytes([65 + i])], [8]) for i in range(3)]
    os.eventfd_write(guest.kick, 1)
    assert guest.wait_call() == 1  # one publish, one signal
    assert guest.used() == [(h, 6) for h in heads]


def test_requests_queued_before_start_are_served_at_start(worker, guest):
    head = guest.driver.add([b"early"], [16])
    assert worker.request(Msg.MEM_TABLE, *guest.mem_table()) == (0, 0)
    assert worker.request(Msg.VRING_CALL, VRING_CALL.pack(RING, 1), [guest.call]) == (0, 0)
    assert worker.request(Msg.VRING_START, guest.vring_start(), [guest.kick]) == (0, 0)
    guest.wait_call()
    assert guest.used() == [(head, 10)]


def test_start_resumes_at_the_given_avail_index(worker, guest):
    guest.driver.add([b"already-served"], [])
    head = guest.driver.add([b"new"], [16])
    assert worker.request(Msg.MEM_TABLE, *guest.mem_table()) == (0, 0)
    assert worker.request(Msg.VRING_CALL, VRING_CALL.pack(RING, 1), [guest.call]) == (0, 0)
    assert worker.request(Msg.VRING_START, guest.vring_start(last_avail_idx=1), [guest.kick]) == (0, 0)
    guest.wait_call()
    assert guest.used() == [(head, 8)]


def test_stop_answers_the_next_avail_index(running, guest):
    for _ in range(3):
        guest.driver.add([b"x"], [8])
    os.eventfd_write(guest.kick, 1)
    guest.wait_call()
    assert running.request(Msg.VRING_STOP, VRING_STOP.pack(RING)) == (0, 3)
    # stopped: kicks are no longer served
    guest.driver.add([b"y"], [8])
    os.eventfd_write(guest.kick, 1)
    assert guest.no_call()
    assert guest.driver.used_idx() == 3
    # and it restarts where it stopped
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert running.request(Msg.VRING_START, guest.vring_start(last_avail_idx=3), [kick]) == (0, 0)
        guest.wait_call()
        assert guest.driver.used_idx() == 4
    finally:
        os.close(kick)


def test_newest_call_fd_is_used(running, guest):
    newer = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert running.request(Msg.VRING_CALL, VRING_CALL.pack(RING, 1), [newer]) == (0, 0)
        guest.driver.add([b"x"], [8])
        os.eventfd_write(guest.kick, 1)
        assert guest.wait_call(newer) == 1
        assert guest.no_call(guest.call)
    finally:
        os.close(newer)


def test_no_call_fd_means_no_signal_but_still_served(running, guest):
    assert running.request(Msg.VRING_CALL, VRING_CALL.pack(RING, 0)) == (0, 0)
    guest.driver.add([b"x"], [8])
    os.eventfd_write(guest.kick, 1)
    deadline = time.monotonic() + TIMEOUT
    while guest.driver.used_idx() != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert guest.no_call()


def test_new_mem_table_while_running_retranslates_the_ring(running, guest):
    assert running.request(Msg.MEM_TABLE, *guest.mem_table()) == (0, 0)
    head = guest.driver.add([b"after"], [16])
    os.eventfd_write(guest.kick, 1)
    guest.wait_call()
    assert guest.used() == [(head, 10)]


# -- deferred requests --------------------------------------------------------------

def test_deferred_request_completes_through_the_retry_timer(running, guest):
    head = guest.driver.add([b"DEFER"], [16])
    out = last_writable_gpa(guest, 16)
    os.eventfd_write(guest.kick, 1)
    # no further kick: only the ~10 ms retry timer can complete it
    assert guest.wait_call() == 1
    assert guest.used() == [(head, 4)] and guest.reply(4, out) == b"LATE"


def test_a_finished_blocking_call_wakes_the_loop(running, guest):
    """The session's wakeup_fd (a helper thread finished an fsync) is in
    the loop's epoll set: the loop drains it and collects at once."""
    head = guest.driver.add([b"WAKE"], [16])
    out = last_writable_gpa(guest, 16)
    os.eventfd_write(guest.kick, 1)
    assert guest.wait_call() == 1
    assert guest.used() == [(head, 4)] and guest.reply(4, out) == b"WOKE"


@pytest.fixture
def coalescing(guest):
    """A worker serving vring 1 as the hiprio ring is served: EVENT_IDX,
    coalescing 4 chains or 50 ms."""
    w = Worker(coalesce=(4, 0.05))
    assert w.request(Msg.MEM_TABLE, *guest.mem_table()) == (0, 0)
    assert w.request(Msg.VRING_CALL, VRING_CALL.pack(RING, 1), [guest.call]) == (0, 0)
    start = guest.vring_start(features=1 << VIRTIO_RING_F_EVENT_IDX)
    assert w.request(Msg.VRING_START, start, [guest.kick]) == (0, 0)
    yield w
    w.kill()


def test_coalescing_serves_a_burst_on_its_timer_then_kicks_per_chain_again(coalescing, guest):
    d = guest.driver
    first = d.add([b"one"], [16])
    os.eventfd_write(guest.kick, 1)           # idle: the first one is served at once
    guest.wait_call()
    assert guest.used() == [(first, 8)]
    assert d.avail_event() == 1 + 3           # now: kick only once 4 more wait
    d.set_used_event(1)                       # as Linux does: call me for the next used entry
    more = [d.add([b"two"], [16]), d.add([b"three"], [16])]
    assert not vring_need_event(d.avail_event(), 3, 1)  # so the guest does not kick...
    deadline = time.monotonic() + TIMEOUT      # ...and the loop's own look serves them
    while len(guest.used()) < 3:
        assert time.monotonic() < deadline, guest.used()
        time.sleep(0.005)
    assert guest.used() == [(first, 8), (more[0], 8), (more[1], 10)]
    d.set_used_event(3)
    deadline = time.monotonic() + TIMEOUT      # a look that finds nothing: a kick per chain again
    while d.avail_event() != 3:
        assert time.monotonic() < deadline, d.avail_event()
        time.sleep(0.01)
    while not guest.no_call(wait=0):           # calls of the burst's batch
        os.eventfd_read(guest.call)
    last = d.add([b"four"], [16])
    os.eventfd_write(guest.kick, 1)
    guest.wait_call()                          # a kick is served (and called) at once
    assert guest.used()[-1] == (last, 9)


@pytest.fixture
def reaped():
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


def test_a_request_worker_reaps_when_its_bell_rings(guest, reaped):
    """The hiprio worker rang (bells.py): the request worker's loop, with
    no request to serve, drains its bell and reaps; no bell, no reap."""
    bells = ReapBells(2)
    w = Worker(bells=bells, session=lambda: ReapingSession(reaped))
    try:
        assert w.request(Msg.MEM_TABLE, *guest.mem_table()) == (0, 0)
        assert w.request(Msg.VRING_START, guest.vring_start(), [guest.kick]) == (0, 0)
        time.sleep(0.1)
        if select.select([reaped], [], [], 0)[0]:      # the start's batch (of nothing) reaped
            os.eventfd_read(reaped)
        os.eventfd_write(bells.fd(2), 1)               # another worker's: not this one's
        assert not select.select([reaped], [], [], 0.2)[0]
        os.eventfd_write(bells.fd(RING), 1)
        assert select.select([reaped], [], [], TIMEOUT)[0]
        os.eventfd_read(reaped)
        deadline = time.monotonic() + TIMEOUT
        while select.select([bells.fd(RING)], [], [], 0)[0]:  # drained by the worker
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert not select.select([reaped], [], [], 0.2)[0]  # level-triggered, drained: once
    finally:
        w.kill()
        bells.close()


def test_the_hiprio_worker_rings_every_bell_after_a_batch_that_freed(guest, reaped):
    """vring 0's loop rings every request vring's bell after a batch that
    moved the table's freed cursor, and not after one that did not."""
    bells = ReapBells(2)
    w = Worker(rings=(0,), bells=bells, session=lambda: ReapingSession(reaped))
    try:
        assert w.request(Msg.MEM_TABLE, *guest.mem_table()) == (0, 0)
        assert w.request(Msg.VRING_CALL, VRING_CALL.pack(0, 1), [guest.call]) == (0, 0)
        assert w.request(Msg.VRING_START, guest.vring_start(index=0), [guest.kick]) == (0, 0)
        guest.driver.add([b"KEEP"], [16])
        os.eventfd_write(guest.kick, 1)
        guest.wait_call()
        assert not select.select([bells.fd(1), bells.fd(2)], [], [], 0.1)[0]
        guest.driver.add([b"FREE"], [16])
        guest.driver.add([b"FREE"], [16])
        os.eventfd_write(guest.kick, 1)
        guest.wait_call()                              # the bells ring right after the call
        for fd in (bells.fd(1), bells.fd(2)):
            assert select.select([fd], [], [], TIMEOUT)[0]
            assert os.eventfd_read(fd) == 1            # once for the batch
    finally:
        w.kill()
        bells.close()


def test_deferred_request_does_not_block_the_ring(running, guest):
    guest.driver.add([b"DEFER-FOREVER"], [16])
    os.eventfd_write(guest.kick, 1)
    head = guest.driver.add([b"next"], [16])
    os.eventfd_write(guest.kick, 1)
    guest.wait_call()
    assert guest.used() == [(head, 9)]


def test_stop_answers_deferred_requests_first(running, guest):
    head = guest.driver.add([b"DEFER-FOREVER"], [16])
    out = last_writable_gpa(guest, 16)
    os.eventfd_write(guest.kick, 1)
    assert guest.no_call(wait=0.1)
    assert running.request(Msg.VRING_STOP, VRING_STOP.pack(RING)) == (0, 1)
    assert guest.used() == [(head, 4)] and guest.reply(4, out) == b"INTR"
    assert guest.wait_call() == 1


# -- broken rings ---------------------------------------------------------------------

def test_broken_ring_stops_being_served_without_spinning(running, guest):
    """The worker's CPU from the broken chain's kicks to the ring's stop
    (not its start-up, which a slow host alone pushed past the bound)."""
    d = guest.driver
    d.write_desc(0, d.buffer(1), 1, NEXT, 0)  # a descriptor loop
    before = sum(procfs.cpu_ticks(running.pid))
    d.offer(0)
    for _ in range(50):
        os.eventfd_write(guest.kick, 1)
    time.sleep(0.5)
    # the channel is still served; the stop answers the avail index consumed
    assert running.request(Msg.VRING_STOP, VRING_STOP.pack(RING)) == (0, 1)
    cpu = (sum(procfs.cpu_ticks(running.pid)) - before) / procfs.TICKS_PER_SECOND
    assert running.request(Msg.SHUTDOWN) == (0, 0)
    assert running.wait() == 0
    assert cpu < 0.25, f"worker used {cpu:.2f} s of CPU: it spun on the broken ring"
    assert d.used_idx() == 0


def test_good_requests_before_the_bad_one_are_published(running, guest):
    d = guest.driver
    good = d.add([b"ok"], [8])
    d.write_desc(7, 0x100000, 8, 0)  # outside guest memory
    d.offer(7)
    os.eventfd_write(guest.kick, 1)
    guest.wait_call()
    assert guest.used() == [(good, 7)]


# -- refusals that keep the worker alive --------------------------------------------

def test_refused_mem_table_is_answered_with_an_errno(worker, guest):
    payload = encode_mem_table([(0, 1 << 30, QVA_BASE, 0)])  # larger than the memfd
    assert worker.request(Msg.MEM_TABLE, payload, [guest.driver.fd]) == (errno.EINVAL, 0)
    assert worker.request(Msg.MEM_TABLE, *guest.mem_table()) == (0, 0)


def test_refused_vring_starts_close_their_kick_fd(worker, guest):
    assert worker.request(Msg.VRING_CALL, VRING_CALL.pack(RING, 0)) == (0, 0)  # the loop is up
    baseline = worker.open_fds()
    # no memory table yet
    assert worker.request(Msg.VRING_START, guest.vring_start(), [guest.kick]) == (errno.EINVAL, 0)
    assert worker.open_fds() == baseline
    assert worker.request(Msg.MEM_TABLE, *guest.mem_table()) == (0, 0)
    baseline = worker.open_fds()  # + one per mapping: Python's mmap keeps a dup of its fd
    # a ring this worker does not serve
    assert worker.request(Msg.VRING_START, guest.vring_start(index=2), [guest.kick]) == (errno.EINVAL, 0)
    # a queue size that is not a power of 2
    assert worker.request(Msg.VRING_START, guest.vring_start(num=6), [guest.kick]) == (errno.EINVAL, 0)
    assert worker.open_fds() == baseline
    assert worker.request(Msg.VRING_START, guest.vring_start(), [guest.kick]) == (0, 0)
    assert worker.request(Msg.VRING_START, guest.vring_start(), [guest.kick]) == (errno.EBUSY, 0)
    assert worker.open_fds() == baseline + 1
    assert worker.request(Msg.VRING_STOP, VRING_STOP.pack(RING)) == (0, 0)
    assert worker.open_fds() == baseline


def test_replaced_mem_table_and_call_fds_are_closed(worker, guest):
    assert worker.request(Msg.MEM_TABLE, *guest.mem_table()) == (0, 0)
    assert worker.request(Msg.VRING_CALL, VRING_CALL.pack(RING, 1), [guest.call]) == (0, 0)
    baseline = worker.open_fds()
    for _ in range(3):
        assert worker.request(Msg.MEM_TABLE, *guest.mem_table()) == (0, 0)
        assert worker.request(Msg.VRING_CALL, VRING_CALL.pack(RING, 1), [guest.call]) == (0, 0)
    assert worker.open_fds() == baseline


def test_shutdown_exits_0_and_answers_deferred(running, guest):
    head = guest.driver.add([b"DEFER-FOREVER"], [16])
    os.eventfd_write(guest.kick, 1)
    assert guest.no_call(wait=0.1)
    assert running.request(Msg.SHUTDOWN) == (0, 0)
    assert running.wait() == 0
    assert guest.used() == [(head, 4)]


# -- channel violations: the worker exits 1 ----------------------------------------

def _raw(worker: Worker, data: bytes, fds=()) -> None:
    socket.send_fds(worker.channel.sock, [data], list(fds))


VIOLATIONS = {
    "mem-table-garbage": lambda w, g: w.channel.send(Msg.MEM_TABLE, b"\x01\x00"),
    "mem-table-fd-count": lambda w, g: w.channel.send(Msg.MEM_TABLE, g.mem_table()[0], [g.driver.fd]),
    "vring-start-without-kick": lambda w, g: w.channel.send(Msg.VRING_START, g.vring_start()),
    "vring-start-short": lambda w, g: w.channel.send(Msg.VRING_START, g.vring_start()[:-1], [g.kick]),
    "vring-stop-with-fd": lambda w, g: w.channel.send(Msg.VRING_STOP, VRING_STOP.pack(RING), [g.kick]),
    "vring-call-has-fd-2": lambda w, g: w.channel.send(Msg.VRING_CALL, VRING_CALL.pack(RING, 2)),
    "vring-call-missing-fd": lambda w, g: w.channel.send(Msg.VRING_CALL, VRING_CALL.pack(RING, 1)),
    "vring-call-long": lambda w, g: w.channel.send(Msg.VRING_CALL, VRING_CALL.pack(RING, 0) + b"\0"),
    "vring-stop-short": lambda w, g: w.channel.send(Msg.VRING_STOP, VRING_STOP.pack(RING)[:-1]),
    "shutdown-with-payload": lambda w, g: w.channel.send(Msg.SHUTDOWN, b"x"),
    "answer-to-worker": lambda w, g: w.channel.send(Msg.ANSWER, ANSWER.pack(0, 0)),
    "ready-to-worker": lambda w, g: w.channel.send(Msg.READY),
    "frame-length-mismatch": lambda w, g: _raw(w, FRAME.pack(Msg.SHUTDOWN, 4)),
    "unknown-type": lambda w, g: _raw(w, FRAME.pack(99, 0)),
    "supervisor-gone": lambda w, g: w.channel.sock.shutdown(socket.SHUT_WR),
}


@pytest.mark.parametrize("violation", sorted(VIOLATIONS))
def test_channel_violation_kills_the_worker_with_exit_1(worker, guest, violation):
    VIOLATIONS[violation](worker, guest)
    assert worker.wait() == 1


# -- worker_main: the whole process -------------------------------------------------

@pytest.mark.parametrize("role,index", [("hiprio", 0), ("request", 1)])
def test_worker_main_sends_ready_serves_and_exits_0(tmp_path, guest, role, index):
    from daemon.config import Config
    from daemon.fuse.inodes import InodeTable
    from daemon.workers.entry import become_worker, worker_main

    config = Config(shared_dir=str(tmp_path), sandbox="none", seccomp="none", inode_table_size=64)
    inodes = InodeTable(64)
    supervisor_end, worker_end = Channel.pair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        supervisor_end.close()
        become_worker(index)         # as the supervisor's pool does first in the child
        worker_main(role, index, worker_end, config, inodes)
    worker_end.close()
    supervisor_end.sock.settimeout(TIMEOUT)
    try:
        msg, payload, fds = supervisor_end.recv()
        assert (msg, payload, fds) == (Msg.READY, b"", [])
        if role == "request":
            assert os.readlink(f"/proc/{pid}/cwd") == f"/proc/{pid}/fd"
        assert open(f"/proc/{pid}/comm").read().startswith("vfsd-")
        supervisor_end.send(Msg.MEM_TABLE, *guest.mem_table())
        assert supervisor_end.expect_answer() == (0, 0)
        supervisor_end.send(Msg.VRING_START, guest.vring_start(index=index), [guest.kick])
        assert supervisor_end.expect_answer() == (0, 0)
        supervisor_end.send(Msg.VRING_START, guest.vring_start(index=index + 1), [guest.kick])
        assert supervisor_end.expect_answer() == (errno.EINVAL, 0)  # not this worker's ring
        supervisor_end.send(Msg.VRING_CALL, VRING_CALL.pack(index, 1), [guest.call])
        assert supervisor_end.expect_answer() == (0, 0)
        # a real FuseSession behind the loop: FORGET on hiprio, INIT on a request queue
        if role == "hiprio":
            request = abi.IN_HEADER.pack(48, Opcode.FORGET, 2, 1, 0, 0, 0, 0, 0) + struct.pack("<Q", 1)
            head = guest.driver.add([request], [])
            os.eventfd_write(guest.kick, 1)
            guest.wait_call()
            assert guest.used() == [(head, 0)]
        else:
            request = (abi.IN_HEADER.pack(104, Opcode.INIT, 2, 0, 0, 0, 0, 0, 0)
                       + abi.INIT_IN.pack(7, 38, 0x20000, 0, 0))
            head = guest.driver.add([request], [16, 256])
            out = guest.driver.next_buffer - 256 - 16
            os.eventfd_write(guest.kick, 1)
            guest.wait_call()
            [(used_head, written)] = guest.used()
            length, error, unique = abi.OUT_HEADER.unpack(bytes(guest.driver.ram[out:out + 16]))
            assert (used_head, error, unique) == (head, 0, 2) and written == length > 16
        supervisor_end.send(Msg.SHUTDOWN)
        assert supervisor_end.expect_answer() == (0, 0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        supervisor_end.close()
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        inodes.close()


# -- worker restart (progress.py) ------------------------------------------------------

def test_replacement_answers_what_the_dead_worker_had_taken_with_eio(guest):
    from daemon.fuse.abi import OUT_HEADER
    from daemon.workers.channel import VRING_START_RECOVER
    from daemon.workers.progress import RingProgress

    progress = RingProgress(RING + 1)           # shared, made before the forks
    first = Worker(progress=progress)
    try:
        assert first.request(Msg.MEM_TABLE, *guest.mem_table()) == (0, 0)
        assert first.request(Msg.VRING_CALL, VRING_CALL.pack(RING, 1), [guest.call]) == (0, 0)
        assert first.request(Msg.VRING_START, guest.vring_start(), [guest.kick]) == (0, 0)
        served = guest.driver.add([b"before"], [32])
        os.eventfd_write(guest.kick, 1)
        assert guest.wait_call() == 1 and guest.used() == [(served, 11)]
        request = b"DEFER-FOREVER" + bytes(11)
        waiting = guest.driver.add([request], [32])      # the worker keeps it (a SETLKW)
        out = last_writable_gpa(guest, 32)
        os.eventfd_write(guest.kick, 1)
        assert guest.no_call(wait=0.1)
    finally:
        first.kill()                            # SIGKILL: nothing answered
    assert progress.avail(RING) == 2
    second = Worker(progress=progress)
    try:
        assert second.request(Msg.MEM_TABLE, *guest.mem_table()) == (0, 0)
        assert second.request(Msg.VRING_CALL, VRING_CALL.pack(RING, 1), [guest.call]) == (0, 0)
        start = guest.vring_start(last_avail_idx=progress.avail(RING), flags=VRING_START_RECOVER)
        assert second.request(Msg.VRING_START, start, [guest.kick]) == (0, 0)
        assert guest.wait_call() == 1
        assert guest.used() == [(served, 11), (waiting, 16)]
        unique = int.from_bytes(request[8:16], "little")
        assert OUT_HEADER.unpack(guest.reply(16, out)) == (16, -errno.EIO, unique)
        after = guest.driver.add([b"after"], [32])   # and the ring goes on
        os.eventfd_write(guest.kick, 1)
        assert guest.wait_call() == 1 and guest.used()[2:] == [(after, 10)]
        assert second.request(Msg.VRING_STOP, VRING_STOP.pack(RING)) == (0, 3)
    finally:
        second.kill()
