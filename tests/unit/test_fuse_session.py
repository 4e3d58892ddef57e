"""FuseSession end to end on a temp dir: requests built as bytes, run
through ``FuseSession.handle`` over IoVecs, replies decoded from the bytes
the session wrote. Session core, entry ops and attribute ops."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import fds
from daemon.config import CacheMode, Config
from daemon.fuse import abi, credentials
from daemon.fuse.abi import InitFlag, Opcode, SetattrValid
from daemon.fuse.inodes import InodeTable
from daemon.fuse.request import DEFERRED, FUSEError
from daemon.fuse.session import FuseSession
from daemon.virtio.iovec import IoVec
from tests.procfs import fd_count
from tests.procfs import settled_fd_count as procfs_settled_fd_count
from tests.unit.fusereq import FuseClient, chain, entry_attr, entry_nodeid, in_header, parse_reply

NUL = b"\0"
LINUX_FLAGS = 0x7BFFFFFB
LINUX_FLAGS2 = 0xB


def init_args(major=7, minor=38, flags=LINUX_FLAGS, flags2=LINUX_FLAGS2) -> bytes:
    return abi.INIT_IN.pack(major, minor, 131072, flags, flags2)


@pytest.fixture
def proc_cwd():
    """Workers run with cwd /proc/self/fd and umask 0 (INTERNALS)."""
    old_cwd = os.getcwd()
    old_umask = os.umask(0)
    os.chdir("/proc/self/fd")
    yield
    os.chdir(old_cwd)
    os.umask(old_umask)
    credentials.restore()


def make_session(share, cache=CacheMode.AUTO, capacity=256, role="request", **options):
    table = InodeTable(capacity)
    fs = FuseSession(Config(shared_dir=str(share), cache=cache, **options), table, role)
    return fs, table


@pytest.fixture
def env(tmp_path, proc_cwd):
    share = tmp_path / "share"
    share.mkdir()
    fs, table = make_session(share)
    client = FuseClient(fs)
    client.call(Opcode.INIT, 0, init_args(), 64).ok()
    yield fs, client, share
    fs.close()
    table.close()


def raw(fs, request: bytes, out_size: int = 4096, split=()):
    """Run raw request bytes; (return value of handle, reply bytes)."""
    readable, writable, out = chain(request, out_size, split)
    n = fs.handle(readable, writable, "tok")
    return n, out


def lookup(client, parent, name):
    return client.call(Opcode.LOOKUP, parent, os.fsencode(name) + NUL, 128)


def mkdir(client, parent, name, mode=0o755):
    return client.call(Opcode.MKDIR, parent, abi.MKDIR_IN.pack(mode, 0) + name + NUL, 128)


def getattr_(client, nodeid):
    return client.call(Opcode.GETATTR, nodeid, abi.GETATTR_IN.pack(0, 0, 0), 104)


def attr_of(payload: bytes) -> tuple:
    return abi.ATTR_OUT.unpack(payload)[3:]


# -- INIT ------------------------------------------------------------------------------------
def test_init_negotiation(env):
    fs, client, _ = env
    out = abi.INIT_OUT.unpack(client.call(Opcode.INIT, 0, init_args(), 64).ok())
    major, minor, readahead, flags, max_bg, congestion, max_write, time_gran, max_pages, \
        map_alignment, flags2 = out
    assert (major, minor, readahead) == (7, 38, 131072)
    expected = (InitFlag.ASYNC_READ | InitFlag.ATOMIC_O_TRUNC | InitFlag.BIG_WRITES
                | InitFlag.AUTO_INVAL_DATA | InitFlag.PARALLEL_DIROPS | InitFlag.MAX_PAGES
                | InitFlag.INIT_EXT)
    assert flags & expected == expected
    allowed = expected | InitFlag.DO_READDIRPLUS | InitFlag.READDIRPLUS_AUTO \
        | InitFlag.POSIX_LOCKS | InitFlag.FLOCK_LOCKS
    assert flags & ~allowed == 0
    assert flags2 == 0  # never SECURITY_CTX or HAS_INODE_DAX
    assert (max_write, time_gran, max_pages, map_alignment) == (1 << 20, 1, 256, 0)
    assert 0 < congestion <= max_bg


@pytest.mark.parametrize("cache, readdirplus, offered", [
    (CacheMode.AUTO, None, True), (CacheMode.ALWAYS, None, True), (CacheMode.NEVER, None, False),
    (CacheMode.NEVER, True, True), (CacheMode.AUTO, False, False),
])
def test_init_offers_readdirplus_unless_cache_never(tmp_path, proc_cwd, cache, readdirplus, offered):
    """With cache=never the guest drops READDIRPLUS's attributes at once
    (zero timeouts), so by default it is not offered; --readdirplus and
    --no-readdirplus override."""
    fs, table = make_session(tmp_path, cache, readdirplus=readdirplus)
    try:
        flags = abi.INIT_OUT.unpack(FuseClient(fs).call(Opcode.INIT, 0, init_args(), 64).ok())[3]
        plus = InitFlag.DO_READDIRPLUS | InitFlag.READDIRPLUS_AUTO
        assert flags & plus == (plus if offered else 0)
    finally:
        fs.close()
        table.close()


@pytest.mark.parametrize("writeback", [False, True])
def test_init_offers_writeback_only_when_configured(tmp_path, proc_cwd, writeback):
    fs, table = make_session(tmp_path, CacheMode.AUTO, writeback=writeback)
    try:
        flags = abi.INIT_OUT.unpack(FuseClient(fs).call(Opcode.INIT, 0, init_args(), 64).ok())[3]
        assert bool(flags & InitFlag.WRITEBACK_CACHE) == writeback
        # never offered to a guest that did not offer it
        offered = int(InitFlag.ASYNC_READ)
        out = abi.INIT_OUT.unpack(FuseClient(fs).call(Opcode.INIT, 0, init_args(flags=offered), 64).ok())
        assert out[3] & InitFlag.WRITEBACK_CACHE == 0
    finally:
        fs.close()
        table.close()


@pytest.fixture
def tmpfs_at():
    """tmpfs_at(path): a small tmpfs mounted on the new directory ``path``
    (another file system inside the share), unmounted afterwards."""
    mounted = []

    def mount(path):
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "vfsd-test", str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("announce", [False, True])
def test_announce_submounts_marks_directories_of_another_file_system(tmp_path, proc_cwd, tmpfs_at,
                                                                    announce):
    share = tmp_path / "share"
    share.mkdir()
    (tmpfs_at(share / "sub") / "inner").mkdir()
    (share / "plain").mkdir()
    (share / "file").write_bytes(b"")
    fs, table = make_session(share, announce_submounts=announce)
    try:
        client = FuseClient(fs)
        flags = abi.INIT_OUT.unpack(client.call(Opcode.INIT, 0, init_args(), 64).ok())[3]
        assert bool(flags & InitFlag.SUBMOUNTS) == announce

        def lookup(parent, name):
            payload = client.call(Opcode.LOOKUP, parent, os.fsencode(name) + b"\0", 128).ok()
            return entry_nodeid(payload), abi.ENTRY_OUT.unpack(payload)[-1]  # fuse_attr.flags

        sub, sub_flags = lookup(1, "sub")
        assert sub_flags == (abi.FUSE_ATTR_SUBMOUNT if announce else 0)
        assert lookup(1, "plain")[1] == 0 and lookup(1, "file")[1] == 0
        assert lookup(sub, "inner")[1] == 0  # the same file system as its parent
        assert lookup(sub, ".")[1] == 0
    finally:
        fs.close()
        table.close()


@pytest.mark.parametrize("posix_lock,flock", [(True, True), (False, True), (True, False), (False, False)])
def test_init_offers_each_lock_kind_as_configured(tmp_path, proc_cwd, posix_lock, flock):
    fs, table = make_session(tmp_path, posix_lock=posix_lock, flock=flock)
    try:
        flags = abi.INIT_OUT.unpack(FuseClient(fs).call(Opcode.INIT, 0, init_args(), 64).ok())[3]
        assert bool(flags & InitFlag.POSIX_LOCKS) == posix_lock
        assert bool(flags & InitFlag.FLOCK_LOCKS) == flock
    finally:
        fs.close()
        table.close()


def test_init_only_echoes_offered_flags(env):
    _, client, _ = env
    offered = int(InitFlag.ASYNC_READ | InitFlag.BIG_WRITES)
    out = abi.INIT_OUT.unpack(client.call(Opcode.INIT, 0, init_args(flags=offered), 64).ok())
    assert out[3] == offered and out[10] == 0


def test_init_versions(env):
    _, client, _ = env
    assert client.call(Opcode.INIT, 0, init_args(minor=26), 64).error == errno.EPROTO
    assert client.call(Opcode.INIT, 0, init_args(major=6), 64).error == errno.EPROTO
    out = abi.INIT_OUT.unpack(client.call(Opcode.INIT, 0, init_args(major=8), 64).ok())
    assert out[:2] == (7, 38) and out[3] == 0
    out = abi.INIT_OUT.unpack(client.call(Opcode.INIT, 0, init_args(minor=31), 64).ok())
    assert out[1] == 31
    # pre-7.36 kernels send the 16-byte form
    compat = abi.INIT_IN_COMPAT.pack(7, 35, 65536, LINUX_FLAGS)
    out = abi.INIT_OUT.unpack(client.call(Opcode.INIT, 0, compat, 64).ok())
    assert out[1] == 35 and out[2] == 65536
    assert client.call(Opcode.INIT, 0, b"\7\0\0\0", 64).error == errno.EINVAL


def test_requests_before_init_are_eio(tmp_path, proc_cwd):
    fs, table = make_session(tmp_path)
    client = FuseClient(fs)
    try:
        assert getattr_(client, 1).error == errno.EIO
        assert client.call(Opcode.INIT, 0, init_args(), 64).error == 0
        assert getattr_(client, 1).error == 0
    finally:
        fs.close()
        table.close()


def test_request_workers_share_one_session(tmp_path, proc_cwd):
    """INIT arrives on one request queue only; a second request worker
    (another session object on the same shared table) serves the nodeids it
    handed out, and DESTROY on either ends the session for both."""
    (tmp_path / "f").write_bytes(b"x")
    table = InodeTable(256)
    config = Config(shared_dir=str(tmp_path), file_handles=True)
    first, second = FuseSession(config, table), FuseSession(config, table)
    a, b = FuseClient(first), FuseClient(second)
    try:
        assert getattr_(b, 1).error == errno.EIO
        a.call(Opcode.INIT, 0, init_args(), 64).ok()
        nodeid = entry_nodeid(lookup(a, 1, "f").ok())
        assert getattr_(b, nodeid).error == 0
        assert b.call(Opcode.DESTROY, 0, b"", 0).error == 0
        assert getattr_(a, 1).error == errno.EIO
        a.call(Opcode.INIT, 0, init_args(), 64).ok()
        assert getattr_(b, nodeid).error in (errno.ESTALE, errno.ENOENT)
        assert getattr_(b, 1).error == 0
    finally:
        first.close()
        second.close()
        table.close()


def test_without_file_handles_another_workers_nodeid_is_stale(tmp_path, proc_cwd):
    """--inode-file-handles=never (the default): a worker holds only the
    O_PATH fds it opened itself, so a nodeid another worker handed out is
    ESTALE to it (Linux 6.1 uses a single request queue)."""
    (tmp_path / "f").write_bytes(b"x")
    first, table = make_session(tmp_path)
    second = FuseSession(Config(shared_dir=str(tmp_path)), table)
    a, b = FuseClient(first), FuseClient(second)
    try:
        a.call(Opcode.INIT, 0, init_args(), 64).ok()
        nodeid = entry_nodeid(lookup(a, 1, "f").ok())
        assert getattr_(b, nodeid).error == errno.ESTALE
        assert getattr_(b, 1).error == 0
        assert getattr_(a, nodeid).error == 0
    finally:
        first.close()
        second.close()
        table.close()


def test_init_starts_a_new_session(env):
    fs, client, share = env
    (share / "f").write_bytes(b"")
    nodeid = entry_nodeid(lookup(client, 1, "f").ok())
    fds = len(fs.cache)
    client.call(Opcode.INIT, 0, init_args(), 64).ok()
    assert len(fs.cache) == 0 and fds == 1
    assert getattr_(client, nodeid).error == errno.ESTALE
    assert entry_nodeid(lookup(client, 1, "f").ok()) >= 2


def test_destroy_ends_the_session(env):
    fs, client, share = env
    (share / "f").write_bytes(b"")
    lookup(client, 1, "f").ok()
    reply = client.call(Opcode.DESTROY, 0, b"", 0)
    assert reply.error == 0 and reply.payload == b""
    assert len(fs.cache) == 0 and len(fs.inodes) == 0
    assert getattr_(client, 1).error == errno.EIO
    client.call(Opcode.INIT, 0, init_args(), 64).ok()
    assert getattr_(client, 1).error == 0


# -- framing ------------------------------------------------------------------------------------
def test_unknown_and_unimplemented_opcodes_are_enosys(env):
    _, client, _ = env
    for opcode in (99, 4096, Opcode.IOCTL, Opcode.SETUPMAPPING, Opcode.BMAP, Opcode.POLL):
        assert client.call(opcode, 1, b"", 64).error == errno.ENOSYS


def test_short_header_is_einval(env):
    fs, _, _ = env
    n, out = raw(fs, bytes(39))
    assert n == 16
    assert abi.OUT_HEADER.unpack_from(out) == (16, -errno.EINVAL, 0)


@pytest.mark.parametrize("delta", [-1, 1, 1000])
def test_header_len_must_match_readable_size(env, delta):
    fs, _, _ = env
    body = abi.GETATTR_IN.pack(0, 0, 0)
    request = bytearray(in_header(Opcode.GETATTR, 1, len(body), 77) + body)
    request[0:4] = (len(request) + delta).to_bytes(4, "little")
    n, out = raw(fs, bytes(request))
    assert n == 16 and abi.OUT_HEADER.unpack_from(out) == (16, -errno.EINVAL, 77)


def test_request_split_anywhere(env):
    fs, _, _ = env
    body = abi.GETATTR_IN.pack(0, 0, 0)
    request = in_header(Opcode.GETATTR, 1, len(body), 9) + body
    n, out = raw(fs, request, 104, split=tuple(range(1, len(request))))
    assert n == 16 + 104
    reply = parse_reply(out, 9)
    assert reply.error == 0 and len(reply.payload) == 104


def test_scattered_writable_part(env):
    fs, _, _ = env
    body = abi.GETATTR_IN.pack(0, 0, 0)
    request = in_header(Opcode.GETATTR, 1, len(body), 9) + body
    buf = bytearray(200)
    view = memoryview(buf)
    writable = IoVec([view[0:3], view[3:50], view[50:51], view[51:200]])
    readable = IoVec([memoryview(bytearray(request))])
    assert fs.handle(readable, writable, None) == 120
    assert abi.OUT_HEADER.unpack_from(buf) == (120, 0, 9)


def test_no_writable_part_means_no_reply_and_no_effect(env):
    fs, _, share = env
    body = abi.MKDIR_IN.pack(0o755, 0) + b"d" + NUL
    request = in_header(Opcode.MKDIR, 1, len(body), 5) + body
    readable = IoVec([memoryview(bytearray(request))])
    assert fs.handle(readable, IoVec([]), None) == 0
    assert not (share / "d").exists()


def test_reply_room_checked_before_the_op(env):
    fs, client, share = env
    (share / "f").write_bytes(b"")
    assert client.call(Opcode.LOOKUP, 1, b"f\0", 100).error == errno.EIO
    assert len(fs.inodes) == 0  # no lookup count was taken
    assert client.call(Opcode.MKDIR, 1, abi.MKDIR_IN.pack(0o755, 0) + b"d\0", 64).error == errno.EIO
    assert not (share / "d").exists()


def test_oversized_args_are_einval(env):
    _, client, _ = env
    assert client.call(Opcode.LOOKUP, 1, b"a" * (1 << 17) + NUL, 128).error == errno.EINVAL


def test_request_extension_is_stripped(env):
    fs, _, share = env
    (share / "f").write_bytes(b"")
    body = b"f\0" + bytes(8)
    request = bytearray(in_header(Opcode.LOOKUP, 1, len(body), 3) + body)
    request[36:38] = (1).to_bytes(2, "little")  # total_extlen: 8 bytes
    n, out = raw(fs, bytes(request), 128)
    assert parse_reply(out, 3).error == 0


def test_handler_bug_is_eio(env, monkeypatch):
    fs, client, _ = env

    def broken(fs_, req):
        raise KeyError("bug")

    monkeypatch.setitem(fs._ops, int(Opcode.STATFS), broken)
    assert client.call(Opcode.STATFS, 1, b"", 80).error == errno.EIO
    monkeypatch.setitem(fs._ops, int(Opcode.STATFS), lambda fs_, req: bytes(5000))
    assert client.call(Opcode.STATFS, 1, b"", 80).error == errno.EIO  # does not fit


def test_hiprio_role(tmp_path, proc_cwd):
    fs_req, table = make_session(tmp_path)
    hiprio = FuseSession(Config(shared_dir=str(tmp_path)), table, "hiprio")
    try:
        client = FuseClient(fs_req)
        client.call(Opcode.INIT, 0, init_args(), 64).ok()
        (tmp_path / "f").write_bytes(b"")
        nodeid = entry_nodeid(lookup(client, 1, "f").ok())
        assert hiprio.cache is None and hiprio.root_fd == -1
        hc = FuseClient(hiprio)
        assert hc.send(Opcode.GETATTR, 1, abi.GETATTR_IN.pack(0, 0, 0), 104) is None
        assert hc.send(Opcode.INIT, 0, init_args(), 64) is None
        hc.forget(nodeid, 1)
        assert table.get(nodeid) is None
        # the request worker closes its fd after its next batch (the loop
        # calls reap once the replies are published), not on a reply's path
        assert getattr_(client, 1).error == 0
        assert len(fs_req.cache) == 1
        assert fs_req.reap() == 1
        assert len(fs_req.cache) == 0
        assert fs_req.reap() == 0
    finally:
        hiprio.close()
        fs_req.close()
        table.close()


# -- deferred requests ------------------------------------------------------------------------
def test_deferred_retry_interrupt_cancel(env, monkeypatch):
    fs, client, _ = env
    state = {"ready": False}

    def slow(fs_, req):
        def again():
            return b"done" if state["ready"] else DEFERRED
        fs_.defer(req, again)
        return DEFERRED

    monkeypatch.setitem(fs._ops, int(Opcode.GETLK), slow)
    lk = abi.LK_IN.pack(0, 0, 0, 0, 0, 0, 0)
    outs = {}
    for unique in (100, 102, 104):
        readable, writable, out = chain(in_header(Opcode.GETLK, 1, len(lk), unique) + lk, 24)
        assert fs.handle(readable, writable, unique) is None
        outs[unique] = out
    assert fs.has_pending()
    assert fs.retry() == []
    # INTERRUPT answers one with EINTR; the completion comes from retry()
    assert client.send(Opcode.INTERRUPT, 0, abi.INTERRUPT_IN.pack(102), 0) is None
    state["ready"] = True
    done = dict(fs.retry())
    assert set(done) == {100, 102, 104}
    assert parse_reply(outs[102], 102).error == errno.EINTR
    reply = parse_reply(outs[100], 100)
    assert reply.error == 0 and reply.payload == b"done"
    assert not fs.has_pending()
    # cancel_all answers what is still waiting with EINTR
    state["ready"] = False
    readable, writable, out = chain(in_header(Opcode.GETLK, 1, len(lk), 106) + lk, 24)
    assert fs.handle(readable, writable, "t106") is None
    assert fs.cancel_all() == [("t106", 16)]
    assert parse_reply(out, 106).error == errno.EINTR


def test_deferred_without_defer_is_eio(env, monkeypatch):
    fs, client, _ = env
    monkeypatch.setitem(fs._ops, int(Opcode.STATFS), lambda fs_, req: DEFERRED)
    assert client.call(Opcode.STATFS, 1, b"", 80).error == errno.EIO
    assert not fs.has_pending()


# -- LOOKUP and FORGET -------------------------------------------------------------------------
def test_lookup_attributes(env):
    _, client, share = env
    (share / "f").write_bytes(b"hello")
    os.utime(share / "f", ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
    payload = lookup(client, 1, "f").ok()
    nodeid, gen, ev, av, evn, avn = abi.ENTRY_OUT.unpack(payload)[:6]
    assert nodeid >= 2 and gen > 0 and (ev, av, evn, avn) == (1, 1, 0, 0)
    st = os.lstat(share / "f")
    attr = entry_attr(payload)
    assert attr[0] == st.st_ino and attr[1] == 5
    assert attr[3:9] == (1_500_000_000, 1_600_000_000, int(st.st_ctime), 123_456_789,
                         987_654_321, st.st_ctime_ns % 10**9)
    assert attr[9] == st.st_mode and attr[10] == 1


def test_lookup_errors(env):
    _, client, share = env
    (share / "f").write_bytes(b"")
    assert lookup(client, 1, "missing").error == errno.ENOENT
    assert client.call(Opcode.LOOKUP, 1, b"a/b\0", 128).error == errno.EINVAL
    assert client.call(Opcode.LOOKUP, 1, b"../f\0", 128).error == errno.EINVAL
    assert client.call(Opcode.LOOKUP, 1, b"noterminator", 128).error == errno.EINVAL
    assert client.call(Opcode.LOOKUP, 1, b"\0", 128).error == errno.EINVAL
    assert client.call(Opcode.LOOKUP, 1, b"x" * 256 + NUL, 128).error == errno.ENAMETOOLONG
    f = entry_nodeid(lookup(client, 1, "f").ok())
    assert lookup(client, f, "x").error == errno.ENOTDIR
    assert lookup(client, 0, "f").error == errno.ESTALE
    assert lookup(client, 200, "f").error == errno.ESTALE


def test_negative_entries_with_cache_always(tmp_path, proc_cwd):
    fs, table = make_session(tmp_path, cache=CacheMode.ALWAYS)
    try:
        client = FuseClient(fs)
        client.call(Opcode.INIT, 0, init_args(), 64).ok()
        payload = lookup(client, 1, "missing").ok()
        nodeid, gen, ev, av = abi.ENTRY_OUT.unpack(payload)[:4]
        assert (nodeid, gen, ev, av) == (0, 0, 86400, 0)
        assert len(table) == 0
    finally:
        fs.close()
        table.close()


def test_lookup_dot_and_dotdot(env):
    _, client, share = env
    (share / "a" / "b").mkdir(parents=True)
    root_ino = os.stat(share).st_ino
    payload = lookup(client, 1, "..").ok()
    assert entry_nodeid(payload) == 1 and abi.ENTRY_OUT.unpack(payload)[1] == 0
    assert entry_attr(payload)[0] == root_ino
    assert entry_nodeid(lookup(client, 1, ".").ok()) == 1
    a = entry_nodeid(lookup(client, 1, "a").ok())
    b = entry_nodeid(lookup(client, a, "b").ok())
    assert entry_nodeid(lookup(client, b, "..").ok()) == a
    assert entry_nodeid(lookup(client, b, ".").ok()) == b
    assert entry_nodeid(lookup(client, a, "..").ok()) == 1


def test_dotdot_of_a_directory_moved_out_of_the_share(env, tmp_path):
    fs, client, share = env
    (share / "a" / "b").mkdir(parents=True)
    a = entry_nodeid(lookup(client, 1, "a").ok())
    b = entry_nodeid(lookup(client, a, "b").ok())
    os.rename(share / "a", tmp_path / "outside")
    assert lookup(client, b, "..").error == errno.EACCES


def test_hard_links_share_a_nodeid(env):
    fs, client, share = env
    (share / "f").write_bytes(b"")
    os.link(share / "f", share / "g")
    f = lookup(client, 1, "f").ok()
    g = lookup(client, 1, "g").ok()
    assert entry_nodeid(f) == entry_nodeid(g)
    assert abi.ENTRY_OUT.unpack(f)[1] == abi.ENTRY_OUT.unpack(g)[1]
    assert fs.inodes.get(entry_nodeid(f))[3] == 2
    assert len(fs.cache) == 1


def open_fd_count() -> int:
    return fd_count(os.getpid())


def settled_fd_count(expect: int) -> int:
    """Forgotten inodes' fds are closed by a helper thread: wait for it."""
    return procfs_settled_fd_count(os.getpid(), expect)


def test_forget_to_zero_closes_the_fd(env):
    fs, client, share = env
    (share / "f").write_bytes(b"")
    before = open_fd_count()
    nodeid = entry_nodeid(lookup(client, 1, "f").ok())
    lookup(client, 1, "f").ok()
    assert open_fd_count() == before + 1
    client.forget(nodeid, 1)
    fs.reap()
    assert open_fd_count() == before + 1 and getattr_(client, nodeid).error == 0
    client.forget(nodeid, 1)
    fs.reap()
    assert settled_fd_count(before) == before
    assert getattr_(client, nodeid).error == errno.ESTALE
    # FORGET of unknown nodeids / the root is ignored
    client.forget(nodeid, 1)
    client.forget(1, 10)
    client.forget(0, 1)
    assert getattr_(client, 1).error == 0


def test_forgotten_fds_are_closed_off_the_loop_thread(env, monkeypatch):
    """The last close of an unlinked file is where the host frees it (and
    may wait for the disk): reap() hands it to a helper thread and returns
    at once."""
    fs, client, share = env
    (share / "f").write_bytes(b"x" * 4096)
    nodeid = entry_nodeid(lookup(client, 1, "f").ok())
    os.unlink(share / "f")
    gate, closed_on = threading.Event(), []
    real_close = fds.close_fd

    def slow_close(fd):
        closed_on.append((threading.current_thread(), fd, os.readlink(f"/proc/self/fd/{fd}")))
        gate.wait(10)
        real_close(fd)
    monkeypatch.setattr(fds, "close_fd", slow_close)
    client.forget(nodeid, 1)
    t0 = time.monotonic()
    assert fs.reap() == 1
    assert time.monotonic() - t0 < 1.0  # did not wait for the close
    deadline = time.monotonic() + 5
    while not closed_on and time.monotonic() < deadline:     # the helper thread's call
        time.sleep(0.005)
    assert len(closed_on) == 1
    thread, fd, target = closed_on[0]
    assert thread is not threading.main_thread()
    assert target == f"{share / 'f'} (deleted)"
    gate.set()
    # that fd, not the process's count (another test's leftovers may close
    # beside it): closed once the gate opens
    deadline = time.monotonic() + 5
    while _fd_target(fd) == target and time.monotonic() < deadline:
        time.sleep(0.005)
    assert _fd_target(fd) != target


def _fd_target(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def test_batch_forget(env):
    fs, client, share = env
    ids = []
    for name in "abc":
        (share / name).write_bytes(b"")
        ids.append(entry_nodeid(lookup(client, 1, name).ok()))
    lookup(client, 1, "a").ok()
    pairs = b"".join(abi.FORGET_ONE.pack(n, 1) for n in ids)
    # a count that does not match the entries present: ignored
    bad = abi.BATCH_FORGET_IN.pack(4) + pairs
    assert client.send(Opcode.BATCH_FORGET, 0, bad, 0) is None
    assert len(fs.inodes) == 3
    good = abi.BATCH_FORGET_IN.pack(3) + pairs
    assert client.send(Opcode.BATCH_FORGET, 0, good, 0) is None
    assert len(fs.inodes) == 1 and fs.inodes.get(ids[0])[3] == 1
    assert fs.reap() == 2  # what the worker loop does after each batch
    assert len(fs.cache) == 1


# -- creating and removing -------------------------------------------------------------------
def test_mkdir_and_rmdir(env):
    fs, client, share = env
    payload = mkdir(client, 1, b"d", 0o1750).ok()
    st = os.lstat(share / "d")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o1750
    assert entry_attr(payload)[0] == st.st_ino
    assert mkdir(client, 1, b"d").error == errno.EEXIST
    assert mkdir(client, 1, b"..").error == errno.EINVAL
    (share / "d" / "x").write_bytes(b"")
    assert client.call(Opcode.RMDIR, 1, b"d\0", 0).error == errno.ENOTEMPTY
    os.unlink(share / "d" / "x")
    assert client.call(Opcode.RMDIR, 1, b"d\0", 0).error == 0
    assert not (share / "d").exists()
    assert client.call(Opcode.RMDIR, 1, b"d\0", 0).error == errno.ENOENT


def test_mknod(env):
    _, client, share = env
    for name, mode in ((b"fifo", stat.S_IFIFO | 0o640), (b"reg", stat.S_IFREG | 0o600),
                       (b"plain", 0o644)):
        payload = client.call(Opcode.MKNOD, 1, abi.MKNOD_IN.pack(mode, 0, 0) + name + NUL, 128).ok()
        st = os.lstat(share / os.fsdecode(name))
        assert entry_attr(payload)[9] == st.st_mode
        assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(mode)
    assert stat.S_ISFIFO(os.lstat(share / "fifo").st_mode)
    assert stat.S_ISREG(os.lstat(share / "plain").st_mode)
    for mode in (stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777, 0o170000):
        reply = client.call(Opcode.MKNOD, 1, abi.MKNOD_IN.pack(mode, 0, 0) + b"x\0", 128)
        assert reply.error == errno.EINVAL
    # a character device (we are root here): rdev in the kernel's encoding
    rdev = (1 << 8) | 3  # 1:3, /dev/null
    payload = client.call(Opcode.MKNOD, 1, abi.MKNOD_IN.pack(stat.S_IFCHR | 0o600, rdev, 0)
                          + b"null\0", 128).ok()
    st = os.lstat(share / "null")
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    assert entry_attr(payload)[13] == rdev


def test_symlink_and_readlink(env):
    _, client, share = env
    payload = client.call(Opcode.SYMLINK, 1, b"l\0../../etc/passwd\0", 128).ok()
    assert os.readlink(share / "l") == "../../etc/passwd"
    nodeid = entry_nodeid(payload)
    assert stat.S_ISLNK(entry_attr(payload)[9])
    assert client.call(Opcode.READLINK, nodeid, b"", 4095).ok() == b"../../etc/passwd"
    # a lookup through the symlink never follows it
    assert lookup(client, nodeid, "x").error == errno.ENOTDIR
    assert client.call(Opcode.SYMLINK, 1, b"l\0t\0", 128).error == errno.EEXIST
    assert client.call(Opcode.SYMLINK, 1, b"e\0\0", 128).error == errno.ENOENT
    assert client.call(Opcode.SYMLINK, 1, b"a/b\0t\0", 128).error == errno.EINVAL
    assert client.call(Opcode.READLINK, 1, b"", 4095).error == errno.EINVAL
    long_target = b"t" * 200
    client.call(Opcode.SYMLINK, 1, b"long\0" + long_target + NUL, 128).ok()
    long_id = entry_nodeid(lookup(client, 1, "long").ok())
    assert client.call(Opcode.READLINK, long_id, b"", 100).error == errno.EIO


def test_link(env):
    fs, client, share = env
    (share / "f").write_bytes(b"")
    (share / "d").mkdir()
    f = entry_nodeid(lookup(client, 1, "f").ok())
    d = entry_nodeid(lookup(client, 1, "d").ok())
    payload = client.call(Opcode.LINK, d, abi.LINK_IN.pack(f) + b"g\0", 128).ok()
    assert entry_nodeid(payload) == f
    assert entry_attr(payload)[10] == 2  # nlink
    assert os.lstat(share / "d" / "g").st_ino == os.lstat(share / "f").st_ino
    assert fs.inodes.get(f)[3] == 2
    assert client.call(Opcode.LINK, 1, abi.LINK_IN.pack(d) + b"d2\0", 128).error == errno.EPERM
    assert client.call(Opcode.LINK, 1, abi.LINK_IN.pack(f) + b"f\0", 128).error == errno.EEXIST
    assert client.call(Opcode.LINK, 1, abi.LINK_IN.pack(99) + b"z\0", 128).error == errno.ESTALE
    # a hard link to a symlink links the symlink itself
    os.symlink("f", share / "sl")
    sl = entry_nodeid(lookup(client, 1, "sl").ok())
    assert entry_nodeid(client.call(Opcode.LINK, 1, abi.LINK_IN.pack(sl) + b"sl2\0", 128).ok()) == sl
    assert os.readlink(share / "sl2") == "f"


def test_unlink(env):
    _, client, share = env
    (share / "f").write_bytes(b"")
    (share / "d").mkdir()
    assert client.call(Opcode.UNLINK, 1, b"d\0", 0).error == errno.EISDIR
    assert client.call(Opcode.UNLINK, 1, b"f\0", 0).error == 0
    assert not (share / "f").exists()
    assert client.call(Opcode.UNLINK, 1, b"f\0", 0).error == errno.ENOENT
    assert client.call(Opcode.UNLINK, 1, b".\0", 0).error == errno.EINVAL


def test_unlinked_but_held_inode_keeps_working(env):
    _, client, share = env
    (share / "f").write_bytes(b"abc")
    f = entry_nodeid(lookup(client, 1, "f").ok())
    client.call(Opcode.UNLINK, 1, b"f\0", 0).ok()
    assert attr_of(getattr_(client, f).ok())[10] == 0  # nlink 0, still answerable


def test_rename(env):
    _, client, share = env
    (share / "a").mkdir()
    (share / "b").mkdir()
    (share / "a" / "f").write_bytes(b"1")
    a = entry_nodeid(lookup(client, 1, "a").ok())
    b = entry_nodeid(lookup(client, 1, "b").ok())
    f = entry_nodeid(lookup(client, a, "f").ok())
    client.call(Opcode.RENAME, a, abi.RENAME_IN.pack(b) + b"f\0g\0", 0).ok()
    assert (share / "b" / "g").read_bytes() == b"1"
    assert entry_nodeid(lookup(client, b, "g").ok()) == f  # the nodeid follows the inode
    assert getattr_(client, f).error == 0
    assert client.call(Opcode.RENAME, a, abi.RENAME_IN.pack(b) + b"f\0g\0", 0).error == errno.ENOENT
    assert client.call(Opcode.RENAME, a, abi.RENAME_IN.pack(b) + b"f\0g/h\0", 0).error == errno.EINVAL
    assert client.call(Opcode.RENAME, a, abi.RENAME_IN.pack(77) + b"f\0g\0", 0).error == errno.ESTALE


def test_rename2(env):
    _, client, share = env
    (share / "x").write_bytes(b"x")
    (share / "y").write_bytes(b"y")

    def rename2(flags, old=b"x", new=b"y"):
        args = abi.RENAME2_IN.pack(1, flags) + old + NUL + new + NUL
        return client.call(Opcode.RENAME2, 1, args, 0).error

    assert rename2(abi.RENAME_NOREPLACE) == errno.EEXIST
    assert rename2(abi.RENAME_EXCHANGE) == 0
    assert (share / "x").read_bytes() == b"y" and (share / "y").read_bytes() == b"x"
    assert rename2(abi.RENAME_EXCHANGE, new=b"missing") == errno.ENOENT
    assert rename2(abi.RENAME_WHITEOUT) == errno.EINVAL
    assert rename2(abi.RENAME_NOREPLACE | abi.RENAME_EXCHANGE) == errno.EINVAL
    assert rename2(8) == errno.EINVAL
    assert rename2(abi.RENAME_NOREPLACE, new=b"z") == 0
    assert (share / "z").read_bytes() == b"y"
    assert rename2(0, old=b"z", new=b"y") == 0
    assert (share / "y").read_bytes() == b"y"


def test_table_full_is_enfile(tmp_path, proc_cwd):
    fs, table = make_session(tmp_path, capacity=3)
    try:
        client = FuseClient(fs)
        client.call(Opcode.INIT, 0, init_args(), 64).ok()
        for name in "abc":
            (tmp_path / name).write_bytes(b"")
        lookup(client, 1, "a").ok()
        lookup(client, 1, "b").ok()
        assert lookup(client, 1, "c").error == errno.ENFILE
        assert mkdir(client, 1, b"d").error == errno.ENFILE
    finally:
        fs.close()
        table.close()


# -- credentials: tests/unit/test_fuse_credentials.py ------------------------------------------


# -- attributes ----------------------------------------------------------------------------------
def test_getattr(env):
    fs, client, share = env
    (share / "f").write_bytes(b"12345")
    f = entry_nodeid(lookup(client, 1, "f").ok())
    valid, valid_nsec, _ = abi.ATTR_OUT.unpack(getattr_(client, f).ok())[:3]
    assert (valid, valid_nsec) == (1, 0)
    attr = attr_of(getattr_(client, f).ok())
    assert attr[0] == os.lstat(share / "f").st_ino and attr[1] == 5
    assert attr_of(getattr_(client, 1).ok())[0] == os.stat(share).st_ino
    assert getattr_(client, 0).error == errno.ESTALE
    assert getattr_(client, 12345).error == errno.ESTALE
    # older kernels' GETATTR without args still works
    assert client.call(Opcode.GETATTR, f, b"", 104).error == 0


def test_getattr_with_fh(env):
    fs, client, share = env
    nodeid, fh = client.create(1, "f")
    client.call(Opcode.UNLINK, 1, b"f\0", 0).ok()
    payload = client.call(Opcode.GETATTR, nodeid, abi.GETATTR_IN.pack(abi.FUSE_GETATTR_FH, 0, fh),
                          104).ok()
    assert attr_of(payload)[10] == 0


def setattr_args(valid, fh=0, size=0, atime=0, mtime=0, atimensec=0, mtimensec=0, mode=0,
                 uid=0, gid=0):
    return abi.SETATTR_IN.pack(int(valid), fh, size, 0, atime, mtime, 0, atimensec, mtimensec, 0,
                               mode, uid, gid)


def test_setattr_mode_owner_size_times(env):
    _, client, share = env
    (share / "f").write_bytes(b"0123456789")
    f = entry_nodeid(lookup(client, 1, "f").ok())
    attr = attr_of(client.call(Opcode.SETATTR, f, setattr_args(SetattrValid.MODE, mode=0o100600),
                               104).ok())
    assert stat.S_IMODE(os.lstat(share / "f").st_mode) == 0o600 and attr[9] == 0o100600
    client.call(Opcode.SETATTR, f, setattr_args(SetattrValid.UID | SetattrValid.GID,
                                                uid=123, gid=456), 104).ok()
    st = os.lstat(share / "f")
    assert (st.st_uid, st.st_gid) == (123, 456)
    client.call(Opcode.SETATTR, f, setattr_args(SetattrValid.GID, gid=789), 104).ok()
    st = os.lstat(share / "f")
    assert (st.st_uid, st.st_gid) == (123, 789)
    attr = attr_of(client.call(Opcode.SETATTR, f, setattr_args(SetattrValid.SIZE, size=3), 104).ok())
    assert attr[1] == 3 and (share / "f").read_bytes() == b"012"
    valid = SetattrValid.ATIME | SetattrValid.MTIME
    attr = attr_of(client.call(Opcode.SETATTR, f, setattr_args(
        valid, atime=1000, atimensec=5, mtime=2000, mtimensec=7), 104).ok())
    st = os.lstat(share / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1000 * 10**9 + 5, 2000 * 10**9 + 7)
    assert attr[3:5] == (1000, 2000) and attr[6:8] == (5, 7)
    # MTIME_NOW with atime omitted
    valid = SetattrValid.MTIME | SetattrValid.MTIME_NOW
    client.call(Opcode.SETATTR, f, setattr_args(valid), 104).ok()
    st = os.lstat(share / "f")
    assert st.st_atime_ns == 1000 * 10**9 + 5 and st.st_mtime > 2000
    # a negative time (before 1970)
    client.call(Opcode.SETATTR, f, setattr_args(SetattrValid.MTIME, mtime=(1 << 64) - 10), 104).ok()
    assert os.lstat(share / "f").st_mtime == -10
    assert client.call(Opcode.SETATTR, f, setattr_args(SetattrValid.MTIME, mtimensec=10**9),
                       104).error == errno.EINVAL


def test_setattr_errors_and_symlinks(env):
    _, client, share = env
    (share / "d").mkdir()
    os.symlink("d", share / "l")
    d = entry_nodeid(lookup(client, 1, "d").ok())
    l_ = entry_nodeid(lookup(client, 1, "l").ok())
    assert client.call(Opcode.SETATTR, d, setattr_args(SetattrValid.SIZE), 104).error == errno.EISDIR
    assert client.call(Opcode.SETATTR, l_, setattr_args(SetattrValid.MODE, mode=0o600),
                       104).error == errno.EOPNOTSUPP
    assert client.call(Opcode.SETATTR, l_, setattr_args(SetattrValid.SIZE), 104).error == errno.EINVAL
    # chown and times of a symlink act on the link, not on its target
    client.call(Opcode.SETATTR, l_, setattr_args(SetattrValid.UID, uid=42), 104).ok()
    assert os.lstat(share / "l").st_uid == 42 and os.stat(share / "d").st_uid == 0
    client.call(Opcode.SETATTR, l_, setattr_args(SetattrValid.MTIME, mtime=5), 104).ok()
    assert os.lstat(share / "l").st_mtime == 5 and os.stat(share / "d").st_mtime != 5
    assert client.call(Opcode.SETATTR, d, b"short", 104).error == errno.EINVAL
    big = setattr_args(SetattrValid.SIZE, size=1 << 63)
    (share / "f").write_bytes(b"")
    f = entry_nodeid(lookup(client, 1, "f").ok())
    assert client.call(Opcode.SETATTR, f, big, 104).error == errno.EINVAL


def test_statfs(env):
    _, client, share = env
    payload = client.call(Opcode.STATFS, 1, b"", 80).ok()
    blocks, bfree, bavail, files, ffree, bsize, namelen, frsize = abi.STATFS_OUT.unpack(payload)
    st = os.statvfs(share)
    assert (blocks, bsize, namelen, frsize) == (st.f_blocks, st.f_bsize, st.f_namemax, st.f_frsize)


def test_fuseerror_is_not_oserror():
    assert not issubclass(FUSEError, OSError)
    assert FUSEError(errno.ENOENT).errno == errno.ENOENT


def test_credentials_are_per_thread(proc_cwd):
    import threading

    seen = {}

    def worker():
        credentials.switch(1000, 1001)
        seen["thread"] = credentials.current()
        credentials.restore()

    credentials.restore()
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["thread"] == (1000, 1001)
    assert credentials.current() == (0, 0)
    # cached: a repeated switch makes no syscall, and forget_cache() re-syncs
    credentials.switch(1000, 1000)
    credentials.switch(1000, 1000)
    assert credentials.current() == (1000, 1000)
    credentials.forget_cache()
    credentials.restore()
    assert credentials.current() == (0, 0)


# -- hostile input ----------------------------------------------------------------------------

_OPS = [int(op) for op in Opcode] + [0, 7, 19, 52, 0xFFFFFFFF]


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opcode=st.sampled_from(_OPS), nodeid=st.sampled_from([0, 1, 2, 3, 1 << 63]),
       args=st.binary(max_size=300), out_size=st.sampled_from([0, 8, 16, 100, 4096]),
       len_delta=st.sampled_from([0, 0, 0, -1, 1]), splits=st.lists(st.integers(1, 400), max_size=4))
def test_random_requests_never_raise(env, opcode, nodeid, args, out_size, len_delta, splits):
    fs, client, share = env
    if opcode in (Opcode.INIT, Opcode.DESTROY):
        opcode = Opcode.GETATTR  # keep the session alive across examples
    request = bytearray(in_header(opcode, nodeid, len(args), 42, 0, 0, 1) + args)
    request[0:4] = ((len(request) + len_delta) & 0xFFFFFFFF).to_bytes(4, "little")
    readable, writable, out = chain(bytes(request), max(out_size - 16, 0), tuple(splits))
    if out_size == 0:
        writable = IoVec([])
    n = fs.handle(readable, writable, None)
    assert n is None or 0 <= n <= writable.size
    if n:
        length, error, unique = abi.OUT_HEADER.unpack_from(out)
        assert length == n and -4096 < error <= 0 and unique == 42
        if error:
            assert n == 16
    credentials.restore()


def test_a_worker_s_own_release_leaves_reap_nothing_to_look_for(env):
    """HandleTable._freed: this worker's RELEASE moves the table's released
    count and, when no other free came between, the count reap compares
    with (so the loop's next reap, and the C wait's watch, do not scan for
    it); a free elsewhere first keeps reap's look."""
    fs, client, share = env
    (share / "f").write_bytes(b"x")
    nodeid = entry_nodeid(lookup(client, 1, "f").ok())
    handles, files = fs.handles, fs.handles.files

    def opened() -> int:
        return abi.OPEN_OUT.unpack(client.call(Opcode.OPEN, nodeid, abi.OPEN_IN.pack(os.O_RDONLY, 0), 16).ok())[0]

    def release(fh: int) -> None:
        client.call(Opcode.RELEASE, nodeid, abi.RELEASE_IN.pack(fh, 0, 0, 0), 0).ok()

    start = files.released
    assert handles._released == start
    release(opened())
    assert handles._released == files.released == start + 1
    fh = opened()
    files.free(files.alloc(nodeid, 1, 0, 99))       # "another queue" frees one first
    release(fh)
    assert (handles._released, files.released) == (start + 1, start + 3)
    fs.reap()
    assert handles._released == start + 3
