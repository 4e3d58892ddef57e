"""A broken or hostile vhost-user frontend, end to end against the real
daemon process: malformed messages through the frontend's raw mode
(``send_raw`` with any size and fds, ``send_bytes`` for half messages).

Expected outcomes (daemon/vhost_user/backend.py, docs/INTERNALS.md):

- a malformed message ends the connection: the supervisor logs exactly one
  ERROR line ("vhost-user protocol error, closing the connection: <why>"),
  shuts its workers down and exits 0; no traceback, no worker left behind;
- what vhost-user lets a backend ignore (an unknown request id without
  NEED_REPLY, a message split over several writes) is ignored or
  reassembled, and every fd that came with it is closed: the supervisor's
  /proc/PID/fd count is the same before and after.

The same messages against ``Backend`` alone (fd-exact, with a fake worker
pool) are in tests/unit/test_vhost_user_backend.py.
"""

from __future__ import annotations

import os
import struct
import time

import pytest

from tests.frontend.fuse_client import FuseClient
from tests.frontend.vhost import HEADER, STATE, U64, VRING_NOFD, Req, VhostUserFrontend
from tests.procfs import children, fd_count, settled_fd_count, steady_fd_count

REGION = struct.Struct("<QQQQ")


@pytest.fixture(autouse=True)
def ours_only(daemon_kind):
    if daemon_kind != "ours":
        pytest.skip("documents pyvirtiofsd's outcome (libvhost-user panics or asserts)")


@pytest.fixture
def fresh(daemon_proc):
    """Connected, realized (GET_FEATURES ... SET_VRING_ERR), nothing started."""
    fe = VhostUserFrontend(daemon_proc.socket_path)
    fe.daemon = daemon_proc
    fe.realize()
    yield fe
    fe.close()


def eventfds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]


def close_all(fds) -> None:
    for fd in fds:
        os.close(fd)


def expect_closed(fe, needle: str) -> None:
    """The documented outcome of a malformed message."""
    daemon = fe.daemon
    workers = children(daemon.pid)
    rc = daemon.wait(10)
    log = daemon.log()
    assert rc == 0, f"exit status {rc}:\n{log[-3000:]}"
    errors = [ln for ln in log.splitlines() if " ERROR: " in ln]
    assert len(errors) == 1, "want exactly one error line:\n" + "\n".join(errors)
    assert "vhost-user protocol error, closing the connection" in errors[0], errors[0]
    assert needle in errors[0], errors[0]
    assert "Traceback" not in log
    for pid in workers:
        assert _gone(pid), f"worker {pid} outlived the supervisor"
    if fe.sock.fileno() >= 0:
        fe.sock.settimeout(2)
        try:
            assert fe.sock.recv(1) == b"", "the connection is still open"
        except ConnectionResetError:
            pass


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"   # reaped by init soon
    except OSError:
        return True


# -- message sizes and ids ------------------------------------------------------------------

@pytest.mark.parametrize("request_id,payload", [
    (Req.SET_VRING_NUM, b"\0" * 4), (Req.SET_FEATURES, b"\0" * 16),
    (Req.GET_FEATURES, b"\0" * 8), (Req.SET_VRING_ADDR, b"\0" * 39),
], ids=["vring_num_short", "features_long", "get_features_with_payload", "vring_addr_short"])
def test_wrong_payload_size(fresh, request_id, payload):
    fresh.send_raw(request_id, payload)
    expect_closed(fresh, f"payload is {len(payload)} bytes")


def test_header_size_beyond_the_limit(fresh):
    fresh.send_raw(Req.SET_VRING_NUM, STATE.pack(1, 8), size=1 << 31)
    expect_closed(fresh, "exceeds the 4096-byte limit")


@pytest.mark.frontend_opts(start="managed")   # as a service manager starts it (tests/start_conditions.py)
def test_unknown_request_id_is_ignored_and_its_fds_closed(fresh):
    daemon = fresh.daemon
    fresh.send_raw(Req.GET_FEATURES)  # a round trip: the daemon is idle and settled
    fresh._expect_reply(Req.GET_FEATURES)
    before = fd_count(daemon.pid)
    for request_id in (0, 19, 24, 41, 200, 0xFFFFFFFF):
        fds = eventfds(3)
        fresh.send_raw(request_id, os.urandom(100), fds)
        close_all(fds)
    fresh.send_raw(Req.GET_FEATURES)
    fresh._expect_reply(Req.GET_FEATURES)
    assert fd_count(daemon.pid) == before
    fresh.start()
    fc = FuseClient(fresh)
    fc.init()
    assert fc.getattr(1).attr.nlink >= 2


def test_unknown_request_id_with_a_huge_payload(fresh):
    fresh.send_raw(201, b"\0" * 8, size=1 << 20)
    expect_closed(fresh, "exceeds the 4096-byte limit")


# -- file descriptors -------------------------------------------------------------------------

def test_missing_kick_fd(fresh):
    fresh.send_raw(Req.SET_VRING_KICK, U64.pack(1))      # no fd, no NOFD bit
    expect_closed(fresh, "came with 0 file descriptor(s), expected 1")


def test_missing_mem_table_fds(fresh):
    payload, fds = fresh.mem.table()
    fresh.send_raw(Req.SET_MEM_TABLE, payload, fds[:1])
    expect_closed(fresh, "2 regions but 1 file descriptor(s)")


def test_surplus_fd_on_a_message_without_fds(fresh):
    fds = eventfds(1)
    fresh.send_raw(Req.SET_VRING_NUM, STATE.pack(1, 128), fds)
    close_all(fds)
    expect_closed(fresh, "unexpected file descriptor")


def test_surplus_fd_on_vring_call(fresh):
    fds = eventfds(2)
    fresh.send_raw(Req.SET_VRING_CALL, U64.pack(1), fds)
    close_all(fds)
    expect_closed(fresh, "came with 2 file descriptor(s), expected 1")


def test_fd_with_nofd_bit(fresh):
    fds = eventfds(1)
    fresh.send_raw(Req.SET_VRING_CALL, U64.pack(1 | VRING_NOFD), fds)
    close_all(fds)
    expect_closed(fresh, "expected 0")


def test_more_than_8_fds(fresh):
    fds = eventfds(12)
    fresh.send_raw(Req.SET_VRING_CALL, U64.pack(1), fds)
    close_all(fds)
    expect_closed(fresh, "more than 8 file descriptors")


# -- memory tables --------------------------------------------------------------------------------

def mem_table(regions: list[tuple[int, int, int, int]]) -> bytes:
    return struct.pack("<II", len(regions), 0) + b"".join(REGION.pack(*r) for r in regions)


def test_mem_table_without_regions(fresh):
    fresh.send_raw(Req.SET_MEM_TABLE, mem_table([]))
    expect_closed(fresh, "0 regions, expected 1..8")


def test_mem_table_with_9_regions(fresh):
    fd = fresh.mem.regions[1].fd
    regions = [(i << 20, 1 << 20, 0x7F00_0000_0000 + (i << 20), 0) for i in range(9)]
    fresh.send_raw(Req.SET_MEM_TABLE, mem_table(regions), [fd] * 8)
    expect_closed(fresh, "9 regions, expected 1..8")


@pytest.mark.parametrize("space", ["gpa", "qva"])
def test_mem_table_overlapping_regions(fresh, space):
    r0, r1 = fresh.mem.regions
    a = (r0.gpa, r0.size, r0.qva, r0.mmap_offset)
    if space == "gpa":
        b = (r0.gpa + 0x1000, r1.size, r1.qva, r1.mmap_offset)
    else:
        b = (r1.gpa, r1.size, r0.qva + 0x1000, r1.mmap_offset)
    fresh.send_raw(Req.SET_MEM_TABLE, mem_table([a, b]), [r0.fd, r1.fd])
    expect_closed(fresh, "overlap")


def test_mem_table_region_beyond_its_file(fresh):
    r = fresh.mem.regions[1]
    fresh.send_raw(Req.SET_MEM_TABLE, mem_table([(r.gpa, 1 << 40, r.qva, 0)]), [r.fd])
    expect_closed(fresh, "bytes of its file")


# -- vrings ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("num", [0, 3, 65536], ids=["zero", "not_power_of_two", "above_32768"])
def test_vring_num(fresh, num):
    fresh.send_raw(Req.SET_VRING_NUM, STATE.pack(1, num))
    expect_closed(fresh, f"size {num} is not a power of two")


def test_vring_addresses_in_no_region(fresh):
    payload, fds = fresh.mem.table()
    fresh.send_raw(Req.SET_MEM_TABLE, payload, fds, flags=0x9)
    fresh._expect_reply(Req.SET_MEM_TABLE)
    fresh.send_raw(Req.SET_VRING_ADDR, struct.pack("<IIQQQQ", 1, 0, 0x1000, 0x2000, 0x3000, 0))
    expect_closed(fresh, "is in no memory region")


def test_vring_crossing_the_end_of_its_region(fresh):
    """Inside a region at SET_VRING_ADDR, but num makes it run past the end."""
    fresh.start()
    r0 = fresh.mem.regions[0]
    end = r0.qva + r0.size
    fresh.send_raw(Req.SET_VRING_ADDR, struct.pack("<IIQQQQ", 1, 0, end - 64, end - 32, end - 64, 0))
    expect_closed(fresh, "is not inside one memory region")


# -- cut messages and vanishing peers ----------------------------------------------------------------

def test_message_cut_in_half_then_completed_is_served(fresh):
    """A message may arrive in pieces: the backend reassembles it."""
    data = HEADER.pack(Req.GET_QUEUE_NUM, 0x1, 0)
    fresh.send_bytes(data[:5])
    time.sleep(0.2)
    fresh.send_bytes(data[5:])
    assert fresh._expect_reply(Req.GET_QUEUE_NUM)
    payload, fds = fresh.mem.table()
    msg = HEADER.pack(Req.SET_MEM_TABLE, 0x9, len(payload)) + payload
    fresh.send_bytes(msg[:30], fds)
    time.sleep(0.2)
    fresh.send_bytes(msg[30:])
    assert U64.unpack(fresh._expect_reply(Req.SET_MEM_TABLE))[0] == 0
    fresh._mem_regions_sent = [r.packed() for r in fresh.mem.regions]  # start(): no ADD_MEM_REG
    fresh.start()
    fc = FuseClient(fresh)
    fc.init()
    assert fc.getattr(1).attr.nlink >= 2


def test_peer_vanishes_inside_a_header(fresh):
    fresh.send_bytes(HEADER.pack(Req.SET_VRING_NUM, 0x1, 8)[:7])
    fresh.disconnect()
    expect_closed(fresh, "of the message header")


def test_peer_vanishes_inside_a_payload_with_rings_running(fresh):
    """QEMU dies halfway through SET_MEM_TABLE (fds attached) while the
    rings run: the workers are shut down, everything is closed."""
    fresh.start()
    fc = FuseClient(fresh)
    fc.init()
    payload, fds = fresh.mem.table()
    msg = HEADER.pack(Req.SET_MEM_TABLE, 0x9, len(payload)) + payload
    fresh.send_bytes(msg[:len(msg) // 2], fds)
    fresh.disconnect()
    expect_closed(fresh, "connection closed after")


def test_fd_churn_does_not_leak(fresh):
    """Messages that replace fds (call, err, kick, the memory table) over and
    over: the supervisor's and the workers' fd counts stay where they were."""
    daemon = fresh.daemon
    fresh.start()
    fc = FuseClient(fresh)
    fc.init()
    pids = [daemon.pid] + children(daemon.pid)
    before = {p: steady_fd_count(p) for p in pids}
    for _ in range(20):
        for v in fresh.vrings:
            call = eventfds(1)
            fresh.set_vring_call(v.index, call[0])
            fresh.set_vring_err(v.index, call[0])
            fresh.set_vring_call(v.index, v.call_fd)
            close_all(call)
        fresh.set_mem_table()
        fresh.stop()
        fresh.start()
        junk = eventfds(4)
        fresh.send_raw(222, b"", junk)
        close_all(junk)
    assert fc.getattr(1).attr.nlink >= 2
    fresh.send_raw(Req.GET_FEATURES)
    fresh._expect_reply(Req.GET_FEATURES)
    after = {p: settled_fd_count(p, before[p]) for p in pids}
    assert after == before


@pytest.mark.parametrize("kind", ["pipe_at_eof", "memfd"])
def test_kick_fd_that_is_not_an_eventfd(fresh, kind):
    """Regression: the worker died on it (epoll refuses a regular file; a
    pipe at EOF is readable forever and eventfd_read raised)."""
    fresh.start()
    fc = FuseClient(fresh)
    fc.init()
    if kind == "memfd":
        fd = os.memfd_create("not-an-eventfd")
    else:
        fd, w = os.pipe()
        os.close(w)
    fresh.send_raw(Req.SET_VRING_KICK, U64.pack(1), [fd])
    os.close(fd)
    expect_closed(fresh, "not an eventfd")
