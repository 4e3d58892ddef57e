"""RELEASEDIR served in C (daemon/fuse/_release.h, the RELEASE code) against
the Python session.

Two sessions from the same start on one share (test_readdirplus_in_c's
Pair: RELEASEDIR changes nothing in the share, READDIRPLUS before it
fills the handles' DirStreams): the reference (``FuseSession.handle``)
and one with the compiled ops (``FastOps.serve`` first, ``handle`` when it
declines). After every RELEASEDIR the reply bytes, the inode tables, the
open files (fh, nodeid, kind, flags, DirStream state), the whole FileTable
memory (byte for byte), the per-nodeid open counts, the released counts,
the meters, the fds each request closed, and the references left to the
released handle and its DirStream must be equal; a declined RELEASEDIR
must leave every buffer, table and fd as it was (test_release_in_c's
``_c_declines``: the same snapshot).
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.fuse import abi, dirs, fastpath, filetable
from daemon.fuse.abi import Opcode
from daemon.virtio.iovec import IoVec
from daemon.virtio.virtqueue import Chain
from tests.unit.fusereq import in_header
from tests.unit.test_fastops_equivalence import _table_state
from tests.unit.test_readdirplus_in_c import Pair, pairs_of, scratch_share, share
from tests.unit.test_release_in_c import _c_declines, _err, _files_bytes

__all__ = ["share"]         # the fixture, imported for the tests below


def releasedir_request(nodeid: int, fh: int, unique: int, release_flags: int = 0, args: bytes | None = None,
                       extlen: int = 0) -> bytes:
    if args is None:
        args = abi.RELEASE_IN.pack(fh, os.O_RDONLY | os.O_DIRECTORY, release_flags, 0)
    if extlen:
        args += bytes(8 * extlen)
    return in_header(Opcode.RELEASEDIR, nodeid, len(args), unique, extlen=extlen) + args


def _handles(session) -> list:
    files = session.handles.files
    return [(fh, h.nodeid, h.kind, h.flags, files.lookup(fh)) for fh, h in sorted(session.handles._handles.items())]


class RelPair(Pair):
    """Pair with RELEASEDIR compared as test_release_in_c compares RELEASE."""

    def same(self) -> None:
        pure, comp = self.sessions
        assert _table_state(comp) == _table_state(pure)
        assert _files_bytes(comp) == _files_bytes(pure)
        assert _handles(comp) == _handles(pure)
        # the DirStreams' state (Pair.stream: the padding after each buffered
        # name is whatever getdents64's buffer held, not compared)
        assert [self.stream(1, fh) for fh in sorted(comp.handles._handles)] \
            == [self.stream(0, fh) for fh in sorted(pure.handles._handles)]
        assert comp.handles._open_per_node == pure.handles._open_per_node
        assert comp.handles._released == pure.handles._released
        assert not comp.handles.files._tlock.locked()
        self.meters_equal()

    def release(self, nodeid: int, fh: int, request: bytes | None = None, **kw) -> tuple[bytes, bool]:
        """RELEASEDIR on both, compared: (the reference's reply, whether C served it)."""
        self.unique += 1
        if request is None:
            request = releasedir_request(nodeid, fh, self.unique, **kw)
        elif len(request) >= 48:
            fh = int.from_bytes(request[40:48], "little")
        held = [s.handles._handles.get(fh) for s in self.sessions]
        streams = [None if h is None else h.dir_stream for h in held]
        fds = [None if h is None else h.fd for h in held]
        pure = self._run(self.sessions[0], None, request, [16], False)
        served = self.fast.served
        comp = self._run(self.sessions[1], self.fast, request, [16], True)
        assert comp == pure             # reply bytes, and the fds the request closed (or opened)
        self.same()
        # the handle and its DirStream: referred to here only, on both
        for objs in (held, streams):
            if objs[0] is not None:
                assert sys.getrefcount(objs[1]) == sys.getrefcount(objs[0])
        if _err(pure[1]) == 0:
            for fd in fds:
                assert fd is not None
                with pytest.raises(OSError):
                    os.fstat(fd)
        return pure[1][:pure[0]], self.fast.served > served

    def declined(self, request: bytes) -> bytes:
        """C declines ``request`` (nothing written or changed), then Python
        answers it on both, compared: the reference's reply."""
        _c_declines(self.sessions[1], self.fast, request)
        reply, served = self.release(0, 0, request)
        assert not served
        return reply

    def open_file(self, nodeid: int) -> int:
        fhs = [abi.OPEN_OUT.unpack_from(r)[0] for r in self.both(Opcode.OPEN, nodeid,
                                                                   abi.OPEN_IN.pack(os.O_RDONLY, 0),
                                                                   abi.OPEN_OUT.size)]
        assert fhs[0] == fhs[1]
        return fhs[0]


@pytest.fixture
def pair_of(share):
    yield from pairs_of(share, RelPair)


def _fill(share) -> None:
    os.mkdir(share / "d")
    for i in range(40):
        (share / "d" / f"f{i:02d}").write_bytes(b"x" * i)
    (share / "file").write_bytes(b"f")


def test_releasedirs_are_served_in_c(pair_of, share):
    """OPENDIR (Python's), READDIRPLUS (C's) part of the way, RELEASEDIR:
    C's, with Python's empty reply, tables, counts, fds, DirStreams
    dropped; two fhs on one directory (the count down, then out); a handle
    never read (no DirStream); the freed slot taken again and released in
    C again; the meter counts RELEASEDIR."""
    _fill(share)
    p = pair_of()
    comp = p.sessions[1]
    d = p.lookup(1, "d")
    fh0, fh1, fh2 = p.opendir(d), p.opendir(d), p.opendir(1)
    p.step(d, fh0, 0, 600)          # a partial listing: the stream holds more
    p.step(d, fh1, 0, 4096)
    assert comp.handles._handles[fh0].dir_stream.buf
    assert comp.handles._open_per_node[d] == 2
    reply, served = p.release(d, fh0)
    assert served and reply == abi.OUT_HEADER.pack(16, 0, p.unique)
    assert comp.handles._open_per_node[d] == 1
    assert p.release(d, fh1, args=abi.RELEASE_IN.pack(fh1, 0, 0, 0) + bytes(8))[1]      # longer: ignored
    assert d not in comp.handles._open_per_node
    assert p.release(1, fh2)[1]
    assert len(comp.handles) == 0 and len(comp.handles.files) == 0
    # released twice: Python's EBADF
    assert _err(p.declined(releasedir_request(1, fh2, 50))) == errno.EBADF
    fh3 = p.opendir(1)
    assert fh3 & filetable.SLOT_MASK == fh2 & filetable.SLOT_MASK and fh3 != fh2
    assert p.release(1, fh3)[1]
    words = comp.meter.words
    assert words[fastpath.op_words(Opcode.RELEASEDIR)[0]] == 5     # 4 in C, the EBADF in Python
    assert words[fastpath.op_words(Opcode.RELEASE)[0]] == 0


@pytest.mark.parametrize("case", ["short-args", "empty-args", "extension", "unknown", "file", "locks",
                                  "peers-odd", "busy", "dirty", "not-own"])
def test_what_c_leaves_to_python(pair_of, share, case):
    """Each case C declines (nothing written or changed), then Python's."""
    _fill(share)
    p = pair_of()
    comp = p.sessions[1]
    d = p.lookup(1, "d")
    fh = p.opendir(d)
    p.step(d, fh, 0, 600)
    request = releasedir_request(d, fh, 20)
    expect = 0
    if case == "short-args":
        request, expect = releasedir_request(d, fh, 20, args=abi.RELEASE_IN.pack(fh, 0, 0, 0)[:23]), errno.EINVAL
    elif case == "empty-args":
        request, expect = releasedir_request(d, fh, 20, args=b""), errno.EINVAL
    elif case == "extension":
        request, expect = releasedir_request(d, fh, 20, extlen=1), None
    elif case == "unknown":
        request, expect = releasedir_request(d, fh + (1 << 24), 20), errno.EBADF
    elif case == "file":
        ffh = p.open_file(p.lookup(1, "file"))
        request, expect = releasedir_request(d, ffh, 20), errno.EBADF
    elif case == "locks":
        for s in p.sessions:
            s.handles.files.alloc_lock(d, 7, 0)
    elif case == "peers-odd":
        class Odd:      # copied not a bool: C does not guess what it means
            copied = 1
        for s in p.sessions:
            s.handles.peers = Odd()
    elif case == "dirty":
        for s in p.sessions:
            s.handles.files._hdr[filetable._H_DIRTY] = 1
    elif case == "not-own":
        for s in p.sessions:
            h = s.handles._handles.pop(fh)
            s.handles._open_per_node.pop(d)
            os.close(h.fd)
        expect = errno.EBADF
    if case == "busy":
        comp.handles.files._tlock.acquire()
        try:
            _c_declines(comp, p.fast, request)
        finally:
            comp.handles.files._tlock.release()
        assert p.release(d, fh)[1]
        return
    reply = p.declined(request)
    if expect is not None:
        assert _err(reply) == expect
    if case in ("locks", "peers-odd", "dirty"):
        assert _err(reply) == 0 and fh not in comp.handles._handles


def _locks_held(fd: int) -> list[str]:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return [ln for ln in f.read().splitlines() if ln.startswith("lock:")]


@pytest.mark.parametrize("copied", [False, True])
def test_no_flock_comes_off_a_directory(pair_of, share, copied):
    """HandleTable.close takes the flock off files only and do_releasedir
    ignores RELEASE_FLOCK_UNLOCK: a flock on the directory's open file
    stays on another copy of it (a dup here) after C's RELEASEDIR as after
    Python's, with peers.copied or not (/proc/self/fdinfo of each copy
    lists it)."""
    _fill(share)
    p = pair_of()
    d = p.lookup(1, "d")
    fh = p.opendir(d)
    copies = []
    try:
        for s in p.sessions:
            fd = s.handles._handles[fh].fd
            fcntl.flock(fd, fcntl.LOCK_SH)
            copies.append(os.dup(fd))
        if copied:
            class Copied:
                copied = True
            for s in p.sessions:
                s.handles.peers = Copied()
        assert p.release(d, fh, release_flags=abi.FUSE_RELEASE_FLOCK_UNLOCK)[1]
        # each copy's open file description still holds its flock (fdinfo
        # lists the locks a description owns: the two sessions' are two)
        held = [_locks_held(fd) for fd in copies]
        assert [len(h) for h in held] == [1, 1] and all("FLOCK" in h[0] for h in held)
    finally:
        for fd in copies:
            os.close(fd)


def test_releasedir_stays_in_python_when_a_row_is_replaced(pair_of, share):
    """A replaced RELEASEDIR row, or RELEASE not C's (its row replaced):
    RELEASEDIR is Python's, and says why."""
    p = pair_of()
    comp = p.sessions[1]
    assert fastpath.releasedir_unsupported(comp) == ""
    comp._ops[int(Opcode.RELEASEDIR)] = lambda fs, req: dirs.do_releasedir(fs, req)
    assert fastpath.releasedir_unsupported(comp) == "RELEASEDIR is not the reference handler"
    fast = fastpath.make(comp)
    fh = p.opendir(1)
    out = bytearray(16)
    assert fast.serve(Chain(0, IoVec([memoryview(releasedir_request(1, fh, 3))]), IoVec([memoryview(out)]))) == -1
    comp._ops[int(Opcode.RELEASEDIR)] = dirs.do_releasedir
    assert fastpath.releasedir_unsupported(comp) == ""
    comp._ops[int(Opcode.RELEASE)] = lambda fs, req: None
    assert fastpath.releasedir_unsupported(comp) == "RELEASE is not the reference handler"
    fast = fastpath.make(comp)
    assert fast.serve(Chain(0, IoVec([memoryview(releasedir_request(1, fh, 3))]), IoVec([memoryview(out)]))) == -1
    with pytest.raises(ValueError):
        fastpath._ext.FastOps(comp, comp.inodes._hdr, comp.inodes._q, 0, 8, 0, 0, False).enable_releasedir(None)


# fuse_release_in's fields: the fh one of the open ones or another, the rest anything
_FH = st.sampled_from(["dir", "dir", "read-dir", "file", "released", "other-gen", "zero", "random"])


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(_FH, st.integers(0, 48), st.integers(0, 2), st.binary(min_size=48, max_size=48),
                          st.integers(0, (1 << 64) - 1)), min_size=1, max_size=8))
def test_hypothesis_over_malformed_args(steps):
    """RELEASEDIRs with args of every length (shorter than fuse_release_in:
    Python's EINVAL), request extensions, any flags, release_flags and
    lock_owner, the fh one of the open directories (read or not), an open
    file's, a released one, one of another generation, 0 or random: C's
    answer where it serves, else Python's, always the same as the
    reference's."""
    with scratch_share() as (root, opened):
        _fill(__import__("pathlib").Path(root))
        p = opened(RelPair(root))
        d = p.lookup(1, "d")
        released = p.opendir(1)
        p.release(1, released)
        fhs = {"file": p.open_file(p.lookup(1, "file")), "released": released}
        for kind, arglen, extlen, raw, rnd in steps:
            if kind in ("dir", "read-dir", "other-gen"):
                fh = p.opendir(d)
                if kind == "read-dir":
                    p.step(d, fh, 0, 500)
                if kind == "other-gen":
                    fh += 1 << 24
            else:
                fh = {**fhs, "zero": 0, "random": rnd}[kind]
            args = (fh.to_bytes(8, "little") + raw[8:])[:arglen]
            served = p.release(d, fh, releasedir_request(d, fh, p.unique + 1, args=args, extlen=extlen))[1]
            # the plain case is C's
            assert served == (kind in ("dir", "read-dir") and arglen >= abi.RELEASE_IN.size and not extlen)
        # whatever is left open: released (in C or Python) alike
        left = sorted((fh, h.nodeid) for fh, h in p.sessions[0].handles._handles.items() if h.kind == 2)
        for fh, nodeid in left:
            p.release(nodeid, fh)
        p.same()
