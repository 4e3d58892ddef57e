"""OPEN and OPENDIR served in C (daemon/fuse/_open.h) against the Python session.

Two sessions from the same start, each on its own copy of the share (the
pair and helpers of test_create_in_c and test_release_in_c): the reference
(``FuseSession.handle``) and one with the compiled ops (``FastOps.serve``
first, ``handle`` when it declines). After every step the reply bytes, the
inode tables, the open files (fh, nodeid, kind, host flags, the shared
FileTable's words), the whole FileTable memory (header and slots, byte for
byte), the per-nodeid open counts, the meters, the trees and the number of
fds open must be equal; a declined request must leave every buffer, table
and fd as it was.
"""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import CacheMode
from daemon.fuse import abi, fastpath, filetable, handles
from daemon.fuse.abi import Opcode
from tests.unit.fusereq import in_header
from tests.unit.test_create_in_c import (_close, _host_step, _lookup, _lookups, _node_of, _pair, _step, fresh_pair,
                                         keeper_loop, shaped_args, shares, submit_creates)
from tests.unit.test_release_in_c import _c_declines, _err, _full_same, _row_replaced, release_request

__all__ = ["shares"]        # the fixture, imported for the tests below


def open_request(nodeid: int, unique: int, flags: int = os.O_RDWR, opcode: int = Opcode.OPEN, uid: int = 0,
                 open_flags: int = 0, variant: str = "ok") -> bytes:
    args, extlen = shaped_args(abi.OPEN_IN.pack(flags, open_flags), variant, 4)
    return in_header(opcode, nodeid, len(args), unique, uid=uid, extlen=extlen) + args


def _open(pair, fast, shares, request: bytes, wsizes=(16, 16)) -> tuple[bool, bytes]:
    """OPEN or OPENDIR on both, compared: (served by C, the reference's reply)."""
    replies: list = []
    served = _step(pair, fast, shares, request, list(wsizes), replies)
    _full_same(pair, shares)
    return served, replies[0]


def _fh(reply: bytes) -> int:
    assert _err(reply) == 0, reply[:16]
    return abi.OPEN_OUT.unpack_from(reply, 16)[0]


def test_opens_are_served_in_c(shares):
    """OPENs of regular files (every access mode, O_APPEND, O_TRUNC from
    root, a read-only file) and OPENDIRs (the root, a looked-up directory)
    are C's, with Python's reply, table memory, handles, counts and fds;
    a directory, a symlink and a FIFO opened as files are C's EISDIR, ELOOP
    and EACCES, a file as a directory C's ENOTDIR; all counted under their
    opcode; C's fhs are released (in C) and their slots taken again."""
    pair, fast = _pair(shares)
    try:
        f, ro, d, ln, fifo = _lookups(pair, fast, shares, b"exists", b"ro", b"dir", b"ln", b"fifo")
        fhs = []
        for k, (node, flags) in enumerate([(f, os.O_RDWR), (f, os.O_RDONLY), (f, os.O_WRONLY | os.O_APPEND),
                                           (f, os.O_RDWR | os.O_TRUNC), (ro, os.O_RDONLY), (ro, os.O_RDWR)]):
            served, reply = _open(pair, fast, shares, open_request(node, 10 + k, flags))
            assert served, (k, reply[:16])
            fhs.append((node, _fh(reply)))
        assert pair[1].handles._open_per_node[f] == 4
        for k, node in enumerate((1, d)):
            served, reply = _open(pair, fast, shares, open_request(node, 20 + k, os.O_RDONLY, Opcode.OPENDIR))
            assert served
            fh = _fh(reply)
            assert pair[1].handles._handles[fh].kind == handles.KIND_DIR
        for k, (node, opcode, err) in enumerate([(d, Opcode.OPEN, errno.EISDIR), (ln, Opcode.OPEN, errno.ELOOP),
                                                 (fifo, Opcode.OPEN, errno.EACCES),
                                                 (f, Opcode.OPENDIR, errno.ENOTDIR)]):
            served, reply = _open(pair, fast, shares, open_request(node, 30 + k, os.O_RDONLY, opcode))
            assert served and _err(reply) == err
        assert os.path.getsize(shares[1] / "exists") == 0        # the O_TRUNC was done, once
        words = pair[1].meter.words
        assert words[fastpath.op_words(Opcode.OPEN)[0]] == 9
        assert words[fastpath.op_words(Opcode.OPENDIR)[0]] == 3
        assert fast.served >= 12
        for k, (node, fh) in enumerate(fhs[:3]):
            replies: list = []
            assert _step(pair, fast, shares, release_request(node, fh, 40 + k), [16], replies)
            _full_same(pair, shares)
        served, reply = _open(pair, fast, shares, open_request(f, 50))
        assert served and _fh(reply) & filetable.SLOT_MASK == fhs[2][1] & filetable.SLOT_MASK
    finally:
        _close(pair)


NAMES = ["exists", "ro", "dir", "ln", "fifo", "sub", "sub/inner"]
FLAGS = st.builds(lambda acc, extra: acc | extra, st.sampled_from([os.O_RDONLY, os.O_WRONLY, os.O_RDWR, 3]),
                  st.sampled_from([0, os.O_TRUNC, os.O_APPEND, os.O_NOATIME, os.O_DIRECT, os.O_SYNC, os.O_NONBLOCK,
                                   os.O_DIRECTORY, os.O_CREAT | os.O_EXCL, os.O_NOFOLLOW | os.O_CLOEXEC,
                                   os.O_PATH, os.O_TMPFILE & ~os.O_DIRECTORY, 0xFFFF0000]))
OPEN_STEP = st.one_of(
    st.tuples(st.sampled_from(["open", "open", "opendir"]),
              st.sampled_from(["root", "stale", "unknown", "zero", *NAMES]), FLAGS,
              st.sampled_from([0, 0, 0, 1000]), st.sampled_from([0, abi.FUSE_OPEN_KILL_SUIDGID, 0xFFFFFFFF]),
              st.sampled_from(["ok", "ok", "ok", "short-out", "extension", "longer", "short-args"])),
    st.tuples(st.just("release"), st.integers(0, 7)),
    st.tuples(st.just("chmod"), st.sampled_from(["exists", "ro"]), st.sampled_from([0o644, 0o444, 0o200, 0o6755])),
    st.tuples(st.just("reap")))

OPEN_CONFIGS = {
    "auto": {},
    "always": {"cache": CacheMode.ALWAYS},
    "metadata": {"cache": CacheMode.METADATA},
    "never-writeback": {"cache": CacheMode.NEVER, "writeback": True},
    "direct-noatime": {"allow_direct_io": True, "preserve_noatime": True},
}


def _run_open_steps(pair, fast, shares, steps) -> int:
    pure, _comp = pair
    served = 0
    nodeids: dict[str, int] = {}
    for k, step in enumerate(steps):
        kind = step[0]
        if kind == "release":        # OPEN's: a RELEASE request
            fhs = sorted(pure.handles._handles)
            if fhs:
                fh = fhs[step[1] % len(fhs)]
                node = pure.handles._handles[fh].nodeid
                replies: list = []
                _step(pair, fast, shares, release_request(node, fh, 100 + k), [16], replies)
                if pure.handles._handles.get(fh) is not None:      # a directory: RELEASEDIR's
                    for session in pair:
                        session.handles.close(fh, session.handles._handles[fh].kind)
        elif not _host_step(pair, shares, step):
            op, where, flags, uid, open_flags, variant = step
            node = _node_of(pair, fast, shares, nodeids, where, {"root": 1, "stale": 3999, "unknown": 7, "zero": 0})
            opcode = Opcode.OPEN if op == "open" else Opcode.OPENDIR
            request = open_request(node, 100 + k, flags, opcode, uid, open_flags, variant)
            wsizes = [16] if variant == "short-out" else [16, 16]
            replies = []
            served += _step(pair, fast, shares, request, wsizes, replies)
        _full_same(pair, shares)
    return served


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(OPEN_STEP, min_size=1, max_size=14), config=st.sampled_from(sorted(OPEN_CONFIGS)))
def test_opens_are_equivalent(tmp_path_factory, steps, config):
    """Sequences of OPENs and OPENDIRs (regular files, a read-only one, a
    directory, a symlink, a FIFO, a file in a subdirectory, the root,
    stale, unknown and zero nodeids; every access mode and many flags,
    unknown bits too; root and another caller; KILL_SUIDGID and unknown
    open flags; malformed args and short reply room), RELEASEs, chmods on
    the host (a write-only file under --writeback) and reaps, on a table
    of 15 open files that fills: the same replies, tables, open files,
    FileTable memory, trees, counters and fd counts."""
    with fresh_pair(tmp_path_factory, "opens", **OPEN_CONFIGS[config]) as (pair, fast, shares):
        _run_open_steps(pair, fast, shares, steps)


def test_writeback_write_only_falls_back_as_python_does(shares):
    """--writeback opens O_WRONLY as O_RDWR; a file the caller may write but
    not read (EACCES for a non-root caller: here the owner's mode 0o200,
    the thread's fsuid the owner's, so no CAP_DAC_OVERRIDE) is then opened write-only, without O_APPEND,
    by C as by Python."""
    pair, fast = _pair(shares, writeback=True)
    try:
        f = _lookup(pair, fast, shares, b"exists")
        for root in shares:
            os.chown(root / "exists", 1000, 1000)
            os.chmod(root / "exists", 0o200)
        with _as_user(1000):
            served, reply = _open(pair, fast, shares, open_request(f, 10, os.O_WRONLY | os.O_APPEND))
        assert served
        fh = _fh(reply)
        assert pair[1].handles._handles[fh].flags & (os.O_ACCMODE | os.O_APPEND) == os.O_WRONLY
    finally:
        _close(pair)


class _as_user:
    """The thread's fsuid/fsgid switched (credentials.switch: no
    CAP_DAC_OVERRIDE then), back to the process's after."""

    def __init__(self, uid: int):
        self.uid = uid

    def __enter__(self):
        from daemon.fuse import credentials
        credentials.switch(self.uid, self.uid)
        return self

    def __exit__(self, *exc):
        from daemon.fuse import credentials
        credentials.restore()


@pytest.mark.parametrize("case", ["short-args", "extension", "accmode", "kill-uid", "kill-flag", "stale", "zero",
                                  "no-room", "short-out", "peers-odd"])
def test_what_c_leaves_to_python(shares, case):
    """Each case C declines (nothing written or changed), then Python's."""
    pair, fast = _pair(shares)
    try:
        f = _lookup(pair, fast, shares, b"exists")
        request, wsizes, expect = open_request(f, 20), [16, 16], 0
        if case in ("short-args", "extension"):
            request = open_request(f, 20, variant=case)
            expect = errno.EINVAL if case == "short-args" else None
        elif case == "accmode":
            request, expect = open_request(f, 20, os.O_ACCMODE), errno.EINVAL
        elif case == "kill-uid":
            request = open_request(f, 20, os.O_RDWR | os.O_TRUNC, uid=1000)
            expect = None
        elif case == "kill-flag":
            request = open_request(f, 20, os.O_RDWR | os.O_TRUNC, open_flags=abi.FUSE_OPEN_KILL_SUIDGID)
        elif case == "stale":
            request, expect = open_request(3999, 20), errno.ESTALE
        elif case == "zero":
            request, expect = open_request(0, 20), errno.ESTALE
        elif case == "no-room":
            for s in pair:
                s.handles.max_open_files = 0
            expect = errno.ENFILE
        elif case == "short-out":
            wsizes, expect = [16], None
        elif case == "peers-odd":
            class Odd:      # serial not an int: C does not guess what it means
                serial = "1"
                copied = False

                def keep(self, fh, fd):
                    pass

                def mine(self, fd):
                    return 0
            for s in pair:
                s.handles.peers = Odd()
        if wsizes == [16]:
            assert not _step(pair, fast, shares, request, wsizes)
            return
        _c_declines(pair[1], fast, request)
        replies: list = []
        assert not _step(pair, fast, shares, request, wsizes, replies)
        _full_same(pair, shares)
        if expect is not None:
            assert _err(replies[0]) == expect
    finally:
        _close(pair)


@pytest.mark.parametrize("case", ["busy", "dirty", "full"])
def test_what_c_allocates_through_python(shares, case):
    """C opened the file but its own allocation declines (the thread lock
    busy, the table DIRTY, the FileTable full while the fd bound is not):
    fastpath.add_handle (HandleTable.add) allocates, repairs or answers
    ENFILE and closes the fd, as Python's OPEN does."""
    pair, fast = _pair(shares)
    try:
        f = _lookup(pair, fast, shares, b"exists")
        if case == "dirty":
            for s in pair:
                s.handles.files._hdr[filetable._H_DIRTY] = 1
        elif case == "full":
            for s in pair:
                s.handles.files._hdr[filetable._H_HIGH] = s.handles.files.capacity + 1
        if case == "busy":
            import threading
            comp = pair[1]
            lock = comp.handles.files._tlock
            lock.acquire()
            t = threading.Timer(0.2, lock.release)
            t.start()
            try:
                served, reply = _open(pair, fast, shares, open_request(f, 20))
            finally:
                t.join()
            assert served and _err(reply) == 0
            return
        served, reply = _open(pair, fast, shares, open_request(f, 20))
        assert served
        assert _err(reply) == (errno.ENFILE if case == "full" else 0)
        if case == "dirty":
            assert pair[1].handles.files._hdr[filetable._H_DIRTY] == 0
    finally:
        _close(pair)


def test_open_stays_in_python_when_a_row_is_replaced(shares):
    from daemon.fuse import dirs, files
    pair, _fast = _pair(shares)
    try:
        comp = pair[1]
        assert _row_replaced(comp, fastpath.open_unsupported, Opcode.OPENDIR, dirs.do_opendir) == \
            "OPENDIR is not the reference handler"
        comp._ops[int(Opcode.OPEN)] = lambda fs, req: files.do_open(fs, req)
        assert fastpath.open_unsupported(comp) == "OPEN is not the reference handler"
        fast = fastpath.make(comp)
        assert not _step(pair, fast, shares, open_request(1, 11, os.O_RDONLY, Opcode.OPENDIR), [16, 16])
        comp._ops[int(Opcode.RELEASE)] = lambda fs, req: files.do_release(fs, req)
        assert fastpath.open_unsupported(comp) == "RELEASE is not the reference handler"
    finally:
        _close(pair)


def test_peers_word_and_keeper_message(shares):
    """With peers (a serial, a keep method): C writes the owner word
    peers.mine(fd) into the slot and calls peers.keep(fh, fd) once, as
    HandleTable.add does; the fd it hands over is the handle's."""
    pair, fast = _pair(shares)

    class Peers:
        serial = 5
        copied = True

        def __init__(self):
            self.kept: list[tuple[int, int]] = []

        def mine(self, fd):
            return (self.serial << 32) | fd

        def keep(self, fh, fd):
            self.kept.append((fh, fd, os.fstat(fd).st_ino))

    try:
        f = _lookup(pair, fast, shares, b"exists")
        peers = [Peers(), Peers()]
        for s, p in zip(pair, peers):
            s.handles.peers = p
        replies: list = []
        assert _step(pair, fast, shares, open_request(f, 20), [16, 16], replies)
        fh = _fh(replies[0])
        for s, p in zip(pair, peers):
            h = s.handles._handles[fh]
            assert p.kept == [(fh, h.fd, os.fstat(h.fd).st_ino)]
            assert s.handles.files.lookup(fh) == (f, handles.KIND_FILE, os.O_RDWR, (5 << 32) | h.fd)
    finally:
        _close(pair)


def test_the_worker_loop_opens_in_c_beside_a_keeper(tmp_path, monkeypatch):
    """WorkerLoop._serve (the batch loop) on a ring of 8 OPENs of one file
    and 8 OPENDIRs of the root, with a meter and a keeper: all answered in
    C, counted under their opcode, each fh live in the shared FileTable
    with this worker's owner word, and the keeper's copy recorded (its kept
    word) once it has read them."""
    import time

    from daemon.metrics import counters
    with keeper_loop(tmp_path, monkeypatch) as (loop, ring, vr, meter):
        monkeypatch.chdir("/proc/self/fd")
        heads = submit_creates(vr, 1)
        assert loop._serve(ring) == 1
        vr.harvest()
        node = abi.ENTRY_OUT_NODEID.unpack_from(vr.read_writable(heads[0]), 16)[0]
        served = loop._fast.served if loop._fast is not None else 0
        heads = {vr.submit([open_request(node if i < 8 else 1, 70 + i, os.O_RDONLY,
                                         Opcode.OPEN if i < 8 else Opcode.OPENDIR)], [16, 16]): 70 + i
                 for i in range(16)}
        assert loop._serve(ring) == 16
        assert sorted(vr.harvest()) == sorted(heads)
        files, peers = loop.session.handles.files, loop.session.handles.peers
        fhs = []
        for h, unique in heads.items():
            reply = vr.read_writable(h)[:32]
            assert reply[:16] == abi.OUT_HEADER.pack(32, 0, unique)
            fh = abi.OPEN_OUT.unpack_from(reply, 16)[0]
            handle = loop.session.handles._handles[fh]
            assert files.lookup(fh)[3] == peers.mine(handle.fd)
            fhs.append(fh)
        assert len(set(fhs)) == 16
        for op in (Opcode.OPEN, Opcode.OPENDIR):
            base = counters.OPS + int(op) * counters.OP_WORDS
            assert meter.words[base + counters.OP_REQUESTS] == 8
        if fastpath.compiled.VirtQueue is fastpath.compiled.CompiledVirtQueue:
            assert loop._fast.served == served + 16
        deadline = time.monotonic() + 10
        while not all(files.kept(fh) for fh in fhs) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(files.kept(fh) for fh in fhs)


def test_the_keeper_handoff_is_sent_from_c_and_left_to_peers_keep_when_its_queue_is_full(tmp_path, monkeypatch):
    """An OPEN served in C hands its fd to the keeper with its own sendmsg
    (KEEP, the fh, the fd by SCM_RIGHTS): Peers.keep is not called and the
    keeper records its copy. When the keeper's socket has no room (here a
    socket pair nobody reads, filled), C's send fails at once and
    Peers.keep does the handoff (it waits for room and logs). Under
    PYVIRTIOFSD_PURE=1 (no compiled ops) Python opens and Peers.keep
    hands over every fd."""
    import socket
    import time

    from daemon.fuse.peers import KEEP
    with keeper_loop(tmp_path, monkeypatch) as (loop, ring, vr, _meter):
        monkeypatch.chdir("/proc/self/fd")
        peers, files = loop.session.handles.peers, loop.session.handles.files
        assert peers is loop.session.cache.peers
        calls: list[tuple[int, int]] = []
        monkeypatch.setattr(peers, "keep", lambda fh, fd: calls.append((fh, fd)))

        in_c = loop._fast is not None and fastpath.compiled.VirtQueue is fastpath.compiled.CompiledVirtQueue

        def open_root(unique: int) -> int:
            head = vr.submit([open_request(1, unique, os.O_RDONLY, Opcode.OPENDIR)], [16, 16])
            served = loop._fast.served if in_c else 0
            assert loop._serve(ring) == 1
            if in_c:
                assert loop._fast.served == served + 1      # answered in C
            vr.harvest()
            return _fh(bytes(vr.read_writable(head)[:32]))

        fh = open_root(90)
        if not in_c:
            assert calls == [(fh, loop.session.handles._handles[fh].fd)]
            return
        assert calls == []
        deadline = time.monotonic() + 10
        while not files.kept(fh) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert files.kept(fh)

        full, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        full.setblocking(False)
        try:
            while True:
                full.send(KEEP.pack(0))
        except BlockingIOError:
            pass
        real = peers._keeper_sock
        peers._keeper_sock = full
        try:
            fh = open_root(91)
        finally:
            peers._keeper_sock = real
            full.close()
            reader.close()
        assert calls == [(fh, loop.session.handles._handles[fh].fd)]


@pytest.mark.parametrize("busy", [False, True])
def test_create_allocates_its_fh_in_c(shares, monkeypatch, busy):
    """With OPEN in C, C's CREATE allocates its fh as OPEN does (no call of
    fastpath.add_created), with Python's reply, FileTable memory, handles
    and fds; with the table's thread lock held by another thread (C's
    allocation declines) fastpath.add_created does it, once."""
    import threading

    from tests.unit.test_create_in_c import create_request
    calls = []
    real = fastpath.add_created

    def counted(*args):
        calls.append(args[1:])
        return real(*args)

    monkeypatch.setattr(fastpath, "add_created", counted)
    pair, fast = _pair(shares)
    try:
        request, wsizes = create_request(1, b"n0", os.O_RDWR, 0o100644, 10)
        timer = None
        if busy:
            lock = pair[1].handles.files._tlock
            lock.acquire()
            timer = threading.Timer(0.2, lock.release)
            timer.start()
        try:
            replies: list = []
            assert _step(pair, fast, shares, request, wsizes, replies)
        finally:
            if timer is not None:
                timer.join()
        _full_same(pair, shares)
        fh = abi.OPEN_OUT.unpack_from(replies[0], 16 + 128)[0]
        assert fh in pair[1].handles._handles
        assert len(calls) == (1 if busy else 0)
    finally:
        _close(pair)
