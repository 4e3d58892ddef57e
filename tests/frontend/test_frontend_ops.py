"""Every FUSE op of FUSE's opcode list, driven through the vhost-user test
frontend against a real daemon process, with host-side effects checked with
``os.*`` on the shared directory.

Run against the baseline with ``--daemon=c`` (QEMU 7.2's C virtiofsd), ours
with ``--daemon=ours`` (default), or both. Where the C daemon is known to
behave differently the test branches on ``frontend.kind`` and says why.
"""

from __future__ import annotations

import errno
import os
import stat
import time

import pytest

from daemon.fuse import abi
from tests.frontend.fuse_client import (F_RDLCK, F_UNLCK, F_WRLCK, OFFSET_MAX,
                                        FuseErrorReply)

ROOT = 1
O_LARGEFILE = os.O_LARGEFILE


def expect_errno(fn, *args, errnos, **kw):
    """Call and require a FuseErrorReply with one of ``errnos``."""
    if isinstance(errnos, int):
        errnos = (errnos,)
    with pytest.raises(FuseErrorReply) as ei:
        fn(*args, **kw)
    assert ei.value.errno in errnos, f"got {errno.errorcode.get(ei.value.errno)}, want {errnos}"
    return ei.value.errno


def enoent(fc):
    """errnos acceptable for an op naming a missing entry.

    Known difference: QEMU 7.2's C virtiofsd resolves the name in UNLINK,
    RMDIR and RENAME with lookup_name() first and answers EIO when it does
    not exist (a real guest always LOOKUPs first, so it never notices).
    The correct answer, and ours, is ENOENT."""
    return (errno.ENOENT, errno.EIO) if fc.kind == "c" else (errno.ENOENT,)


def lookup_missing(fc, parent, name):
    """A missing name: ENOENT, or a negative entry (nodeid 0) — both are what
    the kernel accepts as "does not exist"."""
    try:
        e = fc.lookup(parent, name)
    except FuseErrorReply as err:
        assert err.errno == errno.ENOENT
        return
    assert e.nodeid == 0, f"lookup of a missing name returned nodeid {e.nodeid}"


def host(fc, *parts) -> str:
    return os.path.join(str(fc.shared_dir), *parts)


def write_host(fc, name, data: bytes, mode=0o644) -> str:
    p = host(fc, name)
    with open(p, "wb") as f:
        f.write(data)
    os.chmod(p, mode)
    return p


# ---------------------------------------------------------------- session --
def test_init_reply(frontend):
    io = frontend.init_out
    assert io.major == 7
    assert 27 <= io.minor <= 38
    assert len(io.raw) == 64, "with minor >= 23 the kernel expects the full 64-byte fuse_init_out"
    assert io.max_write >= 4096
    assert io.max_readahead <= 131072
    # the daemon must not claim what it was not offered nor what it cannot do
    assert io.flags & ~0x7BFFFFFB == 0
    if io.flags & abi.InitFlag.INIT_EXT:
        assert io.flags2 & 0x3 == 0, "SECURITY_CTX/HAS_INODE_DAX must not be echoed"


def test_getattr_root_matches_host(frontend):
    a = frontend.getattr(ROOT).attr
    st = os.stat(frontend.shared_dir)
    assert stat.S_ISDIR(a.mode)
    assert a.ino == st.st_ino
    assert a.nlink == st.st_nlink
    assert (a.uid, a.gid) == (st.st_uid, st.st_gid)


def test_statfs_matches_host(frontend):
    s = frontend.statfs(ROOT)
    v = os.statvfs(frontend.shared_dir)
    assert s.bsize == v.f_bsize
    assert s.frsize == v.f_frsize
    assert s.namelen == v.f_namemax
    assert s.blocks == v.f_blocks
    assert s.files == v.f_files


# ----------------------------------------------------------------- lookup --
def test_lookup_file_attrs(frontend):
    write_host(frontend, "hello.txt", b"hello world\n", 0o640)
    st = os.lstat(host(frontend, "hello.txt"))
    e = frontend.lookup(ROOT, "hello.txt")
    assert e.nodeid not in (0, ROOT)
    assert e.attr.ino == st.st_ino
    assert e.attr.size == 12
    assert e.attr.mode == st.st_mode == stat.S_IFREG | 0o640
    assert e.attr.nlink == 1
    assert e.attr.mtime == int(st.st_mtime)
    g = frontend.getattr(e.nodeid).attr
    assert g == e.attr._replace(atime=g.atime, atimensec=g.atimensec)


def test_lookup_missing(frontend):
    lookup_missing(frontend, ROOT, "does-not-exist")


def test_lookup_twice_same_nodeid(frontend):
    write_host(frontend, "a", b"x")
    e1 = frontend.lookup(ROOT, "a")
    e2 = frontend.lookup(ROOT, "a")
    assert e1.nodeid == e2.nodeid and e1.generation == e2.generation


def test_lookup_in_subdir_and_dotdot(frontend):
    os.mkdir(host(frontend, "sub"))
    write_host(frontend, "sub/inner", b"abc")
    d = frontend.lookup(ROOT, "sub")
    assert stat.S_ISDIR(d.attr.mode)
    f = frontend.lookup(d.nodeid, "inner")
    assert f.attr.size == 3
    # ".." at the share root must not escape: it is the root itself
    up = frontend.lookup(ROOT, "..")
    assert up.attr.ino == os.stat(frontend.shared_dir).st_ino
    assert frontend.lookup(d.nodeid, "..").attr.ino == os.stat(frontend.shared_dir).st_ino


def test_lookup_on_file_is_enotdir(frontend):
    write_host(frontend, "plain", b"")
    e = frontend.lookup(ROOT, "plain")
    expect_errno(frontend.lookup, e.nodeid, "x", errnos=errno.ENOTDIR)


def test_hard_links_share_nodeid(frontend):
    p = write_host(frontend, "orig", b"data")
    os.link(p, host(frontend, "hostlink"))
    a = frontend.lookup(ROOT, "orig")
    b = frontend.lookup(ROOT, "hostlink")
    assert a.nodeid == b.nodeid
    # LINK through FUSE: same nodeid again, link count 3, visible on the host
    c = frontend.link(a.nodeid, ROOT, "fuselink")
    assert c.nodeid == a.nodeid
    assert c.attr.nlink == 3
    assert os.stat(host(frontend, "fuselink")).st_ino == os.stat(p).st_ino
    assert os.stat(p).st_nlink == 3
    expect_errno(frontend.link, a.nodeid, ROOT, "orig", errnos=errno.EEXIST)


# ---------------------------------------------------- creating and removing --
def test_mkdir_rmdir(frontend):
    e = frontend.mkdir(ROOT, "d", 0o755)
    assert stat.S_ISDIR(e.attr.mode) and e.nodeid not in (0, ROOT)
    st = os.stat(host(frontend, "d"))
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
    assert e.attr.ino == st.st_ino
    expect_errno(frontend.mkdir, ROOT, "d", 0o755, errnos=errno.EEXIST)
    frontend.mkdir(e.nodeid, "child", 0o700)
    expect_errno(frontend.rmdir, ROOT, "d", errnos=errno.ENOTEMPTY)
    frontend.rmdir(e.nodeid, "child")
    frontend.rmdir(ROOT, "d")
    assert not os.path.exists(host(frontend, "d"))
    expect_errno(frontend.rmdir, ROOT, "d", errnos=enoent(frontend))


def test_mkdir_mode_is_not_masked_by_daemon(frontend):
    # the guest kernel applies the umask; the daemon must create with exactly `mode`
    frontend.mkdir(ROOT, "m", 0o777, umask=0o022)
    assert stat.S_IMODE(os.stat(host(frontend, "m")).st_mode) in (0o777, 0o755)


def test_rmdir_on_file_is_enotdir(frontend):
    write_host(frontend, "f", b"")
    frontend.lookup(ROOT, "f")  # the kernel always has the dentry first
    expect_errno(frontend.rmdir, ROOT, "f", errnos=errno.ENOTDIR)


def test_create_as_unprivileged_user_owns_file(frontend):
    os.chmod(frontend.shared_dir, 0o777)
    e, o = frontend.create(ROOT, "mine", mode=stat.S_IFREG | 0o600, uid=1000, gid=1000)
    st = os.stat(host(frontend, "mine"))
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert (e.attr.uid, e.attr.gid) == (1000, 1000)
    frontend.release(e.nodeid, o.fh)
    d = frontend.mkdir(ROOT, "mydir", 0o755, uid=1000, gid=1000)
    assert os.stat(host(frontend, "mydir")).st_uid == 1000
    assert d.attr.uid == 1000


def test_mknod_fifo_and_regular(frontend):
    e = frontend.mknod(ROOT, "fifo", stat.S_IFIFO | 0o600)
    assert stat.S_ISFIFO(e.attr.mode)
    assert stat.S_ISFIFO(os.lstat(host(frontend, "fifo")).st_mode)
    r = frontend.mknod(ROOT, "reg", stat.S_IFREG | 0o640)
    st = os.lstat(host(frontend, "reg"))
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert r.attr.ino == st.st_ino
    expect_errno(frontend.mknod, ROOT, "reg", stat.S_IFREG | 0o640, errnos=errno.EEXIST)


def test_symlink_readlink(frontend):
    target = "../outside/of/share"
    e = frontend.symlink(ROOT, "ln", target)
    assert stat.S_ISLNK(e.attr.mode)
    assert e.attr.size == len(target)
    assert os.readlink(host(frontend, "ln")) == target
    assert frontend.readlink(e.nodeid) == target.encode()
    # a host-made symlink reads back too, and LOOKUP does not follow it
    os.symlink("/etc/passwd", host(frontend, "abs"))
    a = frontend.lookup(ROOT, "abs")
    assert stat.S_ISLNK(a.attr.mode)
    assert frontend.readlink(a.nodeid) == b"/etc/passwd"
    expect_errno(frontend.symlink, ROOT, "ln", "x", errnos=errno.EEXIST)
    f = frontend.mknod(ROOT, "notlink", stat.S_IFREG | 0o644)
    # (the guest VFS answers EINVAL itself; a daemon asked anyway may say
    # EINVAL or, like C's readlinkat(fd, ""), ENOENT)
    expect_errno(frontend.readlink, f.nodeid, errnos=(errno.EINVAL, errno.ENOENT))


def test_unlink(frontend):
    write_host(frontend, "gone", b"bye")
    frontend.lookup(ROOT, "gone")  # the kernel always has the dentry first
    frontend.unlink(ROOT, "gone")
    assert not os.path.lexists(host(frontend, "gone"))
    expect_errno(frontend.unlink, ROOT, "gone", errnos=enoent(frontend))
    os.mkdir(host(frontend, "dir"))
    frontend.lookup(ROOT, "dir")
    expect_errno(frontend.unlink, ROOT, "dir", errnos=(errno.EISDIR, errno.EPERM))


def test_unlinked_open_file_still_readable(frontend):
    write_host(frontend, "tmp", b"still here")
    e = frontend.lookup(ROOT, "tmp")
    fh = frontend.open(e.nodeid).fh
    frontend.unlink(ROOT, "tmp")
    assert frontend.read(e.nodeid, fh, 0, 100) == b"still here"
    assert frontend.getattr(e.nodeid).attr.nlink == 0
    frontend.release(e.nodeid, fh)


def test_rename(frontend):
    # As a guest kernel does, LOOKUP every name before renaming it (QEMU's C
    # virtiofsd even requires it: lookup_name() only finds known inodes).
    write_host(frontend, "a", b"AAA")
    os.mkdir(host(frontend, "dir"))
    d = frontend.lookup(ROOT, "dir")
    frontend.lookup(ROOT, "a")
    frontend.rename(ROOT, "a", d.nodeid, "b")
    assert not os.path.exists(host(frontend, "a"))
    with open(host(frontend, "dir", "b"), "rb") as f:
        assert f.read() == b"AAA"
    expect_errno(frontend.rename, ROOT, "a", ROOT, "c", errnos=enoent(frontend))
    # overwrite an existing target
    write_host(frontend, "c", b"CCC")
    frontend.lookup(d.nodeid, "b")
    frontend.lookup(ROOT, "c")
    frontend.rename(d.nodeid, "b", ROOT, "c")
    with open(host(frontend, "c"), "rb") as f:
        assert f.read() == b"AAA"
    # a directory onto a non-empty directory
    os.mkdir(host(frontend, "full"))
    write_host(frontend, "full/x", b"")
    frontend.lookup(ROOT, "full")
    expect_errno(frontend.rename, ROOT, "dir", ROOT, "full", errnos=(errno.ENOTEMPTY, errno.EEXIST))


def test_rename2_noreplace_and_exchange(frontend):
    write_host(frontend, "x", b"X")
    write_host(frontend, "y", b"Y")
    frontend.lookup(ROOT, "x")
    frontend.lookup(ROOT, "y")
    expect_errno(frontend.rename2, ROOT, "x", ROOT, "y", abi.RENAME_NOREPLACE, errnos=errno.EEXIST)
    frontend.rename2(ROOT, "x", ROOT, "y", abi.RENAME_EXCHANGE)
    with open(host(frontend, "x"), "rb") as f:
        assert f.read() == b"Y"
    with open(host(frontend, "y"), "rb") as f:
        assert f.read() == b"X"
    frontend.rename2(ROOT, "x", ROOT, "z", abi.RENAME_NOREPLACE)
    assert os.path.exists(host(frontend, "z")) and not os.path.exists(host(frontend, "x"))


# ------------------------------------------------------------------- files --
def test_create_write_read(frontend):
    e, o = frontend.create(ROOT, "new", flags=os.O_CREAT | os.O_RDWR | O_LARGEFILE,
                           mode=stat.S_IFREG | 0o600)
    assert stat.S_ISREG(e.attr.mode) and e.attr.size == 0
    assert stat.S_IMODE(os.stat(host(frontend, "new")).st_mode) == 0o600
    data = bytes(range(256)) * 40  # 10240 bytes: spans 3 pages
    assert frontend.write(e.nodeid, o.fh, 0, data) == len(data)
    assert frontend.write(e.nodeid, o.fh, 20000, b"tail") == 4
    frontend.flush(e.nodeid, o.fh)
    with open(host(frontend, "new"), "rb") as f:
        got = f.read()
    assert len(got) == 20004
    assert got[:len(data)] == data and got[len(data):20000] == bytes(20000 - len(data))
    assert got[20000:] == b"tail"
    assert frontend.read(e.nodeid, o.fh, 0, 4096) == data[:4096]
    assert frontend.read(e.nodeid, o.fh, 4000, 200) == data[4000:4200]
    assert frontend.read(e.nodeid, o.fh, 19990, 4096) == bytes(10) + b"tail"  # short read at EOF
    assert frontend.read(e.nodeid, o.fh, 30000, 4096) == b""
    assert frontend.getattr(e.nodeid).attr.size == 20004
    frontend.fsync(e.nodeid, o.fh)
    frontend.fsync(e.nodeid, o.fh, datasync=True)
    frontend.release(e.nodeid, o.fh)


def test_create_exclusive_on_existing(frontend):
    write_host(frontend, "exists", b"")
    expect_errno(frontend.create, ROOT, "exists",
                 flags=os.O_CREAT | os.O_EXCL | os.O_RDWR | O_LARGEFILE, errnos=errno.EEXIST)


def test_open_existing_and_trunc(frontend):
    write_host(frontend, "t", b"0123456789")
    e = frontend.lookup(ROOT, "t")
    o = frontend.open(e.nodeid, os.O_RDONLY | O_LARGEFILE)
    assert frontend.read(e.nodeid, o.fh, 2, 3) == b"234"
    frontend.release(e.nodeid, o.fh)
    # ATOMIC_O_TRUNC: O_TRUNC arrives in OPEN only if the daemon asked for it
    if frontend.init_out.flags & abi.InitFlag.ATOMIC_O_TRUNC:
        o = frontend.open(e.nodeid, os.O_WRONLY | os.O_TRUNC | O_LARGEFILE)
        assert os.path.getsize(host(frontend, "t")) == 0
        frontend.release(e.nodeid, o.fh)


def test_open_directory_for_write_is_eisdir(frontend):
    os.mkdir(host(frontend, "dd"))
    d = frontend.lookup(ROOT, "dd")
    expect_errno(frontend.open, d.nodeid, os.O_RDWR | O_LARGEFILE, errnos=errno.EISDIR)


@pytest.mark.frontend_opts(queue_size=1024)
def test_read_1mib_matches(frontend):
    # queue-size 1024: Linux's max_pages_limit is then 256, so a 1 MiB READ
    # arrives as one request of 256 page-sized writable descriptors.
    data = os.urandom(1 << 20)
    write_host(frontend, "big", data + b"extra")
    e = frontend.lookup(ROOT, "big")
    fh = frontend.open(e.nodeid).fh
    assert frontend.read(e.nodeid, fh, 0, 1 << 20) == data
    assert frontend.read(e.nodeid, fh, 1 << 20, 1 << 20) == b"extra"
    frontend.release(e.nodeid, fh)


def test_write_256k_multi_page(frontend):
    e, o = frontend.create(ROOT, "w256")
    data = os.urandom(256 << 10)
    assert frontend.write(e.nodeid, o.fh, 4096, data) == len(data)
    frontend.release(e.nodeid, o.fh)
    with open(host(frontend, "w256"), "rb") as f:
        assert f.read() == bytes(4096) + data


def test_setattr(frontend):
    write_host(frontend, "s", b"x" * 100, 0o644)
    e = frontend.lookup(ROOT, "s")
    a = frontend.setattr(e.nodeid, size=10).attr
    assert a.size == 10 and os.path.getsize(host(frontend, "s")) == 10
    a = frontend.setattr(e.nodeid, mode=stat.S_IFREG | 0o600).attr
    assert stat.S_IMODE(a.mode) == 0o600
    assert stat.S_IMODE(os.stat(host(frontend, "s")).st_mode) == 0o600
    a = frontend.setattr(e.nodeid, atime=(1_000_000_000, 5), mtime=(1_200_000_000, 7)).attr
    st = os.stat(host(frontend, "s"))
    assert (st.st_mtime_ns, st.st_atime_ns) == (1_200_000_000_000_000_007, 1_000_000_000_000_000_005)
    assert (a.mtime, a.mtimensec) == (1_200_000_000, 7)
    before = time.time() - 5
    a = frontend.setattr(e.nodeid, mtime_now=True).attr
    assert a.mtime >= before and os.stat(host(frontend, "s")).st_mtime >= before
    a = frontend.setattr(e.nodeid, uid=1234, gid=4321).attr
    st = os.stat(host(frontend, "s"))
    assert (st.st_uid, st.st_gid) == (1234, 4321) == (a.uid, a.gid)


def test_setattr_truncate_via_fh(frontend):
    e, o = frontend.create(ROOT, "ft")
    frontend.write(e.nodeid, o.fh, 0, b"y" * 5000)
    a = frontend.setattr(e.nodeid, size=123, fh=o.fh).attr
    assert a.size == 123 and os.path.getsize(host(frontend, "ft")) == 123
    frontend.release(e.nodeid, o.fh)


def test_getattr_with_fh(frontend):
    e, o = frontend.create(ROOT, "gf")
    frontend.write(e.nodeid, o.fh, 0, b"z" * 77)
    assert frontend.getattr(e.nodeid, fh=o.fh).attr.size == 77
    frontend.release(e.nodeid, o.fh)


def test_fallocate(frontend):
    e, o = frontend.create(ROOT, "fa")
    frontend.fallocate(e.nodeid, o.fh, 0, 1 << 20)
    st = os.stat(host(frontend, "fa"))
    assert st.st_size == 1 << 20 and st.st_blocks * 512 >= 1 << 20
    FALLOC_FL_KEEP_SIZE = 1
    frontend.fallocate(e.nodeid, o.fh, 1 << 20, 1 << 20, FALLOC_FL_KEEP_SIZE)
    assert os.stat(host(frontend, "fa")).st_size == 1 << 20
    frontend.release(e.nodeid, o.fh)


def test_lseek(frontend):
    p = host(frontend, "sparse")
    with open(p, "wb") as f:
        f.seek(1 << 20)
        f.write(b"data")
    e = frontend.lookup(ROOT, "sparse")
    fh = frontend.open(e.nodeid).fh
    assert frontend.lseek(e.nodeid, fh, 0, os.SEEK_DATA) == 1 << 20
    assert frontend.lseek(e.nodeid, fh, 0, os.SEEK_HOLE) == 0
    expect_errno(frontend.lseek, e.nodeid, fh, (1 << 20) + 100, os.SEEK_DATA, errnos=errno.ENXIO)
    frontend.release(e.nodeid, fh)


def test_copy_file_range(frontend):
    src = os.urandom(100_000)
    write_host(frontend, "src", src)
    s = frontend.lookup(ROOT, "src")
    sfh = frontend.open(s.nodeid).fh
    d, do = frontend.create(ROOT, "dst")
    n = frontend.copy_file_range(s.nodeid, sfh, 1000, d.nodeid, do.fh, 10, 50_000)
    assert n == 50_000
    with open(host(frontend, "dst"), "rb") as f:
        assert f.read() == bytes(10) + src[1000:51000]
    frontend.release(s.nodeid, sfh)
    frontend.release(d.nodeid, do.fh)


def test_flush_release_and_syncfs(frontend):
    e, o = frontend.create(ROOT, "fl")
    frontend.write(e.nodeid, o.fh, 0, b"abc")
    frontend.flush(e.nodeid, o.fh, lock_owner=0x1234)
    frontend.release(e.nodeid, o.fh, flags=os.O_RDWR, release_flags=abi.FUSE_RELEASE_FLUSH,
                     lock_owner=0x1234)
    frontend.syncfs()


# ------------------------------------------------------------- directories --
def test_readdir_1000_entries(frontend):
    names = {f"file-{i:04d}-{'x' * (i % 37)}" for i in range(1000)}
    for n in names:
        open(host(frontend, n), "wb").close()
    recs = frontend.readdir_all(ROOT)
    got = [r.name.decode() for r in recs]
    assert len(got) == len(set(got)), "duplicate entries"
    assert set(got) == names | {".", ".."}
    for r in recs:
        if r.name not in (b".", b".."):
            st = os.lstat(host(frontend, r.name.decode()))
            assert r.ino == st.st_ino
            assert r.type == stat.S_IFMT(st.st_mode) >> 12


def test_readdir_resume_from_cookie(frontend):
    for i in range(300):
        os.mkdir(host(frontend, f"d{i}"))
    fh = frontend.opendir(ROOT).fh
    first = frontend.readdir(ROOT, fh, 0)
    assert 0 < len(first) < 302
    # a second pass from a cookie in the middle yields exactly the rest
    mid = len(first) // 2
    rest = []
    off = first[mid].off
    while True:
        recs = frontend.readdir(ROOT, fh, off)
        if not recs:
            break
        rest.extend(recs)
        off = recs[-1].off
    frontend.releasedir(ROOT, fh)
    all_names = [r.name for r in first[:mid + 1]] + [r.name for r in rest]
    assert sorted(all_names) == sorted([b".", b".."] + [f"d{i}".encode() for i in range(300)])
    assert all(r.type == stat.S_IFDIR >> 12 for r in rest)


def test_readdirplus(frontend):
    if not frontend.init_out.flags & abi.InitFlag.DO_READDIRPLUS:
        pytest.fail("daemon does not offer READDIRPLUS with cache=auto")
    for i in range(50):
        write_host(frontend, f"p{i}", b"q" * i)
    recs = frontend.readdir_all(ROOT, plus=True)
    names = {r.name for r in recs}
    assert names == {b".", b".."} | {f"p{i}".encode() for i in range(50)}
    for r in recs:
        if r.name in (b".", b".."):
            assert r.entry.nodeid == 0  # never linked by the kernel, so no lookup count
            continue
        i = int(r.name[1:])
        assert r.entry.nodeid not in (0, ROOT)
        assert r.entry.attr.size == i
        assert r.entry.attr.ino == r.ino == os.lstat(host(frontend, r.name.decode())).st_ino
        # each entry counted as a lookup: the nodeid is the one LOOKUP returns
        assert frontend.lookup(ROOT, r.name).nodeid == r.entry.nodeid


def test_opendir_on_file_and_fsyncdir(frontend):
    write_host(frontend, "nf", b"")
    e = frontend.lookup(ROOT, "nf")
    expect_errno(frontend.opendir, e.nodeid, errnos=errno.ENOTDIR)
    fh = frontend.opendir(ROOT).fh
    frontend.fsyncdir(ROOT, fh)
    frontend.fsyncdir(ROOT, fh, datasync=True)
    frontend.releasedir(ROOT, fh)


# ------------------------------------------------------------------ xattrs --
def test_xattrs(frontend):
    p = write_host(frontend, "xa", b"")
    e = frontend.lookup(ROOT, "xa")
    frontend.setxattr(e.nodeid, "user.color", b"blue")
    assert os.getxattr(p, "user.color") == b"blue"
    assert frontend.getxattr(e.nodeid, "user.color", 0) == 4
    assert frontend.getxattr(e.nodeid, "user.color", 100) == b"blue"
    expect_errno(frontend.getxattr, e.nodeid, "user.color", 2, errnos=errno.ERANGE)
    os.setxattr(p, "user.other", b"1")
    need = frontend.listxattr(e.nodeid, 0)
    assert need == len(b"user.color\0user.other\0")
    assert set(frontend.listxattr(e.nodeid, 4096)) == {b"user.color", b"user.other"}
    expect_errno(frontend.listxattr, e.nodeid, 5, errnos=errno.ERANGE)
    XATTR_CREATE, XATTR_REPLACE = 1, 2
    expect_errno(frontend.setxattr, e.nodeid, "user.color", b"red", XATTR_CREATE, errnos=errno.EEXIST)
    expect_errno(frontend.setxattr, e.nodeid, "user.nope", b"red", XATTR_REPLACE, errnos=errno.ENODATA)
    frontend.removexattr(e.nodeid, "user.color")
    assert "user.color" not in os.listxattr(p)
    expect_errno(frontend.getxattr, e.nodeid, "user.color", 100, errnos=errno.ENODATA)
    expect_errno(frontend.removexattr, e.nodeid, "user.color", errnos=errno.ENODATA)


# ------------------------------------------------------------------- locks --
def test_posix_lock_contention(frontend):
    write_host(frontend, "lk", b"x" * 100)
    e = frontend.lookup(ROOT, "lk")
    a = frontend.open(e.nodeid, os.O_RDWR | O_LARGEFILE).fh
    b = frontend.open(e.nodeid, os.O_RDWR | O_LARGEFILE).fh
    owner_a, owner_b = 0xAAAA, 0xBBBB
    if not frontend.init_out.flags & abi.InitFlag.POSIX_LOCKS:
        pytest.fail("daemon does not offer POSIX_LOCKS")
    frontend.setlk(e.nodeid, a, owner_a, 0, 49, F_WRLCK, pid=100)
    # B sees A's lock (Linux sends GETLK with lk.pid 0; SETLK with the tgid)
    lk = frontend.getlk(e.nodeid, b, owner_b, 0, OFFSET_MAX, F_WRLCK)
    assert lk.type == F_WRLCK and (lk.start, lk.end) == (0, 49)
    # no conflict past A's range
    assert frontend.getlk(e.nodeid, b, owner_b, 50, 99, F_WRLCK).type == F_UNLCK
    expect_errno(frontend.setlk, e.nodeid, b, owner_b, 0, 10, F_RDLCK, pid=200,
                 errnos=(errno.EAGAIN, errno.EACCES))
    frontend.setlk(e.nodeid, b, owner_b, 50, 99, F_WRLCK, pid=200)
    frontend.setlk(e.nodeid, a, owner_a, 0, 49, F_UNLCK, pid=0)
    frontend.setlk(e.nodeid, b, owner_b, 0, 10, F_RDLCK, pid=200)
    frontend.release(e.nodeid, a)
    frontend.release(e.nodeid, b)


def test_setlkw_waits_without_blocking_the_queue(frontend):
    write_host(frontend, "lkw", b"x")
    e = frontend.lookup(ROOT, "lkw")
    a = frontend.open(e.nodeid, os.O_RDWR | O_LARGEFILE).fh
    b = frontend.open(e.nodeid, os.O_RDWR | O_LARGEFILE).fh
    frontend.setlk(e.nodeid, a, 0xA, type_=F_WRLCK, pid=1)
    if frontend.kind == "c":
        # Known difference: QEMU 7.2's C virtiofsd refuses blocking locks
        # outright (lo_setlk: `if (sleep) fuse_reply_err(req, EOPNOTSUPP)`).
        expect_errno(frontend.setlkw, e.nodeid, b, 0xB, type_=F_WRLCK, pid=2,
                     errnos=errno.EOPNOTSUPP)
        return
    pending = frontend.send_setlkw(e.nodeid, b, 0xB, type_=F_WRLCK, pid=2)
    # the waiting SETLKW must not stall other requests on the same queue
    assert frontend.getattr(e.nodeid).attr.size == 1
    with pytest.raises(TimeoutError):
        pending.vring.wait(pending.head, 0.3)
    frontend.setlk(e.nodeid, a, 0xA, type_=F_UNLCK, pid=0)
    assert frontend.check(pending, timeout=5) == b""
    lk = frontend.getlk(e.nodeid, a, 0xA, type_=F_WRLCK)
    assert lk.type == F_WRLCK  # B now holds it
    frontend.release(e.nodeid, a)
    frontend.release(e.nodeid, b)


# ------------------------------------------------------------------ forget --
def test_forget_then_getattr_fails(frontend):
    write_host(frontend, "fg", b"")
    e = frontend.lookup(ROOT, "fg")
    frontend.forget(e.nodeid, 1)
    # the nodeid is gone: any error, but not success
    expect_errno(frontend.getattr, e.nodeid,
                 errnos=(errno.ESTALE, errno.ENOENT, errno.EBADF, errno.EINVAL, errno.EIO))
    # and a new lookup works again
    assert frontend.lookup(ROOT, "fg").attr.ino == os.stat(host(frontend, "fg")).st_ino


def test_forget_keeps_node_while_lookups_remain(frontend):
    write_host(frontend, "fg2", b"")
    e = frontend.lookup(ROOT, "fg2")
    frontend.lookup(ROOT, "fg2")
    frontend.forget(e.nodeid, 1)
    assert frontend.getattr(e.nodeid).attr.ino == e.attr.ino  # one lookup left
    frontend.forget(e.nodeid, 1)
    expect_errno(frontend.getattr, e.nodeid,
                 errnos=(errno.ESTALE, errno.ENOENT, errno.EBADF, errno.EINVAL, errno.EIO))


def test_batch_forget(frontend):
    ents = []
    for i in range(3):
        write_host(frontend, f"b{i}", b"")
        ents.append(frontend.lookup(ROOT, f"b{i}"))
    frontend.lookup(ROOT, "b0")
    frontend.batch_forget([(ents[0].nodeid, 2), (ents[1].nodeid, 1), (ents[2].nodeid, 1)])
    for ent in ents:
        expect_errno(frontend.getattr, ent.nodeid,
                     errnos=(errno.ESTALE, errno.ENOENT, errno.EBADF, errno.EINVAL, errno.EIO))


# ------------------------------------------------------------- credentials --
def test_open_as_other_user_runs_with_the_daemons_credentials(frontend):
    """The guest kernel checks permissions (default_permissions) with the
    caller's groups, which the request does not carry: both daemons open
    as themselves (docs/credentials.md), so what the guest allowed works."""
    write_host(frontend, "secret", b"s", 0o600)
    e = frontend.lookup(ROOT, "secret")
    fh = frontend.open(e.nodeid, os.O_RDONLY | O_LARGEFILE, uid=1000, gid=1000).fh
    assert frontend.read(e.nodeid, fh, 0, 10, uid=1000, gid=1000) == b"s"
    frontend.release(e.nodeid, fh)


# ----------------------------------------------------------------- destroy --
def test_destroy(frontend):
    frontend.destroy()


# ------------------------------------------------- hostile-ish but guest-legal --
def test_forget_on_request_queue_without_reply_buffer(frontend):
    """FORGET may also arrive on a request queue, with no writable part."""
    write_host(frontend, "rqf", b"")
    e = frontend.lookup(ROOT, "rqf")
    p = frontend.send(abi.Opcode.FORGET, e.nodeid, abi.FORGET_IN.pack(1), single=True)
    assert frontend.complete(p).used_len == 0
    expect_errno(frontend.getattr, e.nodeid,
                 errnos=(errno.ESTALE, errno.ENOENT, errno.EBADF, errno.EINVAL, errno.EIO))


def test_readdirplus_counts_as_lookup(frontend):
    write_host(frontend, "rp", b"")
    recs = [r for r in frontend.readdir_all(ROOT, plus=True) if r.name == b"rp"]
    assert len(recs) == 1 and recs[0].entry.nodeid not in (0, ROOT)
    nodeid = recs[0].entry.nodeid
    assert frontend.getattr(nodeid).attr.ino == recs[0].ino
    frontend.forget(nodeid, 1)  # the one lookup READDIRPLUS gave
    expect_errno(frontend.getattr, nodeid,
                 errnos=(errno.ESTALE, errno.ENOENT, errno.EBADF, errno.EINVAL, errno.EIO))


def test_forget_of_unknown_nodeid_is_harmless(frontend):
    frontend.forget(0xDEAD_BEEF, 5)
    frontend.batch_forget([(0xFEED, 1), (0xFEEE, 2)])
    if frontend.kind != "c":
        # Known difference: QEMU 7.2's C virtiofsd aborts on forgetting more
        # lookups than the root holds ("unref_inode: Assertion
        # `inode->nlookup >= n' failed."), so this part is not sent to it.
        frontend.batch_forget([(ROOT, 1000)])
        frontend.forget(ROOT, 1000)
    assert frontend.getattr(ROOT).attr.nlink >= 2  # root stays pinned


def test_destroy_then_new_session(frontend):
    write_host(frontend, "keep", b"k")
    frontend.destroy()
    io = frontend.init()
    assert io.major == 7
    assert frontend.lookup(ROOT, "keep").attr.size == 1


def test_name_with_slash_is_refused(frontend):
    os.mkdir(host(frontend, "a"))
    write_host(frontend, "a/b", b"")
    with pytest.raises(FuseErrorReply):
        e = frontend.lookup(ROOT, "a/b")
        assert e.nodeid == 0  # a negative entry would be acceptable too
        raise FuseErrorReply(errno.ENOENT)
    expect_errno(frontend.mkdir, ROOT, "x/y", 0o755, errnos=(errno.EINVAL, errno.ENOENT, errno.EPERM))
    assert not os.path.exists(host(frontend, "x"))


def test_long_name_is_enametoolong(frontend):
    expect_errno(frontend.lookup, ROOT, "n" * 256, errnos=errno.ENAMETOOLONG)
    expect_errno(frontend.mkdir, ROOT, "n" * 256, 0o755, errnos=errno.ENAMETOOLONG)


def test_symlink_to_outside_is_not_followed(frontend):
    os.symlink("/etc", host(frontend, "esc"))
    e = frontend.lookup(ROOT, "esc")
    assert stat.S_ISLNK(e.attr.mode)
    # LOOKUP with a symlink as the parent must not resolve through it
    with pytest.raises(FuseErrorReply):
        r = frontend.lookup(e.nodeid, "passwd")
        if r.nodeid == 0:
            raise FuseErrorReply(errno.ENOENT)
    expect_errno(frontend.opendir, e.nodeid, errnos=(errno.ENOTDIR, errno.ELOOP, errno.EACCES, errno.EINVAL))


def test_reply_buffer_too_small(frontend):
    """GETATTR whose writable part cannot hold fuse_attr_out: an error reply
    (EIO/ERANGE) in the 16 bytes, never a write past the buffer."""
    p = frontend.send(abi.Opcode.GETATTR, ROOT, bytes(16), [50])
    if frontend.kind == "c":
        # Known difference: QEMU 7.2's C virtiofsd logs "virtio_send_msg: elem
        # 0 too small for data len 120" and completes the chain with used len
        # 0 and nothing written: the guest would parse a garbage out header.
        inf = p.vring.wait(p.head, 10)
        assert inf.used_len == 0
        p.vring.free(p.head)
    else:
        r = frontend.complete(p)
        assert r.error < 0, "a reply that does not fit must be an error"
    assert frontend.getattr(ROOT).attr.nlink >= 2


@pytest.mark.frontend_opts(cache="never")
def test_cache_never(frontend):
    write_host(frontend, "cn", b"x")
    e = frontend.lookup(ROOT, "cn")
    assert (e.entry_valid, e.entry_valid_nsec, e.attr_valid, e.attr_valid_nsec) == (0, 0, 0, 0)
    o = frontend.open(e.nodeid)
    assert o.open_flags & abi.FOPEN_DIRECT_IO
    frontend.release(e.nodeid, o.fh)


@pytest.mark.frontend_opts(cache="never")
def test_cache_never_offers_no_readdirplus(frontend):
    """The guest discards READDIRPLUS's attributes with zero timeouts: neither
    daemon offers it with cache=never (with auto, test_readdirplus). The
    kernel only looks at READDIRPLUS_AUTO when DO_READDIRPLUS is set (the
    C daemon leaves AUTO on)."""
    assert not frontend.init_out.flags & abi.InitFlag.DO_READDIRPLUS


@pytest.mark.frontend_opts(cache="always")
def test_cache_always(frontend):
    write_host(frontend, "ca", b"x")
    e = frontend.lookup(ROOT, "ca")
    assert e.entry_valid >= 3600 and e.attr_valid >= 3600
    o = frontend.open(e.nodeid)
    assert o.open_flags & abi.FOPEN_KEEP_CACHE
    assert not o.open_flags & abi.FOPEN_DIRECT_IO
    frontend.release(e.nodeid, o.fh)
