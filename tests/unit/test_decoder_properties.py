"""Property tests for the decoders the other unit files leave uncovered:

- vhost-user payloads: round trip from the test frontend's own encoders
  (tests/frontend, written independently of the daemon) through
  ``messages.decode_payload``;
- the supervisor↔worker channel: ``encode_mem_table``/``decode_mem_table``
  round trip, and ``Channel.recv`` on arbitrary frames with arbitrary fds
  (only ``ChannelError``, every fd closed);
- descriptor chains: any well-formed chain (direct or indirect, buffers
  split anywhere, zero-length descriptors, straddling the two regions) pops
  as exactly the bytes and sizes the driver wrote;
- every FUSE op of the op table through ``FuseSession.handle`` with
  structured random arguments (real nodeids and fhs, random fields, names,
  writable sizes, scattered buffers): only well-formed replies,
  ``out_header.len`` == bytes written <= writable size, errors are negative
  errnos with no payload, and a success has the op's reply size.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from daemon.fuse import abi, credentials
from daemon.fuse.abi import Opcode
from daemon.fuse import ops
from daemon.vhost_user import messages as m
from daemon.vhost_user.messages import Request
from daemon.virtio.iovec import IoVec
from daemon.workers import channel as ch
from daemon.workers.channel import Channel, ChannelError
from tests.frontend import vhost as fe
from tests.unit.test_fuse_session import init_args, make_session
from tests.unit.test_virtqueue import BUFFER_GPA, SPLIT_GPA, GuestDriver

U64 = (1 << 64) - 1

# -- vhost-user: frontend encoders → daemon decoders ---------------------------------------


@settings(max_examples=200, deadline=None)
@given(index=st.integers(0, m.MAX_VRINGS - 1), log2=st.integers(0, 15), base=st.integers(0, 0xFFFF),
       enable=st.booleans())
def test_vring_state_round_trip(index, log2, base, enable):
    for request, value in ((Request.SET_VRING_NUM, 1 << log2), (Request.SET_VRING_BASE, base),
                           (Request.GET_VRING_BASE, 0), (Request.SET_VRING_ENABLE, int(enable))):
        assert m.decode_payload(request, fe.STATE.pack(index, value), 0) == m.VringState(index, value)


@settings(max_examples=200, deadline=None)
@given(index=st.integers(0, m.MAX_VRINGS - 1), desc=st.integers(0, U64 >> 4),
       used=st.integers(0, U64 >> 2), avail=st.integers(0, U64 >> 1), log=st.integers(0, U64))
def test_vring_addr_round_trip(index, desc, used, avail, log):
    payload = struct.pack("<IIQQQQ", index, 0, desc << 4, used << 2, avail << 1, log)
    assert m.decode_payload(Request.SET_VRING_ADDR, payload, 0) == \
        m.VringAddr(index, 0, desc << 4, used << 2, avail << 1, log)


@settings(max_examples=200, deadline=None)
@given(index=st.integers(0, 0xFF), has_fd=st.booleans(),
       request=st.sampled_from([Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR]))
def test_vring_file_round_trip(index, has_fd, request):
    payload = fe.U64.pack(index if has_fd else index | fe.VRING_NOFD)
    assert m.decode_payload(request, payload, int(has_fd)) == m.VringFile(index, has_fd)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 1 << 40), min_size=1, max_size=8),
       gaps=st.lists(st.integers(0, 1 << 40), min_size=8, max_size=8),
       offsets=st.lists(st.integers(0, 1 << 40), min_size=8, max_size=8))
def test_mem_table_round_trip(sizes, gaps, offsets):
    regions, gpa, qva = [], 0, 0x7F00_0000_0000
    for size, gap, off in zip(sizes, gaps, offsets):
        gpa += gap
        regions.append(m.MemoryRegion(gpa, size, qva, off))
        gpa += size
        qva += size + gap
    payload = struct.pack("<II", len(regions), 0) + b"".join(
        struct.pack("<QQQQ", r.gpa, r.size, r.qva, r.mmap_offset) for r in regions)
    assert m.decode_payload(Request.SET_MEM_TABLE, payload, len(regions)) == regions
    for r in regions:
        single = bytes(8) + struct.pack("<QQQQ", r.gpa, r.size, r.qva, r.mmap_offset)
        assert m.decode_payload(Request.ADD_MEM_REG, single, 1) == r
    # and on to the workers, unchanged
    wire = ch.encode_mem_table([r.as_tuple() for r in regions])
    assert ch.decode_mem_table(wire, len(regions)) == [r.as_tuple() for r in regions]


@settings(max_examples=200, deadline=None)
@given(request=st.integers(0, 0xFFFFFFFF), value=st.integers(0, U64))
def test_replies_parse_as_qemu_parses_them(request, value):
    reply = m.encode_u64_reply(request, value)
    assert fe.HEADER.unpack(reply[:12]) == (request, fe.FLAG_VERSION | fe.FLAG_REPLY, 8)
    assert fe.U64.unpack(reply[12:]) == (value,)


# -- the worker channel ----------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=300), nfds=st.integers(0, 9))
def test_channel_mem_table_decoder_raises_only_channel_error(payload, nfds):
    try:
        regions = ch.decode_mem_table(payload, nfds)
    except ChannelError:
        return
    assert len(regions) == nfds <= ch.MAX_FDS


@pytest.fixture(scope="module")
def channel_pair():
    a, b = Channel.pair()
    yield a, b
    a.close()
    b.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=st.one_of(st.binary(max_size=64),
                       st.tuples(st.integers(0, 12), st.binary(max_size=64)).map(
                           lambda t: ch.FRAME.pack(t[0], len(t[1])) + t[1])),
       nfds=st.integers(0, 10))
def test_channel_recv_raises_only_channel_error_and_closes_fds(channel_pair, frame, nfds):
    sender, receiver = channel_pair
    before = _open_fds()
    fds = [os.eventfd(0) for _ in range(nfds)]
    try:
        if frame:
            socket.send_fds(sender.sock, [frame], fds) if fds else sender.sock.send(frame)
    finally:
        for fd in fds:
            os.close(fd)
    if not frame:
        return  # an empty datagram is EOF to the receiver: covered by "peer closed"
    try:
        msg, payload, got = receiver.recv()
    except ChannelError:
        pass
    else:
        assert ch.FRAME.pack(msg, len(payload)) + payload == frame
        ch.close_fds(got)
    assert _open_fds() == before


@settings(max_examples=300, deadline=None)
@given(msg=st.sampled_from(list(ch.Msg)), size=st.integers(0, 300), nfds=st.integers(0, 9))
def test_channel_request_check_accepts_only_the_table_and_closes_fds_on_refusal(msg, size, nfds):
    before = _open_fds()
    fds = [os.eventfd(0) for _ in range(nfds)]
    try:
        ch.check_request(msg, bytes(size), fds)
    except ChannelError:
        assert _open_fds() == before       # refused: every fd closed
        expect = ch.REQUESTS.get(msg)
        assert expect is None or size not in expect[0] or nfds not in expect[1]
        return
    ch.close_fds(fds)
    sizes, counts = ch.REQUESTS[msg]
    assert size in sizes and nfds in counts
    assert msg not in (ch.Msg.READY, ch.Msg.ANSWER)


# -- descriptor chains: what the driver wrote is what pops --------------------------------------

@pytest.fixture(scope="module")
def ring():
    d = GuestDriver(num=16)
    mem = d.memory()
    yield d, mem
    mem.close()
    d.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(readable=st.lists(st.binary(max_size=200), max_size=5),
       writable=st.lists(st.integers(0, 300), max_size=5),
       indirect=st.booleans(), straddle=st.booleans())
def test_well_formed_chains_pop_as_written(ring, readable, writable, indirect, straddle):
    d, mem = ring
    if not readable and not writable:
        readable = [b""]
    d.next_desc = 0
    d.next_table = 0x6000
    # straddle: buffers start just below the boundary of the two regions
    d.next_buffer = SPLIT_GPA - 96 if straddle else BUFFER_GPA
    q = d.queue(mem, last_avail_idx=d.avail_idx)
    d.add(readable, writable, indirect=indirect)
    chain = q.pop()
    assert chain.readable.read(0, chain.readable.size) == b"".join(readable)
    assert chain.writable.size == sum(writable)
    marker = bytes(range(256)) * 8
    chain.writable.write(0, marker[:chain.writable.size])
    assert b"".join(bytes(v) for v in chain.writable.views) == marker[:sum(writable)]
    assert q.pop() is None
    chain.release()
    q.release()


# -- FUSE: every op through the session --------------------------------------------------------

# fixed-size success payloads (variable-size ops: only the bound is checked)
SUCCESS_SIZE = {op: row.reply for op, row in ops.TABLE.items() if row.reply}
NO_REPLY = ops.NO_REPLY
# the in-struct of each op (what comes before a name or data); ACCESS has no
# row (ENOSYS) but is sent with its struct all the same
IN_STRUCT = {op: row.in_struct for op, row in ops.TABLE.items() if row.in_struct is not None}
IN_STRUCT[int(Opcode.ACCESS)] = abi.ACCESS_IN
OPS = sorted(op for op in ops.TABLE if op not in (Opcode.INIT, Opcode.DESTROY)) + [int(Opcode.ACCESS)]


def _field_values(fmt_char: str, env) -> st.SearchStrategy[int]:
    bits = {"Q": 64, "I": 32, "H": 16, "i": 32, "q": 64}.get(fmt_char, 32)
    top = (1 << bits) - 1
    known = [0, 1, 2, 3, 4, 5, 0o644, 0o100644, 0o40755, 0x8000, 0x8002, 4096, 1 << 20, top, top >> 1]
    live = [v & top for v in env["nodeids"] + env["fhs"]]
    return st.one_of(st.sampled_from(live), st.sampled_from(live), st.sampled_from([v & top for v in known]),
                     st.integers(0, top))


def _struct_args(s: struct.Struct, env) -> st.SearchStrategy[bytes]:
    fields = [c for c in s.format.lstrip("<") if c.isalpha() and c != "x"]
    # repeat counts ("6Q") are expanded by struct itself: count the real fields
    count = len(s.unpack(bytes(s.size)))
    if count != len(fields):
        fields = ["Q"] * count
    return st.tuples(*[_field_values(c, env) for c in fields]).map(
        lambda values: s.pack(*values) if _fits(s, values) else bytes(s.size))


def _fits(s: struct.Struct, values) -> bool:
    try:
        s.pack(*values)
        return True
    except struct.error:
        return False


NAMES = st.one_of(
    st.sampled_from([b"f\0", b"d\0", b"new\0", b".\0", b"..\0", b"\0", b"a/b\0", b"x" * 256 + b"\0",
                     b"user.k\0", b"f\0g\0", b"f\0../../etc\0", b"noterm"]),
    st.binary(max_size=40))


@pytest.fixture(scope="module")
def session_env(tmp_path_factory):
    share = tmp_path_factory.mktemp("props")
    with open(share / "f", "wb") as f:
        f.write(os.urandom(10000))
    (share / "d").mkdir()
    (share / "d" / "inner").write_bytes(b"x")
    os.symlink("f", share / "l")
    old_cwd, old_umask = os.getcwd(), os.umask(0)
    os.chdir("/proc/self/fd")
    fs, table = make_session(share, capacity=64)
    env = {"fs": fs}
    try:
        _call(fs, Opcode.INIT, 0, init_args(), 64)
        yield env
    finally:
        fs.close()
        table.close()
        os.chdir(old_cwd)
        os.umask(old_umask)
        credentials.restore()


def _call(fs, opcode, nodeid, args, out_size, unique=7):
    hdr = abi.IN_HEADER.pack(40 + len(args), opcode, unique, nodeid, 0, 0, 1, 0, 0)
    out = bytearray(16 + out_size)
    fs.handle(IoVec([memoryview(bytearray(hdr + args))]), IoVec([memoryview(out)]), None)
    return out


def _refresh(env) -> None:
    """Live nodeids and fhs for the examples to pick from."""
    fs = env["fs"]
    nodeids, fhs = [1], []
    for name in (b"f", b"d", b"l"):
        out = _call(fs, Opcode.LOOKUP, 1, name + b"\0", 128)
        if abi.OUT_HEADER.unpack_from(out)[1] == 0:
            nodeids.append(abi.ENTRY_OUT.unpack_from(out, 16)[0])
    for opcode, node, flags in ((Opcode.OPEN, nodeids[1] if len(nodeids) > 1 else 1, os.O_RDWR),
                                (Opcode.OPENDIR, 1, 0)):
        out = _call(fs, opcode, node, abi.OPEN_IN.pack(flags, 0), 16)
        if abi.OUT_HEADER.unpack_from(out)[1] == 0:
            fhs.append(abi.OPEN_OUT.unpack_from(out, 16)[0])
    credentials.restore()
    env["nodeids"], env["fhs"] = nodeids, fhs


@st.composite
def fuse_requests(draw, env):
    opcode = draw(st.sampled_from(OPS))
    nodeid = draw(st.one_of(st.sampled_from(env["nodeids"]), st.sampled_from([0, 99, U64])))
    args = b""
    s = IN_STRUCT.get(opcode)
    if s is not None and draw(st.integers(0, 9)):
        args = draw(_struct_args(s, env))
        if draw(st.integers(0, 4)) == 0:
            args = args[:draw(st.integers(0, len(args)))]  # cut short
    args += draw(NAMES) if draw(st.booleans()) else b""
    if opcode == Opcode.WRITE and draw(st.booleans()):
        args += draw(st.binary(max_size=300))
    out_sizes = draw(st.one_of(st.just([]), st.lists(st.integers(0, 5000), min_size=1, max_size=3),
                               st.sampled_from([[16], [16, 4096], [16, 128], [8, 8], [200]])))
    splits = draw(st.lists(st.integers(1, 400), max_size=3))
    return opcode, nodeid, args, out_sizes, splits


def _views(data: bytes, cuts) -> list[memoryview]:
    points = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [memoryview(bytearray(data[a:b])) for a, b in zip(points, points[1:]) if b > a]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(data=st.data())
def test_every_op_gives_only_well_formed_replies(session_env, data):
    env = session_env
    fs = env["fs"]
    _refresh(env)
    opcode, nodeid, args, out_sizes, splits = data.draw(fuse_requests(env))
    request = abi.IN_HEADER.pack(40 + len(args), opcode, 4242, nodeid, 0, 0, 1, 0, 0) + args
    buffers = [bytearray(n) for n in out_sizes]
    writable = IoVec([memoryview(b) for b in buffers if b])
    n = fs.handle(IoVec(_views(request, splits)), writable, "token")
    for _token, k in fs.cancel_all():           # a SETLKW that had to wait
        n = k
    credentials.restore()
    assert n is not None and 0 <= n <= writable.size
    if opcode in NO_REPLY or writable.size < 16:
        assert n == 0
        return
    assert n >= 16, f"{Opcode(opcode).name}: {n}-byte reply"
    out = b"".join(bytes(b) for b in buffers)
    length, err, unique = abi.OUT_HEADER.unpack_from(out)
    assert length == n and unique == 4242
    event(f"{Opcode(opcode).name}: {errno.errorcode.get(-err, err) if err else 'ok'}")
    if err:
        assert -4096 < err < 0 and n == 16, (Opcode(opcode).name, err, n)
        return
    payload = n - 16
    want = SUCCESS_SIZE.get(opcode)
    if opcode in (Opcode.GETXATTR, Opcode.LISTXATTR) and len(args) >= 4 and \
            struct.unpack_from("<I", args)[0] == 0:
        want = abi.GETXATTR_OUT.size
    if want is not None:
        assert payload == want, f"{Opcode(opcode).name}: {payload}-byte success payload, want {want}"
    if opcode in (Opcode.READ, Opcode.READDIR, Opcode.READDIRPLUS) and len(args) >= 24:
        assert payload <= struct.unpack_from("<I", args, 16)[0]


def test_session_survives_the_property_run(session_env):
    """After everything above, the session still answers normally."""
    fs = session_env["fs"]
    out = _call(fs, Opcode.GETATTR, 1, abi.GETATTR_IN.pack(0, 0, 0), 104)
    assert abi.OUT_HEADER.unpack_from(out)[:2] == (120, 0)
    credentials.restore()
