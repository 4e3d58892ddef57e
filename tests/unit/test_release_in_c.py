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
import fcntl
import os

import pytest

from daemon.fuse import abi, fastpath, filetable
from daemon.fuse.abi import Opcode
from daemon.virtio.virtqueue import Chain, IoVec
from tests.unit.fusereq import in_header
from tests.unit.test_create_in_c import (_close, _fd_count, _ok, _pair, _same, _step, create_request, keeper_loop,
                                         shaped_args, shares, submit_creates)

__all__ = ["shares"]        # the fixture, imported for the tests below


def release_request(nodeid: int, fh: int, unique: int, release_flags: int = 0, variant: str = "ok") -> bytes:
    args, extlen = shaped_args(abi.RELEASE_IN.pack(fh, os.O_RDWR, release_flags, 0), variant, 20)
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


def _row_replaced(comp, unsupported, opcode: int, handler) -> str:
    """What ``unsupported`` (fastpath's check) says of ``comp``: nothing,
    then, with its row of ``opcode`` replaced by a wrapper of ``handler``
    (Python's answers, not the reference handler), the reason."""
    assert unsupported(comp) == ""
    comp._ops[int(opcode)] = lambda fs, req: handler(fs, req)
    return unsupported(comp)


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


@pytest.mark.parametrize("case", ["flock-unlock", "copied", "neither"])
def test_the_flock_comes_off_as_python_takes_it_off(shares, case):
    """With RELEASE_FLOCK_UNLOCK, or with copies in other processes
    (peers.copied: a request worker or the keeper), C takes the guest's
    flock off the open file description as Python does: another process's
    copy (a dup here) then holds none. Without either, it stays on the
    copy (and neither C nor Python calls flock)."""
    pair, fast = _pair(shares)
    copies = []
    try:
        n0, fh0 = _created(pair, fast, shares, b"n0", 10)
        for s in pair:
            fd = s.handles._handles[fh0].fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            copies.append(os.dup(fd))
        flags = abi.FUSE_RELEASE_FLOCK_UNLOCK if case == "flock-unlock" else 0
        if case == "copied":
            class Copied:
                copied = True
            for s in pair:
                s.handles.peers = Copied()
        assert _release(pair, fast, shares, n0, fh0, 11, release_flags=flags)[0]
        for root in shares:
            probe = os.open(root / "n0", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if case == "neither":
                    with pytest.raises(BlockingIOError):
                        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                else:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(probe)
    finally:
        for fd in copies:
            os.close(fd)
        _close(pair)


@pytest.mark.parametrize("case", ["short-args", "extension", "unknown", "dir", "locks", "peers-odd", "busy",
                                  "dirty", "not-own"])
def test_what_c_leaves_to_python(shares, case):
    """Each case C declines (nothing written or changed), then Python's."""
    pair, fast = _pair(shares)
    try:
        n0, fh0 = _created(pair, fast, shares, b"n0", 10)
        request = release_request(n0, fh0, 20)
        expect = 0
        if case in ("short-args", "extension"):
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
        elif case == "peers-odd":
            class Odd:      # copied not a bool: C does not guess what it means
                copied = 1
            for s in pair:
                s.handles.peers = Odd()
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
        if case in ("locks", "peers-odd", "dirty"):
            assert fh0 not in pair[1].handles._handles
    finally:
        _close(pair)


def test_a_lock_description_on_another_inode_leaves_release_to_c(shares):
    """A lock description on another inode (dpkg's lock file, held while it
    installs): the RELEASE of this file has no lock work, C's, and the
    lock stays; the locked inode's own last RELEASE is Python's, which
    drops its lock descriptions."""
    pair, fast = _pair(shares)
    try:
        n0, fh0 = _created(pair, fast, shares, b"n0", 10)
        n1, fh1 = _created(pair, fast, shares, b"n1", 11)
        for s in pair:
            s.handles.files.alloc_lock(n1, 7, 0)
        served, reply = _release(pair, fast, shares, n0, fh0, 12)
        assert served and _err(reply) == 0
        assert all(s.handles.files.find_lock(n1, 7) for s in pair)
        assert _err(_declined(pair, fast, shares, release_request(n1, fh1, 13))) == 0
        assert not any(s.handles.files.find_lock(n1, 7) for s in pair)
    finally:
        _close(pair)


def test_release_stays_in_python_when_the_row_is_replaced(shares):
    from daemon.fuse import files
    pair, _fast = _pair(shares)
    try:
        assert _row_replaced(pair[1], fastpath.release_unsupported, Opcode.RELEASE, files.do_release) == \
            "RELEASE is not the reference handler"
        fast = fastpath.make(pair[1])
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


def test_the_worker_loop_releases_in_c_beside_a_keeper(tmp_path, monkeypatch):
    """WorkerLoop._serve (the batch loop) on a ring of 8 CREATEs, then one
    of their 8 RELEASEs, with a meter and a keeper (peers.copied: the
    flock comes off): all answered in C with the empty reply, counted
    under RELEASE, every fh freed in the shared FileTable, every fd the
    worker held of them closed."""
    from daemon.metrics import counters
    with keeper_loop(tmp_path, monkeypatch) as (loop, ring, vr, meter):
        assert loop.session.handles.peers.copied
        heads = submit_creates(vr, 8)
        assert loop._serve(ring) == 8
        assert sorted(vr.harvest()) == sorted(heads)
        got = [_ok(vr.read_writable(h)) for h in heads]
        fds = [loop.session.handles._handles[fh].fd for _n, fh in got]
        served = loop._fast.served if loop._fast is not None else 0
        heads = {vr.submit([release_request(n, fh, 70 + i)], [16]): 70 + i for i, (n, fh) in enumerate(got)}
        assert loop._serve(ring) == 8
        assert sorted(vr.harvest()) == sorted(heads)
        for h, unique in heads.items():
            assert vr.read_writable(h)[:16] == abi.OUT_HEADER.pack(16, 0, unique)
        files = loop.session.handles.files
        assert len(files) == 0 and not loop.session.handles._handles and not loop.session.handles._open_per_node
        assert not any(files.live(fh) for _n, fh in got)
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)
        base = counters.OPS + int(Opcode.RELEASE) * counters.OP_WORDS
        assert meter.words[base + counters.OP_REQUESTS] == 8
        if fastpath.compiled.VirtQueue is fastpath.compiled.CompiledVirtQueue:
            assert loop._fast.served == served + 8


def test_a_worker_killed_during_c_releases_leaves_a_table_python_repairs(shares):
    """A forked worker CREATEs and RELEASEs (both in C) in a loop and is
    SIGKILLed at random moments, maybe in the middle of C's free: the next
    locker of the open-file table (Python's _lock) repairs what was DIRTY,
    the table is consistent, and C releases on it again."""
    from tests.unit.killed import kill_at_random
    from tests.unit.test_create_in_c import _chain, _files_consistent
    from tests.unit.test_fastops_equivalence import _consistent
    pair, fast = _pair(shares, capacity=63)
    session, root = pair[1], shares[1]
    table, files = session.inodes, session.handles.files
    c_releases = []

    def work(round_):
        k = 0
        while True:
            k += 1
            for i in range(4):
                request, wsizes = create_request(1, b"k%d-%d-%d" % (round_, k, i), os.O_RDWR, 0o100644, k)
                fast.serve(_chain(request, wsizes))
            for fh, h in list(session.handles._handles.items()):
                if fast.serve(_chain(release_request(h.nodeid, fh, k), [16])) != 16:
                    session.handles.close(fh, h.kind)
            table.unref_many([(n, table.get(n)[3]) for n in session.cache._fds if table.get(n) is not None])
            session.cache.reap()
            for n in os.listdir(root):
                if n.startswith("k"):
                    os.unlink(root / n)

    def after(_round):
        for t in (table, files):
            t._lock()       # what any successor's first mutation does (repairs if DIRTY)
            t._unlock()
        _consistent(table)
        _files_consistent(files)
        table.unref_many([(n, table.get(n)[3]) for n in range(2, table.capacity + 1) if table.get(n)])
        for s in range(1, files.capacity + 1):
            gen = files.slots[s * 8]
            if gen:
                files.free(gen << 24 | s)
        _files_consistent(files)

    try:
        kill_at_random(work, 20, 13, after)
        request, wsizes = create_request(1, b"after", os.O_RDWR, 0o100644, 1)
        assert fast.serve(_chain(request, wsizes)) > 16
        for fh, h in list(session.handles._handles.items()):
            before = fast.served
            assert fast.serve(_chain(release_request(h.nodeid, fh, 2), [16])) == 16
            c_releases.append(fast.served - before)
        assert c_releases == [1]
        _files_consistent(files)
        assert len(files) == 0
    finally:
        _close(pair)
