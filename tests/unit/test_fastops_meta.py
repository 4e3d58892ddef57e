"""GETXATTR, UNLINK, RMDIR, FLUSH and RENAME served in C (daemon/fuse/_meta.h)
against the Python session, byte for byte.

As in test_fastops_equivalence.py: each request is laid out in readable
buffers cut at arbitrary places and a writable part of arbitrary buffers
pre-filled with a pattern, answered once by ``FuseSession.handle`` alone
(the reference) and once by ``FastOps.serve`` then ``handle`` when it
declines. Before each of the two runs the share's removable entries are
made again, so that UNLINK, RMDIR and RENAME meet the same tree; after each, the
reply bytes, the byte count, the tree (names and types), and this
process's open fds must be equal. With a meter on each path the two
slots must hold the same counters. The tests also check what C serves
and what it must leave to Python.
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.fuse import abi, fastmeta, fastpath, readonly
from daemon.fuse.abi import Opcode
from daemon.metrics import counters
from daemon.virtio.iovec import IoVec
from daemon.virtio.virtqueue import Chain
from tests.unit.fusereq import entry_nodeid, in_header, start_session
from tests.unit.test_fastops_equivalence import _comparable, metered_ops
from tests.unit.test_fastops_equivalence import _run as _session_run

XATTRS = {b"user.small": b"0123456789", b"user.big": bytes(range(200)), b"user.empty": b"",
          b"user.huge": b"h" * 2500, b"user.with/slash": b"s"}
REMOVABLE = ("f1", "f2", "sub", "full", "link")
KEPT = ("x", "d", "gone", "tmpfile")    # the root's own entries (d/ is emptied: a RENAME may make any name)


def _make_tree(root) -> None:
    """d/ with files, an empty and a full directory and a symlink: what
    UNLINK, RMDIR and RENAME may remove or move (made again before every run)."""
    d = root / "d"
    stray = [d / name for name in os.listdir(d)] + [root / name for name in os.listdir(root) if name not in KEPT]
    for p in stray:
        if p.is_symlink() or not p.is_dir():
            p.unlink()
        else:
            shutil.rmtree(p)
    (d / "f1").write_bytes(b"1")
    (d / "f2").write_bytes(b"")
    (d / "sub").mkdir()
    (d / "full").mkdir()
    (d / "full" / "inner").write_bytes(b"")
    (d / "link").symlink_to("f1")
    (root / "tmpfile").write_bytes(b"")


def _tree(root) -> list[tuple[str, str]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            kind = "l" if os.path.islink(p) else "d" if os.path.isdir(p) else "f"
            out.append((os.path.relpath(p, root), kind))
    return sorted(out)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A session on a share with a file carrying xattrs, a directory of
    removable entries, looked-up nodeids (one forgotten again), open fhs
    (one released), and its FastOps."""
    root = tmp_path_factory.mktemp("meta")
    cwd = os.getcwd()
    os.chdir("/proc/self/fd")
    (root / "x").write_bytes(b"x" * 100)
    for name, value in XATTRS.items():
        os.setxattr(root / "x", name, value)
    (root / "d").mkdir()
    (root / "gone").write_bytes(b"")
    _make_tree(root)
    session, client = start_session(root)
    nodeids = {name: entry_nodeid(client.call(Opcode.LOOKUP, 1, name.encode() + b"\0", abi.ENTRY_OUT.size).ok())
               for name in ("x", "d", "gone")}
    session.inodes.unref(nodeids["gone"], 1)
    for name, flags in (("fh", os.O_RDONLY), ("fh-rw", os.O_RDWR), ("fh-released", os.O_RDONLY)):
        out = client.call(Opcode.OPEN, nodeids["x"], abi.OPEN_IN.pack(flags, 0), abi.OPEN_OUT.size).ok()
        nodeids[name] = abi.OPEN_OUT.unpack_from(out)[0]
    client.call(Opcode.RELEASE, nodeids["x"], abi.RELEASE_IN.pack(nodeids["fh-released"], 0, 0, 0), 0).ok()
    fast = fastpath.make(session)
    yield root, session, client, fast, nodeids
    session.close()
    session.inodes.close()
    os.chdir(cwd)


def _run(root, session, fast, request: bytes, rcuts, wsizes, compiled: bool):
    """test_fastops_equivalence's run on a fresh tree: (bytes written, the
    writable bytes, the tree after, fds opened)."""
    _make_tree(root)
    fds = _fds()
    n, out = _session_run(session, fast, request, rcuts, wsizes, compiled)
    return n, out, _tree(root), _fds() - fds


def compare(world, request: bytes, rcuts=(40,), wsizes=(16, 4096), fast=None) -> tuple[int, bool]:
    """(bytes written, whether C served it); asserts both paths agree."""
    root, session, _client, default, _ = world
    fast = fast or default
    pure = _run(root, session, fast, request, list(rcuts), list(wsizes), False)
    before = fast.served
    both = _run(root, session, fast, request, list(rcuts), list(wsizes), True)
    served = fast.served > before
    assert both[:3] == pure[:3]
    # C keeps no fd; Python may close a stale cached one the first time only
    assert both[3] == (0 if served else pure[3]) or (not served and both[3] == 0)
    return pure[0], served


def getxattr_request(nodeid: int, name: bytes, size: int, unique: int = 5) -> bytes:
    args = abi.GETXATTR_IN.pack(size) + name + b"\0"
    return in_header(Opcode.GETXATTR, nodeid, len(args), unique) + args


def name_request(opcode: Opcode, nodeid: int, name: bytes, unique: int = 6) -> bytes:
    return in_header(opcode, nodeid, len(name) + 1, unique) + name + b"\0"


def rename_request(nodeid: int, newdir: int, old: bytes, new: bytes, unique: int = 10) -> bytes:
    args = abi.RENAME_IN.pack(newdir) + old + b"\0" + new + b"\0"
    return in_header(Opcode.RENAME, nodeid, len(args), unique) + args


def flush_request(fh: int, owner: int = 0x77, unique: int = 8) -> bytes:
    args = abi.FLUSH_IN.pack(fh, owner)
    return in_header(Opcode.FLUSH, 1, len(args), unique) + args


def test_the_default_session_serves_all_five_in_c(world):
    _root, session, *_ = world
    assert fastmeta.served(session) == list(fastmeta.OPS)


# -- GETXATTR ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,size,wsizes,expect", [
    (b"user.small", 0, [16, 8], 24),            # the size: fuse_getxattr_out
    (b"user.small", 100, [16, 4096], 26),       # the value
    (b"user.small", 10, [16, 10], 26),          # exactly
    (b"user.small", 9, [16, 4096], 16),         # ERANGE: longer than asked
    (b"user.small", 100, [16, 9], 16),          # ERANGE: longer than the reply part
    (b"user.small", 0, [16, 7], 16),            # ERANGE: no room for fuse_getxattr_out
    (b"user.big", 0, [16, 8], 24),              # past os.getxattr's first 128 bytes
    (b"user.big", 4096, [16, 100, 4000], 216),
    (b"user.huge", 65536, [16, 65536], 2516),
    (b"user.empty", 0, [16, 8], 24),
    (b"user.empty", 10, [16, 10], 16),          # an empty value: the header alone
    (b"user.with/slash", 10, [16, 10], 17),
    (b"security.capability", 0, [16, 8], 16),   # ENODATA: what a guest asks before every write
    (b"user.missing", 100, [16, 100], 16),
    (b"trusted.x", 100, [16, 100], 16),
])
def test_getxattr_is_served_in_c(world, name, size, wsizes, expect):
    nodeids = world[4]
    for nodeid in (nodeids["x"], 1, nodeids["d"]):
        n, in_c = compare(world, getxattr_request(nodeid, name, size), [40, 45], wsizes)
        assert in_c
        if nodeid == nodeids["x"]:
            assert n == expect


def test_getxattr_errors_are_the_host_errno(world):
    """ENODATA for an absent name, ERANGE from the reply checks, in the
    reply header."""
    _root, session, _client, fast, nodeids = world
    for name, size, wsize, err in ((b"security.capability", 0, 8, errno.ENODATA),
                                   (b"user.small", 3, 100, errno.ERANGE)):
        out = bytearray(16 + wsize)
        request = getxattr_request(nodeids["x"], name, size)
        assert fast.serve(Chain(0, IoVec([memoryview(bytearray(request))]), IoVec([memoryview(out)]))) == 16
        assert abi.OUT_HEADER.unpack_from(out) == (16, -err, 5)


@pytest.mark.parametrize("case", ["acl-access", "acl-default", "stale", "unknown", "zero", "no-nul", "two-nuls",
                                  "empty", "long", "short-args", "trailing", "extension", "len"])
def test_getxattr_c_leaves_to_python(world, case):
    nodeids = world[4]
    request = getxattr_request(nodeids["x"], b"user.small", 100)
    if case == "acl-access":
        request = getxattr_request(nodeids["x"], b"system.posix_acl_access", 100)
    elif case == "acl-default":
        request = getxattr_request(nodeids["d"], b"system.posix_acl_default", 0)
    elif case == "stale":
        request = getxattr_request(nodeids["gone"], b"user.small", 100)
    elif case == "unknown":
        request = getxattr_request(4000, b"user.small", 100)
    elif case == "zero":
        request = getxattr_request(0, b"user.small", 100)
    elif case == "no-nul":
        args = abi.GETXATTR_IN.pack(100) + b"user.small"
        request = in_header(Opcode.GETXATTR, nodeids["x"], len(args), 5) + args
    elif case == "two-nuls":
        args = abi.GETXATTR_IN.pack(100) + b"user\0small\0"
        request = in_header(Opcode.GETXATTR, nodeids["x"], len(args), 5) + args
    elif case == "empty":
        request = getxattr_request(nodeids["x"], b"", 100)
    elif case == "long":
        request = getxattr_request(nodeids["x"], b"user." + b"n" * 251, 100)     # 256 bytes: ERANGE
    elif case == "short-args":
        request = in_header(Opcode.GETXATTR, nodeids["x"], 6, 5) + bytes(6)
    elif case == "trailing":
        args = abi.GETXATTR_IN.pack(100) + b"user.small\0xx"
        request = in_header(Opcode.GETXATTR, nodeids["x"], len(args), 5) + args
    elif case == "extension":
        args = abi.GETXATTR_IN.pack(100) + b"user.small\0" + bytes(5) + bytes(8)
        request = in_header(Opcode.GETXATTR, nodeids["x"], len(args), 5, extlen=1) + args
    elif case == "len":
        request = request[:40] + request[40:] + b"\0"
    _n, in_c = compare(world, request)
    assert not in_c


def test_a_255_byte_name_is_served_in_c(world):
    nodeids = world[4]
    n, in_c = compare(world, getxattr_request(nodeids["x"], b"user." + b"n" * 250, 100))
    assert (n, in_c) == (16, True)      # ENODATA


# -- UNLINK and RMDIR --------------------------------------------------------------------------
@pytest.mark.parametrize("opcode,name,err", [
    (Opcode.UNLINK, b"f1", 0), (Opcode.UNLINK, b"link", 0), (Opcode.UNLINK, b"sub", errno.EISDIR),
    (Opcode.UNLINK, b"missing", errno.ENOENT), (Opcode.RMDIR, b"sub", 0), (Opcode.RMDIR, b"full", errno.ENOTEMPTY),
    (Opcode.RMDIR, b"f1", errno.ENOTDIR), (Opcode.RMDIR, b"missing", errno.ENOENT),
    (Opcode.UNLINK, b"n" * 255, errno.ENOENT),
])
def test_unlink_and_rmdir_are_served_in_c(world, opcode, name, err):
    root, session, _client, fast, nodeids = world
    assert compare(world, name_request(opcode, nodeids["d"], name), [40, 41]) == (16, True)
    # and the reply itself, once more on a fresh tree
    _make_tree(root)
    out = bytearray(16)
    assert fast.serve(Chain(0, IoVec([memoryview(bytearray(name_request(opcode, nodeids["d"], name)))]),
                            IoVec([memoryview(out)]))) == 16
    assert abi.OUT_HEADER.unpack_from(out) == (16, -err, 6)
    assert (root / "d" / name.decode()).exists() == bool(err) or err == errno.ENOENT


def test_unlink_in_the_root_is_served_in_c(world):
    assert compare(world, name_request(Opcode.UNLINK, 1, b"tmpfile")) == (16, True)
    assert compare(world, name_request(Opcode.RMDIR, 1, b"tmpfile")) == (16, True)


@pytest.mark.parametrize("name", [b".", b"..", b"a/b", b"/f1", b"", b"n" * 256, b"f1\0x"])
@pytest.mark.parametrize("opcode", [Opcode.UNLINK, Opcode.RMDIR])
def test_bad_names_are_left_to_python(world, opcode, name):
    nodeids = world[4]
    n, in_c = compare(world, name_request(opcode, nodeids["d"], name))
    assert (n, in_c) == (16, False)


@pytest.mark.parametrize("case", ["stale", "unknown", "no-nul", "extension", "file-parent"])
def test_unlink_c_leaves_to_python(world, case):
    nodeids = world[4]
    request = name_request(Opcode.UNLINK, nodeids["d"], b"f1")
    if case == "stale":
        request = name_request(Opcode.UNLINK, nodeids["gone"], b"f1")
    elif case == "unknown":
        request = name_request(Opcode.UNLINK, 77777, b"f1")
    elif case == "no-nul":
        request = in_header(Opcode.UNLINK, nodeids["d"], 2, 6) + b"f1"
    elif case == "extension":
        request = in_header(Opcode.UNLINK, nodeids["d"], 11, 6, extlen=1) + b"f1\0" + bytes(8)
    elif case == "file-parent":     # served: ENOTDIR from the host, the same
        n, in_c = compare(world, name_request(Opcode.UNLINK, nodeids["x"], b"f1"))
        assert (n, in_c) == (16, True)
        return
    _n, in_c = compare(world, request)
    assert not in_c


# -- RENAME ------------------------------------------------------------------------------------
@pytest.mark.parametrize("old,new,err", [
    (b"f1", b"f3", 0), (b"f1", b"f2", 0), (b"sub", b"moved", 0), (b"link", b"moved", 0),
    (b"sub", b"full", errno.ENOTEMPTY), (b"f1", b"sub", errno.EISDIR), (b"sub", b"f1", errno.ENOTDIR),
    (b"missing", b"f3", errno.ENOENT), (b"f1", b"f1", 0), (b"n" * 255, b"f3", errno.ENOENT),
    (b"f1", b"n" * 255, 0),
])
def test_rename_is_served_in_c(world, old, new, err):
    root, _session, _client, fast, nodeids = world
    request = rename_request(nodeids["d"], nodeids["d"], old, new)
    assert compare(world, request, [40, 41, 50]) == (16, True)
    _make_tree(root)
    out = bytearray(16)
    assert fast.serve(Chain(0, IoVec([memoryview(bytearray(request))]), IoVec([memoryview(out)]))) == 16
    assert abi.OUT_HEADER.unpack_from(out) == (16, -err, 10)
    if not err and old != new:
        assert not os.path.lexists(root / "d" / old.decode()) and os.path.lexists(root / "d" / new.decode())


def test_rename_across_directories_is_served_in_c(world):
    root, _session, _client, _fast, nodeids = world
    assert compare(world, rename_request(1, nodeids["d"], b"tmpfile", b"moved")) == (16, True)
    assert compare(world, rename_request(nodeids["d"], nodeids["x"], b"f1", b"f3")) == (16, True)   # ENOTDIR


@pytest.mark.parametrize("args", [
    b".\0f3\0", b"..\0f3\0", b"f1\0.\0", b"f1\0..\0", b"a/b\0f3\0", b"f1\0a/b\0", b"\0f3\0", b"f1\0\0",
    b"f1\0", b"f1\0f3", b"f1\0f3\0x\0", b"n" * 256 + b"\0f3\0", b"f1\0" + b"n" * 256 + b"\0", b"\0\0", b"",
    b"f1",
])
def test_bad_rename_names_are_left_to_python(world, args):
    nodeids = world[4]
    body = abi.RENAME_IN.pack(nodeids["d"]) + args
    n, in_c = compare(world, in_header(Opcode.RENAME, nodeids["d"], len(body), 10) + body)
    assert (n, in_c) == (16, False)


@pytest.mark.parametrize("case", ["stale-old", "stale-new", "unknown-new", "short", "extension"])
def test_rename_c_leaves_to_python(world, case):
    nodeids = world[4]
    d = nodeids["d"]
    request = {
        "stale-old": rename_request(nodeids["gone"], d, b"f1", b"f3"),
        "stale-new": rename_request(d, nodeids["gone"], b"f1", b"f3"),
        "unknown-new": rename_request(d, 77777, b"f1", b"f3"),
        "short": in_header(Opcode.RENAME, d, 4, 10) + bytes(4),
        "extension": in_header(Opcode.RENAME, d, 8 + 6 + 8, 10, extlen=1) + abi.RENAME_IN.pack(d) + b"f1\0f3\0"
        + bytes(8),
    }[case]
    _n, in_c = compare(world, request)
    assert not in_c


# -- FLUSH -------------------------------------------------------------------------------------
def test_flush_is_served_in_c(world):
    nodeids = world[4]
    for fh in ("fh", "fh-rw"):
        assert compare(world, flush_request(nodeids[fh])) == (16, True)


@pytest.mark.parametrize("case", ["released", "unknown", "short", "extension"])
def test_flush_c_leaves_to_python(world, case):
    nodeids = world[4]
    request = flush_request(nodeids["fh"])
    if case == "released":
        request = flush_request(nodeids["fh-released"])
    elif case == "unknown":
        request = flush_request(123456789)
    elif case == "short":
        request = in_header(Opcode.FLUSH, 1, 16, 8) + bytes(16)
    elif case == "extension":
        request = in_header(Opcode.FLUSH, 1, 32, 8, extlen=1) + abi.FLUSH_IN.pack(nodeids["fh"], 1) + bytes(8)
    n, in_c = compare(world, request)
    assert (n, in_c) == (16, False)


def test_flush_with_a_lock_description_is_left_to_python(world):
    """A POSIX lock of the owner: Python's FLUSH releases it; C must not
    answer. Another owner's FLUSH (of the same file, while that lock is
    held) has nothing to release: C's, and the lock stays; but not when
    this worker's own dict has an entry of that owner."""
    _root, session, client, fast, nodeids = world
    fh = nodeids["fh-rw"]
    lk = abi.LK_IN.pack(fh, 0x99, 0, 10, 1, 0, 0)       # F_WRLCK on bytes 0-10, owner 0x99
    client.call(Opcode.SETLK, nodeids["x"], lk, 0).ok()
    files = session.handles.files
    assert files.find_lock(nodeids["x"], 0x99)

    def c_flush(owner: int) -> int:
        out = bytearray(16)
        return fast.serve(Chain(0, IoVec([memoryview(bytearray(flush_request(fh, owner)))]), IoVec([memoryview(out)])))

    before = fast.served
    assert c_flush(0x98) == 16 and fast.served == before + 1
    assert files.find_lock(nodeids["x"], 0x99)          # not the 0x98 FLUSH's to drop
    session.handles._locks[(nodeids["x"], 0x98)] = (0, -1)     # a stale entry of 0x98: Python's look
    try:
        assert c_flush(0x98) == -1 and fast.served == before + 1
        client.call(Opcode.FLUSH, 1, abi.FLUSH_IN.pack(fh, 0x98), 0).ok()
    finally:
        del session.handles._locks[(nodeids["x"], 0x98)]
    assert c_flush(0x99) == -1 and fast.served == before + 1
    client.call(Opcode.FLUSH, 1, abi.FLUSH_IN.pack(fh, 0x99), 0).ok()
    assert not files.find_lock(nodeids["x"], 0x99)
    assert compare(world, flush_request(fh, 0x99)) == (16, True)


def test_flush_out_of_fds_is_still_an_empty_reply(world):
    """EMFILE from the dup: Python ignores it (the guest's close must not
    fail), and so does C."""
    import resource
    _root, _session, _client, fast, nodeids = world
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fill = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (_fds() + 40, hard))
        while True:
            try:
                fill.append(os.open("/", os.O_PATH | os.O_CLOEXEC))
            except OSError:
                break
        out = bytearray(16)
        before = fast.served
        n = fast.serve(Chain(0, IoVec([memoryview(bytearray(flush_request(nodeids["fh"])))]), IoVec([memoryview(out)])))
        assert (n, fast.served, abi.OUT_HEADER.unpack_from(out)) == (16, before + 1, (16, 0, 8))
    finally:
        for fd in fill:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- configurations that keep them in Python ---------------------------------------------------
@pytest.mark.parametrize("config,python", [
    ({"xattr": False}, {Opcode.GETXATTR}),
    ({"security_label": True}, {Opcode.GETXATTR}),
    ({"readonly": True}, {Opcode.UNLINK, Opcode.RMDIR, Opcode.RENAME}),
])
def test_options_that_change_an_answer_keep_the_op_in_python(tmp_path, config, python):
    cwd = os.getcwd()
    os.chdir("/proc/self/fd")
    session, _client = start_session(tmp_path, **config)
    try:
        assert set(fastmeta.OPS) - set(fastmeta.served(session)) == python
        fast = fastpath.make(session)
        for op in python:
            args = abi.GETXATTR_IN.pack(0) + b"user.a\0" if op == Opcode.GETXATTR \
                else abi.RENAME_IN.pack(1) + b"a\0b\0" if op == Opcode.RENAME else b"user.a\0"
            request = in_header(op, 1, len(args), 3) + args
            out = bytearray(64)
            assert fast.serve(Chain(0, IoVec([memoryview(bytearray(request))]), IoVec([memoryview(out)]))) == -1
    finally:
        session.close()
        session.inodes.close()
        os.chdir(cwd)


def test_xattrmap_keeps_getxattr_in_python(tmp_path):
    from daemon.fuse.xattrmap import XattrMap
    cwd = os.getcwd()
    os.chdir("/proc/self/fd")
    session, _client = start_session(tmp_path, xattrmap=XattrMap.parse(":prefix:all:user.virtiofs.::"))
    try:
        assert fastmeta.why_not(session, Opcode.GETXATTR) == "--xattrmap"
        assert Opcode.UNLINK in fastmeta.served(session)
    finally:
        session.close()
        session.inodes.close()
        os.chdir(cwd)


def test_readonly_rows_are_not_the_reference(world):
    _root, session, *_ = world
    ops = dict(session._ops)
    readonly.restrict(ops)
    assert ops[int(Opcode.UNLINK)] is not session._ops[int(Opcode.UNLINK)]


# -- with a meter: the same counters -----------------------------------------------------------
@pytest.fixture(scope="module")
def metered(world):
    return metered_ops(world[1])


def compare_metered(world, metered, request: bytes, rcuts=(40,), wsizes=(16, 4096)) -> tuple[int, bool]:
    root, session, _client, _fast, _ = world
    fast, (pure_meter, c_meter) = metered
    try:
        session.meter = pure_meter
        pure = _run(root, session, fast, request, list(rcuts), list(wsizes), False)
        session.meter = c_meter
        before = fast.served
        both = _run(root, session, fast, request, list(rcuts), list(wsizes), True)
    finally:
        session.meter = None
    assert both == pure
    assert _comparable(c_meter.words) == _comparable(pure_meter.words)
    return pure[0], fast.served > before


@pytest.mark.parametrize("opcode,make,err", [
    (Opcode.GETXATTR, lambda n: getxattr_request(n["x"], b"user.small", 100), 0),
    (Opcode.GETXATTR, lambda n: getxattr_request(n["x"], b"security.capability", 0), errno.ENODATA),
    (Opcode.UNLINK, lambda n: name_request(Opcode.UNLINK, n["d"], b"f2"), 0),
    (Opcode.UNLINK, lambda n: name_request(Opcode.UNLINK, n["d"], b"nope"), errno.ENOENT),
    (Opcode.RMDIR, lambda n: name_request(Opcode.RMDIR, n["d"], b"full"), errno.ENOTEMPTY),
    (Opcode.FLUSH, lambda n: flush_request(n["fh"]), 0),
    (Opcode.RENAME, lambda n: rename_request(n["d"], n["d"], b"f1", b"f3"), 0),
    (Opcode.RENAME, lambda n: rename_request(n["d"], n["d"], b"sub", b"full"), errno.ENOTEMPTY),
])
def test_c_counts_as_python_does(world, metered, opcode, make, err):
    nodeids = world[4]
    _fast, (_, c_meter) = metered
    base = counters.OPS + int(opcode) * counters.OP_WORDS
    errors = counters.ERRORS + int(opcode) * counters.ERRNO_SLOTS + err
    requests, failed = c_meter.words[base + counters.OP_REQUESTS], c_meter.words[errors]
    assert compare_metered(world, metered, make(nodeids))[1]
    assert c_meter.words[base + counters.OP_REQUESTS] == requests + 1
    if err:
        assert c_meter.words[errors] == failed + 1


def test_a_bad_meta_layout_is_refused(world, metered):
    fast, _meters = metered
    with pytest.raises(ValueError):
        fast.enable_meta(0x1F, 6, ((10 ** 9, 0, 0, 0),) * 5)
    with pytest.raises(ValueError):
        fast.enable_meta(1 << 5, 6, None)
    with pytest.raises(TypeError):
        fast.enable_meta(0x1F, 6, ((0, 0, 0, 0),) * 4)      # one op's words missing
    with pytest.raises(TypeError):
        fast.enable_meta(0x1F, 6, None)      # a meter needs its words


# -- properties ---------------------------------------------------------------------------------
NAMES = [b"f1", b"f2", b"sub", b"full", b"link", b"missing", b".", b"..", b"a/b", b"", b"n" * 255, b"n" * 256,
         b"user.small", b"user.big", b"user.huge", b"security.capability", b"system.posix_acl_access"]
NODES = ["root", "x", "d", "gone", "unknown", "zero"]


def _nodeid(nodeids, which: str) -> int:
    fixed = {"root": 1, "unknown": 4000, "zero": 0}
    return fixed[which] if which in fixed else nodeids[which]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opcode=st.sampled_from([Opcode.GETXATTR, Opcode.UNLINK, Opcode.RMDIR, Opcode.FLUSH]),
       node=st.sampled_from(NODES), name=st.sampled_from(NAMES), size=st.sampled_from([0, 1, 10, 128, 200, 65536]),
       fh=st.sampled_from(["fh", "fh-rw", "fh-released", "none"]), trailing=st.binary(max_size=3),
       no_nul=st.booleans(), lendelta=st.sampled_from([0, 0, 0, -1, 1]), extlen=st.sampled_from([0, 0, 1]),
       rcuts=st.lists(st.integers(0, 400), max_size=4),
       wsizes=st.lists(st.integers(0, 6000), min_size=1, max_size=4), unique=st.integers(0, (1 << 64) - 1))
def test_requests_are_equivalent(world, opcode, node, name, size, fh, trailing, no_nul, lendelta, extlen, rcuts,
                                 wsizes, unique):
    nodeids = world[4]
    if opcode == Opcode.FLUSH:
        args = abi.FLUSH_IN.pack(nodeids.get(fh, 99), 0x42) + trailing
    else:
        prefix = abi.GETXATTR_IN.pack(size) if opcode == Opcode.GETXATTR else b""
        args = prefix + name + (b"" if no_nul else b"\0") + trailing
    args += bytes(8 * extlen)
    header = abi.IN_HEADER.pack(40 + len(args) + lendelta, opcode, unique, _nodeid(nodeids, node), 0, 0, 0, extlen, 0)
    compare(world, header + args, rcuts, wsizes)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opcode=st.sampled_from([Opcode.GETXATTR, Opcode.UNLINK, Opcode.RMDIR, Opcode.FLUSH, Opcode.RENAME]),
       node=st.sampled_from(NODES), data=st.binary(max_size=300), rcuts=st.lists(st.integers(0, 400), max_size=3),
       wsizes=st.lists(st.integers(0, 300), min_size=1, max_size=3))
def test_random_args_are_equivalent(world, opcode, node, data, rcuts, wsizes):
    nodeids = world[4]
    header = in_header(opcode, _nodeid(nodeids, node), len(data), 9)
    compare(world, header + data, rcuts, wsizes)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(node=st.sampled_from(NODES), newdir=st.sampled_from(NODES), old=st.sampled_from(NAMES[:12]),
       new=st.sampled_from(NAMES[:12] + [b"f3", b"moved"]), trailing=st.sampled_from([b"", b"\0", b"x", b"x\0"]),
       no_nul=st.booleans(), lendelta=st.sampled_from([0, 0, 0, -1, 1]), extlen=st.sampled_from([0, 0, 1]),
       rcuts=st.lists(st.integers(0, 600), max_size=4),
       wsizes=st.lists(st.integers(0, 100), min_size=1, max_size=3), unique=st.integers(0, (1 << 64) - 1))
def test_renames_are_equivalent(world, node, newdir, old, new, trailing, no_nul, lendelta, extlen, rcuts, wsizes,
                                unique):
    nodeids = world[4]
    args = abi.RENAME_IN.pack(_nodeid(nodeids, newdir)) + old + b"\0" + new + (b"" if no_nul else b"\0") + trailing
    args += bytes(8 * extlen)
    header = abi.IN_HEADER.pack(40 + len(args) + lendelta, Opcode.RENAME, unique, _nodeid(nodeids, node), 0, 0, 0,
                                extlen, 0)
    compare(world, header + args, rcuts, wsizes)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opcode=st.sampled_from([Opcode.GETXATTR, Opcode.UNLINK, Opcode.RMDIR, Opcode.FLUSH, Opcode.RENAME]),
       name=st.sampled_from(NAMES[:8] + NAMES[12:16]), err=st.booleans(),
       rcuts=st.lists(st.integers(0, 300), max_size=3))
def test_metered_requests_count_the_same(world, metered, opcode, name, err, rcuts):
    nodeids = world[4]
    if opcode == Opcode.FLUSH:
        request = flush_request(nodeids["fh-released" if err else "fh"])
    elif opcode == Opcode.GETXATTR:
        request = getxattr_request(nodeids["gone" if err else "x"], name, 100)
    elif opcode == Opcode.RENAME:
        request = rename_request(nodeids["d"], nodeids["d"], name, b"sub" if err else b"moved")
    else:
        request = name_request(opcode, nodeids["d"], name)
    compare_metered(world, metered, request, rcuts)


# -- the batch loop (stage 3): a ring of them, against the pure loop ------------------------
def _ring_run(share, requests, compiled: bool):
    """One WorkerLoop._serve over a ring of ``requests`` (made by a
    function of the nodeids) on a fresh share: the replies in ring order,
    what C served, and the tree after."""
    from daemon.config import Config
    from daemon.fuse.inodes import InodeTable
    from daemon.fuse.session import FuseSession
    from daemon.virtio.compiled import VirtQueue
    from daemon.virtio.memory import GuestMemory as DaemonMemory
    from daemon.workers.loop import WorkerLoop
    from tests.frontend.guestmem import GuestMemory as FrontMemory
    from tests.frontend.vring import VRing

    class NoChannel:
        def fileno(self):
            return -1

    if share.exists():
        shutil.rmtree(share)
    share.mkdir()
    (share / "x").write_bytes(b"x")
    os.setxattr(share / "x", b"user.small", b"0123456789")
    (share / "d").mkdir()
    _make_tree(share)
    fmem = FrontMemory(16 << 20)
    vr = VRing(fmem, 1, 64)
    dmem = DaemonMemory.from_regions([(r.gpa, r.size, r.qva, r.mmap_offset) for r in fmem.regions],
                                     [os.dup(r.fd) for r in fmem.regions])
    session = FuseSession(Config(shared_dir=str(share), sandbox="none", seccomp="none"), InodeTable(1 << 10),
                          "request")
    loop = WorkerLoop(NoChannel(), session, (1,))
    if not compiled:
        loop.use_fast_ops(None)
    ring = loop.rings[1]
    ring.num = vr.num
    ring.queue = VirtQueue(dmem, vr.num, fmem.qva(vr.desc_gpa), fmem.qva(vr.avail_gpa), fmem.qva(vr.used_gpa), 0,
                           False)
    ring.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    unique = [0]
    cwd = os.getcwd()
    os.chdir("/proc/self/fd")   # a request worker's cwd (xattrs and reopening use it)

    def call(opcode, nodeid, args, out):
        unique[0] += 2
        vr.submit([abi.IN_HEADER.pack(40 + len(args), opcode, unique[0], nodeid, 0, 0, 1, 0, 0), args], [16] + out)
        loop._serve(ring)
        head = vr.harvest()[0]
        data = vr.read_writable(head)
        vr.free(head)
        return data

    try:
        call(Opcode.INIT, 0, abi.INIT_IN.pack(7, 38, 1 << 20, 0x7FFFFFFF, 0), [abi.INIT_OUT.size])
        ids = {n: int.from_bytes(call(Opcode.LOOKUP, 1, n.encode() + b"\0", [abi.ENTRY_OUT.size])[16:24], "little")
               for n in ("x", "d")}
        opened = call(Opcode.OPEN, ids["x"], abi.OPEN_IN.pack(os.O_RDWR, 0), [abi.OPEN_OUT.size])
        assert abi.OUT_HEADER.unpack_from(opened)[1] == 0
        ids["fh"] = int.from_bytes(opened[16:24], "little")
        before = loop._fast.served if loop._fast is not None else 0
        heads = [vr.submit(*r(ids)) for r in requests]
        loop._serve(ring)
        done = vr.harvest()
        assert sorted(done) == sorted(heads)
        replies = [vr.read_writable(h) for h in heads]
        served = (loop._fast.served if loop._fast is not None else 0) - before
        return replies, served, _tree(share)
    finally:
        os.chdir(cwd)
        session.close()
        session.inodes.close()
        ring.queue.release()
        dmem.close()
        vr.close()
        fmem.close()
        os.close(ring.call_fd)
        loop._epoll.close()


def _req(opcode, nodeid_of, args, out):
    return lambda ids: ([abi.IN_HEADER.pack(40 + len(args(ids)), opcode, 77, nodeid_of(ids), 0, 0, 1, 0, 0),
                         args(ids)], [16] + out)


def test_a_ring_of_them_in_the_batch_loop(tmp_path, monkeypatch):
    """Stage 3 (the default loop): GETXATTRs, UNLINKs, RMDIRs, FLUSHes, RENAMEs C
    serves, one LOOKUP of ".." it declines in the middle (Python pops it)
    and the rest after it: the same replies and tree as the pure loop,
    and C served all but the declined one."""
    monkeypatch.delenv("PYVIRTIOFSD_FASTOPS", raising=False)
    from daemon.virtio import compiled
    # PYVIRTIOFSD_PURE=1: no compiled ops in the loop, both runs are the pure one
    in_c = 9 if compiled.VirtQueue is compiled.CompiledVirtQueue else 0
    requests = [
        _req(Opcode.GETXATTR, lambda i: i["x"], lambda i: abi.GETXATTR_IN.pack(0) + b"security.capability\0", [8]),
        _req(Opcode.GETXATTR, lambda i: i["x"], lambda i: abi.GETXATTR_IN.pack(100) + b"user.small\0", [100]),
        _req(Opcode.UNLINK, lambda i: i["d"], lambda i: b"f1\0", []),
        _req(Opcode.UNLINK, lambda i: i["d"], lambda i: b"f1\0", []),
        _req(Opcode.LOOKUP, lambda i: i["d"], lambda i: b"a/b\0", [abi.ENTRY_OUT.size]),
        _req(Opcode.RMDIR, lambda i: i["d"], lambda i: b"sub\0", []),
        _req(Opcode.RMDIR, lambda i: i["d"], lambda i: b"full\0", []),
        _req(Opcode.FLUSH, lambda i: 1, lambda i: abi.FLUSH_IN.pack(i["fh"], 3), []),
        _req(Opcode.RENAME, lambda i: i["d"], lambda i: abi.RENAME_IN.pack(i["d"]) + b"f2\0f3\0", []),
        _req(Opcode.RENAME, lambda i: i["d"], lambda i: abi.RENAME_IN.pack(i["d"]) + b"f2\0f3\0", []),
    ]
    pure = _ring_run(tmp_path / "pure", requests, False)
    c = _ring_run(tmp_path / "c", requests, True)
    assert c[0] == pure[0] and c[2] == pure[2]
    assert (pure[1], c[1]) == (0, in_c)
    errors = [abi.OUT_HEADER.unpack_from(r)[1] for r in c[0]]
    assert errors == [-errno.ENODATA, 0, 0, -errno.ENOENT, -errno.EINVAL, 0, -errno.ENOTEMPTY, 0, 0, -errno.ENOENT]
