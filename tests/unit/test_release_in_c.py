"""RELEASE served in C (daemon/fuse/_release.h) against the Python session.

Two sessions from the same start, each on its own copy of the share (the
pair and helpers of test_create_in_c): the reference (``FuseSession.handle``)
and one with the compiled ops (``FastOps.serve`` first, ``handle`` when it
declines). After every RELEASE the reply bytes, the inode tables, the open
files (fh, nodeid, kind, flags, the shared FileTable's words), the whole
FileTable memory (header and slots, byte for byte), the per-nodeid open
counts, the meters and the number of fds open must be equal; a declined
RELEASE must leave every buffer, table and fd as it was.
"""

from __future__ import annotations

import errno
import os

import pytest

from daemon.fuse import abi, fastpath, filetable
from daemon.fuse.abi import Opcode
from daemon.virtio.virtqueue import Chain, IoVec
from tests.unit.fusereq import in_header
from tests.unit.test_create_in_c import _close, _fd_count, _ok, _pair, _same, _step, create_request, shares

__all__ = ["shares"]        # the fixture, imported for the tests below


def release_request(nodeid: int, fh: int, unique: int, release_flags: int = 0, variant: str = "ok") -> bytes:
    args = abi.RELEASE_IN.pack(fh, os.O_RDWR, release_flags, 0)
    extlen = 0
    if variant == "short-args":
        args = args[:20]
    elif variant == "extension":
        args += bytes(8)
        extlen = 1
    elif variant == "longer":
        args += bytes(8)
    return in_header(Opcode.RELEASE, nodeid, len(args), unique, extlen=extlen) + args


def open_request(nodeid: int, unique: int, opcode: int = Opcode.OPEN) -> bytes:
    return in_header(opcode, nodeid, abi.OPEN_IN.size, unique) + abi.OPEN_IN.pack(os.O_RDWR, 0)


def _files_bytes(session) -> bytes:
    return bytes(session.handles.files._mm)


def _full_same(pair, shares) -> None:
    _same(pair, shares)
    pure, comp = pair
    assert _files_bytes(comp) == _files_bytes(pure)
    assert comp.handles._open_per_node == pure.handles._open_per_node
    assert comp.handles._released == pure.handles._released
    assert not comp.handles.files._tlock.locked()


def _created(pair, fast, shares, name: bytes, unique: int) -> tuple[int, int]:
    """CREATE of ``name`` in the root on both: (nodeid, fh)."""
    replies: list = []
    request, wsizes = create_request(1, name, os.O_RDWR, 0o100644, unique)
    _step(pair, fast, shares, request, wsizes, replies)
    return _ok(replies[0])


def _opened(pair, fast, shares, nodeid: int, unique: int, opcode: int = Opcode.OPEN) -> int:
    """OPEN (Python's) of ``nodeid`` on both: the fh."""
    replies: list = []
    _step(pair, fast, shares, open_request(nodeid, unique, opcode), [16, abi.OPEN_OUT.size], replies)
    assert int.from_bytes(replies[0][4:8], "little", signed=True) == 0
    return abi.OPEN_OUT.unpack_from(replies[0], 16)[0]


def _release(pair, fast, shares, nodeid: int, fh: int, unique: int, **kw) -> tuple[bool, bytes]:
    """RELEASE on both, compared: (served by C, the reference's reply)."""
    replies: list = []
    served = _step(pair, fast, shares, release_request(nodeid, fh, unique, **kw), [16], replies)
    _full_same(pair, shares)
    return served, replies[0]


def _snapshot(session) -> tuple:
    h = session.handles
    return (_files_bytes(session), sorted((fh, o.fd, o.nodeid, o.kind, o.flags) for fh, o in h._handles.items()),
            dict(h._open_per_node), dict(h._locks), h._released, sorted(os.listdir("/proc/self/fd")),
            bytes(session.meter.words))


def _c_declines(comp, fast, request: bytes) -> None:
    """C declines ``request`` on ``comp``: nothing written, nothing changed."""
    before = _snapshot(comp)
    out = bytearray(b"\xa5" * 16)
    assert fast.serve(Chain(0, IoVec([memoryview(request)]), IoVec([memoryview(out)]))) == -1
    assert out == bytearray(b"\xa5" * 16)
    assert _snapshot(comp) == before


def _declined(pair, fast, shares, request: bytes) -> bytes:
    """C declines ``request`` on the compiled session; then Python answers
    it on both (compared): the reference's reply."""
    _c_declines(pair[1], fast, request)
    replies: list = []
    assert not _step(pair, fast, shares, request, [16], replies)
    _full_same(pair, shares)
    return replies[0]


def _err(reply: bytes) -> int:
    return -int.from_bytes(reply[4:8], "little", signed=True)


def test_releases_are_served_in_c(shares):
    """The RELEASE of files this worker created or opened is C's, with
    Python's empty reply, tables, counts and fds (two fhs on one inode:
    the count goes down, then out); the freed slots are taken again."""
    pair, fast = _pair(shares)
    try:
        n0, fh0 = _created(pair, fast, shares, b"n0", 10)
        n1, fh1 = _created(pair, fast, shares, b"n1", 11)
        fh0b = _opened(pair, fast, shares, n0, 12)
        assert pair[1].handles._open_per_node[n0] == 2
        served, reply = _release(pair, fast, shares, n0, fh0, 13)
        assert served and reply == abi.OUT_HEADER.pack(16, 0, 13)
        assert pair[1].handles._open_per_node[n0] == 1
        assert _release(pair, fast, shares, n0, fh0b, 14, variant="longer")[0]
        assert n0 not in pair[1].handles._open_per_node
        assert _release(pair, fast, shares, n1, fh1, 15)[0]
        assert len(pair[1].handles) == 0 and len(pair[1].handles.files) == 0
        # released twice: Python's EBADF
        assert _err(_declined(pair, fast, shares, release_request(n1, fh1, 16))) == errno.EBADF
        # the free list reused by the next CREATE, released in C again
        n2, fh2 = _created(pair, fast, shares, b"n2", 17)
        assert fh2 & filetable.SLOT_MASK == fh1 & filetable.SLOT_MASK
        assert _release(pair, fast, shares, n2, fh2, 18)[0]
        words = pair[1].meter.words
        assert words[fastpath.op_words(Opcode.RELEASE)[0]] == 5      # 4 in C, the EBADF in Python
    finally:
        _close(pair)


@pytest.mark.parametrize("case", ["flock-unlock", "short-args", "extension", "unknown", "dir", "locks",
                                  "copied", "busy", "dirty", "not-own"])
def test_what_c_leaves_to_python(shares, case):
    """Each case C declines (nothing written or changed), then Python's."""
    pair, fast = _pair(shares)
    try:
        n0, fh0 = _created(pair, fast, shares, b"n0", 10)
        request = release_request(n0, fh0, 20)
        expect = 0
        if case == "flock-unlock":
            request = release_request(n0, fh0, 20, release_flags=abi.FUSE_RELEASE_FLOCK_UNLOCK)
        elif case in ("short-args", "extension"):
            request = release_request(n0, fh0, 20, variant=case)
            expect = errno.EINVAL if case == "short-args" else None
        elif case == "unknown":
            request, expect = release_request(n0, fh0 + (1 << 24), 20), errno.EBADF
        elif case == "dir":
            fhd = _opened(pair, fast, shares, 1, 11, Opcode.OPENDIR)
            request, expect = release_request(1, fhd, 20), errno.EBADF
        elif case == "locks":
            for s in pair:
                s.handles.files.alloc_lock(n0, 7, 0)
        elif case == "copied":
            class Copied:
                copied = True
            for s in pair:
                s.handles.peers = Copied()
        elif case == "dirty":
            for s in pair:
                s.handles.files._hdr[filetable._H_DIRTY] = 1
        elif case == "not-own":
            # the fh is live in the shared table but not in this worker's
            # dict (another worker's): Python's (EBADF without peers)
            for s in pair:
                h = s.handles._handles.pop(fh0)
                s.handles._open_per_node.pop(n0)
                os.close(h.fd)
            expect = errno.EBADF
        if case == "busy":
            comp = pair[1]
            comp.handles.files._tlock.acquire()
            try:
                _c_declines(comp, fast, request)
            finally:
                comp.handles.files._tlock.release()
            reply = _release(pair, fast, shares, n0, fh0, 20)[1]
            assert _err(reply) == 0
            return
        reply = _declined(pair, fast, shares, request)
        if expect is not None:
            assert _err(reply) == expect
        if case in ("flock-unlock", "locks", "copied", "dirty"):
            assert fh0 not in pair[1].handles._handles
    finally:
        _close(pair)


def test_release_stays_in_python_when_the_row_is_replaced(shares):
    from daemon.fuse import files
    pair, _fast = _pair(shares)
    try:
        comp = pair[1]
        assert fastpath.release_unsupported(comp) == ""
        comp._ops[int(Opcode.RELEASE)] = lambda fs, req: files.do_release(fs, req)
        assert fastpath.release_unsupported(comp) == "RELEASE is not the reference handler"
        fast = fastpath.make(comp)
        n0, fh0 = _created(pair, fast, shares, b"n0", 10)
        assert not _step(pair, fast, shares, release_request(n0, fh0, 11), [16])
    finally:
        _close(pair)


def test_fds_closed_once(shares):
    """C's RELEASE closes the handle's fd and no other."""
    pair, fast = _pair(shares)
    try:
        n0, fh0 = _created(pair, fast, shares, b"n0", 10)
        fd = pair[1].handles._handles[fh0].fd
        count = _fd_count()
        assert _release(pair, fast, shares, n0, fh0, 11)[0]
        assert _fd_count() == count - 2            # one per session
        with pytest.raises(OSError):
            os.fstat(fd)
    finally:
        _close(pair)
