"""READLINK served in C (daemon/fuse/_attrs.h) against the Python session.

Two sessions from the same start, each on its own copy of the share
(test_create_in_c's pair and step): the reference (``FuseSession.handle``)
and one with the compiled ops (``FastOps.serve`` first, ``handle`` when it
declines). After every request the reply bytes and count, the inode
tables, the open files, the meters, the trees, the fds opened and each
session's rate-limited warnings must be equal; a declined request must
leave every buffer, table and fd as it was (test_release_in_c's
``_c_declines``). The batch loop (stage 3) is compared ring by ring with
the pure loop (test_batch_equivalence's ``check``): used ring, progress
record, counters.
"""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.fuse import abi, attrs, fastpath
from daemon.fuse.abi import Opcode
from daemon.virtio.iovec import IoVec
from daemon.virtio.virtqueue import Chain
from tests.unit.fusereq import in_header
from tests.unit.test_batch_equivalence import Builder, check, metered, rig, world  # noqa: F401 - fixtures
from tests.unit.test_create_in_c import (_close, _host_step, _lookups, _node_of, _pair, _run_steps, _step, fresh_pair,
                                         shaped_args, shares)
from tests.unit.test_fastops_equivalence import _run
from tests.unit.test_release_in_c import _c_declines, _err, _row_replaced

__all__ = ["shares", "rig", "metered", "world"]     # the fixtures, imported for the tests below

PAGE = 4095         # the Linux driver's reply part for READLINK (PAGE_SIZE - 1)
# symlinks made in both copies (test_create_in_c's share has "ln" -> "exists")
TARGETS = {"abs": b"/etc/passwd", "dangling": b"nowhere/x", "long": b"t" * 4095, "odd": b"\xff\xfe name\n\x01",
           "dots": b"../..", "one": b"x"}
LINKS = ["ln", *TARGETS]
NOT_LINKS = ["exists", "dir", "fifo", "sub/inner"]
NEW_TARGETS = [b"y", b"exists", b"z" * 300, b"q" * 4095, b"/"]


def _make_links(shares) -> None:
    for root in shares:
        for name, target in TARGETS.items():
            os.symlink(target, os.fsencode(root / name))


def readlink_request(nodeid: int, unique: int, variant: str = "ok") -> bytes:
    """READLINK (no args, as Linux sends it) as ``variant`` wants it:
    shaped_args' "extension" and "longer", "len" (header.len one more)."""
    args, extlen = shaped_args(b"", variant, 0)
    request = in_header(Opcode.READLINK, nodeid, len(args), unique, extlen=extlen) + args
    if variant == "len":
        request = abi.IN_HEADER.pack(len(request) + 1, *abi.IN_HEADER.unpack_from(request)[1:]) + args
    return request


def _warned(pair) -> list[tuple[int, int]]:
    return [(s._log._in_window, s._log._suppressed) for s in pair]


def _rl(pair, fast, shares, nodeid: int, unique: int, wsizes=(16, PAGE), variant: str = "ok") -> tuple[bool, bytes]:
    """READLINK on both, compared (reply, state, fds, warnings): (served by
    C, the reference's reply)."""
    replies: list = []
    served = _step(pair, fast, shares, readlink_request(nodeid, unique, variant), list(wsizes), replies)
    warned = _warned(pair)
    assert warned[0] == warned[1]
    return served, replies[0]


def _target(reply: bytes) -> bytes:
    length = int.from_bytes(reply[:4], "little")
    assert _err(reply) == 0 and length >= 16, reply[:16]
    return reply[16:length]


def test_readlinks_are_served_in_c(shares):
    """The READLINK of every symlink (relative, absolute, dangling, 4095
    bytes, bytes that are not UTF-8, one byte) is C's, with Python's reply;
    of a file, a directory, a FIFO and the root, C's EINVAL; each counted
    under READLINK (the meters compared after every step)."""
    _make_links(shares)
    pair, fast = _pair(shares)
    try:
        names = LINKS + NOT_LINKS[:3]
        nodes = dict(zip(names, _lookups(pair, fast, shares, *(n.encode() for n in names))))
        for k, name in enumerate(LINKS):
            served, reply = _rl(pair, fast, shares, nodes[name], 10 + k)
            assert served and _target(reply) == TARGETS.get(name, b"exists"), name
        for k, name in enumerate(NOT_LINKS[:3]):
            served, reply = _rl(pair, fast, shares, nodes[name], 30 + k)
            assert served and _err(reply) == errno.EINVAL, name
        served, reply = _rl(pair, fast, shares, 1, 40)
        assert served and _err(reply) == errno.EINVAL
        words = pair[1].meter.words
        requests, _, _, errors = fastpath.op_words(Opcode.READLINK)
        assert words[requests] == len(LINKS) + 4 and words[errors + errno.EINVAL] == 4
    finally:
        _close(pair)


@pytest.mark.parametrize("name,wsizes,fits", [
    ("ln", (16, 6), True), ("ln", (22,), True), ("ln", (16, 1, 1, 1, 1, 1, 1), True), ("ln", (10, 10, 10), True),
    ("ln", (16, 5), False), ("ln", (16,), False), ("ln", (21,), False),
    ("long", (16, 4095), True), ("long", (16, 4094), False), ("long", (4111,), True), ("one", (17,), True),
])
def test_the_reply_room(shares, name, wsizes, fits):
    """A target that fits the writable part (however it is cut) is the
    reply; one byte less room is EIO, from C too, after the same
    rate-limited warning Python's _too_big logs (the two sessions'
    limiters compared; the message in the log)."""
    _make_links(shares)
    pair, fast = _pair(shares)
    try:
        (node,) = _lookups(pair, fast, shares, name.encode())
        served, reply = _rl(pair, fast, shares, node, 9, wsizes)
        assert served
        assert (_err(reply) == 0) is fits
        if not fits:
            assert _err(reply) == errno.EIO and _warned(pair)[1][0] >= 1
    finally:
        _close(pair)


def test_too_big_warns_as_python_does(shares, caplog):
    """C's EIO for a target longer than the reply part logs Python's line
    (fastpath.reply_too_big: FuseSession._too_big's words, the session's
    own limiter)."""
    pair, fast = _pair(shares)
    try:
        (node,) = _lookups(pair, fast, shares, b"ln")
        with caplog.at_level("WARNING", logger="pyvirtiofsd"):
            assert _rl(pair, fast, shares, node, 9, (16, 3))[0]
        lines = [r.getMessage() for r in caplog.records if "READLINK" in r.getMessage()]
        assert lines == ["FUSE READLINK: 6-byte reply, 3-byte buffer"] * 2
    finally:
        _close(pair)


def _chain(request: bytes, rcuts: list[int], wsizes: list[int]) -> Chain:
    from tests.unit.test_fastops_equivalence import _cut
    return Chain(0, IoVec(_cut(request, rcuts)), IoVec([memoryview(bytearray(n)) for n in wsizes]))


@pytest.mark.parametrize("case", ["extension", "stale", "gone", "unknown", "zero", "len", "huge-args",
                                  "split-header", "no-room"])
def test_what_c_leaves_to_python(shares, case):
    """Each declined by C before anything was done (nothing written,
    nothing changed), then answered by Python as the reference answers
    it: a request extension, a stale, forgotten, unknown or zero nodeid,
    a wrong header.len, args past MAX_ARGS, a header split over two
    buffers, a writable part without room for a header."""
    pair, fast = _pair(shares)
    try:
        ln, gone = _lookups(pair, fast, shares, b"ln", b"sub")
        node, variant, rcuts, wsizes = ln, "ok", [40], [16, PAGE]
        if case == "extension":
            variant = "extension"
        elif case == "stale":
            node = 3999
        elif case == "gone":
            for session in pair:        # forgotten: the cached fd's generation is stale
                session.inodes.unref(gone, 1)
            node = gone
        elif case == "unknown":
            node = 7
        elif case == "zero":
            node = 0
        elif case == "len":
            variant = "len"
        elif case == "split-header":
            rcuts = [20]
        elif case == "no-room":
            wsizes = [15]
        request = readlink_request(node, 9, variant)
        if case == "huge-args":
            args = bytes(128 * 1024 + 1)
            request = in_header(Opcode.READLINK, node, len(args), 9) + args
        if case in ("split-header", "no-room"):
            assert fast.serve(_chain(request, rcuts, wsizes)) == -1
        else:
            _c_declines(pair[1], fast, request)
        pure, comp = pair
        before = fast.served
        ref = _run(pure, fast, request, rcuts, wsizes, False)
        got = _run(comp, fast, request, rcuts, wsizes, True)
        assert got == ref and fast.served == before
        if case in ("stale", "gone", "unknown", "zero"):
            assert _err(ref[1]) == errno.ESTALE
        if case in ("len", "huge-args"):
            assert _err(ref[1]) == errno.EINVAL
        assert _warned(pair)[0] == _warned(pair)[1]
    finally:
        _close(pair)


def test_readlink_stays_in_python_when_its_row_is_replaced(shares):
    """A replaced READLINK row: Python's (fastpath.readlink_unsupported
    names it, C declines); --readonly leaves the row as it is: C's."""
    pair, _fast = _pair(shares)
    try:
        assert "READLINK is not the reference handler" in _row_replaced(
            pair[1], fastpath.readlink_unsupported, Opcode.READLINK, attrs.do_readlink)
        fast = fastpath.make(pair[1])
        assert fast.serve(_chain(readlink_request(1, 3), [40], [16, PAGE])) == -1
    finally:
        _close(pair)
    pair, fast = _pair(shares, readonly=True)
    try:
        assert fastpath.readlink_unsupported(pair[1]) == ""
        (node,) = _lookups(pair, fast, shares, b"ln")
        assert _rl(pair, fast, shares, node, 5)[0]
    finally:
        _close(pair)


READLINK_STEP = st.one_of(
    st.tuples(st.just("readlink"), st.sampled_from(["root", "stale", "unknown", *LINKS, *NOT_LINKS]),
              st.sampled_from([(16, PAGE), (16, PAGE), (16, 5), (16, 300), (16,), (30,), (16, 2, 2, 2), (4111,)]),
              st.sampled_from(["ok", "ok", "ok", "extension", "longer", "len"])),
    st.tuples(st.just("relink"), st.sampled_from(LINKS), st.sampled_from(NEW_TARGETS)),
    st.tuples(st.just("unlink"), st.sampled_from(LINKS)),
    st.tuples(st.just("forget"), st.sampled_from(LINKS), st.integers(1, 2)),
    st.tuples(st.just("reap")))


def _relink(shares, name: str, target: bytes) -> None:
    for root in shares:
        path = os.fsencode(root / name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.symlink(target, path)


def _readlink_of(pair, fast, shares, nodeids: dict):
    """_run_steps' request_of for READLINK steps: the nodeid of the step's
    name (looked up on both the first time), the step's reply room and
    variant."""
    def request_of(_parent, step, unique):
        _kind, where, wsizes, variant = step
        node = _node_of(pair, fast, shares, nodeids, where, {"root": 1, "stale": 3999, "unknown": 7})
        return readlink_request(node, unique, variant), list(wsizes)
    return request_of


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(READLINK_STEP, min_size=1, max_size=14))
def test_readlinks_are_equivalent(tmp_path_factory, steps):
    """Sequences of READLINKs (symlinks of every kind, files, a directory,
    a FIFO, the root, stale and unknown nodeids; reply parts that fit,
    that do not, cut in pieces; extensions, args, a wrong len) with the
    links replaced, removed and forgotten on the host between: the same
    replies, warnings, tables, counters and fds."""
    with fresh_pair(tmp_path_factory, "readlinks") as (pair, fast, shares):
        _make_links(shares)
        nodeids: dict = {}
        request_of = _readlink_of(pair, fast, shares, nodeids)
        for step in steps:
            if step[0] == "relink":
                _relink(shares, step[1], step[2])
            elif step[0] == "readlink":
                _run_steps(pair, fast, shares, [step], request_of)
                assert _warned(pair)[0] == _warned(pair)[1]
            else:
                if step[0] == "forget" and step[1] in nodeids:
                    nodeids.pop(step[1])
                _host_step(pair, shares, step)


def _ring(rig, requests) -> tuple[bytes, int]:
    """A ring of (request, writable sizes, whether C serves it) laid as the
    driver lays it: its bytes, how many C must serve."""
    b = Builder(16, 7, 3, True)
    for k, (request, wsizes, _served) in enumerate(requests):
        b.request(request, [40], False, wsizes, True, "none", len(requests) - k - 1)
    return b.build(), sum(served for _, _, served in requests)


def test_the_batch_loop_serves_readlinks_as_the_pure_loop(rig):
    """READLINKs of a symlink (room for it, and too little: EIO after
    Python's warning, called with the inode table's thread lock a LOOKUP
    before it took let go, and the LOOKUP after it taking it again), of a
    file (EINVAL) and of an unknown nodeid (Python's: the batch stops
    there and goes on after) in one ring: the batch loop answers them as
    the pure loop does (guest RAM, used ring, progress record, counters,
    lookup counts, the lock free after); C takes each of its own before
    the readlinkat."""
    nodeids = rig[2]
    lookup = in_header(Opcode.LOOKUP, 1, 2, 19) + b"a\0"     # C's: takes the table's thread lock for the call
    requests = [(lookup, [16, 128], True),
                (readlink_request(nodeids["b"], 20), [16, PAGE], True),
                (readlink_request(nodeids["a"], 21), [16, PAGE], True),
                (readlink_request(nodeids["b"], 22), [16, 0], True),    # the tail: the lock let go first
                (lookup, [16, 128], True),
                (readlink_request(3999, 23), [16, PAGE], False),
                (readlink_request(nodeids["b"], 24), [17], True),
                (readlink_request(1, 25, "extension"), [16, PAGE], False),
                (readlink_request(nodeids["b"], 26), [16, PAGE], True)]
    data, expect = _ring(rig, requests)
    in_c, _runs = check(rig, data)
    assert in_c == expect == 7
