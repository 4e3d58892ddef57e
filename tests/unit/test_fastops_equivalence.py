"""Requests served whole in C (daemon/fuse/_fastops.c) against the Python
session, byte for byte.

Each example is one request laid out in readable buffers cut at arbitrary
places and a writable part of arbitrary buffers pre-filled with a pattern.
The reference run is ``FuseSession.handle``; the compiled run is what the
worker loop does (``FastOps.serve(chain)``, and ``handle`` when it returns
-1). Both must return the same byte count and leave the same writable
bytes, and the file WRITE writes ("w", reset before each run) the same
contents. Requests: well-formed GETATTRs on the root, on looked-up nodeids,
on forgotten, unknown, zero and huge nodeids, with and without
GETATTR_FH (held, released, unknown fhs, of the nodeid or another); READs
on an open, a write-only, a released and unknown fhs at offsets and sizes
around end of file and the limits; WRITEs on a read-write, an O_APPEND, a
read-only, released and unknown fhs, with data split anywhere, sizes that
are and are not the data present, offsets up to and past OFFSET_MAX,
FUSE_WRITE_KILL_SUIDGID (written without CAP_FSETID: "w" is SUID and SGID, and its mode after
each run is compared too), a short write (RLIMIT_FSIZE); and malformed ones (short headers, a
header split over buffers, wrong ``len``, short args, extensions, writable
parts too short, other opcodes). The tests also check that C did serve
the well-formed cases. With a metrics meter on each path (--metrics-socket)
the two slots must hold the same counters too (latency: the same number of
observations per opcode).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import CacheMode
from daemon.fuse import abi, fastpath
from daemon.fuse.abi import Opcode
from daemon.fuse.request import FUSEError
from daemon.metrics import counters
from daemon.metrics.counters import MetricsArea, WorkerMeter
from daemon.virtio.iovec import IoVec
from daemon.virtio.virtqueue import Chain
from tests.unit.fusereq import entry_nodeid, in_header, start_session

NAMES = ("a", "b", "d", "gone")
W_CONTENTS = bytes(range(256)) * 24     # "w" before each run: 6144 bytes
W_MODE = 0o6775     # and its mode: SUID, SGID with group execute (a KILL_SUIDGID write clears both)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A session on a share with a few looked-up nodeids (one forgotten
    again: its generation is stale in the shared table), and its FastOps."""
    root = tmp_path_factory.mktemp("share")
    cwd = os.getcwd()
    os.chdir("/proc/self/fd")
    (root / "a").write_bytes(b"x" * 5000)
    (root / "b").symlink_to("a")
    (root / "d").mkdir()
    (root / "gone").write_bytes(b"")
    (root / "w").write_bytes(W_CONTENTS)
    os.mkfifo(root / "d" / "fifo")
    session, client = start_session(root)
    nodeids = {name: entry_nodeid(client.call(Opcode.LOOKUP, 1, name.encode() + b"\0",
                                              abi.ENTRY_OUT.size).ok()) for name in NAMES}
    nodeids["fifo"] = entry_nodeid(client.call(Opcode.LOOKUP, nodeids["d"], b"fifo\0",
                                               abi.ENTRY_OUT.size).ok())
    nodeids["w"] = entry_nodeid(client.call(Opcode.LOOKUP, 1, b"w\0", abi.ENTRY_OUT.size).ok())
    session.inodes.unref(nodeids["gone"], 1)       # forgotten: the cached fd is stale
    for name, flags, file in (("fh", os.O_RDONLY, "a"), ("fh-wronly", os.O_WRONLY, "a"),
                              ("fh-released", os.O_RDONLY, "a"), ("fh-rw", os.O_RDWR, "w"),
                              ("fh-append", os.O_WRONLY | os.O_APPEND, "w"), ("fh-w-rdonly", os.O_RDONLY, "w")):
        out = client.call(Opcode.OPEN, nodeids[file], abi.OPEN_IN.pack(flags, 0), abi.OPEN_OUT.size).ok()
        nodeids[name] = abi.OPEN_OUT.unpack_from(out)[0]
    client.call(Opcode.RELEASE, nodeids["a"], abi.RELEASE_IN.pack(nodeids["fh-released"], 0, 0, 0), 0).ok()
    fast = fastpath.make(session)
    yield session, fast, nodeids
    session.close()
    session.inodes.close()
    os.chdir(cwd)


def test_extension_is_built():
    assert fastpath.EXTENSION_BUILT


def _cut(data: bytes, cuts: list[int]) -> list[memoryview]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [memoryview(bytearray(data[a:b])) for a, b in zip(points, points[1:]) if b > a]


def _run(session, fast, request: bytes, rcuts: list[int], wsizes: list[int], compiled: bool):
    readable = IoVec(_cut(request, rcuts))
    outs = [bytearray(bytes([0xA5 ^ i]) * n) for i, n in enumerate(wsizes)]
    writable = IoVec([memoryview(b) for b in outs])
    chain = Chain(0, readable, writable)
    n = fast.serve(chain) if compiled else -1
    if n < 0:
        n = session.handle(readable, writable, chain)
    return n, b"".join(outs)


def w_reset(session) -> None:
    """"w" back to W_CONTENTS and W_MODE (through a host fd of our own)."""
    fd = os.open("w", os.O_WRONLY | os.O_CLOEXEC, dir_fd=session.root_fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, W_CONTENTS, 0)
        os.fchmod(fd, W_MODE)
    finally:
        os.close(fd)


def w_mode(session) -> int:
    return os.stat("w", dir_fd=session.root_fd).st_mode & 0o7777


def w_contents(session) -> bytes:
    fd = os.open("w", os.O_RDONLY | os.O_CLOEXEC, dir_fd=session.root_fd)
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0) if size <= 1 << 24 else b"%d bytes" % size
    finally:
        os.close(fd)


def _run_w(session, fast, request: bytes, rcuts: list[int], wsizes: list[int], compiled: bool):
    """_run on a fresh "w": (bytes, writable bytes, w's contents and mode after)."""
    w_reset(session)
    return (*_run(session, fast, request, rcuts, wsizes, compiled), w_contents(session), w_mode(session))


def compare(world, request: bytes, rcuts: list[int], wsizes: list[int]) -> tuple[int, bool]:
    """(bytes written, whether C served it); asserts both paths agree (and
    leave "w" alike: contents and mode)."""
    session, fast, _ = world
    pure = _run_w(session, fast, request, rcuts, wsizes, False)
    before = fast.served
    both = _run_w(session, fast, request, rcuts, wsizes, True)
    assert both == pure
    return pure[0], fast.served > before


def getattr_request(nodeid: int, unique: int = 7, flags: int = 0, fh: int = 0) -> bytes:
    args = abi.GETATTR_IN.pack(flags, 0, fh)
    return in_header(Opcode.GETATTR, nodeid, len(args), unique) + args


LINUX = ([40], [16, 104])      # the driver's layout


@pytest.mark.parametrize("name", ["root", "a", "b", "d", "fifo"])
def test_linux_shaped_getattr_is_served_in_c(world, name):
    session, _fast, nodeids = world
    nodeid = 1 if name == "root" else nodeids[name]
    n, in_c = compare(world, getattr_request(nodeid, unique=0x1122334455667788), *LINUX)
    assert (n, in_c) == (120, True)


def test_getattr_fh_of_an_open_file_is_served_in_c(world):
    """GETATTR_FH naming an open file this worker holds, of that nodeid:
    its fstat, in C."""
    _session, _fast, nodeids = world
    request = getattr_request(nodeids["a"], flags=abi.FUSE_GETATTR_FH, fh=nodeids["fh"])
    assert compare(world, request, *LINUX) == (120, True)


@pytest.mark.parametrize("case", ["stale", "unknown", "zero", "huge", "fh", "fh-other-nodeid", "fh-released",
                                  "extension", "short-out", "len", "lookup"])
def test_what_c_leaves_to_python(world, case):
    """Every one of these is answered by Python (C declines), the same way."""
    _session, _fast, nodeids = world
    request, wsizes = getattr_request(1), [16, 104]
    if case == "stale":
        request = getattr_request(nodeids["gone"])
    elif case == "unknown":
        request = getattr_request(4000)
    elif case == "zero":
        request = getattr_request(0)
    elif case == "huge":
        request = getattr_request((1 << 64) - 1)
    elif case == "fh":
        request = getattr_request(1, flags=abi.FUSE_GETATTR_FH, fh=12345)
    elif case == "fh-other-nodeid":     # Python: the inode's own fstat
        request = getattr_request(nodeids["b"], flags=abi.FUSE_GETATTR_FH, fh=nodeids["fh"])
    elif case == "fh-released":
        request = getattr_request(nodeids["a"], flags=abi.FUSE_GETATTR_FH, fh=nodeids["fh-released"])
    elif case == "extension":
        request = abi.IN_HEADER.pack(56, Opcode.GETATTR, 9, 1, 0, 0, 0, 1, 0) + bytes(16)
    elif case == "short-out":
        wsizes = [16, 103]
    elif case == "len":
        request = abi.IN_HEADER.pack(57, Opcode.GETATTR, 9, 1, 0, 0, 0, 0, 0) + bytes(16)
    elif case == "lookup":      # ".." (names.py): Python resolves the dots
        request, wsizes = in_header(Opcode.LOOKUP, 1, 3, 9) + b"..\0", [16, 128]
    _n, in_c = compare(world, request, [40], wsizes)
    assert not in_c


def test_a_meter_c_was_not_made_for_is_left_to_python(world):
    """C counts only into the meter FastOps was made with: any other
    (here one that is not even a meter) and Python serves and counts."""
    session, _fast, _ = world
    session.meter = object()      # never called: C must decline before
    try:
        n, in_c = compare_fast_only(world, getattr_request(1))
    finally:
        session.meter = None
    assert (n, in_c) == (-1, False)


def test_a_meter_on_another_clock_is_left_to_python(world):
    """A meter whose clock is not time.perf_counter_ns (C reads
    CLOCK_MONOTONIC): FastOps is made without it, and serve declines."""
    session, _fast, _ = world
    meter = WorkerMeter(MetricsArea(1).slot(0), clock=lambda: 0)
    session.meter = meter
    try:
        assert fastpath.meter_layout(meter) == {}
        fast = fastpath.make(session)
        chain = Chain(0, IoVec([memoryview(bytearray(getattr_request(1)))]), IoVec([memoryview(bytearray(120))]))
        assert (fast.serve(chain), fast.served) == (-1, 0)
    finally:
        session.meter = None


# -- with a meter (--metrics-socket): the same counters ----------------------------
@pytest.fixture(scope="module")
def metered(world):
    """(the world, a FastOps counting into a second meter): the Python
    run counts into slot 0, the compiled run into slot 1."""
    session, _fast, nodeids = world
    fast, meters = metered_ops(session)
    yield session, fast, nodeids, meters


def metered_ops(session):
    """(a FastOps for ``session`` counting into the second of two meters,
    the two meters): the Python run counts into slot 0."""
    area = MetricsArea(2)
    meters = [WorkerMeter(area.slot(i), fd_limit=1024) for i in range(2)]
    session.meter = meters[1]
    try:
        fast = fastpath.make(session)
    finally:
        session.meter = None
    return fast, meters


def _comparable(words) -> tuple[list[int], list[int]]:
    """(the slot with each opcode's latency sum and buckets zeroed, the
    number of latency observations per opcode): latencies differ in time,
    not in count."""
    words = list(words)
    observations = []
    for op in range(counters.OPCODE_SLOTS):
        base = counters.OPS + op * counters.OP_WORDS
        buckets = slice(base + counters.OP_BUCKETS, base + counters.OP_BUCKETS + len(counters.LATENCY_BUCKETS_NS) + 1)
        observations.append(sum(words[buckets]))
        words[base + counters.OP_LATENCY_SUM] = 0
        words[buckets] = [0] * len(words[buckets])
    return words, observations


def compare_metered(metered, request: bytes, rcuts: list[int], wsizes: list[int]) -> tuple[int, bool]:
    """compare() with a meter on each path: the same bytes, and the same
    counters (requests and errors per opcode and errno, bytes, latency
    observations) in both slots."""
    session, fast, _, (pure_meter, c_meter) = metered
    try:
        session.meter = pure_meter
        pure = _run_w(session, fast, request, rcuts, wsizes, False)
        session.meter = c_meter
        before = fast.served
        both = _run_w(session, fast, request, rcuts, wsizes, True)
    finally:
        session.meter = None
    assert both == pure
    assert _comparable(c_meter.words) == _comparable(pure_meter.words)
    return pure[0], fast.served > before


def _op_words(meter, opcode) -> list[int]:
    base = counters.OPS + int(opcode) * counters.OP_WORDS
    return list(meter.words[base:base + counters.OP_WORDS])


@pytest.mark.parametrize("case", ["getattr", "getattr-fh", "getattr-ebadf", "read", "read-eof", "read-ebadf",
                                  "declined"])
def test_c_counts_as_python_does(metered, case):
    """Requests C answers, with a meter: counted by C into the same words
    as Python counts them (an error under its opcode and errno, READ's
    bytes), and C's latency is a real observation in the opcode's sum."""
    session, fast, nodeids, (_, c_meter) = metered
    opcode, request, wsizes, in_c = Opcode.GETATTR, getattr_request(nodeids["a"]), [16, 104], True
    fds = session.cache._fds
    gen, fd = fds[nodeids["a"]]
    if case == "getattr-fh":
        request = getattr_request(nodeids["a"], flags=abi.FUSE_GETATTR_FH, fh=nodeids["fh"])
    elif case == "getattr-ebadf":
        fds[nodeids["a"]] = (gen, 999_999)
    elif case.startswith("read"):
        opcode, wsizes = Opcode.READ, [16, 4096]
        fh, offset = {"read": ("fh", 10), "read-eof": ("fh", 5000), "read-ebadf": ("fh-wronly", 0)}[case]
        request = read_request(nodeids[fh], offset, 4096)
    elif case == "declined":
        request, in_c = getattr_request(nodeids["gone"]), False
    before = _op_words(c_meter, opcode)
    try:
        n, served = compare_metered(metered, request, [40], wsizes)
    finally:
        fds[nodeids["a"]] = (gen, fd)
    assert served == in_c
    after = _op_words(c_meter, opcode)
    assert after[counters.OP_REQUESTS] == before[counters.OP_REQUESTS] + 1
    assert after[counters.OP_LATENCY_SUM] > before[counters.OP_LATENCY_SUM]
    assert n == {"getattr": 120, "getattr-fh": 120, "read": 16 + 4096, "read-eof": 16}.get(case, 16)


def test_c_counts_errno_and_bytes_in_their_words(metered):
    """The words themselves (not only equal to Python's): EBADF under
    GETATTR, 4096 data bytes under BYTES_READ."""
    session, _fast, nodeids, (_, c_meter) = metered
    words = c_meter.words
    ebadf = counters.ERRORS + int(Opcode.GETATTR) * counters.ERRNO_SLOTS + 9
    errors, read = words[ebadf], words[counters.BYTES_READ]
    fds = session.cache._fds
    gen, fd = fds[nodeids["a"]]
    fds[nodeids["a"]] = (gen, 999_999)
    try:
        assert compare_metered(metered, getattr_request(nodeids["a"]), [40], [16, 104]) == (16, True)
    finally:
        fds[nodeids["a"]] = (gen, fd)
    assert compare_metered(metered, read_request(nodeids["fh"], 0, 4096), [40], [16, 4096]) == (16 + 4096, True)
    assert (words[ebadf], words[counters.BYTES_READ]) == (errors + 1, read + 4096)


def compare_fast_only(world, request: bytes) -> tuple[int, bool]:
    _session, fast, _ = world
    before = fast.served
    chain = Chain(0, IoVec([memoryview(bytearray(request))]), IoVec([memoryview(bytearray(120))]))
    return fast.serve(chain), fast.served > before


def test_another_session_is_left_to_python(world):
    """The shared table moved to a new FUSE session (INIT in another
    worker): Python adopts it; C never answers for the old one."""
    session, _fast, _ = world
    mine = session._session
    session._session = mine + 1000
    try:
        assert compare_fast_only(world, getattr_request(1)) == (-1, False)
    finally:
        session._session = mine


def test_fstat_failure_is_the_same_errno(world):
    """A cached fd that fstat refuses (closed under the cache): both paths
    answer EBADF, C included."""
    session, _fast, nodeids = world
    fds = session.cache._fds
    nodeid = nodeids["a"]
    gen, fd = fds[nodeid]
    fds[nodeid] = (gen, 999_999)
    try:
        n, in_c = compare(world, getattr_request(nodeid), *LINUX)
        assert (n, in_c) == (16, True)
    finally:
        fds[nodeid] = (gen, fd)


def test_translated_ids_get_no_compiled_ops(share):
    """--translate-uid rewrites GETATTR's ids in Python: no compiled ops
    (a plain session on the same share gets them)."""
    from daemon.fuse.idtranslate import Ids, Translation
    plain, _ = start_session(share)
    ids = Ids(Translation.parse(["map:0:1000:1"]), Translation.parse([]))
    translated, _ = start_session(share, ids=ids)
    try:
        assert fastpath.unsupported(plain) == ""
        assert "--translate-uid" in fastpath.unsupported(translated)
    finally:
        for session in (plain, translated):
            session.close()
            session.inodes.close()


# -- hypothesis ------------------------------------------------------------------
U64 = st.integers(0, (1 << 64) - 1)
NODE = st.sampled_from(["root", *NAMES, "fifo", "zero", "unknown", "huge"])
CUTS = st.lists(st.integers(0, 200), max_size=4)
WSIZES = st.one_of(st.just([16, 104]), st.lists(st.integers(0, 130), min_size=0, max_size=4))
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _nodeid(nodeids, which: str) -> int:
    special = {"root": 1, "zero": 0, "unknown": 3999, "huge": (1 << 64) - 1}
    return special[which] if which in special else nodeids[which]


@SETTINGS
@given(node=NODE, unique=U64, flags=st.sampled_from([0, 0, 1, 2, 0xFFFFFFFF]),
       fh=st.one_of(U64, st.sampled_from(["fh", "fh-wronly", "fh-released"])),
       nargs=st.sampled_from([16, 16, 0, 8, 15, 24]), rcuts=CUTS, wsizes=WSIZES,
       lendelta=st.sampled_from([0, 0, 0, -1, 1, 1 << 20]), extlen=st.sampled_from([0, 0, 0, 1, 3]),
       opcode=st.sampled_from([Opcode.GETATTR] * 4 + [Opcode.LOOKUP, Opcode.READ, 0, 9999]))
def test_requests_are_equivalent(world, node, unique, flags, fh, nargs, rcuts, wsizes, lendelta,
                                 extlen, opcode):
    _session, _fast, nodeids = world
    fh = nodeids[fh] if isinstance(fh, str) else fh
    args = (abi.GETATTR_IN.pack(flags, 0, fh) + bytes(8))[:nargs]
    length = (40 + nargs + lendelta) & 0xFFFFFFFF
    request = abi.IN_HEADER.pack(length, opcode, unique, _nodeid(nodeids, node), 0, 0, 0, extlen, 0) + args
    compare(world, request, rcuts, wsizes)


@SETTINGS
@given(data=st.binary(min_size=0, max_size=96), rcuts=CUTS, wsizes=WSIZES)
def test_random_bytes_are_equivalent(world, data, rcuts, wsizes):
    compare(world, data, rcuts, wsizes)


@SETTINGS
@given(node=NODE, rcuts=CUTS, wsizes=WSIZES, unique=U64)
def test_well_formed_getattrs_are_served_in_c_when_they_can_be(world, node, rcuts, wsizes, unique):
    """Any cut of a well-formed GETATTR: the same bytes, and C serves it
    whenever the header is whole in the first buffer, the writable part
    holds the reply and the nodeid's fd is held."""
    _session, _fast, nodeids = world
    request = getattr_request(_nodeid(nodeids, node), unique)
    n, in_c = compare(world, request, rcuts, wsizes)
    first = min([c % (len(request) + 1) for c in rcuts if c % (len(request) + 1)] or [len(request)])
    held = node in ("root", "a", "b", "d", "fifo")
    assert in_c == (first >= 40 and sum(wsizes) >= 120 and held)
    if in_c:
        assert n == 120


def read_request(fh: int, offset: int, size: int, unique: int = 11, nodeid: int = 2) -> bytes:
    args = abi.READ_IN.pack(fh, offset, size, 0, 0, 0)
    return in_header(Opcode.READ, nodeid, len(args), unique) + args


@pytest.mark.parametrize("offset,size,wsizes,n", [
    (0, 4096, [16, 4096], 16 + 4096), (4000, 4096, [16, 4096], 16 + 1000), (5000, 10, [16, 10], 16),
    (0, 1 << 20, [16] + [4096] * 2, 16 + 5000), (10, 100, [16, 30], 16 + 30), (0, 0, [16, 8], 16),
    (0, 100, [16], 16), (1 << 40, 4096, [16, 4096], 16)])
def test_linux_shaped_read_is_served_in_c(world, offset, size, wsizes, n):
    _session, _fast, nodeids = world
    assert compare(world, read_request(nodeids["fh"], offset, size), [40], wsizes) == (n, True)


def test_read_on_a_write_only_fh_is_ebadf_in_c_too(world):
    _session, _fast, nodeids = world
    request = read_request(nodeids["fh-wronly"], 0, 100)
    assert compare(world, request, [40], [16, 100]) == (16, True)


@pytest.mark.parametrize("case", ["released", "unknown", "offset", "short-args", "extension", "short-out"])
def test_reads_c_leaves_to_python(world, case):
    _session, _fast, nodeids = world
    request, wsizes = read_request(nodeids["fh"], 0, 100), [16, 100]
    if case == "released":
        request = read_request(nodeids["fh-released"], 0, 100)
    elif case == "unknown":
        request = read_request(0xDEAD << 24 | 5, 0, 100)
    elif case == "offset":
        request = read_request(nodeids["fh"], 1 << 63, 100)
    elif case == "short-args":
        request = in_header(Opcode.READ, 2, 32, 9) + abi.READ_IN.pack(nodeids["fh"], 0, 100, 0, 0, 0)[:32]
    elif case == "extension":
        args = abi.READ_IN.pack(nodeids["fh"], 0, 100, 0, 0, 0) + bytes(8)
        request = abi.IN_HEADER.pack(40 + len(args), Opcode.READ, 9, 2, 0, 0, 0, 1, 0) + args
    elif case == "short-out":
        wsizes = [15]
    _n, in_c = compare(world, request, [40], wsizes)
    assert not in_c


FH = st.sampled_from(["fh", "fh", "fh-wronly", "fh-released", "unknown", "huge"])
OFFSET = st.one_of(st.sampled_from([0, 1, 4095, 4999, 5000, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]),
                   st.integers(0, 6000))
SIZE = st.one_of(st.sampled_from([0, 1, 4096, 1 << 20, (1 << 20) + 1, (1 << 32) - 1]), st.integers(0, 6000))
RSIZES = st.one_of(st.just([16, 4096]), st.lists(st.integers(0, 2000), min_size=0, max_size=6))


@SETTINGS
@given(fh=FH, offset=OFFSET, size=SIZE, rcuts=CUTS, wsizes=RSIZES, unique=U64,
       nargs=st.sampled_from([40, 40, 40, 39, 0, 48]), lendelta=st.sampled_from([0, 0, 0, 1, -1]),
       extlen=st.sampled_from([0, 0, 0, 1]))
def test_reads_are_equivalent(world, fh, offset, size, rcuts, wsizes, unique, nargs, lendelta, extlen):
    _session, _fast, nodeids = world
    fhs = {"unknown": 77 << 24 | 3, "huge": (1 << 64) - 1}
    args = (abi.READ_IN.pack(fhs[fh] if fh in fhs else nodeids[fh], offset, size, 0, 0, 0) + bytes(8))[:nargs]
    length = (40 + nargs + lendelta) & 0xFFFFFFFF
    request = abi.IN_HEADER.pack(length, Opcode.READ, unique, 2, 0, 0, 0, extlen, 0) + args
    compare(world, request, rcuts, wsizes)


@SETTINGS
@given(fh=FH, offset=OFFSET, size=SIZE, rcuts=CUTS, wsizes=RSIZES, unique=U64,
       nargs=st.sampled_from([40, 40, 40, 39, 0]), node=NODE, getattr_flags=st.sampled_from([0, 1, 0]),
       opcode=st.sampled_from([Opcode.GETATTR, Opcode.READ, Opcode.READ, Opcode.LOOKUP]))
def test_metered_requests_count_the_same(metered, fh, offset, size, rcuts, wsizes, unique, nargs, node,
                                         getattr_flags, opcode):
    """GETATTRs and READs, served by C or declined, each path with its
    meter: the same bytes and the same counters."""
    _session, _fast, nodeids, _meters = metered
    fhs = {"unknown": 77 << 24 | 3, "huge": (1 << 64) - 1}
    fh = fhs[fh] if fh in fhs else nodeids[fh]
    if opcode == Opcode.GETATTR:
        args = abi.GETATTR_IN.pack(getattr_flags, 0, fh)[:min(nargs, 16)]
        nodeid = _nodeid(nodeids, node)
    else:
        args = abi.READ_IN.pack(fh, offset, size, 0, 0, 0)[:nargs]
        nodeid = 2
    request = abi.IN_HEADER.pack(40 + len(args), opcode, unique, nodeid, 0, 0, 0, 0, 0) + args
    compare_metered(metered, request, rcuts, wsizes)


def test_which_sessions_get_compiled_ops(world, monkeypatch):
    """The switches: PYVIRTIOFSD_FASTOPS=0 turns the ops off, and
    PYVIRTIOFSD_PURE=1 (compiled.py's choice) everything compiled."""
    session, _fast, _ = world
    if fastpath.compiled.VirtQueue is fastpath.compiled.CompiledVirtQueue:
        assert fastpath.why_not(session) == ""
        monkeypatch.setenv("PYVIRTIOFSD_FASTOPS", "0")
        assert fastpath.why_not(session) == "PYVIRTIOFSD_FASTOPS=0"
        assert fastpath.fast_ops(session) is None
    else:
        assert "PYVIRTIOFSD_PURE" in fastpath.why_not(session)
        assert fastpath.fast_ops(session) is None


@pytest.mark.parametrize("op", ["getattr", "read4k", "write4k"])
def test_the_worker_loop_serves_them_in_c(tmp_path, monkeypatch, op):
    """WorkerLoop._serve on a ring of 8 requests (tests/perf/inproc.py's
    set-up): all answered without an error, in C unless the pure path was
    chosen."""
    from tests.perf import inproc
    monkeypatch.chdir(tmp_path)
    loop, ring, vr, heads = inproc._build(op, 8, str(tmp_path))
    before = loop._fast.served if loop._fast is not None else 0    # the set-up's LOOKUP is C's too
    assert loop._serve(ring) == 8
    done = vr.harvest()
    assert sorted(done) == sorted(heads)
    for head in done:
        assert abi.OUT_HEADER.unpack(vr.read_writable(head, 16))[1] == 0
    if fastpath.compiled.VirtQueue is fastpath.compiled.CompiledVirtQueue:
        assert loop._fast.served - before == 8
    else:
        assert loop._fast is None
    inproc.close(loop, ring, vr)


@pytest.mark.parametrize("op,opcode", [("getattr", Opcode.GETATTR), ("read4k", Opcode.READ),
                                       ("write4k", Opcode.WRITE), ("lookup", Opcode.LOOKUP)])
def test_the_worker_loop_counts_them_with_a_meter(tmp_path, monkeypatch, op, opcode):
    """--metrics-socket keeps the compiled path: a session with a meter
    (as workers/entry.py gives it before the loop) is served in C, and its
    slot counts the 8 requests, their latencies, the batch (and READ's
    bytes, WRITE's)."""
    from tests.perf import inproc
    monkeypatch.chdir(tmp_path)
    loop, ring, vr, heads = inproc._build(op, 8, str(tmp_path))
    meter = WorkerMeter(MetricsArea(1).slot(0))
    loop.session.meter = meter
    loop.use_fast_ops(fastpath.fast_ops(loop.session))    # what WorkerLoop.__init__ asks, now with the meter
    assert loop._serve(ring) == 8
    assert sorted(vr.harvest()) == sorted(heads)
    words = meter.words
    base = counters.OPS + int(opcode) * counters.OP_WORDS
    buckets = words[base + counters.OP_BUCKETS:base + counters.OP_WORDS]
    assert (words[base + counters.OP_REQUESTS], sum(buckets)) == (8, 8)
    assert words[base + counters.OP_LATENCY_SUM] > 0
    assert (words[counters.BATCHES], words[counters.CHAINS]) == (1, 8)
    assert words[counters.BYTES_READ] == (8 * 4096 if op == "read4k" else 0)
    assert words[counters.BYTES_WRITTEN] == (8 * 4096 if op == "write4k" else 0)
    if fastpath.compiled.VirtQueue is fastpath.compiled.CompiledVirtQueue:
        assert loop._fast.served == 8
    inproc.close(loop, ring, vr)


# -- LOOKUP (docs/compiled.md, "LOOKUP in C") ----------------------------------------------
# A share with many files, and tiny inode tables (capacity 15: a 32-entry
# index whose home slot is ino & 31), so that the files COLLIDE, whose
# inode numbers agree modulo 32, probe past each other and move back when
# one is forgotten (InodeTable._hash_remove): C must find each where
# Python's _find does.
LOOKUP_CAPACITY = 15


@pytest.fixture(scope="module")
def lookup_share(tmp_path_factory):
    """(the share, the names of COLLIDE: files whose inos agree mod 32,
    and a few others)."""
    root = tmp_path_factory.mktemp("lookups")
    by_home: dict[int, list[str]] = {}
    for i in range(200):
        name = f"f{i:03d}"
        (root / name).write_bytes(b"y" * i)
        by_home.setdefault(os.stat(root / name).st_ino & 31, []).append(name)
    collide = max(by_home.values(), key=len)[:5]
    others = [n for names in by_home.values() for n in names if n not in collide][:4]
    (root / "sub").mkdir()
    (root / "sub" / "inner").write_bytes(b"z")
    (root / "ln").symlink_to("f000")
    os.link(root / collide[0], root / "hard")
    return root, collide, others


def lookup_request(parent: int, name: bytes, unique: int = 21) -> bytes:
    return in_header(Opcode.LOOKUP, parent, len(name), unique) + name


def _table_state(session) -> list:
    """Every live nodeid's (nodeid, generation, dev, ino, count, file
    handle, owner word), the header's free list, high mark, generation
    counter, live count, DIRTY and freed-ring cursor, and the nodeids this
    worker caches an fd of with their generations, in the cache's order
    (the order InodeCache._trim evicts in), each fd checked to be of the
    slot's inode. An owner word naming this worker's own cached fd of the
    nodeid is compared as ("mine", serial): the two sessions' fd numbers
    differ."""
    from daemon.fuse import inodes
    table = session.inodes
    fds = session.cache._fds
    live = []
    for n in range(1, table.capacity + 1):
        info = table.get(n)
        if info is None:
            continue
        word = table.owner(n) if n > 1 else 0
        if word and n in fds and (word & 0xFFFFFFFF) == fds[n][1]:
            word = ("mine", word >> 32)
        live.append((n, *info, table.handle(n, info[0]) if n > 1 else b"", word))
    hdr = table._hdr
    cached = []
    for n, (gen, fd) in fds.items():
        info = table.get(n)
        st_ = os.fstat(fd)
        cached.append((n, gen, info is not None and info[0] == gen and (st_.st_dev, st_.st_ino) == info[1:3]))
    return [live, [hdr[w] for w in (inodes._H_FREE, inodes._H_HIGH, inodes._H_GEN, inodes._H_DIRTY,
                                    inodes._H_RING_W)], len(table), cached]


PEER_WORD = 6 << 32 | 9     # another request worker's owner word (serial 6, its fd 9)


def _lookup_pair(lookup_share, capacity: int = LOOKUP_CAPACITY, peers: bool = False, **config):
    """Two fresh sessions on the share: the reference and one with the
    compiled ops (and a meter each). ``peers``: each worker has serial 5
    and a peer (serial 6, a pidfd of this process): owner words are
    written and a found inode is claimed. Freed fds are closed at once
    (the session's helper thread would close them later)."""
    from daemon.fds import close_fds
    root, _collide, _others = lookup_share
    area = MetricsArea(2)
    pair = []
    for i in range(2):
        session, _client = start_session(root, capacity=capacity, **config)
        session.meter = WorkerMeter(area.slot(i), fd_limit=1024)
        session.cache._close_fds = close_fds
        if peers:
            session.peers.set_self(5)
            session.peers._pidfds[6] = os.pidfd_open(os.getpid())
            session.peers._recount()
        pair.append(session)
    fast = fastpath.make(pair[1])
    return pair, fast


def _close(sessions):
    for session in sessions:
        session.meter = None
        session.close()
        session.inodes.close()


LOOKUP_NAMES = st.sampled_from(["COLLIDE0", "COLLIDE1", "COLLIDE2", "COLLIDE3", "COLLIDE4", "OTHER0", "OTHER1",
                                "sub", "ln", "hard", "missing", ".", "..", "a/b", "", "x" * 255, "x" * 256])
LOOKUP_STEP = st.one_of(
    st.tuples(st.just("lookup"), st.sampled_from(["root", "root", "sub", "file", "stale", "unknown"]), LOOKUP_NAMES,
              st.sampled_from(["ok", "ok", "ok", "no-nul", "inner-nul", "short-out", "extension", "len"])),
    st.tuples(st.just("forget"), LOOKUP_NAMES, st.integers(1, 3), st.just("")),
    # another request worker's LOOKUP of the name (the inode in the table, its fd not this worker's)
    st.tuples(st.just("peer"), LOOKUP_NAMES, st.just(0), st.just("")),
    # the worker loop's InodeCache.reap between batches (with --inode-fds, the trim too)
    st.tuples(st.just("reap"), st.just(""), st.just(0), st.just("")))


def _name(lookup_share, which: str) -> bytes:
    _root, collide, others = lookup_share
    if which.startswith("COLLIDE"):
        return collide[int(which[7:])].encode()
    if which.startswith("OTHER"):
        return others[int(which[5:])].encode()
    return which.encode()


def _lookup_bytes(parent: int, name: bytes, variant: str, unique: int) -> tuple[bytes, list[int]]:
    """A LOOKUP as the driver lays it out, or malformed as ``variant`` says."""
    arg = name + b"\0"
    if variant == "no-nul":
        arg = name or b"q"
    elif variant == "inner-nul":
        arg = name + b"\0q\0"
    request = lookup_request(parent, arg, unique)
    if variant == "extension":
        request = abi.IN_HEADER.pack(len(request) + 8, Opcode.LOOKUP, unique, parent, 0, 0, 0, 1, 0) + arg + bytes(8)
    elif variant == "len":
        request = abi.IN_HEADER.pack(len(request) + 1, Opcode.LOOKUP, unique, parent, 0, 0, 0, 0, 0) + arg
    return request, ([16, 127] if variant == "short-out" else [16, 128])


def _run_steps(lookup_share, steps, pair, fast) -> int:
    """Each step on both sessions, the reference first; returns how many
    LOOKUPs C served. Asserts the same replies, tables, cached nodeids and
    counters after every step."""
    pure, comp = pair
    served = 0
    for k, (kind, a, b, variant) in enumerate(steps):
        if kind == "reap":
            for session in pair:
                session.cache.reap()
        elif kind == "peer":
            try:
                st_ = os.lstat(lookup_share[0] / os.fsdecode(_name(lookup_share, a)))
            except (OSError, ValueError):
                continue
            for session in pair:
                try:
                    session.inodes.ref(st_.st_dev, st_.st_ino, owner=PEER_WORD)
                except FUSEError:
                    pass    # the table is full
        elif kind == "forget":
            # the nodeid the name has in the reference (the same in both, or absent)
            name = _name(lookup_share, a)
            nodeids = []
            for session in pair:
                e = session.cache._fds
                n = next((n for n in e if _nodeid_of(session, n, name, lookup_share[0])), 0)
                nodeids.append(n)
            assert nodeids[0] == nodeids[1]
            for session in pair:
                session.inodes.unref(nodeids[0], b)
        else:
            parent = {"root": 1, "stale": 3999, "unknown": 7}.get(a, 0)
            if a in ("sub", "file"):
                name = "sub" if a == "sub" else _name(lookup_share, "OTHER0").decode()
                parent = _sub_nodeid(pure, lookup_share[0], name)
                if parent != _sub_nodeid(comp, lookup_share[0], name):
                    parent = 1
                parent = parent or 1
            request, wsizes = _lookup_bytes(parent, _name(lookup_share, b), variant, 100 + k)
            fds = len(os.listdir("/proc/self/fd"))
            ref = _run(pure, fast, request, [40], wsizes, False)
            opened = len(os.listdir("/proc/self/fd")) - fds
            before = fast.served
            got = _run(comp, fast, request, [40], wsizes, True)
            assert got == ref, (kind, a, b, variant)
            # as many fds kept (or closed) by C's path as by Python's: none leaked
            assert len(os.listdir("/proc/self/fd")) - fds == 2 * opened, (kind, a, b, variant)
            served += fast.served - before
        assert _table_state(comp) == _table_state(pure)
        assert _comparable(comp.meter.words) == _comparable(pure.meter.words)
        assert not comp.inodes._tlock.locked()      # C keeps it for one call only
    return served


def _nodeid_of(session, nodeid: int, name: bytes, root) -> bool:
    """Whether ``nodeid`` is the inode ``name`` names in the share (or in sub/)."""
    info = session.inodes.get(nodeid)
    if info is None:
        return False
    for path in (root / os.fsdecode(name), root / "sub" / os.fsdecode(name)):
        try:
            st_ = os.lstat(path)
        except (OSError, ValueError):
            continue
        if (st_.st_dev, st_.st_ino) == info[1:3]:
            return True
    return False


def _sub_nodeid(session, root, name: str = "sub") -> int:
    """The nodeid of ``name`` in the share in this session, if it was
    looked up (else 0)."""
    st_ = os.stat(root / name)
    for nodeid in session.cache._fds:
        info = session.inodes.get(nodeid)
        if info is not None and info[1:3] == (st_.st_dev, st_.st_ino):
            return nodeid
    return 0


LOOKUP_CONFIGS = {
    "auto": {},
    "always": {"cache": CacheMode.ALWAYS},
    # file handles stored on insertion; at most 4 fds kept (reap trims)
    "handles": {"file_handles": True, "inode_fds": 4},
    # owner words and claims
    "peers": {"peers": True},
    "handles-peers": {"file_handles": True, "peers": True, "cache": CacheMode.ALWAYS},
}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(LOOKUP_STEP, min_size=1, max_size=16), config=st.sampled_from(sorted(LOOKUP_CONFIGS)))
def test_lookups_are_equivalent(lookup_share, steps, config):
    """Sequences of LOOKUPs (valid, invalid, dotted, too long and missing
    names; root, looked-up directory and file, stale and unknown parents;
    malformed args, short reply room), FORGETs, another worker's lookups
    and reaps, on a reference session and on one with the compiled ops,
    from the same start: after every step the same reply bytes, the same
    table (nodeids, generations, lookup counts, file handles, owner words,
    free list, counters), the same nodeids cached by the worker in the same
    order with the same generations, each fd of its inode, the same meter
    counters, and as many fds open. The first LOOKUPs of inodes (C's
    insertions and claims), a table of 15 that fills (ENFILE), and freed
    slots reused while the worker still caches their old fds, included.
    --cache=always (negative entries), --inode-file-handles with a bound of
    4 fds, and peers too."""
    pair, fast = _lookup_pair(lookup_share, **LOOKUP_CONFIGS[config])
    try:
        _run_steps(lookup_share, steps, pair, fast)
    finally:
        _close(pair)


def test_repeated_lookups_are_served_in_c(lookup_share):
    """Every LOOKUP C serves, the first of each inode (an insertion; the
    hard link finds COLLIDE0's inode cached) and every later one with one
    count each, colliding inodes, hard links, symlinks, directories and
    missing names alike, and after a FORGET of some (the index shifted
    back, the freed slots reused) too."""
    _root, collide, _others = lookup_share
    names = ["COLLIDE0", "COLLIDE1", "COLLIDE2", "COLLIDE3", "COLLIDE4", "hard", "ln", "sub"]
    first = [("lookup", "root", n, "ok") for n in names]
    again = first * 2 + [("lookup", "root", "missing", "ok")]
    forget = [("forget", "COLLIDE1", 3, ""), ("forget", "COLLIDE3", 3, "")]
    pair, fast = _lookup_pair(lookup_share)
    try:
        assert _run_steps(lookup_share, first, pair, fast) == len(first)
        assert _run_steps(lookup_share, again, pair, fast) == len(again)
        assert _run_steps(lookup_share, forget + first, pair, fast) == len(first)
        counts = {n: pair[1].inodes.get(n)[3] for n in pair[1].cache._fds}
        assert sorted(counts.values()) == sorted({n: pair[0].inodes.get(n)[3] for n in pair[0].cache._fds}.values())
        words = pair[1].meter.words
        base = counters.OPS + int(Opcode.LOOKUP) * counters.OP_WORDS
        enoent = counters.ERRORS + int(Opcode.LOOKUP) * counters.ERRNO_SLOTS + errno.ENOENT
        assert (words[base + counters.OP_REQUESTS], words[enoent]) == (2 * len(first) + len(again), 1)
    finally:
        _close(pair)


def test_a_lookup_after_a_first_one_is_opened_straight_away(lookup_share):
    """After a LOOKUP of an inode new to the worker, C opens the next name
    at once (no fstatat first): a missing name is its openat's ENOENT, a
    new inode is inserted, an inode the worker holds is counted with the
    new fd closed (as many fds as Python's), a symlink is the link's own
    inode; then the stat'ed way again. Every reply, table and fd count as
    the reference's, every LOOKUP C's."""
    names = ["COLLIDE0", "missing", "COLLIDE1", "COLLIDE0", "COLLIDE0", "ln", "hard", "sub", "missing", "sub"]
    steps = [("lookup", "root", n, "ok") for n in names]
    pair, fast = _lookup_pair(lookup_share)
    try:
        assert _run_steps(lookup_share, steps, pair, fast) == len(steps)
        comp = pair[1]
        st_ = os.lstat(lookup_share[0] / os.fsdecode(_name(lookup_share, "COLLIDE0")))
        nodeid = next(n for n in comp.cache._fds if comp.inodes.get(n)[1:3] == (st_.st_dev, st_.st_ino))
        assert comp.inodes.get(nodeid)[3] == 4       # three LOOKUPs and "hard", its hard link
    finally:
        _close(pair)


def test_first_lookups_are_served_in_c_as_adopt_does(lookup_share):
    """--inode-file-handles with peers: C's insertion stores the inode's
    file handle (the bytes inodecache.file_handle gives for the cached fd)
    and this worker's owner word for the fd it keeps; an inode another
    worker put in the table is counted, its fd kept and claimed."""
    from daemon.fuse.inodecache import file_handle
    root, collide, others = lookup_share
    pair, fast = _lookup_pair(lookup_share, file_handles=True, peers=True)
    comp = pair[1]
    try:
        steps = [("peer", "OTHER1", 0, "")] + [("lookup", "root", n, "ok") for n in ("COLLIDE0", "OTHER1", "sub")]
        assert _run_steps(lookup_share, steps, pair, fast) == 3
        table, fds = comp.inodes, comp.cache._fds
        by_name = {}
        for name in (collide[0], others[1], "sub"):
            st_ = os.lstat(root / name)
            by_name[name] = next(n for n in fds if table.get(n)[1:3] == (st_.st_dev, st_.st_ino))
        for name, nodeid in by_name.items():
            gen, fd = fds[nodeid]
            assert table.owner(nodeid) == 5 << 32 | fd
            if name != others[1]:        # inserted here: its handle (ext4, tmpfs: they have them)
                assert table.handle(nodeid, gen) == file_handle(fd) != b""
        assert table.get(by_name[others[1]])[3] == 2      # the peer's count and this worker's
        assert table.handle(by_name[others[1]], fds[by_name[others[1]]][0]) == b""  # ref stores none
    finally:
        _close(pair)


def test_a_full_table_is_left_to_python(lookup_share):
    """A table of capacity 3 (the root and two): the third inode's first
    LOOKUP is declined with its new fd closed and the table untouched, and
    Python answers ENFILE; the inodes in it are still served in C."""
    names = ["COLLIDE0", "COLLIDE1", "COLLIDE2", "OTHER0"]
    pair, fast = _lookup_pair(lookup_share, capacity=3)
    try:
        steps = [("lookup", "root", n, "ok") for n in names]
        assert _run_steps(lookup_share, steps, pair, fast) == 2
        for session in pair:
            assert (len(session.inodes), len(session.cache._fds)) == (2, 2)
        assert _run_steps(lookup_share, steps[:2], pair, fast) == 2
        enfile = counters.ERRORS + int(Opcode.LOOKUP) * counters.ERRNO_SLOTS + errno.ENFILE
        assert pair[1].meter.words[enfile] == 2      # COLLIDE2 and OTHER0, answered by Python
        # a FORGET frees a slot: the next first LOOKUP takes it, in C
        assert _run_steps(lookup_share, [("forget", "COLLIDE1", 2, ""), ("reap", "", 0, ""),
                                         ("lookup", "root", "OTHER0", "ok")], pair, fast) == 1
    finally:
        _close(pair)


def test_at_the_fd_limit_c_declines_and_python_answers_emfile(lookup_share):
    """No fd left for the new O_PATH fd (RLIMIT_NOFILE): C's openat fails,
    it declines with the table untouched, Python's fails the same way
    (EMFILE). A name whose inode the worker holds C still serves (it opens
    no fd), where Python answers EMFILE: the one known difference
    (docs/compiled.md, "LOOKUP in C")."""
    import resource
    pair, fast = _lookup_pair(lookup_share)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        _run_steps(lookup_share, [("lookup", "root", "COLLIDE0", "ok")], pair, fast)
        lowest = os.dup(0)
        os.close(lowest)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
        try:
            request, wsizes = _lookup_bytes(1, _name(lookup_share, "COLLIDE1"), "ok", 7)
            before = fast.served
            replies = [_run(session, fast, request, [40], wsizes, session is pair[1]) for session in pair]
            assert replies[0] == replies[1] and abi.OUT_HEADER.unpack_from(replies[0][1])[1] == -errno.EMFILE
            assert fast.served == before
            assert _table_state(pair[1]) == _table_state(pair[0])
            request, wsizes = _lookup_bytes(1, _name(lookup_share, "COLLIDE0"), "ok", 8)
            replies = [_run(session, fast, request, [40], wsizes, session is pair[1]) for session in pair]
            assert abi.OUT_HEADER.unpack_from(replies[0][1])[1] == -errno.EMFILE
            assert replies[1][0] == 144 and fast.served == before + 1
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    finally:
        _close(pair)


def _consistent(table) -> None:
    """The table as InodeTable's invariants want it: every live slot below
    the high mark found by _find, the index holding exactly the live slots
    and the root, the free list and the live slots together every other
    slot, the live count right."""
    from daemon.fuse import inodes
    q, hdr, words = table._q, table._hdr, inodes._SLOT_WORDS
    high = hdr[inodes._H_HIGH]
    live = [s for s in range(2, high) if q[s * words + inodes._S_GEN]]
    for s in live:
        assert table._find(q[s * words + inodes._S_DEV], q[s * words + inodes._S_INO])[1] == s
    assert sorted(s for s in table._hash if s) == sorted(live + [1])
    free, f = [], hdr[inodes._H_FREE]
    while f and len(free) <= table.capacity:
        free.append(f)
        f = q[f * words + inodes._S_NEXT]
    assert sorted(free + live) == list(range(2, high))
    assert len(table) == len(live)


def test_at_the_fd_cache_bound_a_first_lookup_is_python_s(lookup_share):
    """--inode-file-handles with --inode-fds 8: C caches at most 8 fds; the
    next first LOOKUP is Python's (the wait loop in C never reaps after a
    batch: the batch Python takes part in ends with the reap that trims),
    a LOOKUP of a held inode is still C's, and after the trim to 7 C has
    room for one more."""
    pair, fast = _lookup_pair(lookup_share, file_handles=True, inode_fds=8)
    try:
        names = ["COLLIDE0", "COLLIDE1", "COLLIDE2", "COLLIDE3", "COLLIDE4", "OTHER0", "OTHER1", "OTHER2"]
        assert _run_steps(lookup_share, [("lookup", "root", n, "ok") for n in names], pair, fast) == 8
        assert _run_steps(lookup_share, [("lookup", "root", "OTHER3", "ok")], pair, fast) == 0
        assert _run_steps(lookup_share, [("lookup", "root", "COLLIDE0", "ok")], pair, fast) == 1
        assert _run_steps(lookup_share, [("reap", "", 0, "")], pair, fast) == 0
        assert (len(pair[1].cache), pair[1].cache.evicted) == (7, 2)
        assert _run_steps(lookup_share, [("lookup", "root", n, "ok") for n in ("sub", "ln")], pair, fast) == 1
    finally:
        _close(pair)


def test_a_worker_killed_during_c_lookups_leaves_a_table_python_repairs(lookup_share):
    """A forked worker runs C's first LOOKUPs (insertions) and FORGETs in
    a loop and is killed (SIGKILL) at random moments, maybe in the middle
    of an insertion: the next locker (Python's _lock, as the successor's
    first lookup) finds the table DIRTY when it was, repairs it, and the
    table is consistent; C serves on it again."""
    from daemon.fds import close_fds
    from tests.unit.killed import kill_at_random
    pair, fast = _lookup_pair(lookup_share, capacity=63)
    session = pair[1]
    table = session.inodes
    names = [_name(lookup_share, n) for n in ("COLLIDE0", "COLLIDE1", "COLLIDE2", "COLLIDE3", "OTHER0", "sub")]
    chains = [lambda n=n: Chain(0, IoVec([memoryview(bytearray(lookup_request(1, n + b"\0")))]),
                                IoVec([memoryview(bytearray(144))])) for n in names]

    def work(_round):
        session.cache._close_fds = close_fds
        while True:
            for make in chains:
                fast.serve(make())
            table.unref_many([(n, table.get(n)[3]) for n in session.cache._fds if table.get(n) is not None])
            session.cache.reap()

    def after(_round):
        table._lock()       # what any successor's first mutation does (repairs if DIRTY)
        table._unlock()
        _consistent(table)
        table.unref_many([(n, table.get(n)[3]) for n in range(2, table.capacity + 1) if table.get(n)])
        _consistent(table)

    try:
        kill_at_random(work, 25, 7, after)
        assert fast.serve(chains[0]()) == 144
        _consistent(table)
    finally:
        _close(pair)


@pytest.mark.parametrize("case", ["thread-lock", "dirty"])
def test_a_busy_or_dirty_table_is_left_to_python(lookup_share, case):
    """C never waits for the thread lock (another thread of this process
    holds it: Python's turn), and never touches a table a dead holder left
    DIRTY (Python repairs it): the table stays as it was."""
    from daemon.fuse import inodes
    pair, fast = _lookup_pair(lookup_share)
    session = pair[1]
    try:
        _run_steps(lookup_share, [("lookup", "root", "COLLIDE0", "ok")], pair, fast)
        request, _ = _lookup_bytes(1, _name(lookup_share, "COLLIDE0"), "ok", 5)
        table = session.inodes
        if case == "thread-lock":
            table._tlock.acquire()
        else:
            table._hdr[inodes._H_DIRTY] = 1
        before = _table_state(session)
        try:
            chain = Chain(0, IoVec([memoryview(bytearray(request))]), IoVec([memoryview(bytearray(144))]))
            assert (fast.serve(chain), _table_state(session)) == (-1, before)
        finally:
            if case == "thread-lock":
                table._tlock.release()
        assert table._hdr[inodes._H_DIRTY] == (1 if case == "dirty" else 0)
        if case == "dirty":
            table._hdr[inodes._H_DIRTY] = 0
        assert _run_steps(lookup_share, [("lookup", "root", "COLLIDE0", "ok")], pair, fast) == 1
    finally:
        _close(pair)


def test_c_waits_for_another_process_holding_the_table_lock(lookup_share):
    """The lock InodeTable's mutations take in Python (the TableLock, or the
    POSIX record lock under PYVIRTIOFSD_PURE) is the one C takes: while
    another process holds it, C's LOOKUP waits (GIL released), then serves."""
    import time
    pair, fast = _lookup_pair(lookup_share)
    table = pair[1].inodes
    try:
        _run_steps(lookup_share, [("lookup", "root", "COLLIDE0", "ok")], pair, fast)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:    # pragma: no cover - the child
            try:
                table._lock()
                os.write(w, b"x")
                time.sleep(0.3)
                table._unlock()
            finally:
                os._exit(0)
        os.read(r, 1)
        os.close(r)
        os.close(w)
        request, _ = _lookup_bytes(1, _name(lookup_share, "COLLIDE0"), "ok", 5)
        start = time.monotonic()
        chain = Chain(0, IoVec([memoryview(bytearray(request))]), IoVec([memoryview(bytearray(144))]))
        assert fast.serve(chain) == 144
        assert time.monotonic() - start > 0.15
        os.waitpid(pid, 0)
    finally:
        _close(pair)


def test_lookup_stays_in_python_when_an_option_changes_its_reply(share):
    """--announce-submounts, --translate-uid: LOOKUP is Python's (GETATTR
    and READ may still be C's)."""
    from daemon.fuse.idtranslate import Ids, Translation
    sessions = [start_session(share)[0], start_session(share, announce_submounts=True)[0],
                start_session(share, ids=Ids(Translation.parse(["map:0:1000:1"]), Translation.parse([])))[0]]
    try:
        assert fastpath.lookup_unsupported(sessions[0]) == ""
        assert fastpath.lookup_unsupported(sessions[1]) == "--announce-submounts"
        assert "--translate-uid" in fastpath.lookup_unsupported(sessions[2])
        (share / "f").write_bytes(b"")
        fast = fastpath.make(sessions[1])
        for _ in range(2):
            request = lookup_request(1, b"f\0")
            chain = Chain(0, IoVec([memoryview(bytearray(request))]), IoVec([memoryview(bytearray(144))]))
            if fast.serve(chain) < 0:
                sessions[1].handle(chain.readable, chain.writable, chain)
        assert fast.served == 0
    finally:
        _close(sessions)


def test_supervisor_never_loads_the_fast_ops():
    code = ("import sys, daemon.supervisor, daemon.workers.loop; "
            "print(sorted(m for m in sys.modules if m in ('daemon.fuse.fastpath', 'daemon.fuse._fastops')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- WRITE -----------------------------------------------------------------------------
def write_request(fh: int, offset: int, data: bytes, unique: int = 13, size: int | None = None,
                  write_flags: int = 0, nodeid: int = 7) -> bytes:
    args = abi.WRITE_IN.pack(fh, offset, len(data) if size is None else size, write_flags, 0, 0)
    return in_header(Opcode.WRITE, nodeid, len(args) + len(data), unique) + args + data


def _data(n: int, seed: int = 1) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(n))


def _written(world, request: bytes, rcuts: list[int], wsizes: list[int]) -> tuple[int, bool, int, bytes]:
    """compare(), and (bytes, in C, the reply's count or -errno, w after)."""
    session, fast, _ = world
    n, in_c = compare(world, request, rcuts, wsizes)
    _, out, contents, _mode = _run_w(session, fast, request, rcuts, wsizes, True)
    err = abi.OUT_HEADER.unpack_from(out)[1]
    return n, in_c, (abi.WRITE_OUT.unpack_from(out, 16)[0] if n == 24 else err), contents


@pytest.mark.parametrize("fh,offset,size,cuts", [
    ("fh-rw", 0, 4096, [40, 80]), ("fh-rw", 100, 10, [40, 80]), ("fh-rw", 6000, 1000, [40, 80, 500]),
    ("fh-rw", 4000, 8192, [40, 80, 4176]), ("fh-rw", 0, 0, [40, 80]), ("fh-rw", 1 << 40, 10, [40, 80]),
    ("fh-rw", 3, 100, [40, 60, 90, 100, 101, 150]), ("fh-append", 0, 100, [40, 80]),
    ("fh-rw", 0, 1 << 20, [40, 80] + [80 + 4096 * k for k in range(1, 16, 3)])])
def test_linux_shaped_write_is_served_in_c(world, fh, offset, size, cuts):
    """The guest's data at offset into the file (O_APPEND: at its end), the
    count in fuse_write_out; the file as Python leaves it."""
    _session, _fast, nodeids = world
    data = _data(size)
    n, in_c, count, contents = _written(world, write_request(nodeids[fh], offset, data), cuts, [16, 8])
    assert (n, in_c, count) == (24, True, size)
    if fh == "fh-append":
        assert contents == W_CONTENTS + data
    elif offset + size <= 1 << 24:
        expect = bytearray(W_CONTENTS)
        expect[len(expect):] = bytes(max(0, offset + size - len(expect)))
        expect[offset:offset + size] = data
        assert contents == bytes(expect)


@pytest.mark.parametrize("fh,offset,err", [("fh-w-rdonly", 0, errno.EBADF), ("fh", 0, errno.EBADF),
                                           ("fh-rw", (1 << 63) - 1, errno.EINVAL)])
def test_write_errors_are_the_same_errno_in_c(world, fh, offset, err):
    """pwritev's errno (a read-only open file: EBADF; an end past the
    largest file offset: EINVAL), in C as in Python; the file untouched."""
    _session, _fast, nodeids = world
    n, in_c, got, contents = _written(world, write_request(nodeids[fh], offset, b"x" * 10), [40, 80], [16, 8])
    assert (n, in_c, got, contents) == (16, True, -err, W_CONTENTS)


def test_a_short_write_returns_its_count_in_c(world):
    """RLIMIT_FSIZE cuts a write short: the count written, in C as in
    Python (SIGXFSZ is ignored, as CPython sets it)."""
    import resource
    _session, _fast, nodeids = world
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(W_CONTENTS) + 100, old[1]))
    try:
        request = write_request(nodeids["fh-rw"], len(W_CONTENTS) - 50, _data(4096))
        n, in_c, count, contents = _written(world, request, [40, 80], [16, 8])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
    assert (n, in_c, count) == (24, True, 150)
    assert contents == W_CONTENTS[:-50] + _data(150)


@pytest.mark.parametrize("size,flags,mode", [(100, abi.FUSE_WRITE_KILL_SUIDGID, 0o775), (100, 0, W_MODE),
                                              (0, abi.FUSE_WRITE_KILL_SUIDGID, W_MODE)])
def test_kill_suidgid_write_is_served_in_c_without_cap_fsetid(world, size, flags, mode):
    """FUSE_WRITE_KILL_SUIDGID (a guest caller without CAP_FSETID, every
    write of a non-root process under KILLPRIV_V2): C writes without
    CAP_FSETID as Python does, so the host clears SUID and SGID; the same
    bytes, contents and mode; a plain write (the worker's CAP_FSETID) and
    an empty one keep them. The thread has CAP_FSETID again after."""
    from daemon.fuse import credentials
    session, _fast, nodeids = world
    request = write_request(nodeids["fh-rw"], 10, _data(size), write_flags=flags)
    assert compare(world, request, [40, 80], [16, 8]) == (24, True)
    _, out, contents, after = _run_w(session, _fast, request, [40, 80], [16, 8], True)
    assert (abi.WRITE_OUT.unpack_from(out, 16)[0], after) == (size, mode)
    assert contents == W_CONTENTS[:10] + _data(size) + W_CONTENTS[10 + size:]
    assert credentials.effective_caps() & 1 << credentials.CAP_FSETID


def test_kill_suidgid_write_clears_what_a_local_write_clears(world, tmp_path):
    """The host's own rule, which both paths rely on: SUID always, SGID only
    with group execute (02765 keeps SGID), for a writer without CAP_FSETID."""
    session, _fast, nodeids = world
    for start, end in ((0o4755, 0o755), (0o2775, 0o775), (0o2765, 0o2765), (0o6755, 0o755)):
        for compiled in (False, True):
            w_reset(session)
            os.chmod("w", start, dir_fd=session.root_fd)
            request = write_request(nodeids["fh-rw"], 0, b"x", write_flags=abi.FUSE_WRITE_KILL_SUIDGID)
            n, _ = _run(session, _fast, request, [40, 80], [16, 8], compiled)
            assert (n, w_mode(session)) == (24, end), (oct(start), compiled)


@pytest.mark.parametrize("case", ["released", "unknown", "offset", "size-more", "size-less",
                                  "too-big", "short-args", "extension", "short-out", "split-header",
                                  "many-buffers", "len"])
def test_writes_c_leaves_to_python(world, case):
    """Each of these is Python's (C declines), answered the same way."""
    _session, _fast, nodeids = world
    fh, data = nodeids["fh-rw"], _data(100)
    request, rcuts, wsizes = write_request(fh, 0, data), [40, 80], [16, 8]
    if case == "released":
        request = write_request(nodeids["fh-released"], 0, data)
    elif case == "unknown":
        request = write_request(0xDEAD << 24 | 5, 0, data)
    elif case == "offset":
        request = write_request(fh, 1 << 63, data)
    elif case == "size-more":
        request = write_request(fh, 0, data, size=101)
    elif case == "size-less":
        request = write_request(fh, 0, data, size=99)
    elif case == "too-big":
        request = write_request(fh, 0, bytes((1 << 20) + 1))
    elif case == "short-args":
        request = in_header(Opcode.WRITE, 7, 32, 9) + abi.WRITE_IN.pack(fh, 0, 0, 0, 0, 0)[:32]
    elif case == "extension":
        args = abi.WRITE_IN.pack(fh, 0, 8, 0, 0, 0) + bytes(8)
        request = abi.IN_HEADER.pack(40 + len(args), Opcode.WRITE, 9, 7, 0, 0, 0, 1, 0) + args
    elif case == "short-out":
        wsizes = [16, 7]
    elif case == "split-header":
        rcuts = [20, 80]
    elif case == "many-buffers":       # more than a raw chain's 1040 readable buffers
        data = _data(1100)
        request, rcuts = write_request(fh, 0, data), list(range(40, 80 + 1100))
    elif case == "len":
        request = request[:-1]
    _n, in_c = compare(world, request, rcuts, wsizes)
    assert not in_c


def test_page_cache_write_of_scattered_pages_is_served_in_c(world):
    """A cache=auto guest writes from its page cache: one readable buffer
    per 4 KiB page (the pages are not adjacent in guest memory), 256 for a
    1 MiB WRITE, after the header and the args. C serves it, as Python
    does (it used to leave more than 16 readable buffers to Python)."""
    _session, _fast, nodeids = world
    data = bytes(range(256)) * 4096                  # 1 MiB
    request = write_request(nodeids["fh-rw"], 0, data)
    rcuts = [40, 80] + [80 + 4096 * i for i in range(1, 256)]
    n, in_c = compare(world, request, rcuts, [16, 8])
    assert (n, in_c) == (24, True)


def test_readonly_sessions_keep_write_in_python(share):
    """--readonly answers WRITE with EROFS in Python: no WRITE in C."""
    ro, _ = start_session(share, readonly=True)
    try:
        assert fastpath.compiled_ops(ro) == "GETATTR and READ"
        fast = fastpath.make(ro)
        request = write_request(1 << 24 | 1, 0, b"x" * 10)
        chain = Chain(0, IoVec([memoryview(bytearray(request[:40])), memoryview(bytearray(request[40:]))]),
                      IoVec([memoryview(bytearray(24))]))
        assert (fast.serve(chain), fast.served) == (-1, 0)
    finally:
        ro.close()
        ro.inodes.close()


WFH = st.sampled_from(["fh-rw", "fh-rw", "fh-append", "fh-w-rdonly", "fh-released", "unknown", "huge"])
WOFFSET = st.one_of(st.sampled_from([0, 1, 4095, 6143, 6144, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]),
                    st.integers(0, 7000))
WFLAGS = st.sampled_from([0, 0, 0, abi.FUSE_WRITE_CACHE, abi.FUSE_WRITE_LOCKOWNER, abi.FUSE_WRITE_KILL_SUIDGID])


def _write_args(nodeids, fh: str, offset: int, size: int, write_flags: int) -> bytes:
    fhs = {"unknown": 77 << 24 | 3, "huge": (1 << 64) - 1}
    return abi.WRITE_IN.pack(fhs[fh] if fh in fhs else nodeids[fh], offset, size & 0xFFFFFFFF, write_flags, 0, 0)


@SETTINGS
@given(fh=WFH, offset=WOFFSET, datalen=st.integers(0, 9000), sizedelta=st.sampled_from([0, 0, 0, 0, 1, -1]),
       write_flags=WFLAGS, rcuts=st.lists(st.integers(0, 9100), max_size=6), wsizes=WSIZES, unique=U64,
       nargs=st.sampled_from([40, 40, 40, 39, 0]), lendelta=st.sampled_from([0, 0, 0, 1, -1]),
       extlen=st.sampled_from([0, 0, 0, 0, 1]))
def test_writes_are_equivalent(world, fh, offset, datalen, sizedelta, write_flags, rcuts, wsizes, unique, nargs,
                               lendelta, extlen):
    _session, _fast, nodeids = world
    data = _data(datalen, unique & 0xFF)
    args = _write_args(nodeids, fh, offset, datalen + sizedelta, write_flags)[:nargs]
    body = args + (data if nargs == 40 else b"")
    length = (40 + len(body) + lendelta) & 0xFFFFFFFF
    request = abi.IN_HEADER.pack(length, Opcode.WRITE, unique, 7, 0, 0, 0, extlen, 0) + body
    compare(world, request, [40, 80, *rcuts], wsizes)


@SETTINGS
@given(fh=WFH, offset=WOFFSET, datalen=st.integers(0, 5000), rcuts=st.lists(st.integers(0, 5100), max_size=4),
       wsizes=WSIZES, unique=U64)
def test_well_formed_writes_are_served_in_c_when_they_can_be(world, fh, offset, datalen, rcuts, wsizes, unique):
    """Any cut of a well-formed plain WRITE: the same bytes and file, and C
    serves it whenever the header is whole in the first buffer, the
    writable part holds the 24-byte reply, the offset is a file offset and
    the fh is held (an error from pwritev included)."""
    _session, _fast, nodeids = world
    args = _write_args(nodeids, fh, offset, datalen, 0)
    request = abi.IN_HEADER.pack(80 + datalen, Opcode.WRITE, unique, 7, 0, 0, 0, 0, 0) + args + _data(datalen)
    n, in_c = compare(world, request, rcuts, wsizes)
    points = {c % (len(request) + 1) for c in rcuts} - {0, len(request)}
    first = min(points or [len(request)])
    held = fh in ("fh-rw", "fh-append", "fh-w-rdonly")
    assert in_c == (first >= 40 and sum(wsizes) >= 24 and held and offset < 1 << 63 and len(points) < 16)
    if in_c:
        assert n in (16, 24)


@SETTINGS
@given(fh=WFH, offset=WOFFSET, datalen=st.integers(0, 5000), sizedelta=st.sampled_from([0, 0, 0, 1]),
       write_flags=WFLAGS, rcuts=st.lists(st.integers(0, 5100), max_size=3), wsizes=WSIZES, unique=U64)
def test_metered_writes_count_the_same(metered, fh, offset, datalen, sizedelta, write_flags, rcuts, wsizes,
                                       unique):
    """WRITEs, served by C or declined, each path with its meter: the same
    bytes, file and counters (BYTES_WRITTEN, WRITE's errors)."""
    _session, _fast, nodeids, _meters = metered
    args = _write_args(nodeids, fh, offset, datalen + sizedelta, write_flags)
    request = abi.IN_HEADER.pack(80 + datalen, Opcode.WRITE, unique, 7, 0, 0, 0, 0, 0) + args + _data(datalen)
    compare_metered(metered, request, [40, 80, *rcuts], wsizes)


def test_c_counts_write_bytes_and_errors_in_their_words(metered):
    """The words themselves: 4096 data bytes under BYTES_WRITTEN, EBADF
    under WRITE, each request under WRITE's requests."""
    _session, _fast, nodeids, (_, c_meter) = metered
    words = c_meter.words
    ebadf = counters.ERRORS + int(Opcode.WRITE) * counters.ERRNO_SLOTS + errno.EBADF
    before = _op_words(c_meter, Opcode.WRITE)
    errors, written = words[ebadf], words[counters.BYTES_WRITTEN]
    assert compare_metered(metered, write_request(nodeids["fh-rw"], 0, _data(4096)), [40, 80], [16, 8]) == (24, True)
    assert compare_metered(metered, write_request(nodeids["fh-w-rdonly"], 0, b"x"), [40, 80], [16, 8]) == (16, True)
    after = _op_words(c_meter, Opcode.WRITE)
    assert (words[ebadf], words[counters.BYTES_WRITTEN]) == (errors + 1, written + 4096)
    assert after[counters.OP_REQUESTS] == before[counters.OP_REQUESTS] + 2
    assert after[counters.OP_LATENCY_SUM] > before[counters.OP_LATENCY_SUM]
