"""STATFS served in C (daemon/fuse/_attrs.h) against the Python session.

STATFS answers the file system's free counts, which any process writing
to the same disk changes between two calls. So the comparisons run in a
forked child with its own mount namespace and a tmpfs of its own
(tests/fuzz/sharefs.py's ``bounded``, as the fuzz target's share): no
other process writes there, and the two sessions' calls see the same
counts. In it, two sessions from the same start, each on its own copy of
the share (test_create_in_c's pair and step): after every request the
reply bytes and count, the tables, the meters, the trees, the fds and
each session's warnings must be equal; a declined request must leave
everything as it was. The batch loop is compared ring by ring with the
pure loop (test_batch_equivalence's ``check``) on a world made there.
The Python tail C calls for counts ``struct.pack`` refuses
(``fastpath.statfs_rest``) is compared with the session's own answer on a
faked ``os.fstatvfs``.
"""

from __future__ import annotations

import errno
import logging
import os
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.fuse import abi, attrs, fastpath
from daemon.fuse.abi import Opcode
from tests.fuzz import sharefs
from tests.unit.fusereq import in_header, start_session
from tests.unit.test_create_in_c import _close, _host_step, _lookups, _node_of, _pair, _share, _step, shaped_args
from tests.unit.test_fastops_equivalence import _run
from tests.unit.test_readlink_in_c import _chain, _ring, _warned
from tests.unit.test_release_in_c import _c_declines, _err, _row_replaced

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a tmpfs in a mount namespace of its own needs root")

OUT = abi.STATFS_OUT.size       # 80


def statfs_request(nodeid: int, unique: int, variant: str = "ok") -> bytes:
    args, extlen = shaped_args(b"", variant, 0)
    request = in_header(Opcode.STATFS, nodeid, len(args), unique, extlen=extlen) + args
    if variant == "len":
        request = abi.IN_HEADER.pack(len(request) + 1, *abi.IN_HEADER.unpack_from(request)[1:]) + args
    return request


def on_private_tmpfs(tmp_path, body) -> None:
    """``body(base)`` in a forked child (one thread: unshare works) with a
    tmpfs at ``base`` in a mount namespace of its own; an exception there
    (a failed assert) fails the test here with the child's traceback."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:        # pragma: no cover - the child
        status, text = 1, b""
        try:
            os.close(r)
            cwd = os.getcwd()
            point = sharefs.bounded(str(tmp_path))
            try:
                body(Path(point))
            finally:
                os.chdir(cwd)
            status, text = 0, b"ok"
        except BaseException:  # noqa: BLE001 - reported to the parent
            text = traceback.format_exc().encode()
        finally:
            try:
                os.write(w, text[-30000:])
            finally:
                os._exit(status)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if (tmp_path / "share-fs").exists():
        os.rmdir(tmp_path / "share-fs")     # the empty mount point, here
    assert os.waitstatus_to_exitcode(status) == 0 and out == b"ok", out.decode(errors="replace")


def _tmpfs_pair(base: Path, **config):
    """Two copies of test_create_in_c's share on the tmpfs, the pair on
    them (the cwd /proc/self/fd)."""
    shares = (base / "pure", base / "comp")
    for root in shares:
        _share(root)
    os.chdir("/proc/self/fd")
    pair, fast = _pair(shares, **config)
    return pair, fast, shares


def _sf(pair, fast, shares, nodeid: int, unique: int, wsizes=(16, OUT), variant: str = "ok") -> tuple[bool, bytes]:
    replies: list = []
    served = _step(pair, fast, shares, statfs_request(nodeid, unique, variant), list(wsizes), replies)
    assert _warned(pair)[0] == _warned(pair)[1]
    return served, replies[0]


def _write_both(shares, name: str, size: int) -> None:
    for root in shares:
        (root / name).write_bytes(b"w" * size)


def test_statfs_is_served_in_c(tmp_path):
    """STATFS of the root, a file, a directory, a FIFO and a symlink (its
    O_PATH fd) is C's, with Python's fuse_kstatfs (the tmpfs's blocks,
    free counts, block and fragment size, name length); after files are
    written and removed (the free counts move) too; each counted under
    STATFS."""
    def body(base):
        pair, fast, shares = _tmpfs_pair(base)
        try:
            nodes = [1, *_lookups(pair, fast, shares, b"exists", b"dir", b"fifo", b"ln")]
            for k, node in enumerate(nodes):
                served, reply = _sf(pair, fast, shares, node, 10 + k)
                assert served and len(reply) == 16 + OUT and int.from_bytes(reply[:4], "little") == 16 + OUT
                s = os.statvfs(shares[1])
                assert reply[16:] == abi.STATFS_OUT.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree,
                                                         s.f_bsize, s.f_namemax, s.f_frsize)
            before = abi.STATFS_OUT.unpack_from(reply, 16)
            _write_both(shares, "big", 1 << 20)
            served, reply = _sf(pair, fast, shares, nodes[2], 20)
            after = abi.STATFS_OUT.unpack_from(reply, 16)
            assert served and after[1] < before[1] and after[4] < before[4]
            for root in shares:
                os.unlink(root / "big")
            assert _sf(pair, fast, shares, 1, 21)[0]
            words = pair[1].meter.words
            assert words[fastpath.op_words(Opcode.STATFS)[0]] == len(nodes) + 2
        finally:
            _close(pair)
    on_private_tmpfs(tmp_path, body)


def test_the_reply_room(tmp_path):
    """fuse_kstatfs needs 16 + 80 bytes, however cut (more is fine: 96
    written); one byte less is Python's EIO (ops.py's reply column, before
    the op runs), which C leaves to it."""
    def body(base):
        pair, fast, shares = _tmpfs_pair(base)
        try:
            for wsizes in [(96,), (16, 40, 40), (8, 8, 80), (16, 100), (200,), (16, 1) + (1,) * 79]:
                served, reply = _sf(pair, fast, shares, 1, 5, wsizes)
                assert served and _err(reply) == 0 and int.from_bytes(reply[:4], "little") == 96, wsizes
            for wsizes in [(16, 79), (95,), (16,)]:
                served, reply = _sf(pair, fast, shares, 1, 6, wsizes)
                assert not served and _err(reply) == errno.EIO, wsizes
        finally:
            _close(pair)
    on_private_tmpfs(tmp_path, body)


CASES = ["extension", "stale", "gone", "unknown", "zero", "len", "huge-args", "split-header", "no-room"]


def test_what_c_leaves_to_python(tmp_path):
    """Each declined by C before anything was done (nothing written,
    nothing changed), then answered by Python as the reference answers
    it: a request extension, a stale, forgotten, unknown or zero nodeid,
    a wrong header.len, args past MAX_ARGS, a header split over two
    buffers, a writable part without room for a header."""
    def body(base):
        pair, fast, shares = _tmpfs_pair(base)
        try:
            (gone,) = _lookups(pair, fast, shares, b"sub")
            for session in pair:
                session.inodes.unref(gone, 1)
            for case in CASES:
                node, variant, rcuts, wsizes = 1, "ok", [40], [16, OUT]
                node = {"stale": 3999, "gone": gone, "unknown": 7, "zero": 0}.get(case, 1)
                if case in ("extension", "len"):
                    variant = case
                elif case == "split-header":
                    rcuts = [20]
                elif case == "no-room":
                    wsizes = [15]
                request = statfs_request(node, 9, variant)
                if case == "huge-args":
                    args = bytes(128 * 1024 + 1)
                    request = in_header(Opcode.STATFS, 1, len(args), 9) + args
                if case in ("split-header", "no-room"):
                    assert fast.serve(_chain(request, rcuts, wsizes)) == -1, case
                else:
                    out = [bytearray(b"\xa5" * 16), bytearray(b"\x5a" * OUT)]
                    from daemon.virtio.iovec import IoVec
                    from daemon.virtio.virtqueue import Chain
                    assert fast.serve(Chain(0, IoVec([memoryview(bytearray(request))]),
                                            IoVec([memoryview(b) for b in out]))) == -1, case
                    assert out == [bytearray(b"\xa5" * 16), bytearray(b"\x5a" * OUT)]
                    _c_declines(pair[1], fast, request)
                before = fast.served
                ref = _run(pair[0], fast, request, rcuts, wsizes, False)
                got = _run(pair[1], fast, request, rcuts, wsizes, True)
                assert got == ref and fast.served == before, case
                assert _warned(pair)[0] == _warned(pair)[1]
                want = {"stale": errno.ESTALE, "gone": errno.ESTALE, "unknown": errno.ESTALE, "zero": errno.ESTALE,
                        "len": errno.EINVAL, "huge-args": errno.EINVAL, "extension": 0, "split-header": 0}
                if case in want:
                    assert _err(ref[1]) == want[case], case
        finally:
            _close(pair)
    on_private_tmpfs(tmp_path, body)


def test_statfs_stays_in_python_when_its_row_is_replaced(tmp_path):
    """A replaced STATFS row: Python's (statfs_unsupported names it, C
    declines); --readonly leaves the row as it is: C's."""
    def body(base):
        pair, _fast, shares = _tmpfs_pair(base)
        try:
            assert "STATFS is not the reference handler" in _row_replaced(
                pair[1], fastpath.statfs_unsupported, Opcode.STATFS, attrs.do_statfs)
            assert fastpath.make(pair[1]).serve(_chain(statfs_request(1, 3), [40], [16, OUT])) == -1
        finally:
            _close(pair)
        for root in shares:
            os.rename(root, str(root) + "-1")
        pair, fast, shares = _tmpfs_pair(base, readonly=True)
        try:
            assert fastpath.statfs_unsupported(pair[1]) == ""
            assert _sf(pair, fast, shares, 1, 5)[0]
        finally:
            _close(pair)
    on_private_tmpfs(tmp_path, body)


class _Vfs:
    """os.statvfs_result's fields fstatvfs gives (a fake, as CPython makes
    them: C longs, so a count at or above 2**63 is negative)."""

    def __init__(self, blocks=100, bfree=50, bavail=40, files=1000, ffree=900, bsize=4096, namemax=255,
                 frsize=4096):
        self.f_blocks, self.f_bfree, self.f_bavail, self.f_files, self.f_ffree = blocks, bfree, bavail, files, ffree
        self.f_bsize, self.f_namemax, self.f_frsize = bsize, namemax, frsize


@pytest.mark.parametrize("fields,ok", [({}, True), ({"blocks": -1}, False), ({"ffree": -5}, False),
                                       ({"bsize": 1 << 32}, False), ({"frsize": -1}, False),
                                       ({"namemax": (1 << 32) - 1}, True), ({"files": (1 << 63) - 1}, True)])
def test_the_python_tail_answers_as_the_session(tmp_path, monkeypatch, caplog, fields, ok):
    """fastpath.statfs_rest (C's tail for counts struct.pack refuses) gives
    what FuseSession.handle gives for the same fstatvfs, and logs the same
    line: the 80 bytes, or EIO and "FUSE STATFS (nodeid 1) failed" with
    the exception."""
    monkeypatch.chdir("/proc/self/fd")
    session, _client = start_session(tmp_path)
    try:
        monkeypatch.setattr(attrs.os, "fstatvfs", lambda fd: _Vfs(**fields))
        with caplog.at_level(logging.ERROR, logger="pyvirtiofsd"):
            ref = _run(session, None, statfs_request(1, 4), [40], [16, OUT], False)
            logged = [r.getMessage() for r in caplog.records]
            caplog.clear()
            tail = fastpath.statfs_rest(session, 1)
            assert [r.getMessage() for r in caplog.records] == logged
        if ok:
            assert tail == ref[1][16:] and ref[0] == 96
        else:
            assert tail == errno.EIO and _err(ref[1]) == errno.EIO
            assert logged == ["FUSE STATFS (nodeid 1) failed"]
        assert fastpath.statfs_rest(session, 3999) == errno.ESTALE
    finally:
        session.close()
        session.inodes.close()


STATFS_STEP = st.one_of(
    st.tuples(st.just("statfs"), st.sampled_from(["root", "stale", "unknown", "exists", "dir", "ln", "fifo",
                                                  "sub/inner"]),
              st.sampled_from([(16, OUT), (16, OUT), (96,), (16, 79), (16,), (16, 40, 50), (300,)]),
              st.sampled_from(["ok", "ok", "ok", "extension", "longer", "len"])),
    st.tuples(st.just("write"), st.sampled_from(["w0", "w1"]), st.sampled_from([0, 1, 5000, 1 << 18])),
    st.tuples(st.just("unlink"), st.sampled_from(["w0", "w1", "exists"])),
    st.tuples(st.just("forget"), st.sampled_from(["exists", "dir", "ln"]), st.integers(1, 2)),
    st.tuples(st.just("reap")))


def test_statfs_requests_are_equivalent(tmp_path):
    """Sequences of STATFS (every kind of inode, stale and unknown
    nodeids, reply parts that fit and do not, cut, extensions, args, a
    wrong len) with files written, removed and forgotten between (the free
    counts move): the same replies, tables, counters and fds."""
    def body(base):
        runs = [0]

        @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(steps=st.lists(STATFS_STEP, min_size=1, max_size=12))
        def run(steps):
            runs[0] += 1
            where = base / str(runs[0])
            where.mkdir()
            pair, fast, shares = _tmpfs_pair(where)
            nodeids: dict = {}
            try:
                for k, step in enumerate(steps):
                    if step[0] == "write":
                        _write_both(shares, step[1], step[2])
                    elif step[0] == "statfs":
                        node = _node_of(pair, fast, shares, nodeids, step[1], {"root": 1, "stale": 3999,
                                                                               "unknown": 7})
                        _sf(pair, fast, shares, node, 100 + k, step[2], step[3])
                    else:
                        if step[0] == "forget":
                            nodeids.pop(step[1], None)
                        _host_step(pair, shares, step)
            finally:
                _close(pair)
                import shutil
                shutil.rmtree(where)
        run()
        assert runs[0] > 1
    on_private_tmpfs(tmp_path, body)


def test_the_batch_loop_serves_statfs_as_the_pure_loop(tmp_path):
    """STATFS of the root and of a file (room for fuse_kstatfs, and too
    little: Python's EIO), of an unknown nodeid (Python's) and with an
    extension (Python's) in one ring: the batch loop answers them as the
    pure loop does (guest RAM, used ring, progress record, counters); C
    takes each of its own before the fstatfs."""
    def body(base):
        from daemon.workers.loop import WorkerLoop
        from tests.fuzz.differential import Image
        from tests.unit.test_batch_equivalence import _NoChannel, check
        from tests.unit.test_fastops_equivalence import W_CONTENTS, entry_nodeid, metered_ops
        root = base / "share"
        root.mkdir()
        (root / "a").write_bytes(b"x" * 5000)
        (root / "d").mkdir()
        os.mkfifo(root / "d" / "fifo")
        (root / "w").write_bytes(W_CONTENTS)
        os.chdir("/proc/self/fd")
        session, client = start_session(root)
        img = None
        try:
            nodeids = {n: entry_nodeid(client.call(Opcode.LOOKUP, 1, n.encode() + b"\0", abi.ENTRY_OUT.size).ok())
                       for n in ("a", "d", "w")}
            nodeids["fifo"] = entry_nodeid(client.call(Opcode.LOOKUP, nodeids["d"], b"fifo\0",
                                                       abi.ENTRY_OUT.size).ok())
            fast, meters = metered_ops(session)
            loop = WorkerLoop(_NoChannel(), session, (1,))
            img = Image()
            rig = (session, fast, nodeids, meters, loop, img)
            requests = [(statfs_request(1, 40), [16, OUT], True),
                        (statfs_request(nodeids["a"], 41), [16, OUT], True),
                        (statfs_request(nodeids["a"], 42), [16, 79], False),
                        (statfs_request(3999, 43), [16, OUT], False),
                        (statfs_request(1, 44), [96], True),
                        (statfs_request(1, 45, "extension"), [16, OUT], False),
                        (statfs_request(nodeids["d"], 46), [16, OUT], True)]
            data, expect = _ring(rig, requests)
            in_c, _runs = check(rig, data)
            assert in_c == expect == 4
            loop._epoll.close()
        finally:
            if img is not None:
                img.close()
            session.close()
            session.inodes.close()
    on_private_tmpfs(tmp_path, body)


def test_a_disk_with_reserved_blocks(tmp_path, monkeypatch):
    """On the test's own disk (ext4 keeps blocks for root: bfree and
    bavail differ, which a tmpfs never shows) C's fuse_kstatfs is
    Python's. Other processes write to that disk, so a comparison counts
    only when Python's answers before and after C's are the same."""
    from tests.unit.test_create_in_c import _share as make_share
    s = os.statvfs(tmp_path)
    if s.f_bfree == s.f_bavail:
        pytest.skip("no reserved blocks on this disk")
    shares = (tmp_path / "pure", tmp_path / "comp")
    for root in shares:
        make_share(root)
    monkeypatch.chdir("/proc/self/fd")
    pair, fast = _pair(shares)
    try:
        compared = 0
        for k in range(200):
            before = fast.served
            ref = _run(pair[0], fast, statfs_request(1, k), [40], [16, OUT], False)
            got = _run(pair[1], fast, statfs_request(1, k), [40], [16, OUT], True)
            again = _run(pair[0], fast, statfs_request(1, k), [40], [16, OUT], False)
            assert fast.served == before + 1
            if ref == again:
                assert got == ref
                compared += 1
                if compared == 5:
                    break
        assert compared == 5
        bfree, bavail = abi.STATFS_OUT.unpack_from(got[1], 16)[1:3]
        assert bfree > bavail
    finally:
        _close(pair)
