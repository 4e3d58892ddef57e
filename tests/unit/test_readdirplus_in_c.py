"""READDIRPLUS served in C (daemon/fuse/_readdir.h) against the Python session.

Two sessions from the same start on one share (READDIRPLUS changes
nothing in it, so both see the same inodes and the replies must be equal
byte for byte): the reference (``FuseSession.handle``) and one with the
compiled ops (``FastOps.serve`` first, ``handle`` when it declines; or
``handle`` alone for the steps a test gives to Python on that handle).
After every request the reply bytes, the inode table (nodeids,
generations, dev/ino, lookup counts, free list, live count, cached
nodeids), the directory handle's stream state (its cookie and position),
the number of fds the request opened and, at the end, the meters'
counters must be equal; the tests also check that C served what it should.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import CacheMode
from daemon.fds import close_fds
from daemon.fuse import abi, dirs, fastpath
from daemon.fuse.abi import Opcode
from daemon.metrics.counters import MetricsArea, WorkerMeter
from daemon.virtio.iovec import IoVec
from daemon.virtio.virtqueue import Chain
from tests.unit.fusereq import entry_nodeid, in_header, start_session
from tests.unit.test_fastops_equivalence import _comparable, _table_state


def _stale_errno() -> None:
    """Leave EAGAIN in this thread's errno (a read of an empty non-blocking
    pipe), as the worker loop's eventfd reads do: C must read errno only
    after a call that failed (the fuzz target found a reply that was EAGAIN
    because a getdents64 that succeeded was followed by a record that did
    not fit)."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.read(r, 1)
    except BlockingIOError:
        pass
    finally:
        os.close(r)
        os.close(w)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def readdirplus_request(nodeid: int, fh: int, cookie: int, size: int, unique: int = 9, extlen: int = 0,
                        uid: int = 0) -> bytes:
    args = abi.READ_IN.pack(fh, cookie, size, 0, 0, 0)
    if extlen:
        args += bytes(8 * extlen)
    return in_header(Opcode.READDIRPLUS, nodeid, len(args), unique, uid=uid, gid=uid, extlen=extlen) + args


def records(reply: bytes) -> list[tuple[int, bytes, int]]:
    """(nodeid, name, next cookie) of each fuse_direntplus in a reply."""
    out, at = [], 16
    while at < len(reply):
        nodeid = abi.ENTRY_OUT.unpack_from(reply, at)[0]
        _ino, off, namelen, _type = abi.DIRENT.unpack_from(reply, at + abi.ENTRY_OUT.size)
        out.append((nodeid, reply[at + abi.DIRENTPLUS.size:at + abi.DIRENTPLUS.size + namelen], off))
        at += abi.direntplus_size(namelen)
    return out


class Pair:
    """The reference session and the compiled one, each with its meter."""

    def __init__(self, root, capacity: int = 1 << 12, peers: bool = False, **config):
        self.area = MetricsArea(2)
        self.sessions = []
        self.clients = []
        for i in range(2):
            session, client = start_session(root, capacity=capacity, **config)
            session.meter = WorkerMeter(self.area.slot(i), fd_limit=1024)
            session.cache._close_fds = close_fds
            if peers:       # serial 5 and a peer (serial 6): owner words, claims, reseek
                session.peers.set_self(5)
                session.peers._pidfds[6] = os.pidfd_open(os.getpid())
                session.peers._recount()
            self.sessions.append(session)
            self.clients.append(client)
        self.fast = fastpath.make(self.sessions[1])
        self.unique = 100

    def close(self):
        for session in self.sessions:
            session.meter = None
            session.close()
            session.inodes.close()

    def both(self, opcode, nodeid: int, args: bytes, out: int) -> list[bytes]:
        return [client.call(opcode, nodeid, args, out).ok() for client in self.clients]

    def lookup(self, parent: int, name: str) -> int:
        ids = [entry_nodeid(r) for r in self.both(Opcode.LOOKUP, parent, name.encode() + b"\0",
                                                   abi.ENTRY_OUT.size)]
        assert ids[0] == ids[1]
        return ids[0]

    def opendir(self, nodeid: int = 1) -> int:
        fhs = [abi.OPEN_OUT.unpack_from(r)[0] for r in self.both(Opcode.OPENDIR, nodeid,
                                                                   abi.OPEN_IN.pack(os.O_RDONLY, 0),
                                                                   abi.OPEN_OUT.size)]
        assert fhs[0] == fhs[1]
        return fhs[0]

    def releasedir(self, nodeid: int, fh: int) -> None:
        self.both(Opcode.RELEASEDIR, nodeid, abi.RELEASE_IN.pack(fh, 0, 0, 0), 0)

    @staticmethod
    def _run(session, fast, request: bytes, wsizes: list[int], compiled: bool) -> tuple[int, bytes, int]:
        readable = IoVec([memoryview(bytearray(request))])
        outs = [bytearray(bytes([0xA5 ^ i]) * n) for i, n in enumerate(wsizes)]
        writable = IoVec([memoryview(b) for b in outs])
        chain = Chain(0, readable, writable)
        before = _fd_count()
        _stale_errno()
        n = fast.serve(chain) if compiled else -1
        if n < 0:
            n = session.handle(readable, writable, chain)
        return n, b"".join(outs), _fd_count() - before

    def stream(self, i: int, fh: int):
        h = self.sessions[i].handles._handles.get(fh)
        s = None if h is None else h.dir_stream
        if s is None:
            return None
        # the records buffered from pos on (the padding after each name is
        # whatever the buffer held: not compared)
        left, at = [], s.pos
        while at + dirs.LINUX_DIRENT64.size <= len(s.buf):
            ino, off, reclen, dtype = dirs.LINUX_DIRENT64.unpack_from(s.buf, at)
            name = s.buf[at + dirs.LINUX_DIRENT64.size:at + reclen].split(b"\0")[0]
            left.append((ino, off, dtype, name))
            at += reclen
        return s.cookie, s.pos, len(s.buf), left, s.reseek

    def step(self, nodeid: int, fh: int, cookie: int, size: int, wsizes: list[int] | None = None,
             python: bool = False, extlen: int = 0, uid: int = 0) -> tuple[bytes, bool]:
        """One READDIRPLUS on both; (the reply, whether C served it)."""
        self.unique += 1
        request = readdirplus_request(nodeid, fh, cookie, size, self.unique, extlen, uid)
        wsizes = wsizes if wsizes is not None else [16, max(size, 0)]
        pure = self._run(self.sessions[0], None, request, wsizes, False)
        served = self.fast.served
        comp = self._run(self.sessions[1], self.fast, request, wsizes, not python)
        assert comp[:2] == pure[:2]
        assert comp[2] == pure[2]       # fds opened (kept in the cache) by the request
        assert _table_state(self.sessions[1]) == _table_state(self.sessions[0])
        assert self.stream(1, fh) == self.stream(0, fh)
        return pure[1][:pure[0]], self.fast.served > served

    def meters_equal(self) -> None:
        words = [_comparable(s.meter.words) for s in self.sessions]
        assert words[1] == words[0]

    def list_all(self, nodeid: int, fh: int, size: int = 4096, python_every: int = 0) -> list:
        """The whole listing from cookie 0 in steps of ``size``."""
        out, cookie, i = [], 0, 0
        while True:
            reply, _ = self.step(nodeid, fh, cookie, size, python=bool(python_every) and i % python_every == 1)
            recs = records(reply)
            if not recs:
                return out
            out += recs
            cookie = recs[-1][2]
            i += 1


@pytest.fixture
def share(tmp_path):
    cwd = os.getcwd()
    os.chdir("/proc/self/fd")
    root = tmp_path / "share"
    root.mkdir()
    yield root
    os.chdir(cwd)


def pairs_of(share, cls):
    """The ``pair_of`` fixture's body for a Pair class (test_readdir_in_c's
    NamesPair too): ``make(**config)`` builds one; all are closed after."""
    made = []

    def make(**config):
        p = cls(share, **config)
        made.append(p)
        return p
    yield make
    for p in made:
        p.close()


@contextlib.contextmanager
def scratch_share():
    """A new share directory, for a hypothesis test (the ``share`` fixture
    would serve all its examples), /proc/self/fd the cwd; yields (root,
    opened): ``opened(pair)`` returns the pair and has it closed after,
    before the cwd is back and the directory removed."""
    cwd = os.getcwd()
    tmp = tempfile.mkdtemp()
    os.chdir("/proc/self/fd")
    made: list = []

    def opened(pair):
        made.append(pair)
        return pair
    try:
        root = os.path.join(tmp, "share")
        os.mkdir(root)
        yield root, opened
    finally:
        for pair in made:
            pair.close()
        os.chdir(cwd)
        shutil.rmtree(tmp)


@pytest.fixture
def pair_of(share):
    yield from pairs_of(share, Pair)


def _tree(root, n: int, namelen: int = 8) -> list[str]:
    names = []
    for i in range(n):
        name = (f"f{i:04d}" + "x" * namelen)[:max(namelen, 5)]
        (root / name).write_bytes(b"y" * i)
        names.append(name)
    return names


def test_extension_has_readdirplus(pair_of):
    p = pair_of()
    assert fastpath.readdirplus_unsupported(p.sessions[1]) == ""


def test_an_empty_directory(pair_of, share):
    (share / "empty").mkdir()
    p = pair_of()
    d = p.lookup(1, "empty")
    fh = p.opendir(d)
    reply, in_c = p.step(d, fh, 0, 4096)
    assert in_c
    assert sorted(r[1] for r in records(reply)) == [b".", b".."]
    assert all(r[0] == 0 for r in records(reply))
    reply, in_c = p.step(d, fh, records(reply)[-1][2], 4096)
    assert in_c and reply == abi.OUT_HEADER.pack(16, 0, p.unique)
    p.releasedir(d, fh)
    p.meters_equal()


@pytest.mark.parametrize("size", [176, 200, 400, 1000, 4096, 32768])
def test_many_entries_over_several_replies(pair_of, share, size):
    names = _tree(share, 150, 20)
    (share / "sub").mkdir()
    (share / "sub" / "inner").touch()
    (share / "ln").symlink_to("sub")
    os.mkfifo(share / "fifo")
    p = pair_of()
    fh = p.opendir()
    listing = p.list_all(1, fh, size)
    got = sorted(r[1] for r in listing)
    assert got == sorted([b".", b".."] + [n.encode() for n in names + ["sub", "ln", "fifo"]])
    assert all((r[0] == 0) == (r[1] in (b".", b"..")) for r in listing)
    # every entry counted once in both tables
    table = p.sessions[1].inodes
    assert len(table) == len(names) + 3
    p.releasedir(1, fh)
    p.meters_equal()


def test_the_same_listing_twice_counts_twice(pair_of, share):
    _tree(share, 30)
    p = pair_of()
    for _ in range(2):
        fh = p.opendir()
        p.list_all(1, fh, 1024)
        p.releasedir(1, fh)
    table = p.sessions[1].inodes
    counts = [table.get(n)[3] for n in range(2, table.capacity + 1) if table.get(n) is not None]
    assert counts and set(counts) == {2}
    p.meters_equal()


@pytest.mark.parametrize("size", [0, 1, 100, 159, 160 - 1])
def test_sizes_too_small_for_one_record(pair_of, share, size):
    _tree(share, 5)
    p = pair_of()
    fh = p.opendir()
    reply, in_c = p.step(1, fh, 0, size)
    assert in_c and len(reply) == 16
    assert len(p.sessions[1].inodes) == 0     # nothing looked up
    # a writable part smaller than the size
    reply, in_c = p.step(1, fh, 0, 4096, wsizes=[16, 100])
    assert in_c and len(reply) == 16
    p.meters_equal()


def test_c_and_python_interleave_on_one_handle(pair_of, share):
    names = _tree(share, 120, 30)
    p = pair_of()
    fh = p.opendir()
    listing = p.list_all(1, fh, 700, python_every=2)
    assert sorted(r[1] for r in listing) == sorted([b".", b".."] + [n.encode() for n in names])
    p.meters_equal()


def test_seek_back_to_zero_and_to_a_middle_cookie(pair_of, share):
    _tree(share, 80, 12)
    p = pair_of()
    fh = p.opendir()
    first = records(p.step(1, fh, 0, 1200)[0])
    second = records(p.step(1, fh, first[-1][2], 1200)[0])
    # rewinddir
    again, in_c = p.step(1, fh, 0, 1200)
    assert in_c and records(again)[0][1:] == first[0][1:]
    # seekdir to a cookie in the middle of the first reply
    mid = first[len(first) // 2][2]
    back, in_c = p.step(1, fh, mid, 1200)
    assert in_c and records(back)[0][1] == first[len(first) // 2 + 1][1]
    # and to one of the second reply, through Python, then C again
    p.step(1, fh, second[1][2], 600, python=True)
    p.step(1, fh, second[3][2], 600)
    p.meters_equal()


def test_entries_unlinked_between_getdents_and_lookup(pair_of, share):
    names = _tree(share, 100)
    p = pair_of()
    fh = p.opendir()
    first = records(p.step(1, fh, 0, 2000)[0])   # both streams hold 32 KiB of names now
    listed = {r[1] for r in first}
    gone = [n for i, n in enumerate(names) if n.encode() not in listed and i % 3 == 0]
    for n in gone:
        os.unlink(share / n)
    rest = []
    cookie = first[-1][2]
    while True:
        recs = records(p.step(1, fh, cookie, 2000)[0])
        if not recs:
            break
        rest += recs
        cookie = recs[-1][2]
    got = {r[1] for r in first + rest}
    assert got == {b".", b".."} | {n.encode() for n in names if n not in gone}
    p.meters_equal()


def test_names_of_max_length(pair_of, share):
    names = [c * 255 for c in "abcdefgh"] + ["z" * 254]
    for n in names:
        (share / n).touch()
    p = pair_of()
    fh = p.opendir()
    # one record of a 255-byte name: 152 + 255 -> 408 bytes
    for size in (407, 408, 409, 816, 4096):
        reply, in_c = p.step(1, fh, 0, size)
        assert in_c
    listing = p.list_all(1, fh, 900)
    assert {r[1] for r in listing} == {b".", b".."} | {n.encode() for n in names}
    p.meters_equal()


def test_symlink_fifo_subdirectory_and_a_subdirectory_listing(pair_of, share):
    (share / "sub").mkdir()
    for i in range(10):
        (share / "sub" / f"s{i}").write_bytes(b"s")
    (share / "sub" / "deeper").mkdir()
    (share / "ln").symlink_to("nowhere")
    os.mkfifo(share / "fifo")
    (share / "file").write_bytes(b"f")
    p = pair_of()
    fh = p.opendir()
    listing = p.list_all(1, fh, 4096)
    assert {r[1] for r in listing} == {b".", b"..", b"sub", b"ln", b"fifo", b"file"}
    sub = p.lookup(1, "sub")
    sfh = p.opendir(sub)
    sub_listing = p.list_all(sub, sfh, 500)
    assert len(sub_listing) == 13
    p.meters_equal()


def test_entries_already_held_take_a_count_without_an_fd(pair_of, share):
    _tree(share, 10)
    p = pair_of()
    held = [p.lookup(1, f"f{i:04d}xxx") for i in range(0, 10, 2)]
    assert all(held)
    fh = p.opendir()
    p.list_all(1, fh, 4096)
    table = p.sessions[1].inodes
    assert all(table.get(n)[3] == 2 for n in held)


def test_a_run_of_held_and_new_inodes_is_counted_in_order(pair_of, share):
    """One reply's lookups are taken as a run (their system calls first,
    then every count under one round of the record lock): held inodes
    (+1, no fd) and new ones (an fd each) mixed, and one name twice (a
    hard link: its second record counts the inode the first inserted)."""
    names = _tree(share, 16)
    os.link(share / names[3], share / "hardlink")
    p = pair_of()
    held = [p.lookup(1, names[i]) for i in range(0, 16, 3)]
    fh = p.opendir()
    listing = p.list_all(1, fh, 4096)
    by_name = {name.decode(): nodeid for nodeid, name, _ in listing}
    assert by_name["hardlink"] == by_name[names[3]]
    table = p.sessions[1].inodes
    assert table.get(by_name[names[3]])[3] == 3      # LOOKUP + two records
    assert all(table.get(n)[3] == 2 for n in held if n != by_name[names[3]])
    p.meters_equal()


def _dirent64(ino: int, off: int, dtype: int, name: bytes) -> bytes:
    reclen = (dirs.LINUX_DIRENT64.size + len(name) + 1 + 7) & ~7
    head = dirs.LINUX_DIRENT64.pack(ino, off, reclen, dtype)
    return head + name + bytes(reclen - len(head) - len(name))


def test_a_run_stopped_short_before_a_malformed_record_resumes_in_its_buffer(pair_of, share):
    """A run staged from a buffer, then a malformed host record (the
    buffer dropped, EIO), and the run's counts stop short (a full table):
    the stream goes back to the first entry not counted in the same
    buffer (no getdents64 since), which takes Python's step, and the reply
    ends at the malformed record as Python's does."""
    names = _tree(share, 6)
    p = pair_of(capacity=4)     # the root and three more
    fh = p.opendir()
    buf = b"".join(_dirent64(os.stat(share / n).st_ino, i + 1, 8, n.encode()) for i, n in enumerate(names))
    buf += dirs.LINUX_DIRENT64.pack(1, 99, 0, 8) + bytes(16)   # reclen 0: malformed
    for s in p.sessions:
        stream = dirs.DirStream()
        stream.buf, stream.pos, stream.cookie = buf, 0, 0
        s.handles._handles[fh].dir_stream = stream
    reply, in_c = p.step(1, fh, 0, 4096)
    recs = records(reply)
    assert in_c and [r[1].decode() for r in recs] == names
    assert sum(1 for r in recs if r[0]) == 3        # the others ENFILE: nodeid 0
    assert p.sessions[1].handles._handles[fh].dir_stream.cookie == -1
    p.meters_equal()


def test_entries_past_the_fd_cache_bound_take_python_s_step(pair_of, share, monkeypatch):
    """A run's new fds count against the cache's bound as found_entry's
    one by one did: past it each entry is Python's (whose batch then reaps
    the cache back under the bound)."""
    calls = []
    real = dirs.plus_entry

    def counting(*args):
        calls.append(args[2])
        return real(*args)
    monkeypatch.setattr(dirs, "plus_entry", counting)
    _tree(share, 20)
    p = pair_of(file_handles=True, inode_fds=8)
    fh = p.opendir()
    reply, in_c = p.step(1, fh, 0, 8192)
    assert in_c and len(records(reply)) == 22
    cache = p.sessions[1].cache
    assert cache.max_fds == 8 and len(calls) == 20 - 8
    p.meters_equal()


def test_a_directory_without_search_permission_lists_names_without_nodeids(pair_of, share):
    from tests.unit.fusereq import without_cap
    (share / "locked").mkdir()
    for i in range(5):
        (share / "locked" / f"f{i}").touch()
    os.chmod(share / "locked", 0o644)
    p = pair_of()
    locked = p.lookup(1, "locked")
    with without_cap(1), without_cap(2):
        fh = p.opendir(locked)
        listing = p.list_all(locked, fh, 4096)
    assert sorted(r[1] for r in listing) == [b".", b"..", b"f0", b"f1", b"f2", b"f3", b"f4"]
    assert all(r[0] == 0 for r in listing)
    p.meters_equal()


CONFIGS = {
    "auto": {},
    "always": {"cache": CacheMode.ALWAYS},
    "handles": {"file_handles": True},
    "peers": {"peers": True},
    "handles-peers-fds": {"file_handles": True, "peers": True, "inode_fds": 4},
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_listings_in_each_configuration(pair_of, share, config):
    """Owner words, claims of another worker's inodes, file handles, the
    reseek of a shared stream, the fd-cache bound with reaps between."""
    names = _tree(share, 40, 10)
    (share / "sub").mkdir()
    p = pair_of(**CONFIGS[config])
    # another request worker looked some names up (in the table, no fd here)
    for s_ in p.sessions:
        for name in names[::5]:
            st_ = os.lstat(share / name)
            s_.inodes.ref(st_.st_dev, st_.st_ino, owner=(6 << 32) | 99)
    held = p.lookup(1, names[1])
    assert held
    fh = p.opendir()
    cookie = 0
    for i in range(40):
        recs = records(p.step(1, fh, cookie, 900, python=i % 4 == 3)[0])
        for s_ in p.sessions:
            s_.reap()
        if not recs:
            break
        cookie = recs[-1][2]
    if CONFIGS[config].get("peers"):
        assert all(s_.handles._handles[fh].dir_stream.reseek for s_ in p.sessions)
    p.meters_equal()


def test_a_full_table_leaves_entries_to_python(pair_of, share):
    _tree(share, 12)
    p = pair_of(capacity=6)
    fh = p.opendir()
    listing = p.list_all(1, fh, 4096)
    # five fit (the root is one of six), the rest go out with nodeid 0 (ENFILE)
    assert sum(1 for r in listing if r[0]) == 5
    p.meters_equal()


def test_the_fd_cache_bound_leaves_entries_to_python(pair_of, share):
    _tree(share, 20)
    p = pair_of(inode_fds=8)
    fh = p.opendir()
    listing = p.list_all(1, fh, 4096)
    assert sum(1 for r in listing if r[0]) == 20
    p.meters_equal()


@pytest.mark.parametrize("case", ["extension", "released", "unknown", "file-fh", "huge-cookie", "short-args"])
def test_declined_requests_are_python_s(pair_of, share, case):
    _tree(share, 5)
    p = pair_of()
    fh = p.opendir()
    if case == "extension":
        _reply, in_c = p.step(1, fh, 0, 4096, extlen=1)
    elif case == "released":
        p.releasedir(1, fh)
        _reply, in_c = p.step(1, fh, 0, 4096)
    elif case == "unknown":
        _reply, in_c = p.step(1, fh + 77, 0, 4096)
    elif case == "file-fh":
        nodeid = p.lookup(1, "f0000xxx")
        ffh = [abi.OPEN_OUT.unpack_from(r)[0] for r in p.both(Opcode.OPEN, nodeid, abi.OPEN_IN.pack(0, 0),
                                                                abi.OPEN_OUT.size)][0]
        _reply, in_c = p.step(1, ffh, 0, 4096)
    elif case == "huge-cookie":
        _reply, in_c = p.step(1, fh, abi.OFFSET_MAX + 1, 4096)
    else:
        request = in_header(Opcode.READDIRPLUS, 1, 20, 5) + bytes(20)
        outs = [p._run(s, p.fast if i else None, request, [16, 4096], bool(i)) for i, s in enumerate(p.sessions)]
        assert outs[0][:2] == outs[1][:2]
        in_c = False
    assert not in_c
    p.meters_equal()


def test_a_dir_stream_made_by_c_is_python_s_dirstream(pair_of, share):
    _tree(share, 3)
    p = pair_of()
    fh = p.opendir()
    assert p.sessions[1].handles._handles[fh].dir_stream is None
    p.step(1, fh, 0, 4096)
    assert type(p.sessions[1].handles._handles[fh].dir_stream) is dirs.DirStream


def test_a_getdents_error_before_any_record_is_the_reply(pair_of, share):
    """A stream whose host directory is gone (ENOENT from getdents64 on an
    unlinked directory: none; use a closed-and-reopened fd of a file)."""
    (share / "d").mkdir()
    (share / "d" / "x").touch()
    p = pair_of()
    d = p.lookup(1, "d")
    fh = p.opendir(d)
    # both handles' fds replaced by an fd of a regular file: getdents64 says ENOTDIR
    for s in p.sessions:
        h = s.handles._handles[fh]
        fd = os.open(share / "d" / "x", os.O_RDONLY | os.O_CLOEXEC)
        os.dup2(fd, h.fd)
        os.close(fd)
    reply, in_c = p.step(d, fh, 0, 4096)
    assert in_c and abi.OUT_HEADER.unpack_from(reply)[1] == -20     # ENOTDIR
    p.meters_equal()


def test_readdirplus_is_counted_under_its_opcode(pair_of, share):
    _tree(share, 4)
    p = pair_of()
    fh = p.opendir()
    p.step(1, fh, 0, 4096)
    from tests.unit.test_fastops_equivalence import _op_words
    words = _op_words(p.sessions[1].meter, Opcode.READDIRPLUS)
    assert words[0] == 1
    p.meters_equal()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.integers(1, 255), max_size=40),
       st.lists(st.tuples(st.integers(0, 3000), st.sampled_from(["next", "next", "zero", "mid", "python"]),
                          st.integers(0, 5)), min_size=1, max_size=12),
       st.integers(0, 2))
def test_hypothesis_over_sizes_and_trees(namelens, steps, kinds):
    with scratch_share() as (root, opened):
        names = []
        for i, n in enumerate(namelens):
            name = (f"{i:03d}" + "n" * 255)[:max(n, 3)]
            path = os.path.join(root, name)
            if i % 7 == 3 and kinds:
                os.mkdir(path)
            elif i % 11 == 5:
                os.symlink("target", path)
            else:
                with open(path, "wb") as f:
                    f.write(b"z" * i)
            names.append(name)
        p = opened(Pair(root))
        fh = p.opendir()
        cookie, seen = 0, []
        for size, how, unlink in steps:
            if how == "zero":
                cookie = 0
            elif how == "mid" and seen:
                cookie = seen[len(seen) // 2]
            for name in names[:unlink]:
                path = os.path.join(root, name)
                if os.path.lexists(path):
                    if os.path.isdir(path) and not os.path.islink(path):
                        os.rmdir(path)
                    else:
                        os.unlink(path)
            reply, in_c = p.step(1, fh, cookie, size, python=how == "python")
            assert in_c == (how != "python")
            recs = records(reply)
            seen += [r[2] for r in recs]
            if recs:
                cookie = recs[-1][2]
        p.meters_equal()


def test_a_getdents_error_after_some_records_ends_the_reply_with_them(pair_of, share):
    """The buffered records go out, the refill fails (ENOTDIR: the handle's
    fd made a regular file's), the reply is the records so far; the next
    request is an error reply."""
    _tree(share, 900, 30)
    p = pair_of()
    fh = p.opendir()
    first = records(p.step(1, fh, 0, 2000)[0])
    for s in p.sessions:
        h = s.handles._handles[fh]
        fd = os.open(share / "f0000xxxxxxxxxxxxxxxxxxxxxxxxx", os.O_RDONLY | os.O_CLOEXEC)
        os.dup2(fd, h.fd)
        os.close(fd)
    reply, in_c = p.step(1, fh, first[-1][2], 1 << 20)
    rest = records(reply)
    assert in_c and 0 < len(rest) < 900 - len(first) + 2
    reply, in_c = p.step(1, fh, rest[-1][2], 1 << 20)
    # the stream's cookie is unknown after the error: a seek on the file
    # (EINVAL past its largest offset) or the getdents64's ENOTDIR
    assert in_c and abi.OUT_HEADER.unpack_from(reply)[1] in (-20, -22)
    p.meters_equal()


def test_a_non_root_caller_is_served_alike(pair_of, share):
    """READDIRPLUS is not an as_caller op: every caller's request runs
    under the worker's own credentials, in C as in Python."""
    _tree(share, 20)
    p = pair_of()
    fh = p.opendir()
    reply, in_c = p.step(1, fh, 0, 4096, uid=1000)
    assert in_c and len(records(reply)) == 22
    p.meters_equal()


@pytest.mark.parametrize("option", ["announce-submounts", "translate-ids"])
def test_readdirplus_stays_in_python_when_an_option_changes_its_reply(pair_of, share, option):
    """--announce-submounts (a mount point's entry carries
    FUSE_ATTR_SUBMOUNT), --translate-uid (the attrs are rewritten): the
    whole session's READDIRPLUS is Python's."""
    from daemon.fuse.idtranslate import Ids, Translation
    config = ({"announce_submounts": True} if option == "announce-submounts"
              else {"ids": Ids(Translation.parse(["map:0:1000:1"]), Translation.parse([]))})
    _tree(share, 5)
    p = pair_of(**config)
    assert fastpath.readdirplus_unsupported(p.sessions[1]) != ""
    fh = p.opendir()
    reply, in_c = p.step(1, fh, 0, 4096)
    assert not in_c and len(records(reply)) == 7
    p.meters_equal()
