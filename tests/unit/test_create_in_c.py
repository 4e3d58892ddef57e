"""CREATE served in C (daemon/fuse/_create.h) against the Python session.

Two sessions from the same start, each on its own copy of the share (a
CREATE changes the share, so the two cannot share one): the reference
(``FuseSession.handle``) and one with the compiled ops (``FastOps.serve``
first, ``handle`` when it declines). After every step the reply bytes
(the attributes' inode number and times, which differ between the two
copies, masked), the inode table (nodeids, generations, counts, free
list; each live inode named by its path in its own copy), the cached
nodeids, the open files (fh, nodeid, kind, host flags, the shared
FileTable's words), the meters' counters, the two copies' trees (names,
types, modes, sizes, owners) and the number of fds opened must be equal.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import CacheMode
from daemon.fds import close_fds
from daemon.fuse import abi, credentials, fastpath
from daemon.fuse.abi import Opcode
from daemon.metrics.counters import MetricsArea, WorkerMeter
from tests.unit.fusereq import in_header, start_session
from tests.unit.test_fastops_equivalence import _comparable, _run, _table_state

REPLY = 16 + abi.ENTRY_OUT.size + abi.OPEN_OUT.size        # 160
NEW = ("n0", "n1", "n2", "n3")


def _share(root) -> None:
    root.mkdir()
    (root / "exists").write_bytes(b"e" * 100)
    os.chmod(root / "exists", 0o6755)
    (root / "ro").write_bytes(b"r")
    os.chmod(root / "ro", 0o444)
    (root / "dir").mkdir()
    (root / "ln").symlink_to("exists")
    (root / "sub").mkdir()
    (root / "sub" / "inner").write_bytes(b"i")
    os.mkfifo(root / "fifo")


@pytest.fixture
def shares(tmp_path):
    cwd = os.getcwd()
    os.chdir("/proc/self/fd")
    a, b = tmp_path / "pure", tmp_path / "comp"
    _share(a)
    _share(b)
    yield a, b
    os.chdir(cwd)


def _pair(shares, capacity: int = 15, **config):
    area = MetricsArea(2)
    pair = []
    for i, root in enumerate(shares):
        session, _client = start_session(root, capacity=capacity, **config)
        session.meter = WorkerMeter(area.slot(i), fd_limit=1024)
        session.cache._close_fds = close_fds
        pair.append(session)
    credentials.restore()       # the thread's ids known (Python's first switch makes them so)
    return pair, fastpath.make(pair[1])


def _close(pair):
    for session in pair:
        session.meter = None
        session.close()
        session.inodes.close()


def shaped_args(args: bytes, variant: str, short: int) -> tuple[bytes, int]:
    """A request's args as ``variant`` wants them, and the header's extlen:
    "short-args" cut to ``short`` bytes, "extension" 8 bytes of request
    extension after them (extlen 1), "longer" 8 more bytes the header does
    not call an extension; any other variant as they are."""
    if variant == "short-args":
        return args[:short], 0
    if variant == "extension":
        return args + bytes(8), 1
    if variant == "longer":
        return args + bytes(8), 0
    return args, 0


def create_request(parent: int, name: bytes, flags: int, mode: int, unique: int, uid: int = 0,
                   open_flags: int = 0, variant: str = "ok") -> tuple[bytes, list[int]]:
    arg = name + b"\0"
    if variant == "no-nul":
        arg = name or b"q"
    elif variant == "inner-nul":
        arg = name + b"\0q\0"
    args, extlen = shaped_args(abi.CREATE_IN.pack(flags, mode, 0o022, open_flags) + arg, variant, 12)
    request = in_header(Opcode.CREATE, parent, len(args), unique, uid=uid, gid=uid, extlen=extlen) + args
    if variant == "len":
        request = abi.IN_HEADER.pack(len(request) + 1, *abi.IN_HEADER.unpack_from(request)[1:]) + args
    return request, [16, REPLY - 17] if variant == "short-out" else [16, abi.ENTRY_OUT.size + abi.OPEN_OUT.size]


def _masked(reply: bytes) -> bytes:
    """An entry reply (LOOKUP's, CREATE's) with fuse_attr's ino and times
    zeroed (the copies differ there)."""
    r = bytearray(reply)
    if int.from_bytes(r[4:8], "little") == 0 and int.from_bytes(r[0:4], "little") in (16 + 128, REPLY):
        a = 16 + 40
        r[a:a + 8] = bytes(8)
        r[a + 24:a + 60] = bytes(36)
    return bytes(r)


def _names(root) -> dict:
    """(dev, ino) → path in the copy, for every entry in it."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames + ["."]:
            p = os.path.join(dirpath, n)
            s = os.lstat(p)
            out[(s.st_dev, s.st_ino)] = os.path.normpath(os.path.relpath(p, root))
    return out


def _tree(root) -> list:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            s = os.lstat(p)
            out.append((os.path.relpath(p, root), stat.S_IFMT(s.st_mode), s.st_mode & 0o7777, s.st_size, s.st_nlink,
                        s.st_uid, s.st_gid))
    return sorted(out)


def _state(session, root) -> list:
    """_table_state with each (dev, ino) named by its path, and the open files."""
    live, hdr, count, cached = _table_state(session)
    names = _names(root)
    live = [(n, gen, names.get((dev, ino), "?"), ref, handle, word)
            for n, gen, dev, ino, ref, handle, word in live]
    files = session.handles.files
    handles = sorted((fh, h.nodeid, h.kind, h.flags, files.lookup(fh)[:3])
                     for fh, h in session.handles._handles.items())
    return [live, hdr, count, cached, handles, len(files)]


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _step(pair, fast, shares, request, wsizes, replies: list | None = None) -> bool:
    """One request on both sessions; asserts they agree; whether C served
    it. ``replies``: the reference's reply is appended there."""
    pure, comp = pair
    fds = _fd_count()
    ref = _run(pure, fast, request, [40], wsizes, False)
    opened = _fd_count() - fds
    before = fast.served
    got = _run(comp, fast, request, [40], wsizes, True)
    assert (got[0], _masked(got[1])) == (ref[0], _masked(ref[1]))
    assert _fd_count() - fds == 2 * opened          # no fd leaked or closed twice by C
    _same(pair, shares)
    if replies is not None:
        replies.append(ref[1])
    return fast.served > before


def _same(pair, shares) -> None:
    pure, comp = pair
    assert _state(comp, shares[1]) == _state(pure, shares[0])
    assert _tree(shares[1]) == _tree(shares[0])
    assert _comparable(comp.meter.words) == _comparable(pure.meter.words)
    assert not comp.inodes._tlock.locked()


def _ok(reply: bytes) -> tuple[int, int]:
    """(nodeid, fh) of a CREATE reply."""
    assert int.from_bytes(reply[4:8], "little", signed=True) == 0, reply[:16]
    return abi.ENTRY_OUT_NODEID.unpack_from(reply, 16)[0], abi.OPEN_OUT.unpack_from(reply, 16 + 128)[0]


def _lookup(pair, fast, shares, name: bytes, parent: int = 1) -> int:
    """LOOKUP of ``name`` on both sessions; its nodeid (0: an error)."""
    request = in_header(Opcode.LOOKUP, parent, len(name) + 1, 1) + name + b"\0"
    ref = _run(pair[0], fast, request, [40], [16, 128], False)
    got = _run(pair[1], fast, request, [40], [16, 128], True)
    assert (got[0], _masked(got[1])) == (ref[0], _masked(ref[1]))
    _same(pair, shares)
    return abi.ENTRY_OUT_NODEID.unpack_from(ref[1], 16)[0] if ref[0] > 16 else 0


def _lookups(pair, fast, shares, *names: bytes) -> list[int]:
    """_lookup of each name in the root, in order: their nodeids."""
    return [_lookup(pair, fast, shares, name) for name in names]


def _node_of(pair, fast, shares, nodeids: dict[str, int], where: str, fixed: dict[str, int]) -> int:
    """The nodeid ``where`` names: one of ``fixed`` ("root", "stale", …),
    else a path of the share ("sub/inner": in a subdirectory) looked up on
    both the first time (``nodeids`` keeps them)."""
    node = fixed.get(where)
    if node is None:
        if where not in nodeids:
            parent = 1
            if "/" in where:
                parent = nodeids.get("sub") or _lookup(pair, fast, shares, b"sub")
                nodeids["sub"] = parent
            nodeids[where] = _lookup(pair, fast, shares, where.rsplit("/", 1)[-1].encode(), parent)
        node = nodeids[where]
    return node


def test_plain_creates_are_served_in_c(shares):
    """Linux-shaped CREATEs of new names (the root and a looked-up
    directory; read-write, write-only with O_TRUNC, O_EXCL, a SUID mode)
    are all C's, with Python's reply, table, fhs and files; after their
    RELEASE, FORGET and unlink, the freed slots are C's again."""
    pair, fast = _pair(shares)
    try:
        sub = _lookup(pair, fast, shares, b"sub")
        cases = [(1, b"n0", os.O_RDWR, 0o100644), (1, b"n1", os.O_WRONLY | os.O_TRUNC, 0o100600),
                 (sub, b"n2", os.O_RDWR | os.O_EXCL, 0o106755), (1, b"n3", os.O_RDONLY | os.O_APPEND, 0o644)]
        for k, (parent, name, flags, mode) in enumerate(cases):
            request, wsizes = create_request(parent, name, flags, mode, 10 + k)
            assert _step(pair, fast, shares, request, wsizes), name
        assert fast.served >= 4
        for root in shares:
            assert stat.S_IMODE(os.stat(root / "sub" / "n2").st_mode) == 0o6755
            assert stat.S_IMODE(os.stat(root / "n1").st_mode) == 0o600
        # RELEASE, FORGET (both counts of each), unlink on the host: the slots are freed
        for session in pair:
            for fh, h in list(session.handles._handles.items()):
                session.handles.close(fh, h.kind)
            for n in list(session.cache._fds):
                info = session.inodes.get(n)
                if info is not None and n != sub:
                    session.inodes.unref(n, info[3])
            session.cache.reap()
        for root in shares:
            for n in ("n0", "n1", "n3"):
                os.unlink(root / n)
        _same(pair, shares)
        for k, name in enumerate((b"n0", b"n1")):
            request, wsizes = create_request(1, name, os.O_RDWR, 0o100644, 20 + k)
            assert _step(pair, fast, shares, request, wsizes)
    finally:
        _close(pair)


CREATE_NAMES = st.sampled_from([*NEW, "exists", "ro", "dir", "ln", "fifo", ".", "..", "a/b", "", "x" * 255, "x" * 256])
FLAGS = st.builds(lambda acc, extra: acc | extra, st.sampled_from([os.O_RDONLY, os.O_WRONLY, os.O_RDWR, 3]),
                  st.sampled_from([0, os.O_EXCL, os.O_TRUNC, os.O_APPEND, os.O_EXCL | os.O_TRUNC, os.O_NOATIME,
                                   os.O_DIRECT, os.O_SYNC, os.O_NONBLOCK, os.O_NOFOLLOW | os.O_CLOEXEC]))
MODES = st.sampled_from([0o100644, 0o644, 0o100600, 0o106755, 0o40755, 0o20644, 0o100000])
CREATE_STEP = st.one_of(
    st.tuples(st.just("create"), st.sampled_from(["root", "root", "root", "sub", "file", "stale", "unknown"]),
              CREATE_NAMES, FLAGS, MODES, st.sampled_from([0, 0, 0, 1000]),
              st.sampled_from([0, abi.FUSE_OPEN_KILL_SUIDGID]),
              st.sampled_from(["ok", "ok", "ok", "no-nul", "inner-nul", "short-out", "extension", "len",
                               "short-args"])),
    st.tuples(st.just("release"), st.integers(0, 7)),
    st.tuples(st.just("forget"), CREATE_NAMES, st.integers(1, 3)),
    st.tuples(st.just("unlink"), st.sampled_from(NEW)),
    st.tuples(st.just("reap")))

CREATE_CONFIGS = {
    "auto": {},
    "always": {"cache": CacheMode.ALWAYS},
    "never-writeback": {"cache": CacheMode.NEVER, "writeback": True},
    "direct-noatime": {"allow_direct_io": True, "preserve_noatime": True},
}


def _nodeid(session, root, name: str) -> int:
    """The nodeid this session caches of ``name`` in its copy (0: none)."""
    try:
        s = os.lstat(root / name)
    except (OSError, ValueError):
        return 0
    for n in session.cache._fds:
        info = session.inodes.get(n)
        if info is not None and info[1:3] == (s.st_dev, s.st_ino):
            return n
    return 0


def _parent(pair, fast, shares, where: str) -> int:
    """The parent nodeid a step names: the root, a stale or unknown nodeid,
    or "sub" (a directory) or "file" looked up on both (the root if that
    failed)."""
    parent = {"root": 1, "stale": 3999, "unknown": 7}.get(where, 0)
    if where in ("sub", "file"):
        parent = _lookup(pair, fast, shares, b"sub" if where == "sub" else b"exists") or 1
    return parent


def _create_of(parent: int, step, unique: int) -> tuple[bytes, list[int]]:
    _kind, _where, name, flags, mode, uid, open_flags, variant = step
    return create_request(parent, name.encode(), flags, mode, unique, uid, open_flags, variant)


# what a host-side removal step does, and the error it lets pass
_REMOVES = {"unlink": (os.unlink, FileNotFoundError), "rmdir": (os.rmdir, OSError)}


def _host_step(pair, shares, step) -> bool:
    """A step done on both sessions or copies directly, not by a request:
    "reap" (both reap their handles and fds), "release" (one of the open
    fhs, by index, closed as a RELEASE would), "unlink" and "rmdir" (a name
    in both copies, there or not), "chmod" (a path, a mode), "forget" (a
    name's nodeid, by a count). False (nothing done): another step."""
    kind = step[0]
    if kind == "reap":
        for session in pair:
            session.handles.reap()
            session.cache.reap()
    elif kind == "release":
        fhs = sorted(pair[0].handles._handles)
        if fhs:
            fh = fhs[step[1] % len(fhs)]
            for session in pair:
                session.handles.close(fh, session.handles._handles[fh].kind)
    elif kind in _REMOVES:
        remove, gone = _REMOVES[kind]
        for root in shares:
            try:
                remove(root / step[1])
            except gone:
                pass
    elif kind == "chmod":
        for root in shares:
            os.chmod(root / step[1], step[2])
    elif kind == "forget":
        nodeids = [_nodeid(s, r, step[1]) for s, r in zip(pair, shares)]
        assert nodeids[0] == nodeids[1]
        if nodeids[0] > 1:
            for session in pair:
                session.inodes.unref(nodeids[0], step[2])
    else:
        return False
    return True


def _run_steps(pair, fast, shares, steps, request_of=_create_of) -> int:
    """The steps on both sessions, compared after each; how many C served.
    A _host_step, else a request: ``request_of(parent, step, unique)``
    (CREATE's by default), the parent the one step[1] names (_parent)."""
    served = 0
    for k, step in enumerate(steps):
        if not _host_step(pair, shares, step):
            request, wsizes = request_of(_parent(pair, fast, shares, step[1]), step, 100 + k)
            served += _step(pair, fast, shares, request, wsizes)
        _same(pair, shares)
    return served


@contextlib.contextmanager
def fresh_pair(tmp_path_factory, name: str, **config):
    """The ``shares`` fixture's and _pair's set-up for a hypothesis test
    (a function-scoped fixture would serve all its examples): two new
    copies of the share in a new temporary directory, /proc/self/fd the
    cwd, the pair on them; closed, the cwd back, after. Yields (pair,
    fast, shares)."""
    cwd = os.getcwd()
    base = tmp_path_factory.mktemp(name)
    shares = (base / "pure", base / "comp")
    for root in shares:
        _share(root)
    os.chdir("/proc/self/fd")
    pair, fast = _pair(shares, **config)
    try:
        yield pair, fast, shares
    finally:
        _close(pair)
        os.chdir(cwd)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(CREATE_STEP, min_size=1, max_size=14), config=st.sampled_from(sorted(CREATE_CONFIGS)))
def test_creates_are_equivalent(tmp_path_factory, steps, config):
    """Sequences of CREATEs (new, existing, a read-only file, a directory,
    a symlink, a FIFO, dotted, invalid and too long names; the root, a
    looked-up directory and file, stale and unknown parents; every access
    mode, O_EXCL, O_TRUNC, O_APPEND, O_NOATIME, O_DIRECT and others; file,
    bare, SUID, directory and device modes; root and another caller;
    KILL_SUIDGID; malformed args and short reply room), RELEASEs, FORGETs,
    unlinks on the host and reaps, on a table of 15 inodes that fills:
    the same replies, tables, open files, trees, counters and fd counts."""
    with fresh_pair(tmp_path_factory, "creates", **CREATE_CONFIGS[config]) as (pair, fast, shares):
        _run_steps(pair, fast, shares, steps)


@pytest.mark.parametrize("case", ["uid", "gid", "extension", "exists", "exists-excl", "dir-mode", "accmode",
                                  "dot", "stale", "short-out", "no-room", "dirty", "thread-lock", "unknown-ids"])
def test_what_c_leaves_to_python(shares, case):
    """Each case declined by C before anything was done, then answered by
    Python as the reference answers it."""
    pair, fast = _pair(shares)
    try:
        flags, mode, uid, name, parent, variant = os.O_RDWR, 0o100644, 0, b"n0", 1, "ok"
        if case == "uid":
            uid = 1000
        elif case == "extension":
            variant = "extension"
        elif case in ("exists", "exists-excl"):
            name = b"exists"
            flags |= os.O_EXCL if case == "exists-excl" else os.O_TRUNC
        elif case == "dir-mode":
            mode = 0o40755
        elif case == "accmode":
            flags = 3
        elif case == "dot":
            name = b".."
        elif case == "stale":
            parent = 3999
        elif case == "short-out":
            variant = "short-out"
        elif case == "no-room":
            for session in pair:
                session.handles.max_open_files = 0
        elif case == "dirty":
            from daemon.fuse import inodes
            for session in pair:
                session.inodes._hdr[inodes._H_DIRTY] = 1
        request, wsizes = create_request(parent, name, flags, mode, 5, uid, 0, variant)
        if case == "gid":
            request = abi.IN_HEADER.pack(*abi.IN_HEADER.unpack_from(request)[:5], 7, 0, 0, 0) + request[40:]
        if case in ("thread-lock", "unknown-ids"):
            _declined_until_clear(pair, fast, shares, case, request, wsizes, "n0")
            return
        assert not _step(pair, fast, shares, request, wsizes)
    finally:
        _close(pair)


def _declined_until_clear(pair, fast, shares, case: str, request: bytes, wsizes, made: str) -> None:
    """C declines ``request`` untouched (``made`` not in the copy) while
    ``case`` stands in its way, "unknown-ids" (Python's next as_caller
    makes the system calls) or "thread-lock" (another thread holds the
    inode table), and serves it, as the reference answers it, once the
    obstacle is gone."""
    if case == "unknown-ids":
        credentials.forget_cache()
    else:
        pair[1].inodes._tlock.acquire()
    assert fast.serve(_chain(request, wsizes)) == -1
    if case == "thread-lock":
        pair[1].inodes._tlock.release()
    assert not (shares[1] / made).exists()
    assert _step(pair, fast, shares, request, wsizes)


def _chain(request, wsizes):
    from daemon.virtio.iovec import IoVec
    from daemon.virtio.virtqueue import Chain
    return Chain(0, IoVec([memoryview(bytearray(request))]), IoVec([memoryview(bytearray(n)) for n in wsizes]))


def test_a_full_table_after_the_create_is_answered_as_python_does(shares):
    """A table of 3 inodes: the fourth file is created, and C's lookup of it
    declines (ENFILE is Python's): fastpath.create_rest answers as do_create
    (ENFILE, the new fd closed, the file stays)."""
    pair, fast = _pair(shares, capacity=3)
    try:
        replies: list = []
        for k, name in enumerate(NEW):
            request, wsizes = create_request(1, name.encode(), os.O_RDWR, 0o100644, 30 + k)
            assert _step(pair, fast, shares, request, wsizes, replies)     # C answers each
        errors = [-int.from_bytes(r[4:8], "little", signed=True) for r in replies]
        assert errors == [0, 0, errno.ENFILE, errno.ENFILE]     # a table of 3: the root and two
        assert all((shares[1] / n).exists() for n in NEW)       # every file made
        assert len(pair[1].handles._handles) == 2
    finally:
        _close(pair)


def test_create_rest_opens_a_name_that_appeared_as_create_file_does(shares):
    """The race C hands to Python (fd -1): the name appeared between C's
    fstatat and its O_EXCL create, without the guest's O_EXCL: opened as
    do_create opens an existing file (O_TRUNC truncates)."""
    pair, fast = _pair(shares)
    try:
        pure, comp = pair
        request, wsizes = create_request(1, b"exists", os.O_RDWR | os.O_TRUNC, 0o100644, 9)
        ref = _run(pure, fast, request, [40], wsizes, False)
        got = fastpath.create_rest(comp, comp.root_fd, b"exists", -1, os.O_RDWR | os.O_TRUNC, 0,
                                   os.O_RDWR | os.O_TRUNC, os.O_RDWR | os.O_TRUNC)
        assert isinstance(got, bytes) and _masked(ref[1][:16] + got) == _masked(ref[1][:REPLY])
        assert _state(comp, shares[1]) == _state(pure, shares[0])
        assert _tree(shares[1]) == _tree(shares[0])
        assert fastpath.create_rest(comp, comp.root_fd, b"dir", -1, os.O_RDWR, 0, os.O_RDWR, os.O_RDWR) \
            == errno.EISDIR
    finally:
        _close(pair)


@pytest.mark.parametrize("config,why", [({"posix_acl": True}, "--posix-acl"),
                                        ({"security_label": True}, "--security-label"),
                                        ({"readonly": True}, "CREATE is not the reference handler"),
                                        ({"announce_submounts": True}, "--announce-submounts")])
def test_create_stays_in_python_when_an_option_changes_it(shares, config, why):
    pair, _fast = _pair(shares, **config)
    try:
        assert why in fastpath.create_unsupported(pair[1])
        fast = fastpath.make(pair[1])
        request, wsizes = create_request(1, b"n0", os.O_RDWR, 0o100644, 3)
        assert fast.serve(_chain(request, wsizes)) == -1
    finally:
        _close(pair)


@contextlib.contextmanager
def keeper_loop(tmp_path, monkeypatch):
    """tests/perf/inproc.py's set-up: a WorkerLoop with the compiled ops
    on a share in tmp_path, a meter and a keeper (stopped, and the loop
    closed, after). Yields (loop, ring, vr, meter)."""
    from tests.perf import inproc
    monkeypatch.chdir(tmp_path)
    loop, ring, vr, _ = inproc._build("create", 8, str(tmp_path), open_files=64)
    meter = WorkerMeter(MetricsArea(1).slot(0))
    loop.session.meter = meter
    loop.use_fast_ops(fastpath.fast_ops(loop.session))
    pid, stop_w = inproc.start_keeper(loop.session)
    try:
        credentials.restore()
        yield loop, ring, vr, meter
    finally:
        inproc.stop_keeper(pid, stop_w)
        inproc.close(loop, ring, vr)


def submit_creates(vr, count: int) -> list[int]:
    """CREATEs of c0, c1, … in the root (O_RDWR, 0644; uniques 50, 51, …)
    on the ring: their heads."""
    return [vr.submit([in_header(Opcode.CREATE, 1, 16 + 3, 50 + i),
                       abi.CREATE_IN.pack(os.O_RDWR, 0o100644, 0, 0) + b"c%d\0" % i], [16, 144])
            for i in range(count)]


def test_the_worker_loop_serves_creates_in_c_and_counts_them(tmp_path, monkeypatch):
    """WorkerLoop._serve (the batch loop) on a ring of 8 CREATEs, with a
    meter and a keeper (tests/perf/inproc.py's set-up): all 8 answered in
    C, counted under CREATE, each fh in the shared FileTable with the
    keeper's copy recorded."""
    from daemon.metrics import counters
    from tests.perf import inproc
    with keeper_loop(tmp_path, monkeypatch) as (loop, ring, vr, meter):
        heads = submit_creates(vr, 8)
        assert loop._serve(ring) == 8
        assert sorted(vr.harvest()) == sorted(heads)
        fhs = [_ok(vr.read_writable(h))[1] for h in heads]
        files = loop.session.handles.files
        assert all(files.live(fh) for fh in fhs) and sorted(loop.session.handles._handles) == sorted(fhs)
        words = meter.words
        base = counters.OPS + int(Opcode.CREATE) * counters.OP_WORDS
        assert words[base + counters.OP_REQUESTS] == 8
        if fastpath.compiled.VirtQueue is fastpath.compiled.CompiledVirtQueue:
            assert loop._fast.served == 8
        deadline = __import__("time").monotonic() + 5
        while not all(files.kept(fh) for fh in fhs):
            assert __import__("time").monotonic() < deadline, "the keeper did not get every fd"
        assert {files.kept(fh) >> 32 for fh in fhs} == {inproc.KEEPER_SERIAL}


@pytest.mark.parametrize("config", sorted(CREATE_CONFIGS))
def test_every_flag_is_opened_as_python_opens_it(shares, config):
    """Each access mode with each kept or dropped flag (O_APPEND,
    O_NOATIME, O_DIRECT, O_SYNC, O_NONBLOCK, O_TRUNC, O_EXCL) creates a
    new file in C, opened with the host flags Python's HandleTable holds
    (--writeback: write-only opened read-write, no O_APPEND; O_NOATIME
    and O_DIRECT only with their options), and modes with SUID, SGID and
    sticky bits are the file's."""
    pair, fast = _pair(shares, capacity=64, **CREATE_CONFIGS[config])
    try:
        extras = [0, os.O_APPEND, os.O_NOATIME, os.O_DIRECT, os.O_SYNC, os.O_NONBLOCK, os.O_TRUNC, os.O_EXCL,
                  os.O_DSYNC | os.O_APPEND]
        k = 0
        for acc in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
            for extra in extras:
                k += 1
                mode = (0o100644, 0o104755, 0o102711, 0o101777, 0o644)[k % 5]
                request, wsizes = create_request(1, b"f%d" % k, acc | extra, mode, 60 + k)
                assert _step(pair, fast, shares, request, wsizes), (acc, extra)
        opened = {h.flags for h in pair[1].handles._handles.values()}
        if "writeback" in config:
            assert not any(f & os.O_APPEND for f in opened)
            assert not any(f & os.O_ACCMODE == os.O_WRONLY for f in opened)
        else:
            assert any(f & os.O_ACCMODE == os.O_WRONLY for f in opened)
    finally:
        _close(pair)


def _files_consistent(files) -> None:
    """The open-file table as FileTable's invariants want it: the free list
    and the live slots together every slot below the high mark, the live
    count right."""
    from daemon.fuse import filetable as ft
    q, hdr = files.slots, files._hdr
    high = hdr[ft._H_HIGH]
    live = [s for s in range(1, high) if q[s * ft._WORDS + ft._F_GEN]]
    free, f = [], hdr[ft._H_FREE]
    while f and len(free) <= files.capacity:
        free.append(f)
        f = q[f * ft._WORDS + ft._F_NEXT]
    assert sorted(free + live) == list(range(1, high))
    assert len(files) == len(live)


def test_a_worker_killed_during_c_creates_leaves_tables_python_repairs(shares):
    """A forked worker runs C's CREATEs of new names (each an insertion in
    the inode table and a slot of the open-file table), RELEASEs, FORGETs
    and unlinks in a loop, and is SIGKILLed at random moments, maybe in the
    middle of an insertion or an allocation: the next locker of each table
    (Python's _lock, as the successor's first mutation) repairs what was
    DIRTY, both tables are consistent, and C creates on them again."""
    from tests.unit.killed import kill_at_random
    from tests.unit.test_fastops_equivalence import _consistent
    pair, fast = _pair(shares, capacity=63)
    session, root = pair[1], shares[1]
    table, files = session.inodes, session.handles.files

    def work(round_):
        k = 0
        while True:
            k += 1
            for i in range(4):
                request, wsizes = create_request(1, b"k%d-%d-%d" % (round_, k, i), os.O_RDWR, 0o100644, k)
                fast.serve(_chain(request, wsizes))
            for fh, h in list(session.handles._handles.items()):
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
        # the dead worker's slots: freed as DESTROY would (its fds died with it)
        table.unref_many([(n, table.get(n)[3]) for n in range(2, table.capacity + 1) if table.get(n)])
        for s in range(1, files.capacity + 1):
            gen = files.slots[s * 8]
            if gen:
                files.free(gen << 24 | s)
        _consistent(table)
        _files_consistent(files)

    try:
        kill_at_random(work, 20, 11, after)
        request, wsizes = create_request(1, b"after", os.O_RDWR, 0o100644, 1)
        before = fast.served
        assert fast.serve(_chain(request, wsizes)) == REPLY and fast.served == before + 1
        _consistent(table)
        _files_consistent(files)
    finally:
        _close(pair)


def test_the_keeper_has_the_new_file_before_the_reply_is_out(shares):
    """The handoff is part of C's CREATE, as of Python's: when ``serve``
    returns (before the loop pushes and publishes the reply) the KEEP of
    the new fh, with an fd of the new file, is already in the keeper's
    socket, so a worker killed after the reply loses nothing."""
    import socket

    from daemon.fds import recv_with_fds
    from daemon.fuse.peers import KEEP
    pair, fast = _pair(shares)
    comp = pair[1]
    keep_r, keep_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    answers, answer_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    comp.peers.set_self(1)
    comp.peers.set_keeper(9, keep_w.detach(), answers.detach(), answer_end.detach())
    try:
        request, wsizes = create_request(1, b"n0", os.O_RDWR, 0o100644, 3)
        chain = _chain(request, wsizes)
        before = fast.served
        assert fast.serve(chain) == REPLY and fast.served == before + 1
        reply = b"".join(bytes(v) for v in chain.writable.views)
        _nodeid, fh = _ok(reply)
        keep_r.setblocking(False)
        data, fds, _flags = recv_with_fds(keep_r, 64, 2)
        try:
            assert KEEP.unpack(data) == (fh,) and len(fds) == 1
            assert os.fstat(fds[0]).st_ino == os.lstat(shares[1] / "n0").st_ino
        finally:
            close_fds(fds)
    finally:
        keep_r.close()
        _close(pair)
