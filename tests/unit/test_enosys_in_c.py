"""The opcodes the op table answers ENOSYS (ops.ENOSYS: IOCTL, POLL,
ACCESS, ...), answered in C (daemon/fuse/_attrs.h), against the Python
session.

Two sessions from the same start (test_create_in_c's pair and step): the
reference (``FuseSession.handle``) and one with the compiled ops. After
every request the reply bytes and count, the tables, the meters (each
opcode's requests, errors per errno and latency observations), the trees,
the fds and each session's rate-limited warnings must be equal; what C
declines must leave everything as it was. The batch loop is compared ring
by ring with the pure loop (test_batch_equivalence's ``check``).
"""

from __future__ import annotations

import errno

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.fuse import abi, fastpath, ops
from daemon.fuse.abi import Opcode
from daemon.metrics import counters
from tests.unit.fusereq import in_header
from tests.unit.test_batch_equivalence import check, getattr_request, metered, rig, world  # noqa: F401 - fixtures
from tests.unit.test_create_in_c import _close, _pair, _step, fresh_pair, shares
from tests.unit.test_fastops_equivalence import _run
from tests.unit.test_readlink_in_c import _chain, _ring, _warned
from tests.unit.test_release_in_c import _c_declines, _err

__all__ = ["shares", "rig", "metered", "world"]     # the fixtures, imported for the tests below

ENOSYS_OPS = sorted(ops.ENOSYS)
# what a guest sends with them (abi's structs where it has them), and junk
ARGS = {Opcode.ACCESS: abi.ACCESS_IN.pack(4), Opcode.IOCTL: bytes(32), Opcode.POLL: bytes(24),
        Opcode.BMAP: bytes(16), Opcode.NOTIFY_REPLY: bytes(16) + b"data", Opcode.TMPFILE: bytes(16) + b"t\0",
        Opcode.SETUPMAPPING: bytes(40), Opcode.REMOVEMAPPING: bytes(4) + bytes(24)}


def request(opcode: int, nodeid: int = 1, unique: int = 9, args: bytes | None = None, extlen: int = 0) -> bytes:
    args = ARGS.get(opcode, b"") if args is None else args
    return in_header(opcode, nodeid, len(args), unique, extlen=extlen) + args


def _counted(session, opcode: int) -> tuple[int, int]:
    """(requests, ENOSYS replies) the session's meter counted under opcode."""
    words = session.meter.words
    return (words[counters.OPS + int(opcode) * counters.OP_WORDS + counters.OP_REQUESTS],
            words[counters.ERRORS + int(opcode) * counters.ERRNO_SLOTS + errno.ENOSYS])


def _both(pair, fast, shares, req: bytes, wsizes=(16,)) -> tuple[bool, bytes]:
    replies: list = []
    served = _step(pair, fast, shares, req, list(wsizes), replies)
    assert _warned(pair)[0] == _warned(pair)[1]
    return served, replies[0]


def test_every_enosys_opcode_is_answered_in_c(shares):
    """Each opcode of ops.ENOSYS, with the args a guest sends, none, junk,
    a request extension, args past MAX_ARGS, on the root, nodeid 0 and an
    unknown nodeid, with a bigger reply part: C's ENOSYS, Python's reply
    byte for byte, counted under the opcode and ENOSYS."""
    pair, fast = _pair(shares)
    try:
        assert fastpath.enosys_opcodes(pair[1]) == ENOSYS_OPS
        for k, op in enumerate(ENOSYS_OPS):
            variants = [request(op, unique=100 + k), request(op, 0, 200 + k, b""), request(op, 3999, 300 + k, b"x" * 7),
                        request(op, 1, 400 + k, bytes(8), extlen=1), request(op, 1, 500 + k, bytes(24), extlen=9),
                        request(op, 1, 600 + k, bytes(128 * 1024 + 1))]
            for v, req in enumerate(variants):
                served, reply = _both(pair, fast, shares, req, (16, 64) if v == 1 else (16,))
                unique = abi.IN_HEADER.unpack_from(req)[2]
                assert served and reply[:16] == abi.OUT_HEADER.pack(16, -errno.ENOSYS, unique)
            assert _counted(pair[1], op) == _counted(pair[0], op) == (len(variants), len(variants))
    finally:
        _close(pair)


def test_enosys_comes_before_the_session(shares):
    """Python answers ENOSYS before it looks at the FUSE session (no
    adopting, no EIO after DESTROY): so does C, and neither session
    changes."""
    pair, fast = _pair(shares)
    try:
        for session in pair:
            session.end()           # DESTROY: no session until the next INIT
        served, reply = _both(pair, fast, shares, request(Opcode.IOCTL))
        assert served and _err(reply) == errno.ENOSYS
        assert [s._session for s in pair] == [0, 0] and pair[0].inodes.session == 0
        served, reply = _both(pair, fast, shares, in_header(Opcode.GETATTR, 1, 16, 5) + bytes(16), (16, 104))
        assert not served and _err(reply) == errno.EIO      # the session's own, Python's
    finally:
        _close(pair)


@pytest.mark.parametrize("case", ["split-header", "len", "no-room", "no-writable", "unknown-9999", "opcode-0",
                                  "cuse-init", "opcode-63"])
def test_what_c_leaves_to_python(shares, case):
    """A header split over two buffers, a wrong header.len (Python logs
    and answers EINVAL), a writable part without room for a header (Python
    drops the request, logged), opcodes outside ops.ENOSYS (Python's
    ENOSYS too, but not C's to give): declined, nothing written or
    changed, then answered by Python as the reference."""
    pair, fast = _pair(shares)
    try:
        req, rcuts, wsizes = request(Opcode.IOCTL), [40], [16]
        if case == "split-header":
            rcuts = [20]
        elif case == "len":
            req = abi.IN_HEADER.pack(len(req) + 1, *abi.IN_HEADER.unpack_from(req)[1:]) + req[40:]
        elif case == "no-room":
            wsizes = [15]
        elif case == "no-writable":
            wsizes = []
        elif case != "len":
            req = request({"unknown-9999": 9999, "opcode-0": 0, "cuse-init": 4096, "opcode-63": 63}[case], args=b"")
        if case in ("split-header", "no-room", "no-writable"):
            assert fast.serve(_chain(req, rcuts, wsizes)) == -1
        else:
            _c_declines(pair[1], fast, req)
        before = fast.served
        ref = _run(pair[0], fast, req, rcuts, wsizes, False)
        got = _run(pair[1], fast, req, rcuts, wsizes, True)
        assert got == ref and fast.served == before
        assert _warned(pair)[0] == _warned(pair)[1]
        if case in ("no-room", "no-writable"):
            assert ref[0] == 0
        else:
            assert _err(ref[1]) == (errno.EINVAL if case == "len" else errno.ENOSYS)
    finally:
        _close(pair)


def test_notify_reply_without_room_is_dropped_alike(shares):
    """NOTIFY_REPLY is no ``no_reply`` op: without room for a header
    Python drops it (and logs), C declines; with room, ENOSYS in C."""
    pair, fast = _pair(shares)
    try:
        req = request(Opcode.NOTIFY_REPLY)
        assert fast.serve(_chain(req, [40], [8])) == -1
        assert _run(pair[0], fast, req, [40], [8], False) == _run(pair[1], fast, req, [40], [8], True)
        served, reply = _both(pair, fast, shares, req)
        assert served and _err(reply) == errno.ENOSYS
    finally:
        _close(pair)


def test_an_opcode_with_a_row_is_not_answered_enosys(shares):
    """A session whose op table has a row for IOCTL (a test's, as a
    future op would): fastpath.enosys_opcodes leaves it out, C declines
    it (the row answers) and still answers the others."""
    pair, _fast = _pair(shares)
    try:
        for session in pair:
            session._ops[int(Opcode.IOCTL)] = lambda fs, req: b"ok"
        assert Opcode.IOCTL not in fastpath.enosys_opcodes(pair[1])
        fast = fastpath.make(pair[1])
        served, reply = _both(pair, fast, shares, request(Opcode.IOCTL), (16, 2))
        assert not served and reply == abi.OUT_HEADER.pack(18, 0, 9) + b"ok"
        assert _both(pair, fast, shares, request(Opcode.POLL))[0]
        for session in pair:
            for op in ENOSYS_OPS:
                session._ops[int(op)] = lambda fs, req: b""
        assert fastpath.enosys_unsupported(pair[1]) == "every opcode of ops.ENOSYS has a row"
    finally:
        _close(pair)


def test_enable_enosys_checks_its_arguments(shares):
    pair, fast = _pair(shares)
    try:
        with pytest.raises(ValueError):
            fast.enable_enosys((64,), None)
        with pytest.raises(ValueError):
            fast.enable_enosys((39,), None)         # a meter needs the words
        with pytest.raises(ValueError):
            fast.enable_enosys((39, 40), (fastpath.op_words(Opcode.IOCTL),))
        with pytest.raises(ValueError):
            fast.enable_enosys((39,), ((0, 0, 0, 1 << 40),))
    finally:
        _close(pair)


OPCODES = st.sampled_from([*ENOSYS_OPS, *ENOSYS_OPS, 0, 63, 64, 9999, 4096, int(Opcode.GETATTR)])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reqs=st.lists(st.tuples(OPCODES, st.sampled_from([0, 1, 2, 3999]), st.binary(max_size=64),
                               st.integers(0, 3), st.sampled_from([0, 0, 0, 1, -1]), st.lists(st.integers(0, 120),
                                                                                             max_size=2),
                               st.sampled_from([[16], [16, 8], [40], [8], [], [10, 10]])),
                     min_size=1, max_size=10))
def test_requests_are_equivalent(tmp_path_factory, reqs):
    """Sequences of requests of the ENOSYS opcodes and others (GETATTR,
    unknown ones), any nodeid, args, extensions, header.len off by one,
    readable parts cut anywhere, writable parts of any room: the same
    replies, counters and warnings; C serves exactly the well-formed
    ENOSYS ones."""
    with fresh_pair(tmp_path_factory, "enosys") as (pair, fast, shares):
        for k, (op, nodeid, args, extlen, off, rcuts, wsizes) in enumerate(reqs):
            req = in_header(op, nodeid, len(args), 1000 + k, extlen=extlen) + args
            if off:
                req = abi.IN_HEADER.pack(len(req) + off, *abi.IN_HEADER.unpack_from(req)[1:]) + args
            before = fast.served
            ref = _run(pair[0], fast, req, [40, *rcuts], wsizes, False)
            got = _run(pair[1], fast, req, [40, *rcuts], wsizes, True)
            assert got == ref
            assert _warned(pair)[0] == _warned(pair)[1]
            header_whole = min([c % (len(req) + 1) for c in rcuts if c % (len(req) + 1)] or [len(req)]) >= 40
            want = op in ops.ENOSYS and not off and sum(wsizes) >= 16 and header_whole
            assert (fast.served > before) == want, (op, off, wsizes, rcuts)
        from tests.unit.test_fastops_equivalence import _comparable
        assert _comparable(pair[1].meter.words) == _comparable(pair[0].meter.words)


def test_the_batch_loop_answers_them_as_the_pure_loop(rig):
    """ENOSYS opcodes among GETATTRs and Python's requests in one ring: the
    batch loop answers them in C as the pure loop does (guest RAM, used
    ring, progress record, counters)."""
    requests = [(request(Opcode.IOCTL, unique=30), [16], True),
                (getattr_request(1, 31), [16, 104], True),
                (request(Opcode.POLL, unique=32), [16, 8], True),
                (request(9999, unique=33, args=b""), [16], False),
                (request(Opcode.ACCESS, unique=34), [16], True),
                (request(Opcode.TMPFILE, unique=35), [8], False),
                (request(Opcode.BMAP, unique=36, args=bytes(8), extlen=1), [16], True)]
    data, expect = _ring(rig, requests)
    in_c, _runs = check(rig, data)
    assert in_c == expect == 5


@pytest.mark.parametrize("op,opcode,err", [("readlink", Opcode.READLINK, 0), ("statfs", Opcode.STATFS, 0),
                                           ("ioctl", Opcode.IOCTL, errno.ENOSYS)])
def test_the_worker_loop_serves_and_counts_them(tmp_path, monkeypatch, op, opcode, err):
    """WorkerLoop._serve on a ring of 8 READLINKs, STATFSs or IOCTLs
    (tests/perf/inproc.py's set-up) with a meter, as a worker with
    --metrics-socket runs: all 8 answered in C (unless the pure path was
    chosen), their replies right, counted under the opcode (and ENOSYS)."""
    from daemon.metrics.counters import MetricsArea, WorkerMeter
    from tests.perf import inproc
    monkeypatch.chdir(tmp_path)
    loop, ring, vr, heads = inproc._build(op, 8, str(tmp_path))
    meter = WorkerMeter(MetricsArea(1).slot(0))
    loop.session.meter = meter
    loop.use_fast_ops(fastpath.fast_ops(loop.session))
    before = loop._fast.served if loop._fast is not None else 0
    assert loop._serve(ring) == 8
    done = vr.harvest()
    assert sorted(done) == sorted(heads)
    for head in done:
        reply = vr.read_writable(head)
        assert abi.OUT_HEADER.unpack_from(reply)[1] == -err
        if op == "readlink":
            assert reply[16:abi.OUT_HEADER.unpack_from(reply)[0]] == b"bench/a/symlink/tgt"
    base = counters.OPS + int(opcode) * counters.OP_WORDS
    words = meter.words
    assert words[base + counters.OP_REQUESTS] == 8
    assert words[counters.ERRORS + int(opcode) * counters.ERRNO_SLOTS + errno.ENOSYS] == (8 if err else 0)
    if fastpath.compiled.VirtQueue is fastpath.compiled.CompiledVirtQueue:
        assert loop._fast.served - before == 8
    else:
        assert loop._fast is None
    inproc.close(loop, ring, vr)
