"""SETATTR served in C (daemon/fuse/_setattr.h) against the Python session.

Two sessions from the same start, each on its own copy of the share (the
pair and helpers of test_create_in_c and test_release_in_c): the reference
(``FuseSession.handle``) and one with the compiled ops (``FastOps.serve``
first, ``handle`` when it declines). After every step the reply bytes (the
inode number and ctime, which differ between the two copies, masked; the
atime and mtime too where the request said *_NOW), the inode tables, the
open files, the FileTable memory, the meters, the trees (modes, sizes,
owners), every file's atime and mtime (but those a *_NOW set) and the
number of fds open must be equal; a declined request must leave every
buffer, table, file and fd as it was.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.fuse import abi, fastpath
from daemon.fuse.abi import Opcode, SetattrValid
from daemon.virtio.virtqueue import Chain, IoVec
from tests.unit.fusereq import in_header
from tests.unit.test_create_in_c import (_close, _fd_count, _host_step, _lookups, _node_of, _pair, _same, fresh_pair,
                                         shaped_args, shares)
from tests.unit.test_fastops_equivalence import _run
from tests.unit.test_release_in_c import _err, _full_same, _snapshot

__all__ = ["shares"]        # the fixture, imported for the tests below

REPLY = 16 + abi.ATTR_OUT.size          # 120
V = SetattrValid
NOW = V.ATIME_NOW | V.MTIME_NOW
# what sets a file's times to the current time: *_NOW, and a truncate
# (FATTR_SIZE) moves the mtime; the two copies' clocks are read a moment
# apart, in the same coarse clock tick only by luck (a loaded machine
# showed it: a truncated file's mtimes a tick apart)
CLOCKED = NOW | V.SIZE
NAMES = ["exists", "ro", "dir", "ln", "fifo", "sub", "sub/inner"]


def setattr_request(nodeid: int, unique: int, valid: int, mode: int = 0, atime: tuple[int, int] = (0, 0),
                    mtime: tuple[int, int] = (0, 0), fh: int = 0, size: int = 0, uid: int = 0, gid: int = 0,
                    caller: int = 0, variant: str = "ok") -> bytes:
    args, extlen = shaped_args(abi.SETATTR_IN.pack(valid, fh, size, 0, atime[0], mtime[0], 0, atime[1], mtime[1], 0,
                                                   mode, uid, gid), variant, 80)
    return in_header(Opcode.SETATTR, nodeid, len(args), unique, uid=caller, gid=caller, extlen=extlen) + args


def _masked(reply: bytes, now: bool) -> bytes:
    """An attr reply with the inode number and ctime zeroed (the copies
    differ there), and atime and mtime if a *_NOW set them (``now``: this
    request or an earlier one on the same file), a directory's atime."""
    r = bytearray(reply)
    if len(r) >= REPLY and int.from_bytes(r[0:4], "little") == REPLY and int.from_bytes(r[4:8], "little") == 0:
        a = 32                          # fuse_attr: ino size blocks atime mtime ctime, then the nsecs
        r[a:a + 8] = bytes(8)
        r[a + 40:a + 48] = bytes(8)
        r[a + 56:a + 60] = bytes(4)
        if now:
            r[a + 24:a + 40] = bytes(16)
            r[a + 48:a + 56] = bytes(8)
        mode = int.from_bytes(r[a + 60:a + 64], "little")
        if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):   # read by the trees' walks: relatime
            r[a + 24:a + 32] = bytes(8)
            r[a + 48:a + 52] = bytes(4)
    return bytes(r)


def _times(root, skip: set) -> list:
    """(path, atime, mtime) of every entry but those in skip; a
    directory's and a symlink's atime None (reading them may move it:
    relatime)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            if rel not in skip:
                s = os.lstat(p)
                read = stat.S_ISDIR(s.st_mode) or stat.S_ISLNK(s.st_mode)
                out.append((rel, None if read else s.st_atime_ns, s.st_mtime_ns))
    return sorted(out)


def _fix_times(shares) -> None:
    """Every entry of both copies (made at different instants) at the same
    atime and mtime, so that the copies' times compare."""
    for root in shares:
        os.utime(root, ns=(10**18, 2 * 10**18))
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                os.utime(os.path.join(dirpath, n), ns=(10**18, 2 * 10**18), follow_symlinks=False)


def _sa(pair, fast, shares, request: bytes, wsizes=(16, abi.ATTR_OUT.size), now_set: set | None = None,
        name: str | None = None) -> tuple[bool, bytes]:
    """SETATTR (or any request) on both, compared: (served by C, the
    reference's reply)."""
    valid = abi.SETATTR_IN.unpack_from(request, 40)[0] if len(request) >= 40 + abi.SETATTR_IN.size else 0
    if now_set is not None and valid & CLOCKED and name is not None:
        now_set.add(name)
    now = bool(valid & CLOCKED) or (now_set is not None and name in now_set)
    pure, comp = pair
    fds = _fd_count()
    ref = _run(pure, fast, request, [40], list(wsizes), False)
    opened = _fd_count() - fds
    before = fast.served
    got = _run(comp, fast, request, [40], list(wsizes), True)
    assert (got[0], _masked(got[1], now)) == (ref[0], _masked(ref[1], now))
    assert _fd_count() - fds == 2 * opened
    _full_same(pair, shares)
    skip = set(now_set or ()) | {"."}
    assert _times(shares[1], skip) == _times(shares[0], skip)
    return fast.served > before, ref[1]


def _opened(pair, fast, shares, nodeid: int, unique: int, flags: int = os.O_RDWR, now_set: set | None = None) -> int:
    """OPEN of ``nodeid`` on both (C's or Python's): the fh. ``now_set``:
    the files a *_NOW set the times of, so far."""
    request = in_header(Opcode.OPEN, nodeid, abi.OPEN_IN.size, unique) + abi.OPEN_IN.pack(flags, 0)
    _served, reply = _sa(pair, fast, shares, request, (16, abi.OPEN_OUT.size), now_set)
    assert _err(reply) == 0
    return abi.OPEN_OUT.unpack_from(reply, 16)[0]


def _c_declines(comp, shares, fast, request: bytes) -> None:
    """C declines ``request`` on ``comp``: nothing written, nothing changed."""
    before = (_snapshot(comp), _times(shares[1], set()), sorted((p, os.lstat(shares[1] / p).st_mode) for p in NAMES))
    out = [bytearray(b"\xa5" * 16), bytearray(b"\x5a" * abi.ATTR_OUT.size)]
    assert fast.serve(Chain(0, IoVec([memoryview(bytearray(request))]), IoVec([memoryview(b) for b in out]))) == -1
    assert out == [bytearray(b"\xa5" * 16), bytearray(b"\x5a" * abi.ATTR_OUT.size)]
    after = (_snapshot(comp), _times(shares[1], set()), sorted((p, os.lstat(shares[1] / p).st_mode) for p in NAMES))
    assert after == before


def test_tar_shaped_setattrs_are_served_in_c(shares):
    """What tar -x sends (utimensat with explicit times and with *_NOW,
    chmod, chown of owner and group or one of them, all at once), on a
    file, a directory, the root, a FIFO and through an open fh: C's, with
    Python's reply, files and fds; an out-of-range nanosecond is C's
    EINVAL after the chmod and chown; any caller; all counted under
    SETATTR."""
    pair, fast = _pair(shares)
    _fix_times(shares)
    try:
        f, d, fifo = _lookups(pair, fast, shares, b"exists", b"dir", b"fifo")
        now: set = set()
        t1, t2 = (1_600_000_000, 123_456_789), (1_500_000_000, 987_654_321)
        cases = [
            (f, "exists", dict(valid=V.ATIME | V.MTIME, atime=t1, mtime=t2)),
            (f, "exists", dict(valid=V.MODE, mode=0o100640)),
            (d, "dir", dict(valid=V.MODE | V.ATIME | V.MTIME, mode=0o40700, atime=t2, mtime=t1)),
            (f, "exists", dict(valid=V.MTIME | V.ATIME_NOW, mtime=t1, caller=1000)),
            (fifo, "fifo", dict(valid=V.MODE | V.MTIME, mode=0o600, mtime=((1 << 64) - 5, 0))),  # before 1970
            (1, ".", dict(valid=V.MODE, mode=0o755)),
            (1, ".", dict(valid=V.ATIME | V.MTIME, atime=t1, mtime=t1)),
            (f, "exists", dict(valid=0)),
            (d, "dir", dict(valid=NOW)),
            (f, "exists", dict(valid=V.UID | V.GID, uid=1000, gid=1001)),
            (d, "dir", dict(valid=V.GID, uid=5, gid=1002)),               # the uid left as it is
            (fifo, "fifo", dict(valid=V.UID, uid=1003, gid=7)),
            (f, "exists", dict(valid=V.UID | V.GID, uid=0xFFFFFFFF, gid=0xFFFFFFFF)),   # -1: unchanged
            (1, ".", dict(valid=V.UID | V.GID, uid=0, gid=0)),
            (d, "dir", dict(valid=V.MODE | V.UID | V.ATIME | V.MTIME, mode=0o750, uid=1004, atime=t1, mtime=t2)),
        ]
        for k, (node, name, kw) in enumerate(cases):
            served, reply = _sa(pair, fast, shares, setattr_request(node, 10 + k, **kw), now_set=now, name=name)
            assert served and _err(reply) == 0, (k, reply[:16])
            assert len(reply) == REPLY
        s = os.stat(shares[1] / "exists")
        assert (s.st_mode & 0o7777, s.st_atime_ns // 10**9 > t1[0], s.st_mtime_ns) == (
            0o640, True, t1[0] * 10**9 + t1[1])
        assert os.stat(shares[1] / "fifo").st_mtime_ns == -5 * 10**9
        assert [(s.st_uid, s.st_gid) for s in (os.stat(shares[1] / n) for n in ("exists", "dir", "fifo"))] == [
            (1000, 1001), (1004, 1002), (1003, 0)]
        fh = _opened(pair, fast, shares, f, 30, now_set=now)
        served, reply = _sa(pair, fast, shares, setattr_request(f, 31, V.FH | V.MODE | V.ATIME | V.MTIME, 0o604,
                                                                 t2, t2, fh=fh), now_set=now, name="exists")
        assert served and _err(reply) == 0
        assert os.stat(shares[1] / "exists").st_mode & 0o7777 == 0o604
        # nanoseconds ≥ 1e9: EINVAL, after the chmod and the chown
        served, reply = _sa(pair, fast, shares, setattr_request(d, 32, V.MODE | V.UID | V.MTIME, 0o711,
                                                                 mtime=(5, 10**9), uid=1005), now_set=now, name="dir")
        assert served and _err(reply) == errno.EINVAL
        assert (os.stat(shares[1] / "dir").st_mode & 0o7777, os.stat(shares[1] / "dir").st_uid) == (0o711, 1005)
        # *_NOW wins over a bad nanosecond of the same time (as _timespec)
        served, reply = _sa(pair, fast, shares, setattr_request(d, 33, V.MTIME | V.MTIME_NOW, mtime=(5, 2 * 10**9)),
                            now_set=now, name="dir")
        assert served and _err(reply) == 0
        words = pair[1].meter.words
        assert words[fastpath.op_words(Opcode.SETATTR)[0]] == len(cases) + 3
        assert words[fastpath.op_words(Opcode.SETATTR)[3] + errno.EINVAL] == 1
    finally:
        _close(pair)


@pytest.mark.parametrize("case", ["size", "lockowner", "ctime", "kill", "unknown-bit", "symlink",
                                  "symlink-times", "stale", "not-cached", "zero", "short-args", "extension",
                                  "unknown-fh", "other-fh", "short-out"])
def test_what_c_leaves_to_python(shares, case):
    """Each case declined by C before anything was done, then answered by
    Python as the reference answers it."""
    pair, fast = _pair(shares)
    _fix_times(shares)
    try:
        f, ln, ro = _lookups(pair, fast, shares, b"exists", b"ln", b"ro")
        fh = _opened(pair, fast, shares, ro, 5, os.O_RDONLY)
        t = (1_000_000_000, 5)
        node, kw, variant, wsizes = f, dict(valid=V.MODE, mode=0o600), "ok", (16, abi.ATTR_OUT.size)
        if case in ("size", "lockowner", "ctime", "kill"):
            bit = {"size": V.SIZE, "lockowner": V.LOCKOWNER, "ctime": V.CTIME,
                   "kill": V.KILL_SUIDGID | V.SIZE}[case]
            kw = dict(valid=V.MODE | bit, mode=0o600, size=3, uid=1000, gid=1000)
        elif case == "unknown-bit":
            kw = dict(valid=V.MODE | (1 << 20), mode=0o600)
        elif case == "symlink":
            node = ln
        elif case == "symlink-times":
            node, kw = ln, dict(valid=V.ATIME | V.MTIME, atime=t, mtime=t)
        elif case == "stale":
            node = 3999
        elif case == "not-cached":
            node = 7
        elif case == "zero":
            node = 0
        elif case in ("short-args", "extension"):
            variant = case
        elif case == "unknown-fh":
            kw = dict(valid=V.MODE | V.FH, mode=0o600, fh=fh + 1)
        elif case == "other-fh":
            kw = dict(valid=V.MODE | V.FH, mode=0o600, fh=fh)       # ro's fh on "exists"
        elif case == "short-out":
            wsizes = (16, abi.ATTR_OUT.size - 1)
        request = setattr_request(node, 9, variant=variant, **kw)
        if case != "short-out":
            _c_declines(pair[1], shares, fast, request)
        # a SIZE change stamps the file with the host's clock (a 4 ms tick
        # apart in the two shares now and then): those times are not compared
        served, reply = _sa(pair, fast, shares, request, wsizes, now_set=set(),
                            name={f: "exists", ln: "ln", ro: "ro"}.get(node))
        assert not served
        if case == "symlink":
            assert _err(reply) == errno.EOPNOTSUPP
        if case == "short-args":
            assert _err(reply) == errno.EINVAL
    finally:
        _close(pair)


@pytest.mark.parametrize("option", ["readonly", "translate"])
def test_setattr_stays_in_python_when_an_option_changes_it(shares, option):
    """--readonly (its EROFS row) and --translate-uid (the attr reply
    rewritten): SETATTR is Python's; the stock session's is C's."""
    from daemon.fuse.idtranslate import Ids, Translation
    config, why = ({"readonly": True}, "SETATTR is not the reference") if option == "readonly" else (
        {"ids": Ids(Translation.parse(["map:0:1000:1"]), Translation.parse([]))}, "attr replies are rewritten")
    pair, _fast = _pair(shares, **config)
    try:
        assert why in fastpath.setattr_unsupported(pair[1])
    finally:
        _close(pair)


ALL_BITS = [V.MODE, V.UID, V.GID, V.SIZE, V.ATIME, V.MTIME, V.FH, V.ATIME_NOW, V.MTIME_NOW, V.LOCKOWNER, V.CTIME,
            V.KILL_SUIDGID, 1 << 12, 1 << 31]
COMMON = [V.ATIME | V.MTIME, V.MODE, NOW, V.MODE | V.ATIME | V.MTIME, V.FH | V.ATIME | V.MTIME, V.FH | V.MODE,
          V.UID | V.GID, V.UID, V.GID, V.FH | V.UID | V.GID | V.MODE]
VALID = st.one_of(st.sampled_from(COMMON), st.lists(st.sampled_from(ALL_BITS), max_size=4).map(
    lambda bits: sum(set(bits)) & 0xFFFFFFFF))
TIME = st.tuples(st.sampled_from([0, 1, 1_700_000_000, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]),
                 st.sampled_from([0, 1, 999_999_999, 10**9, 0xFFFFFFFF]))
SETATTR_STEP = st.one_of(
    st.tuples(st.just("setattr"), st.sampled_from(["root", "stale", "unknown", *NAMES]), VALID,
              st.integers(0, 0o177777), TIME, TIME, st.sampled_from(["open", "open", "other", "junk"]),
              st.sampled_from([0, 1, 100]), st.sampled_from([0, 1000]),
              st.sampled_from(["ok", "ok", "ok", "short-out", "extension", "longer", "short-args"])),
    st.tuples(st.just("open"), st.sampled_from(["exists", "ro", "sub/inner"])),
    st.tuples(st.just("chmod"), st.sampled_from(["exists", "ro", "dir"]), st.sampled_from([0o644, 0o444, 0o6755])))


def _run_setattr_steps(pair, fast, shares, steps) -> int:
    pure, _comp = pair
    served = 0
    nodeids: dict[str, int] = {}
    now: set = set()

    def node_of(where: str) -> int:
        return _node_of(pair, fast, shares, nodeids, where, {"root": 1, "stale": 3999, "unknown": 7})

    fhs: dict[int, int] = {}
    for k, step in enumerate(steps):
        kind = step[0]
        if kind == "open":
            node = node_of(step[1])
            if node not in fhs:
                fhs[node] = _opened(pair, fast, shares, node, 200 + k, now_set=now)
        elif not _host_step(pair, shares, step):       # a chmod, else a SETATTR
            _kind, where, valid, mode, atime, mtime, which_fh, size, ids, variant = step
            node = node_of(where)
            fh = {"open": fhs.get(node, 0), "other": next((v for n, v in fhs.items() if n != node), 0),
                  "junk": 12345}[which_fh]
            request = setattr_request(node, 300 + k, valid, mode, atime, mtime, fh, size, ids, ids,
                                      caller=ids, variant=variant)
            wsizes = (16, abi.ATTR_OUT.size - 1) if variant == "short-out" else (16, abi.ATTR_OUT.size)
            served += _sa(pair, fast, shares, request, wsizes, now, "." if where == "root" else where)[0]
            _same(pair, shares)
    return served


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(SETATTR_STEP, min_size=1, max_size=12))
def test_setattrs_are_equivalent(tmp_path_factory, steps):
    """Sequences of SETATTRs (every valid bit alone and together, unknown
    bits; modes with type bits; times at the edges, nanoseconds at and
    above 1e9; the fh of the inode, of another, unknown; sizes; owners; a
    root and another caller; malformed args and short reply room) on
    files, a read-only file, directories, a symlink, a FIFO, the root,
    stale and unknown nodeids, with OPENs and chmods on the host between:
    the same replies, files, times, tables, counters and fd counts."""
    with fresh_pair(tmp_path_factory, "setattrs") as (pair, fast, shares):
        _fix_times(shares)
        _run_setattr_steps(pair, fast, shares, steps)
