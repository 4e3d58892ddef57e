"""The vhost-user state machine (daemon/vhost_user/backend.py), driven over a
real socketpair the way QEMU 7.2 drives it (docs/protocol.md, "Message order, QEMU 7.2"), with a
fake WorkerPool that records what the workers would have been told."""

from __future__ import annotations

import errno
import logging
import os
import select
import socket

import pytest

from daemon.vhost_user import messages as m
from daemon.vhost_user.backend import OFFERED_FEATURES, Backend
from daemon.workers.pool import WorkerFailure, WorkerSpawnError
from daemon.vhost_user.messages import Request as R

QEMU_FEATURES = 0x1_5000_0000          # guest acked VERSION_1|INDIRECT, QEMU adds bit 30
RAM_QVA = 0x7F00_0000_0000
RAM_SIZE = 1 << 20
QUEUE_SIZE = 128


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class FakePool:
    """Records every call. Hands out next-avail indexes from ``progress``."""

    def __init__(self, live=(0, 1)):
        self.workers = set(live)
        self.calls = []
        self.progress = {}              # index -> how far the worker got past base
        self.started_at = {}
        self.fail_start = None          # errno the next start_ring answers
        self.broken = False
        self.spawn_budget = None        # spawns left before WorkerSpawnError (None: unlimited)

    def live(self):
        return set(self.workers)

    def spawn(self, index):
        if self.spawn_budget is not None:
            if self.spawn_budget == 0:
                raise WorkerSpawnError(f"worker {index} died too often")
            self.spawn_budget -= 1
        self.calls.append(("spawn", index))
        self.workers.add(index)

    def die(self, index):
        """The worker of ``index`` is found dead (ProcessPool has reaped it)."""
        self.workers.discard(index)
        return WorkerFailure(f"worker {index} died: test", index)

    def mem_table(self, index, regions, fds):
        assert len(fds) == len(regions)
        for fd in fds:
            os.fstat(fd)                # lent fds are open during the call
        self.calls.append(("mem_table", index, tuple(regions)))

    def set_call(self, index, fd):
        self.calls.append(("set_call", index, None if fd is None else os.fstat(fd).st_ino))

    def start_ring(self, index, num, desc, avail, used, base, features, kick_fd, recover=False):
        if self.broken:
            self.workers.discard(index)     # as ProcessPool: killed, reaped, forgotten
            raise WorkerFailure("worker request-1 (pid 1) failed: test", index)
        if self.fail_start:
            raise OSError(self.fail_start, os.strerror(self.fail_start))
        self.started_at[index] = base
        self.calls.append(("start", index, num, desc, avail, used, base, features, os.fstat(kick_fd).st_ino)
                          + (("recover",) if recover else ()))

    def stop_ring(self, index):
        self.calls.append(("stop", index))
        return (self.started_at[index] + self.progress.get(index, 0)) & 0xFFFF

    def published_avail(self, index):
        return (self.started_at[index] + self.progress.get(index, 0)) & 0xFFFF

    def take(self):
        calls, self.calls = self.calls, []
        return calls


class Rig:
    """A backend on one end of a socketpair, the test as QEMU on the other."""

    def __init__(self, queue_count=9, live=(0, 1), read_timeout=2.0):
        self.baseline = open_fds()
        self.qemu, backend_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.qemu.settimeout(5.0)       # a missing reply fails the test instead of hanging it
        self.pool = FakePool(live)
        self.backend = Backend(backend_end, self.pool, queue_count, read_timeout=read_timeout)

    # -- QEMU's side ----------------------------------------------------------------
    def send_raw(self, data: bytes, fds=()):
        if fds:
            socket.send_fds(self.qemu, [data], list(fds))
        else:
            self.qemu.sendall(data)
        for fd in fds:                 # the backend has its own copies now
            os.close(fd)

    def send(self, request, payload=b"", fds=(), flags=m.VERSION):
        self.send_raw(m.HEADER.pack(request, flags, len(payload)) + payload, fds)

    def request(self, request, payload=b"", fds=(), flags=m.VERSION) -> bool:
        """Send one message and let the backend handle it."""
        self.send(request, payload, fds, flags)
        return self.backend.serve_one()

    def reply(self) -> bytes:
        header = self._recv(12)
        request, flags, size = m.HEADER.unpack(header)
        return header + self._recv(size)

    def _recv(self, n):
        data = b""
        while len(data) < n:
            chunk = self.qemu.recv(n - len(data))
            assert chunk, "backend closed the connection"
            data += chunk
        return data

    def assert_no_reply(self):
        readable, _, _ = select.select([self.qemu], [], [], 0)
        assert not readable, f"unsolicited bytes from the backend: {self.qemu.recv(64)!r}"

    def assert_closed_cleanly(self):
        """The backend hung up and holds no fd any more."""
        assert self.backend.closed
        try:
            assert self.qemu.recv(64) == b""
        except ConnectionResetError:    # it hung up with our bytes unread
            pass
        self.qemu.close()
        assert open_fds() == self.baseline

    def close(self):
        self.backend.close()
        self.qemu.close()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


# -- helpers building QEMU's messages -------------------------------------------------------

def eventfd():
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def memfd(size):
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def u64(v):
    return m.U64.pack(v)


def state(index, num):
    return m.VRING_STATE.pack(index, num)


def ring_addr(index, num=QUEUE_SIZE, base=RAM_QVA):
    """A ring laid out like Linux does: desc, avail, used (4 KiB aligned)."""
    desc = base + 0x10000 * (index + 1)
    avail = desc + 16 * num
    used = (avail + 6 + 2 * num + 4095) & ~4095
    return desc, avail, used


def addr_payload(index, desc, avail, used, flags=0):
    return m.VRING_ADDR.pack(index, flags, desc, used, avail, 0)


def region(gpa, size, qva, off=0):
    return m.MEMORY_REGION.pack(gpa, size, qva, off)


def mem_table_payload(*regions):
    return m.MEMORY_HEADER.pack(len(regions)) + b"".join(regions)


def one_region_table():
    return mem_table_payload(region(0, RAM_SIZE, RAM_QVA)), [memfd(RAM_SIZE)]


def negotiate(rig, features=QEMU_FEATURES):
    """QEMU 7.2 realize + the start of DRIVER_OK, up to the memory table."""
    for req, payload in ((R.GET_FEATURES, b""), (R.GET_PROTOCOL_FEATURES, b"")):
        assert rig.request(req, payload)
        rig.reply()
    assert rig.request(R.SET_PROTOCOL_FEATURES, u64(0x9))
    assert rig.request(R.GET_QUEUE_NUM)
    rig.reply()
    assert rig.request(R.SET_OWNER)
    assert rig.request(R.SET_FEATURES, u64(features))
    payload, fds = one_region_table()
    assert rig.request(R.SET_MEM_TABLE, payload, fds, flags=m.VERSION | m.FLAG_NEED_REPLY)
    assert rig.reply() == m.encode_u64_reply(R.SET_MEM_TABLE, 0)


def configure_ring(rig, index, base=0):
    assert rig.request(R.SET_VRING_NUM, state(index, QUEUE_SIZE))
    assert rig.request(R.SET_VRING_BASE, state(index, base))
    assert rig.request(R.SET_VRING_ADDR, addr_payload(index, *ring_addr(index)))
    assert rig.request(R.SET_VRING_KICK, u64(index), [eventfd()])


def started(calls):
    return [c[1] for c in calls if c[0] == "start"]


# -- the QEMU 7.2 sequence ---------------------------------------------------------------------

def test_qemu_7_2_session_from_realize_to_power_off():
    rig = Rig(queue_count=9)
    nvqs = 3                                   # num-request-queues=2

    # realize
    assert rig.request(R.GET_FEATURES)
    # VERSION_1 | bit 30 | INDIRECT_DESC, and EVENT_IDX where the host has the fence (x86-64)
    assert OFFERED_FEATURES in (0x1_5000_0000, 0x1_7000_0000)
    assert rig.reply() == bytes.fromhex("01000000 05000000 08000000") + OFFERED_FEATURES.to_bytes(8, "little")
    assert rig.request(R.GET_PROTOCOL_FEATURES)
    assert rig.reply() == bytes.fromhex("0f000000 05000000 08000000 0980000000000000")
    assert rig.request(R.SET_PROTOCOL_FEATURES, u64(0x9))
    rig.assert_no_reply()
    assert rig.request(R.GET_QUEUE_NUM)
    assert rig.reply() == bytes.fromhex("11000000 05000000 08000000 0900000000000000")
    assert rig.request(R.SET_OWNER)
    assert rig.request(R.GET_FEATURES)
    assert rig.reply() == m.encode_u64_reply(R.GET_FEATURES, OFFERED_FEATURES)
    masked_calls = {}
    for i in range(nvqs):
        call = eventfd()
        masked_calls[i] = os.fstat(call).st_ino
        assert rig.request(R.SET_VRING_CALL, u64(i), [call])
        assert rig.request(R.SET_VRING_ERR, u64(i), [eventfd()])
    rig.assert_no_reply()
    # calls are forwarded to the workers that exist (hiprio, request-1), at once
    assert rig.pool.take() == [("set_call", 0, masked_calls[0]), ("set_call", 1, masked_calls[1])]

    # DRIVER_OK: MSI-X unmask sends the calls again, before SET_FEATURES
    for i in range(nvqs):
        assert rig.request(R.SET_VRING_CALL, u64(i), [eventfd()])
    assert rig.request(R.SET_FEATURES, u64(QEMU_FEATURES))
    payload, fds = one_region_table()
    assert rig.request(R.SET_MEM_TABLE, payload, fds, flags=0x9)
    assert rig.reply() == bytes.fromhex("05000000 05000000 08000000 0000000000000000")
    calls = rig.pool.take()
    # (vring 2 has no worker yet: its call fd is kept for when it gets one)
    assert [c[:2] for c in calls] == [("set_call", 0), ("set_call", 1), ("mem_table", 0), ("mem_table", 1)]
    assert calls[-1][2] == ((0, RAM_SIZE, RAM_QVA, 0),)

    for i in range(nvqs):
        configure_ring(rig, i)
    rig.assert_no_reply()
    assert started(rig.pool.take()) == []      # bit 30: rings start disabled

    for i in range(nvqs):
        assert rig.request(R.SET_VRING_ENABLE, state(i, 1))
    rig.assert_no_reply()
    calls = rig.pool.take()
    # vring 2's worker is forked when its ring first starts, and given the
    # memory table and its call fd before VRING_START
    assert [c[:2] for c in calls] == [("start", 0), ("start", 1), ("spawn", 2), ("mem_table", 2),
                                      ("set_call", 2), ("start", 2)]
    desc, avail, used = ring_addr(1)
    start1 = calls[1]
    assert start1[2:8] == (QUEUE_SIZE, desc, avail, used, 0, QEMU_FEATURES)

    guest_calls = {}
    for i in range(nvqs):
        call = eventfd()
        guest_calls[i] = os.fstat(call).st_ino
        assert rig.request(R.SET_VRING_CALL, u64(i), [call])
    assert rig.pool.take() == [("set_call", i, guest_calls[i]) for i in range(nvqs)]

    # the guest used vring 1 for 14 requests and vring 0 for one FORGET
    rig.pool.progress = {0: 1, 1: 14}

    # power-off
    for i in range(nvqs):
        assert rig.request(R.SET_VRING_ENABLE, state(i, 0))
    assert rig.pool.take() == [("stop", 0), ("stop", 1), ("stop", 2)]
    bases = []
    for i in range(nvqs):
        assert rig.request(R.GET_VRING_BASE, state(i, 0))
        bases.append(rig.reply())
    assert bases == [m.encode_reply(m.Request.GET_VRING_BASE, m.VRING_STATE.pack(0, 1)),
                     bytes.fromhex("0b000000 05000000 08000000 01000000 0e000000"),
                     m.encode_reply(m.Request.GET_VRING_BASE, m.VRING_STATE.pack(2, 0))]
    assert rig.pool.take() == []               # already stopped by SET_VRING_ENABLE 0
    for i in range(nvqs):
        assert rig.request(R.SET_VRING_CALL, u64(i), [eventfd()])
    rig.assert_no_reply()

    # QEMU goes away
    rig.qemu.shutdown(socket.SHUT_WR)
    assert rig.backend.serve_one() is False
    rig.assert_closed_cleanly()


def test_restart_after_reboot_resumes_from_the_base_qemu_gives(rig):
    negotiate(rig)
    configure_ring(rig, 1)
    assert rig.request(R.SET_VRING_ENABLE, state(1, 1))
    rig.pool.progress[1] = 5
    assert rig.request(R.GET_VRING_BASE, state(1, 0))     # stop without disabling first
    assert rig.reply() == m.encode_reply(m.Request.GET_VRING_BASE, m.VRING_STATE.pack(1, 5))
    rig.pool.take()
    # the whole DRIVER_OK block again: SET_FEATURES disables the rings
    assert rig.request(R.SET_FEATURES, u64(QEMU_FEATURES))
    payload, fds = one_region_table()
    assert rig.request(R.SET_MEM_TABLE, payload, fds, flags=0x9)
    rig.reply()
    configure_ring(rig, 1, base=5)
    assert started(rig.pool.take()) == []
    assert rig.request(R.SET_VRING_ENABLE, state(1, 1))
    (start,) = rig.pool.take()
    assert start[0] == "start" and start[6] == 5


def test_ring_starts_on_kick_without_protocol_features(rig):
    negotiate(rig, features=QEMU_FEATURES & ~m.F_PROTOCOL_FEATURES)
    rig.pool.take()
    configure_ring(rig, 1)
    assert started(rig.pool.take()) == [1]


def test_new_mem_table_while_running_stops_and_restarts_rings(rig):
    negotiate(rig)
    for i in (0, 1):
        configure_ring(rig, i)
        assert rig.request(R.SET_VRING_ENABLE, state(i, 1))
    rig.pool.take()
    rig.pool.progress = {0: 2, 1: 7}
    payload = mem_table_payload(region(0, RAM_SIZE, RAM_QVA), region(1 << 32, RAM_SIZE, RAM_QVA + (1 << 30)))
    assert rig.request(R.SET_MEM_TABLE, payload, [memfd(RAM_SIZE), memfd(RAM_SIZE)], flags=0x9)
    assert rig.reply() == m.encode_u64_reply(R.SET_MEM_TABLE, 0)
    calls = rig.pool.take()
    assert [c[:2] for c in calls] == [("stop", 0), ("stop", 1), ("mem_table", 0), ("mem_table", 1),
                                      ("start", 0), ("start", 1)]
    assert len(calls[2][2]) == 2
    assert (calls[4][6], calls[5][6]) == (2, 7)    # restarted where they stopped


def test_kick_while_running_restarts_the_ring(rig):
    negotiate(rig)
    configure_ring(rig, 1)
    assert rig.request(R.SET_VRING_ENABLE, state(1, 1))
    rig.pool.take()
    rig.pool.progress[1] = 3
    kick = eventfd()
    ino = os.fstat(kick).st_ino
    assert rig.request(R.SET_VRING_KICK, u64(1), [kick])
    stop, start = rig.pool.take()
    assert stop == ("stop", 1) and start[0] == "start" and start[6] == 3 and start[8] == ino


def test_set_vring_call_without_fd_is_forwarded_as_none(rig):
    assert rig.request(R.SET_VRING_CALL, u64(1 | m.VRING_NOFD_MASK))
    assert rig.pool.take() == [("set_call", 1, None)]


def test_get_vring_base_of_a_ring_never_started(rig):
    negotiate(rig)
    assert rig.request(R.SET_VRING_BASE, state(1, 42))
    assert rig.request(R.GET_VRING_BASE, state(1, 0))
    assert rig.reply() == m.encode_reply(m.Request.GET_VRING_BASE, m.VRING_STATE.pack(1, 42))


def test_ring_beyond_the_queue_count_gets_no_worker(caplog):
    rig = Rig(queue_count=2)
    try:
        negotiate(rig)
        rig.pool.take()
        configure_ring(rig, 2)
        with caplog.at_level(logging.WARNING):
            assert rig.request(R.SET_VRING_ENABLE, state(2, 1))
        assert rig.pool.take() == []
        assert "vring 2 has no worker" in caplog.text
        assert rig.request(R.GET_VRING_BASE, state(2, 0))
        assert rig.reply() == m.encode_reply(m.Request.GET_VRING_BASE, m.VRING_STATE.pack(2, 0))
    finally:
        rig.close()


def test_need_reply_on_a_message_without_reply_gets_an_ack(rig):
    assert rig.request(R.SET_OWNER, flags=m.VERSION | m.FLAG_NEED_REPLY)
    assert rig.reply() == m.encode_u64_reply(R.SET_OWNER, 0)


def test_need_reply_on_get_features_gives_one_reply_only(rig):
    assert rig.request(R.GET_FEATURES, flags=m.VERSION | m.FLAG_NEED_REPLY)
    assert rig.reply() == m.encode_u64_reply(R.GET_FEATURES, OFFERED_FEATURES)
    rig.assert_no_reply()


def test_unknown_request_is_ignored_and_its_fds_closed():
    rig = Rig()
    assert rig.request(200, b"xyz", [eventfd(), eventfd()])
    assert rig.request(R.SET_LOG_FD, b"", [eventfd()])
    rig.assert_no_reply()
    assert open_fds() == rig.baseline + 2          # the two socket ends, nothing else
    rig.close()


def test_unknown_request_with_need_reply_gets_a_failure_ack(rig):
    assert rig.request(R.GET_STATUS, flags=m.VERSION | m.FLAG_NEED_REPLY)
    reply = rig.reply()
    assert reply[:12] == m.HEADER.pack(R.GET_STATUS, 0x5, 8)
    assert m.U64.unpack(reply[12:])[0] != 0
    assert rig.request(R.GET_FEATURES)                # and the connection goes on
    rig.reply()


def test_worker_refusing_a_ring_closes_the_connection(caplog):
    rig = Rig()
    negotiate(rig)
    configure_ring(rig, 1)
    rig.pool.fail_start = errno.ENOMEM
    with caplog.at_level(logging.ERROR):
        assert not rig.request(R.SET_VRING_ENABLE, state(1, 1))
    assert "cannot start it: Cannot allocate memory" in caplog.text
    rig.assert_closed_cleanly()


def test_worker_that_keeps_dying_ends_in_spawn_error_and_close_releases_everything():
    rig = Rig()
    negotiate(rig)
    configure_ring(rig, 1)
    rig.pool.broken = True
    rig.pool.spawn_budget = 3
    with pytest.raises(WorkerSpawnError):
        rig.request(R.SET_VRING_ENABLE, state(1, 1))
    assert [c for c in rig.pool.take() if c[0] == "spawn"] == [("spawn", 1)] * 3
    rig.backend.close()
    rig.assert_closed_cleanly()


def test_dead_worker_of_a_running_ring_is_replaced_and_resumes_with_recovery(rig):
    negotiate(rig)
    configure_ring(rig, 1)
    assert rig.request(R.SET_VRING_CALL, u64(1), [eventfd()])
    assert rig.request(R.SET_VRING_ENABLE, state(1, 1))
    rig.pool.progress[1] = 5                        # the worker had taken 5 chains
    rig.pool.take()
    rig.backend.revive(rig.pool.die(1) and 1)
    calls = rig.pool.take()
    assert [c[0] for c in calls] == ["spawn", "mem_table", "set_call", "start"]
    assert calls[-1][6] == 5 and calls[-1][-1] == "recover"     # base = published avail index
    # GET_VRING_BASE now answers from the replacement
    rig.pool.progress[1] = 0
    assert rig.request(R.GET_VRING_BASE, state(1, 0))
    assert rig.reply() == m.encode_reply(m.Request.GET_VRING_BASE, m.VRING_STATE.pack(1, 5))


def test_get_vring_base_on_a_dead_worker_answers_its_published_index(rig):
    negotiate(rig)
    configure_ring(rig, 1)
    assert rig.request(R.SET_VRING_ENABLE, state(1, 1))
    rig.pool.progress[1] = 7
    real_stop = rig.pool.stop_ring
    deaths = [1]

    def stop_ring(index):
        if deaths:
            deaths.pop()
            raise rig.pool.die(index)               # found dead at VRING_STOP
        rig.pool.progress[1] = 0                    # the replacement stops where it started
        return real_stop(index)
    rig.pool.stop_ring = stop_ring
    rig.pool.take()
    assert rig.request(R.GET_VRING_BASE, state(1, 0))
    calls = rig.pool.take()
    assert ("spawn", 1) in calls
    restart = [c for c in calls if c[0] == "start"]
    assert len(restart) == 1 and restart[0][6] == 7 and restart[0][-1] == "recover"
    assert rig.reply() == m.encode_reply(m.Request.GET_VRING_BASE, m.VRING_STATE.pack(1, 7))


def test_dead_idle_worker_gets_the_memory_table_and_call_fd(rig):
    negotiate(rig)
    assert rig.request(R.SET_VRING_CALL, u64(0), [eventfd()])
    rig.pool.take()
    rig.pool.die(0)
    rig.backend.revive(0)
    assert [c[0] for c in rig.pool.take()] == ["spawn", "mem_table", "set_call"]


def test_worker_dying_on_a_new_call_fd_is_replaced_with_it(rig):
    negotiate(rig)
    real = rig.pool.set_call
    deaths = [1]

    def set_call(index, fd):
        if deaths:
            deaths.pop()
            raise rig.pool.die(index)
        real(index, fd)
    rig.pool.set_call = set_call
    rig.pool.take()
    assert rig.request(R.SET_VRING_CALL, u64(1), [eventfd()])
    calls = rig.pool.take()
    assert [c[0] for c in calls] == ["spawn", "mem_table", "set_call"]
    assert calls[-1][2] is not None


def test_close_releases_every_kept_fd():
    rig = Rig()
    negotiate(rig)
    for i in range(3):
        configure_ring(rig, i)
        assert rig.request(R.SET_VRING_CALL, u64(i), [eventfd()])
        assert rig.request(R.SET_VRING_ERR, u64(i), [eventfd()])
    assert open_fds() > rig.baseline + 2
    rig.backend.close()
    rig.assert_closed_cleanly()


# -- hostile frontends: one clean close each, no fd left behind --------------------------------

def hostile(rig, caplog, *messages, setup=None):
    """Run the backend over ``messages`` (raw bytes or (bytes, fds)); the last
    one must make it close the connection with exactly one error line."""
    if setup:
        setup(rig)
    with caplog.at_level(logging.ERROR, logger="pyvirtiofsd"):
        for msg in messages:
            data, fds = msg if isinstance(msg, tuple) else (msg, [])
            rig.send_raw(data, fds)
        results = [rig.backend.serve_one() for _ in messages]
    assert results[-1] is False and all(results[:-1])
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    rig.assert_closed_cleanly()
    return errors[0].getMessage()


def msg(request, payload=b"", flags=m.VERSION, size=None):
    return m.HEADER.pack(request, flags, len(payload) if size is None else size) + payload


@pytest.fixture
def fresh():
    r = Rig(read_timeout=0.3)
    yield r
    if not r.backend.closed:
        r.close()


def test_hostile_wrong_payload_size(fresh, caplog):
    text = hostile(fresh, caplog, msg(R.SET_VRING_NUM, state(0, 128) + b"\0"))
    assert "SET_VRING_NUM: payload is 9 bytes, expected 8" in text


def test_hostile_short_payload(fresh, caplog):
    assert "expected 8" in hostile(fresh, caplog, msg(R.SET_FEATURES, b"\1\0\0\0"))


def test_hostile_payload_too_large(fresh, caplog):
    assert "exceeds" in hostile(fresh, caplog, msg(R.SET_FEATURES, size=1 << 20))


def test_hostile_bad_header_version(fresh, caplog):
    assert "version" in hostile(fresh, caplog, msg(R.GET_FEATURES, flags=0))


def test_hostile_message_cut_in_half_then_peer_vanishes(fresh, caplog):
    data = msg(R.SET_VRING_ADDR, addr_payload(1, *ring_addr(1)))[:30]
    fresh.send_raw(data)
    fresh.qemu.shutdown(socket.SHUT_WR)
    with caplog.at_level(logging.ERROR):
        assert fresh.backend.serve_one() is False
    assert "connection closed after 18 of 40 bytes of the SET_VRING_ADDR payload" in caplog.text
    fresh.assert_closed_cleanly()


def test_hostile_header_cut_in_half(fresh, caplog):
    fresh.send_raw(msg(R.GET_FEATURES)[:7], [eventfd()])
    fresh.qemu.shutdown(socket.SHUT_WR)
    with caplog.at_level(logging.ERROR):
        assert fresh.backend.serve_one() is False
    assert "connection closed after 0 of 5 bytes of the message header" in caplog.text
    fresh.assert_closed_cleanly()


def test_hostile_message_cut_in_half_peer_stays_silent(fresh, caplog):
    fresh.send_raw(msg(R.SET_MEM_TABLE, bytes(40))[:20], [memfd(4096)])
    with caplog.at_level(logging.ERROR):
        assert fresh.backend.serve_one() is False
    assert "timed out after 8 of 40 bytes" in caplog.text
    fresh.assert_closed_cleanly()


def test_hostile_kick_without_fd(fresh, caplog):
    assert "expected 1" in hostile(fresh, caplog, msg(R.SET_VRING_KICK, u64(1)))


def test_hostile_kick_polling_mode(fresh, caplog):
    assert "polling mode" in hostile(fresh, caplog, msg(R.SET_VRING_KICK, u64(1 | m.VRING_NOFD_MASK)))


@pytest.mark.parametrize("kind", ["pipe", "memfd", "socket"])
@pytest.mark.parametrize("request_id", [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR])
def test_hostile_notifier_that_is_not_an_eventfd(fresh, caplog, kind, request_id):
    """Regression: a kick fd that was a regular file made the worker's
    epoll.register raise (worker died, traceback, exit 1); a pipe at EOF
    made its eventfd_read raise. Kick/call/err fds must be eventfds."""
    if kind == "pipe":
        fd, w = os.pipe()
        os.close(w)
    elif kind == "memfd":
        fd = memfd(4096)
    else:
        a, b = socket.socketpair()
        fd = a.detach()
        b.close()
    text = hostile(fresh, caplog, (msg(request_id, u64(1)), [fd]))
    assert "not an eventfd" in text


def test_hostile_surplus_fd(fresh, caplog):
    assert "unexpected file descriptor" in hostile(fresh, caplog, (msg(R.SET_FEATURES, u64(0)), [eventfd()]))


def test_hostile_too_many_fds(fresh, caplog):
    text = hostile(fresh, caplog, (msg(R.SET_VRING_CALL, u64(0)), [eventfd() for _ in range(10)]))
    assert "more than 8 file descriptors" in text


def test_hostile_mem_table_fd_count(fresh, caplog):
    payload = mem_table_payload(region(0, RAM_SIZE, RAM_QVA))
    text = hostile(fresh, caplog, (msg(R.SET_MEM_TABLE, payload, flags=0x9), [memfd(RAM_SIZE), memfd(RAM_SIZE)]))
    assert "1 regions but 2 file descriptor" in text


def test_hostile_mem_table_overlap(fresh, caplog):
    payload = mem_table_payload(region(0, RAM_SIZE, RAM_QVA), region(RAM_SIZE // 2, RAM_SIZE, RAM_QVA + (1 << 30)))
    text = hostile(fresh, caplog, (msg(R.SET_MEM_TABLE, payload), [memfd(RAM_SIZE), memfd(RAM_SIZE)]))
    assert "overlap in guest-physical" in text


def test_hostile_mem_table_region_past_end_of_file(fresh, caplog):
    payload = mem_table_payload(region(0, RAM_SIZE, RAM_QVA, off=4096))
    text = hostile(fresh, caplog, (msg(R.SET_MEM_TABLE, payload), [memfd(RAM_SIZE)]))
    assert "region 0 needs 0x101000 bytes of its file, which has 0x100000" in text


def test_hostile_mem_table_no_regions(fresh, caplog):
    assert "0 regions" in hostile(fresh, caplog, msg(R.SET_MEM_TABLE, m.MEMORY_HEADER.pack(0)))


@pytest.mark.parametrize("num", [0, 96, 65536])
def test_hostile_vring_num(fresh, caplog, num):
    assert "power of two" in hostile(fresh, caplog, msg(R.SET_VRING_NUM, state(1, num)))


def test_hostile_vring_addr_outside_regions(fresh, caplog):
    desc, avail, used = ring_addr(1)
    text = hostile(fresh, caplog, msg(R.SET_VRING_ADDR, addr_payload(1, desc, avail, RAM_QVA + RAM_SIZE)),
                   setup=negotiate)
    assert "used ring address 0x7f0000100000 is in no memory region" in text


def test_hostile_vring_addr_before_mem_table(fresh, caplog):
    assert "before any SET_MEM_TABLE" in hostile(fresh, caplog, msg(R.SET_VRING_ADDR, addr_payload(1, *ring_addr(1))))


def test_hostile_ring_crossing_the_end_of_its_region(fresh, caplog):
    # the descriptor table starts inside guest RAM but its 128 entries run past it
    desc = RAM_QVA + RAM_SIZE - 1024
    _, avail, used = ring_addr(1)

    def setup(rig):
        negotiate(rig)
        assert rig.request(R.SET_VRING_NUM, state(1, QUEUE_SIZE))
        assert rig.request(R.SET_VRING_ADDR, addr_payload(1, desc, avail, used))
        assert rig.request(R.SET_VRING_ENABLE, state(1, 1))

    text = hostile(fresh, caplog, (msg(R.SET_VRING_KICK, u64(1)), [eventfd()]), setup=setup)
    assert "descriptor table [0x7f00000ffc00, +0x800) is not inside one memory region" in text


def test_hostile_features_never_offered(fresh, caplog):
    text = hostile(fresh, caplog, msg(R.SET_FEATURES, u64(QEMU_FEATURES | 1 << 24)))  # NOTIFY_ON_EMPTY
    assert "never offered (0x1000000)" in text


def test_hostile_protocol_features_never_offered(fresh, caplog):
    assert "never offered" in hostile(fresh, caplog, msg(R.SET_PROTOCOL_FEATURES, u64(0x209)))


def test_hostile_garbage_after_a_good_session(fresh, caplog):
    def setup(rig):
        negotiate(rig)
        configure_ring(rig, 1)
        assert rig.request(R.SET_VRING_ENABLE, state(1, 1))

    assert "expected 8" in hostile(fresh, caplog, msg(R.GET_VRING_BASE, b"\xff" * 12), setup=setup)


def test_peer_closing_between_messages_is_a_plain_disconnect(fresh, caplog):
    fresh.qemu.shutdown(socket.SHUT_WR)
    with caplog.at_level(logging.INFO):
        assert fresh.backend.serve_one() is False
    assert "QEMU disconnected" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    fresh.assert_closed_cleanly()


# -- CONFIGURE_MEM_SLOTS: regions one at a time -------------------------------------------------

def single_region(gpa, size, qva, off=0):
    return m.SINGLE_REGION.pack(gpa, size, qva, off)


def test_mem_slots_add_and_remove_regions_while_a_ring_runs():
    """QEMU with CONFIGURE_MEM_SLOTS sends GET_MAX_MEM_SLOTS, then one
    ADD_MEM_REG per region (REPLY_ACK'd); a hot-unplug is REM_MEM_REG. Each
    change stops the running rings, gives every worker the whole new table
    and restarts the rings at the base the worker reported."""
    rig = Rig(queue_count=2)
    negotiate(rig)
    configure_ring(rig, 1)
    assert rig.request(R.SET_VRING_ENABLE, state(1, 1))
    assert rig.request(R.GET_MAX_MEM_SLOTS)
    assert rig.reply() == bytes.fromhex("24000000 05000000 08000000 0800000000000000")
    rig.pool.take()
    rig.pool.progress[1] = 5
    hot = single_region(1 << 32, RAM_SIZE, RAM_QVA + (1 << 32))
    before = open_fds()
    assert rig.request(R.ADD_MEM_REG, hot, [memfd(RAM_SIZE)], flags=m.VERSION | m.FLAG_NEED_REPLY)
    assert rig.reply() == m.encode_u64_reply(R.ADD_MEM_REG, 0)
    calls = rig.pool.take()
    assert calls[0] == ("stop", 1)
    tables = [c for c in calls if c[0] == "mem_table"]
    assert {c[1] for c in tables} == {0, 1}
    assert all(len(c[2]) == 2 for c in tables)
    assert started(calls) == [1] and calls[-1][6] == 5      # restarted at the reported base
    assert open_fds() == before + 1                          # the new region's fd is kept
    assert rig.request(R.REM_MEM_REG, hot, flags=m.VERSION | m.FLAG_NEED_REPLY)
    assert rig.reply() == m.encode_u64_reply(R.REM_MEM_REG, 0)
    tables = [c for c in rig.pool.take() if c[0] == "mem_table"]
    assert tables and all(len(c[2]) == 1 for c in tables)
    assert open_fds() == before                              # and closed once removed
    rig.close()


def test_hostile_add_mem_reg_overlapping(fresh, caplog):
    overlap = single_region(RAM_SIZE // 2, RAM_SIZE, RAM_QVA + (1 << 32))
    text = hostile(fresh, caplog, (msg(R.ADD_MEM_REG, overlap), [memfd(RAM_SIZE)]),
                   setup=negotiate)
    assert "overlap" in text


def test_hostile_add_mem_reg_without_fd(fresh, caplog):
    text = hostile(fresh, caplog, msg(R.ADD_MEM_REG, single_region(1 << 32, RAM_SIZE, 1 << 40)),
                   setup=negotiate)
    assert "ADD_MEM_REG: 0 file descriptor(s)" in text


def test_hostile_add_mem_reg_beyond_the_announced_slots(fresh, caplog):
    messages = [(msg(R.ADD_MEM_REG, single_region((i + 1) << 32, 4096, (i + 1) << 40)), [memfd(4096)])
                for i in range(8)]
    text = hostile(fresh, caplog, *messages, setup=negotiate)
    assert "already 8 regions" in text


def test_hostile_rem_mem_reg_of_an_unknown_region(fresh, caplog):
    text = hostile(fresh, caplog, msg(R.REM_MEM_REG, single_region(1 << 32, RAM_SIZE, 1 << 40)),
                   setup=negotiate)
    assert "REM_MEM_REG: no region" in text
