"""A hostile guest, end to end: malformed rings and FUSE requests written
into guest memory through the frontend's raw mode, against the real daemon
process (supervisor + forked workers).

Expected outcomes (the virtio rule, docs/INTERNALS.md):

- a malformed *chain or ring* marks that ring broken: one log line
  (rate-limited) ``vring N: ... no longer served``; the worker neither
  spins nor dies, the other queues (hiprio, vring 0) keep being served, and
  after a device reset of the ring (stop, fresh ring, start) the same queue
  serves again; the supervisor's fd count is unchanged;
- a malformed *FUSE request* in a well-formed chain gets a FUSE error reply
  (never a write past the writable part) and the queue goes on.

The same cases against ``VirtQueue`` / ``FuseSession`` alone are in
tests/unit/test_virtqueue.py and tests/unit/test_fuse_*.py; the fuzz target
(tests/fuzz/) covers their combinations.
"""

from __future__ import annotations

import errno
import os
import struct
import time

import pytest

from daemon.fuse import abi
from daemon.fuse.abi import Opcode
from tests.frontend.fuse_client import FuseErrorReply
from tests.frontend.vhost import STATE, Req
from tests.frontend.vring import VRING_DESC_F_INDIRECT as INDIRECT
from tests.frontend.vring import VRING_DESC_F_NEXT as NEXT
from tests.frontend.vring import VRING_DESC_F_WRITE as WRITE
from tests.procfs import children, settled_fd_count, steady_fd_count
from tests import procfs

GETATTR_ARGS = abi.GETATTR_IN.pack(0, 0, 0)
U64_MAX = (1 << 64) - 1
CPU_TICKS_IDLE = 10          # of 100/s: a spinning process burns ~50 in 0.5 s


@pytest.fixture(autouse=True)
def ours_only(daemon_kind):
    if daemon_kind != "ours":
        pytest.skip("documents pyvirtiofsd's outcome (the C virtiofsd exits on a bad ring)")


# -- process observation ---------------------------------------------------------------

def cpu_ticks(pid: int) -> int:
    return sum(procfs.cpu_ticks(pid))   # utime + stime



def assert_no_spin(daemon, seconds: float = 0.5) -> None:
    pids = [daemon.pid] + children(daemon.pid)
    before = {p: cpu_ticks(p) for p in pids}
    time.sleep(seconds)
    for p in pids:
        burnt = cpu_ticks(p) - before[p]
        assert burnt < CPU_TICKS_IDLE, f"pid {p} used {burnt} CPU ticks in {seconds} s: spinning"


def wait_log(daemon, needle: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = daemon.log()
        lines = [ln for ln in log.splitlines() if needle in ln]
        if lines:
            return lines[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line with {needle!r}:\n{log[-3000:]}")
        time.sleep(0.02)


# -- raw chains ----------------------------------------------------------------------------

def header(fc, opcode: int, nodeid: int, args_len: int, length: int | None = None) -> bytes:
    unique = fc.next_unique()
    total = 40 + args_len if length is None else length
    return abi.IN_HEADER.pack(total, opcode, unique, nodeid, 0, 0, 0, 0, 0)


def getattr_request(fc) -> bytes:
    return header(fc, Opcode.GETATTR, 1, len(GETATTR_ARGS)) + GETATTR_ARGS


def offer(vring, descs: list[tuple[int, int, int, int]], slots: list[int] | None = None) -> list[int]:
    """Write raw descriptors (addr, len, flags, next) into the ring's table
    and make the first one available; ``next`` values are used as given."""
    slots = slots if slots is not None else vring.take_descs(len(descs))
    for slot, (addr, length, flags, nxt) in zip(slots, descs):
        vring.write_desc(slot, addr, length, flags, nxt)
    vring.publish_head(slots[0])
    vring.kick()
    return slots


def chain_in_slots(slots: list[int], parts: list[tuple[int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Link (addr, len, flags) parts through ``slots`` with NEXT."""
    out = []
    for k, (addr, length, flags) in enumerate(parts):
        last = k == len(parts) - 1
        out.append((addr, length, flags | (0 if last else NEXT), 0 if last else slots[k + 1]))
    return out


def indirect_parts(parts: list[tuple[int, int, int]]) -> list[tuple[int, int, int, int]]:
    return [(a, n, f | (0 if k == len(parts) - 1 else NEXT), 0 if k == len(parts) - 1 else k + 1)
            for k, (a, n, f) in enumerate(parts)]


# -- outcomes --------------------------------------------------------------------------------

def expect_ring_broken(fc, slots: list[int], what: str) -> None:
    """The documented outcome of a malformed chain or ring on vring 1."""
    daemon, fe = fc.daemon, fc.vhost
    line = wait_log(daemon, "vring 1:")
    assert "no longer served" in line and what in line, line
    assert fc.rq.quiet(0.2), "a broken chain must not be answered"
    assert daemon.proc.poll() is None, "the daemon died"
    workers = children(daemon.pid)
    assert len(workers) == 3, f"workers {workers}: one died (hiprio, request-1, keeper)"
    assert_no_spin(daemon)
    fds = steady_fd_count(daemon.pid)
    targets = procfs.fd_targets(daemon.pid)
    # the other queue (hiprio, vring 0, its own worker) is still served
    fc.forget(1, 1)
    os.mkdir(os.path.join(fc.shared_dir, "probe"))
    fc.rq.give_back(slots)
    # a device reset of vring 1 (what a guest driver does with a broken
    # device): the same worker serves the fresh ring
    fc.rq = fe.reset_vring(1)
    entry = fc.lookup(1, "probe")
    fc.forget(entry.nodeid, 1)
    assert fc.getattr(1).attr.nlink >= 2
    assert children(daemon.pid) == workers, "a worker was replaced"
    assert settled_fd_count(daemon.pid, fds) == fds, (
        "supervisor fd count changed: "
        + procfs.fd_difference(targets, procfs.fd_targets(daemon.pid)))
    assert daemon.log().count("no longer served") == 1


# -- descriptor chains -----------------------------------------------------------------------

@pytest.mark.frontend_opts(start="managed")   # as a service manager starts it (tests/start_conditions.py)
def test_descriptor_loop(frontend):
    rq = frontend.rq
    req = rq.raw_buffer(getattr_request(frontend))
    slots = rq.take_descs(2)
    offer(rq, [(req, 40, NEXT, slots[1]), (req + 40, 16, NEXT, slots[0])], slots)
    expect_ring_broken(frontend, slots, "descriptor loop")


def test_chain_longer_than_the_queue(frontend):
    """Every descriptor of the table chained in a cycle: longer than num."""
    rq = frontend.rq
    req = rq.raw_buffer(getattr_request(frontend))
    slots = rq.take_descs(rq.num)
    descs = [(req, 56 if k == 0 else 0, NEXT, slots[(k + 1) % rq.num]) for k in range(rq.num)]
    offer(rq, descs, slots)
    expect_ring_broken(frontend, slots, "longer than its table")


def test_next_out_of_range(frontend):
    rq = frontend.rq
    req = rq.raw_buffer(getattr_request(frontend))
    slots = offer(rq, [(req, 56, NEXT, rq.num + 7)])
    expect_ring_broken(frontend, slots, "next index")


def test_indirect_table_inside_an_indirect_descriptor(frontend):
    rq = frontend.rq
    req = rq.raw_buffer(getattr_request(frontend))
    inner = rq.raw_table([(req, 56, 0, 0)])
    outer = rq.raw_table([(inner, 16, INDIRECT, 0)])
    slots = offer(rq, [(outer, 16, INDIRECT, 0)])
    expect_ring_broken(frontend, slots, "nested indirect")


def test_indirect_with_next_set(frontend):
    rq = frontend.rq
    req = rq.raw_buffer(getattr_request(frontend))
    table = rq.raw_table(indirect_parts([(req, 56, 0), (rq.raw_buffer(120), 120, WRITE)]))
    slots = rq.take_descs(2)
    offer(rq, [(table, 32, INDIRECT | NEXT, slots[1]), (rq.raw_buffer(16), 16, WRITE, 0)], slots)
    expect_ring_broken(frontend, slots, "indirect descriptor with NEXT")


@pytest.mark.parametrize("length", [24, 0, 16 * 1025], ids=["not_multiple_of_16", "empty",
                                                             "more_than_1024_entries"])
def test_indirect_table_length(frontend, length):
    rq = frontend.rq
    req = rq.raw_buffer(getattr_request(frontend))
    table = rq.raw_table(indirect_parts([(req, 56, 0), (rq.raw_buffer(120), 120, WRITE)]))
    slots = offer(rq, [(table, length, INDIRECT, 0)])
    expect_ring_broken(frontend, slots, f"indirect table length {length}")


# -- addresses ---------------------------------------------------------------------------------

def test_address_outside_every_region(frontend):
    """GPA 0xB0000 is in the VGA hole between the two pc regions."""
    rq = frontend.rq
    table = rq.raw_table(indirect_parts([(0xB0000, 56, 0), (rq.raw_buffer(120), 120, WRITE)]))
    slots = offer(rq, [(table, 32, INDIRECT, 0)])
    expect_ring_broken(frontend, slots, "outside guest memory")


def test_buffer_spanning_the_hole_between_two_regions(frontend):
    """Starts in region 0 (ends at 0xA0000), continues into the hole."""
    rq = frontend.rq
    req = rq.raw_buffer(getattr_request(frontend))
    table = rq.raw_table(indirect_parts([(req, 56, 0), (0xA0000 - 64, 120, WRITE)]))
    slots = offer(rq, [(table, 32, INDIRECT, 0)])
    expect_ring_broken(frontend, slots, "outside guest memory")


def test_buffer_spanning_two_adjacent_regions_is_served(frontend):
    """Legal: a hot-plugged region right after RAM; the reply straddles the
    boundary and arrives whole."""
    fe, rq = frontend.vhost, frontend.rq
    end = max(r.end for r in fe.mem.regions)
    fe.mem.add_region(end, 1 << 20)
    fe.set_mem_table()
    req = rq.raw_buffer(getattr_request(frontend))
    reply_gpa = end - 50                      # 50 bytes before, 70 after the boundary
    fe.mem.write(reply_gpa, b"\xa5" * 50)
    fe.mem.write(end, b"\xa5" * 70)
    table = rq.raw_table(indirect_parts([(req, 56, 0), (reply_gpa, 120, WRITE)]))
    slots = offer(rq, [(table, 32, INDIRECT, 0)])
    head = slots[0]
    deadline = time.monotonic() + 5
    while rq.used_idx() == rq.last_used:
        assert time.monotonic() < deadline, "straddling request not answered"
        time.sleep(0.01)
    reply = fe.mem.read(reply_gpa, 50) + fe.mem.read(end, 70)
    length, err, _ = abi.OUT_HEADER.unpack_from(reply)
    assert (length, err) == (120, 0)
    attr = abi.ATTR_OUT.unpack_from(reply, 16)
    assert attr[3] == os.stat(frontend.shared_dir).st_ino
    hid, used = struct.unpack("<II", fe.mem.read(rq.used_gpa + 4 + 8 * (rq.last_used % rq.num), 8))
    assert (hid, used) == (head, 120)
    rq.last_used = (rq.last_used + 1) & 0xFFFF
    rq.give_back(slots)
    assert frontend.getattr(1).attr.nlink >= 2


def test_address_plus_length_overflows_64_bits(frontend):
    rq = frontend.rq
    req = rq.raw_buffer(getattr_request(frontend))
    table = rq.raw_table(indirect_parts([(req, 56, 0), (U64_MAX - 15, 120, WRITE)]))
    slots = offer(rq, [(table, 32, INDIRECT, 0)])
    expect_ring_broken(frontend, slots, "overflows 64 bits")


def test_zero_length_descriptors_are_served(frontend):
    """Zero-length descriptors contribute nothing (even with a bogus address)."""
    rq = frontend.rq
    req = rq.raw_buffer(getattr_request(frontend))
    out = rq.raw_buffer(120)
    parts = [(req, 0, 0), (req, 40, 0), (0xB0000, 0, 0), (req + 40, 16, 0),
             (out, 0, WRITE), (out, 120, WRITE), (U64_MAX, 0, WRITE)]
    slots = rq.take_descs(len(parts))
    offer(rq, chain_in_slots(slots, parts), slots)
    deadline = time.monotonic() + 5
    while rq.used_idx() == rq.last_used:
        assert time.monotonic() < deadline, "request with zero-length descriptors not answered"
        time.sleep(0.01)
    length, err, _ = abi.OUT_HEADER.unpack_from(frontend.vhost.mem.read(out, 16))
    assert (length, err) == (120, 0)
    rq.last_used = (rq.last_used + 1) & 0xFFFF
    rq.give_back(slots)
    assert frontend.getattr(1).attr.nlink >= 2


def test_writable_descriptor_before_a_readable_one(frontend):
    rq = frontend.rq
    req = rq.raw_buffer(getattr_request(frontend))
    slots = rq.take_descs(2)
    offer(rq, chain_in_slots(slots, [(rq.raw_buffer(120), 120, WRITE), (req, 56, 0)]), slots)
    expect_ring_broken(frontend, slots, "device-readable descriptor after a writable one")


# -- the ring ----------------------------------------------------------------------------------

def test_avail_index_jumping_by_more_than_the_queue_size(frontend):
    rq = frontend.rq
    rq.store_avail_idx(rq.avail_idx + rq.num + 1)
    rq.kick()
    expect_ring_broken(frontend, [], "avail index jumped")


def test_ring_not_enabled_is_not_served(frontend):
    """SET_VRING_ENABLE 0: requests wait, with no side effect, until it is
    enabled again; no CPU spin meanwhile (the kick fd stays signalled)."""
    fe, rq = frontend.vhost, frontend.rq
    # NEED_REPLY: the ack says the backend has acted on it (REPLY_ACK)
    fe._set(Req.SET_VRING_ENABLE, STATE.pack(1, 0), need_reply=True)
    p = frontend.send(Opcode.MKDIR, 1, abi.MKDIR_IN.pack(0o755, 0) + b"later\0", [128])
    assert rq.quiet(0.5)
    assert not os.path.exists(os.path.join(frontend.shared_dir, "later"))
    assert_no_spin(frontend.daemon)
    fe.set_vring_enable(1, True)
    assert frontend.complete(p, 5).error == 0
    assert os.path.isdir(os.path.join(frontend.shared_dir, "later"))


def test_kicks_before_set_mem_table(daemon_proc):
    """The guest kicks (and QEMU passes kick fds) before any memory table:
    nothing runs, nothing breaks; the normal start then serves."""
    from tests.frontend.fuse_client import FuseClient
    from tests.frontend.vhost import F_PROTOCOL_FEATURES, VhostUserFrontend

    fe = VhostUserFrontend(daemon_proc.socket_path, ram_size=64 << 20)
    try:
        fe.realize()
        fe.acked_features = fe.guest_features() | (fe.features & F_PROTOCOL_FEATURES)
        fe._make_vrings()
        fe.set_features(fe.acked_features)
        for v in fe.vrings:
            fe.set_vring_num(v.index, v.num)
            fe.set_vring_base(v.index, 0)
            fe.set_vring_kick(v.index, v.kick_fd)
            fe.set_vring_enable(v.index, True)
            for _ in range(3):
                v.kick()
        assert fe.no_reply_pending(0.3)
        assert daemon_proc.proc.poll() is None
        assert_no_spin(daemon_proc, 0.5)
        fe.start()
        fc = FuseClient(fe)
        fc.init()
        assert fc.getattr(1).attr.nlink >= 2
    finally:
        fe.close()


# -- FUSE requests -----------------------------------------------------------------------------

def raw_call(fc, readable: list[bytes], writable: list[int]) -> tuple[int, int, int, int, bytes]:
    return fc.raw_reply(fc.send_raw(readable, writable))


def still_serving(fc) -> None:
    assert fc.daemon.proc.poll() is None
    assert fc.getattr(1).attr.nlink >= 2


@pytest.mark.parametrize("delta", [-1, +1, +4096], ids=["smaller_by_1", "larger_by_1", "larger_by_4096"])
def test_fuse_header_len_differs_from_the_readable_part(frontend, delta):
    hdr = header(frontend, Opcode.GETATTR, 1, 16, length=56 + delta)
    used, olen, err, unique, _ = raw_call(frontend, [hdr, GETATTR_ARGS], [16, 104])
    assert err == -errno.EINVAL and olen == 16
    assert unique == abi.IN_HEADER.unpack(hdr)[2]
    still_serving(frontend)


@pytest.mark.parametrize("size", [0, 39])
def test_fuse_short_header(frontend, size):
    hdr = header(frontend, Opcode.GETATTR, 1, 0)[:size]
    parts = [hdr] if hdr else []
    if not parts:  # a readable part of 0 bytes: one zero-length descriptor
        parts = [b""]
    used, olen, err, unique, _ = raw_call(frontend, parts, [16, 104])
    assert (err, olen, unique) == (-errno.EINVAL, 16, 0)
    still_serving(frontend)


@pytest.mark.parametrize("opcode", [7, 52, 0xFFFFFFFF])
def test_fuse_unknown_opcode_is_enosys(frontend, opcode):
    hdr = header(frontend, opcode, 1, 8)
    used, olen, err, unique, _ = raw_call(frontend, [hdr, bytes(8)], [16, 64])
    assert (err, olen) == (-errno.ENOSYS, 16)
    still_serving(frontend)


@pytest.mark.parametrize("nodeid", [0, 77, U64_MAX], ids=["zero", "never_looked_up", "u64_max"])
def test_fuse_unknown_nodeid_is_estale(frontend, nodeid):
    for op in (frontend.getattr, frontend.statfs, frontend.readlink, frontend.opendir):
        with pytest.raises(FuseErrorReply) as e:
            op(nodeid)
        assert e.value.errno == errno.ESTALE
    with pytest.raises(FuseErrorReply) as e:
        frontend.lookup(nodeid, "x")
    assert e.value.errno == errno.ESTALE
    still_serving(frontend)


def test_fuse_forgotten_nodeid_is_estale(frontend):
    os.mkdir(os.path.join(frontend.shared_dir, "gone"))
    e = frontend.lookup(1, "gone")
    frontend.forget(e.nodeid, 1)
    time.sleep(0.05)  # FORGET is on the hiprio worker; the request worker reaps on its next request
    with pytest.raises(FuseErrorReply) as err:
        frontend.getattr(e.nodeid)
    assert err.value.errno == errno.ESTALE
    still_serving(frontend)


def test_fuse_forget_more_than_the_lookup_count(frontend):
    """FORGET and BATCH_FORGET with counts beyond the lookup count free the
    inode once, never underflow, never touch the root."""
    os.mkdir(os.path.join(frontend.shared_dir, "d"))
    e = frontend.lookup(1, "d")
    assert frontend.lookup(1, "d").nodeid == e.nodeid      # nlookup 2
    frontend.forget(e.nodeid, U64_MAX)
    frontend.forget(e.nodeid, 5)                            # already free
    frontend.batch_forget([(e.nodeid, 1 << 63), (1, U64_MAX), (0, 1), (U64_MAX, 1)])
    frontend.forget(1, U64_MAX)                             # the root is pinned
    time.sleep(0.05)
    with pytest.raises(FuseErrorReply) as err:
        frontend.getattr(e.nodeid)
    assert err.value.errno == errno.ESTALE
    assert frontend.getattr(1).attr.nlink >= 3
    again = frontend.lookup(1, "d")
    assert frontend.getattr(again.nodeid).attr.ino == os.stat(os.path.join(frontend.shared_dir, "d")).st_ino


def test_fuse_batch_forget_count_beyond_its_entries(frontend):
    args = abi.BATCH_FORGET_IN.pack(1_000_000) + abi.FORGET_ONE.pack(1, 1)
    p = frontend.send(Opcode.BATCH_FORGET, 0, args, vring=frontend.hq, single=True)
    assert frontend.complete(p).used_len == 0
    still_serving(frontend)


def test_fuse_name_without_nul(frontend):
    name = b"abc"
    for opcode, args in ((Opcode.LOOKUP, name), (Opcode.MKDIR, abi.MKDIR_IN.pack(0o755, 0) + name),
                         (Opcode.UNLINK, name),
                         (Opcode.CREATE, abi.CREATE_IN.pack(os.O_RDWR, 0o100644, 0, 0) + name),
                         (Opcode.SYMLINK, name + b"\0target"), (Opcode.RENAME, abi.RENAME_IN.pack(1) + b"a\0b")):
        with pytest.raises(FuseErrorReply) as e:
            frontend.call(opcode, 1, args, [144])
        assert e.value.errno == errno.EINVAL, Opcode(opcode).name
    assert os.listdir(frontend.shared_dir) == []
    still_serving(frontend)


@pytest.mark.parametrize("length", [256, 4000])
def test_fuse_name_longer_than_255_bytes(frontend, length):
    with pytest.raises(FuseErrorReply) as e:
        frontend.lookup(1, "n" * length)
    assert e.value.errno == errno.ENAMETOOLONG
    with pytest.raises(FuseErrorReply) as e:
        frontend.mkdir(1, "n" * length)
    assert e.value.errno == errno.ENAMETOOLONG
    assert os.listdir(frontend.shared_dir) == []
    still_serving(frontend)


def _file(fc, data: bytes = b"0123456789" * 1000):
    with open(os.path.join(fc.shared_dir, "f"), "wb") as f:
        f.write(data)
    os.setxattr(os.path.join(fc.shared_dir, "f"), "user.big", b"v" * 200)
    e = fc.lookup(1, "f")
    return e, fc.open(e.nodeid, os.O_RDWR | os.O_LARGEFILE).fh, data


@pytest.mark.parametrize("size", [2 << 20, 0xFFFFFFFF])
def test_fuse_read_size_beyond_the_writable_part(frontend, size):
    """READ asks for more than max_write and than its buffer: the answer is
    clipped to the buffer (what fits), never written past it."""
    e, fh, data = _file(frontend)
    args = frontend.read_args(fh, 0, size)
    used, olen, err, _, payload = raw_call(
        frontend, [header(frontend, Opcode.READ, e.nodeid, len(args)), args], [16, 4096])
    assert err == 0 and payload == data[:4096]
    still_serving(frontend)


@pytest.mark.parametrize("declared", [50, 0xFFFFFFFF])
def test_fuse_write_size_not_the_data_it_carries(frontend, declared):
    e, fh, data = _file(frontend)
    args = abi.WRITE_IN.pack(fh, 0, declared, 0, 0, os.O_RDWR)
    payload = b"x" * 100
    used, olen, err, _, _ = raw_call(
        frontend, [header(frontend, Opcode.WRITE, e.nodeid, len(args) + len(payload)), args, payload],
        [16, 8])
    assert err == -errno.EINVAL
    with open(os.path.join(frontend.shared_dir, "f"), "rb") as f:
        assert f.read() == data
    still_serving(frontend)


def test_fuse_write_beyond_max_write(frontend):
    e, fh, data = _file(frontend)
    big = b"y" * ((1 << 20) + 4096)
    with pytest.raises(FuseErrorReply) as err:
        frontend.write(e.nodeid, fh, 0, big)
    assert err.value.errno == errno.EINVAL
    still_serving(frontend)


@pytest.mark.parametrize("asked", [0xFFFFFFFF])
def test_fuse_getxattr_size_beyond_the_writable_part(frontend, asked):
    """The value (200 bytes) fits what was asked, not the 100-byte buffer:
    ERANGE, as for a value larger than the size."""
    e, _fh, _ = _file(frontend)
    args = abi.GETXATTR_IN.pack(asked) + b"user.big\0"
    used, olen, err, _, _ = raw_call(
        frontend, [header(frontend, Opcode.GETXATTR, e.nodeid, len(args)), args], [16, 100])
    assert err == -errno.ERANGE
    assert frontend.getxattr(e.nodeid, "user.big", 4096) == b"v" * 200
    still_serving(frontend)


@pytest.mark.parametrize("asked", [3, 0xFFFFFFFF])
def test_fuse_listxattr_size_beyond_the_writable_part(frontend, asked):
    e, _fh, _ = _file(frontend)
    args = abi.GETXATTR_IN.pack(asked)
    used, olen, err, _, _ = raw_call(
        frontend, [header(frontend, Opcode.LISTXATTR, e.nodeid, len(args)), args], [16, 3])
    assert err == -errno.ERANGE
    assert b"user.big" in frontend.listxattr(e.nodeid, 4096)
    still_serving(frontend)


@pytest.mark.parametrize("offset", [0xDEADBEEF, U64_MAX])
def test_fuse_readdir_offset_from_nowhere(frontend, offset):
    for i in range(20):
        open(os.path.join(frontend.shared_dir, f"e{i}"), "w").close()
    fh = frontend.opendir(1).fh
    for op in (frontend.readdir, frontend.readdirplus):
        try:
            op(1, fh, offset)   # well-formed records (checked by the client), or an error
        except FuseErrorReply as e:
            assert e.errno in (errno.EINVAL, errno.ENOENT, errno.EIO), e
    names = {d.name for d in frontend.readdir_all(1)}
    assert {f"e{i}".encode() for i in range(20)} <= names
    frontend.releasedir(1, fh)
    still_serving(frontend)


def _with_canary(fc, readable: list[bytes], size: int, canary: int = 64) -> tuple[int, bytes]:
    """A raw request whose one writable buffer of ``size`` bytes is followed
    by ``canary`` bytes the device must not touch; (reply bytes, canary after)."""
    rq, mem = fc.rq, fc.vhost.mem
    block = rq.raw_buffer(b"\x5a" * (size + canary))
    parts = [(rq.raw_buffer(r), len(r), 0) for r in readable] + [(block, size, WRITE)]
    slots = offer(rq, [(rq.raw_table(indirect_parts(parts)), 16 * len(parts), INDIRECT, 0)])
    deadline = time.monotonic() + 5
    while rq.used_idx() == rq.last_used:
        assert time.monotonic() < deadline, "raw request not answered"
        time.sleep(0.01)
    hid, used = struct.unpack("<II", mem.read(rq.used_gpa + 4 + 8 * (rq.last_used % rq.num), 8))
    assert hid == slots[0] and used <= size
    rq.last_used = (rq.last_used + 1) & 0xFFFF
    rq.give_back(slots)
    return mem.read(block, used), mem.read(block + size, canary)


@pytest.mark.parametrize("op,size,want", [
    ("getattr", 16 + 50, errno.EIO), ("lookup", 16 + 127, errno.EIO),
    ("statfs", 16 + 79, errno.EIO), ("getxattr", 16 + 199, errno.ERANGE),
    ("listxattr", 16 + 5, errno.ERANGE), ("readlink", 16 + 3, None),
    ("readdir", 16 + 30, None), ("readdirplus", 16 + 151, None), ("read", 16 + 7, None),
])
def test_fuse_reply_buffer_too_small(frontend, op, size, want):
    """ERANGE/EIO as the kernel expects, or an answer clipped to the buffer;
    never a byte past the buffer. ``want`` None: a short success."""
    fc = frontend
    e, fh, data = _file(fc)
    os.symlink("a-long-symlink-target", os.path.join(fc.shared_dir, "sl"))
    sl = fc.lookup(1, "sl").nodeid
    dfh = fc.opendir(1).fh
    requests = {
        "getattr": (Opcode.GETATTR, 1, GETATTR_ARGS),
        "lookup": (Opcode.LOOKUP, 1, b"f\0"),
        "statfs": (Opcode.STATFS, 1, b""),
        "getxattr": (Opcode.GETXATTR, e.nodeid, abi.GETXATTR_IN.pack(4096) + b"user.big\0"),
        "listxattr": (Opcode.LISTXATTR, e.nodeid, abi.GETXATTR_IN.pack(4096)),
        "readlink": (Opcode.READLINK, sl, b""),
        "readdir": (Opcode.READDIR, 1, fc.read_args(dfh, 0, 4096, flags=0x18800)),
        "readdirplus": (Opcode.READDIRPLUS, 1, fc.read_args(dfh, 0, 4096, flags=0x18800)),
        "read": (Opcode.READ, e.nodeid, fc.read_args(fh, 0, 4096)),
    }
    opcode, nodeid, args = requests[op]
    readable = [header(fc, opcode, nodeid, len(args))] + ([args] if args else [])
    reply, canary = _with_canary(fc, readable, size)
    assert canary == b"\x5a" * 64, f"{op}: the device wrote past the writable buffer"
    olen, err, _ = abi.OUT_HEADER.unpack_from(reply)
    assert olen == len(reply) <= size
    if want is not None:
        assert err == -want and olen == 16
    else:
        assert err in (0, -errno.ERANGE, -errno.EIO), err
        if op == "read":
            assert reply[16:] == data[:7]
    if op == "lookup":  # EIO before the op: no lookup count was taken
        fc.forget(1, 0)
    fc.releasedir(1, dfh)
    still_serving(fc)
