#!/usr/bin/python3
"""In-guest differential suite: the same operations on tmpfs and on virtiofs.

Runs inside the test guest under the host's /usr/bin/python3 (stdlib only).
Every check is a function ``check_x(d) -> outcome`` that works inside its own
fresh directory ``d``. It runs once under the reference directory (tmpfs) and
once under the target directory (the virtiofs mount); the two outcomes
(return values, errno names, stat fields that must agree, file contents) are
compared. A few checks have no faithful tmpfs counterpart in Linux 6.1
(user.* xattrs: tmpfs gained them in 6.6; the 256 MiB file; MAP_SHARED under
cache=never): they compare the target against a literal expected outcome.

Output: one line per check, ``GUESTOPS {json}`` with ``check``, ``status``
(pass | FAIL | known | skip), ``ms``, and on a mismatch ``ref`` and
``target``; then ``GUESTOPS {"summary": ...}``. Exit status 1 if any check
failed (``--known NAME`` turns an expected mismatch of a baseline into
"known", which does not fail the run).

The host side imports this module for ``mmap_expected()`` and
``big_block()`` to verify, after the guest exits, what the guest wrote.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import mmap
import os
import random
import select
import shutil
import stat
import struct
import sys
import time
import traceback

PREFIX = "GUESTOPS "

# --------------------------------------------------------------------------
# deterministic data shared with the host-side checks

MMAP_SIZE = 64 * 1024
BIG_BLOCK = 1 << 20
_BIG_BASE: bytes | None = None


def mmap_expected() -> bytes:
    """What mmap.bin holds after the MAP_SHARED check: page i starts with a
    32-byte digest, and byte 100 of each page is (i * 7) & 0xff."""
    buf = bytearray(MMAP_SIZE)
    for i in range(MMAP_SIZE // 4096):
        off = i * 4096
        buf[off:off + 32] = hashlib.sha256(b"mmap-page-%d" % i).digest()
        buf[off + 100] = (i * 7) & 0xFF
    return bytes(buf)


def big_block(i: int) -> bytes:
    """Block i (1 MiB) of the big file: its index, then fixed random bytes."""
    global _BIG_BASE
    if _BIG_BASE is None:
        _BIG_BASE = random.Random(20240611).randbytes(BIG_BLOCK)
    return struct.pack("<Q", i) * 8 + _BIG_BASE[64:]


def big_sha256(mib: int) -> str:
    h = hashlib.sha256()
    for i in range(mib):
        h.update(big_block(i))
    return h.hexdigest()


# --------------------------------------------------------------------------
# helpers

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
libc.syncfs.argtypes = [ctypes.c_int]
libc.syscall.restype = ctypes.c_long

AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
SYS_getdents64 = 217  # x86-64
FLOCK = struct.Struct("=hh4xqqi4x")  # struct flock on x86-64 (32 bytes)


def ename(e: int) -> str:
    return errno.errorcode.get(e, str(e))


def E(fn, *args, **kw):
    """Call fn; its value, or "E:<ERRNO>" for an OSError."""
    try:
        r = fn(*args, **kw)
    except OSError as e:
        return "E:" + ename(e.errno)
    return r


def ok(fn, *args, **kw):
    """Call fn; "ok" (dropping a value that may legitimately differ) or the errno."""
    r = E(fn, *args, **kw)
    return r if isinstance(r, str) and r.startswith("E:") else "ok"


def _libc_call(fn, *args):
    r = fn(*args)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def renameat2(src: str, dst: str, flags: int) -> int:
    return _libc_call(libc.renameat2, AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags)


def fallocate(fd: int, mode: int, off: int, length: int) -> int:
    return _libc_call(libc.fallocate, fd, mode, off, length)


def syncfs(fd: int) -> int:
    return _libc_call(libc.syncfs, fd)


def getdents64(fd: int, bufsize: int) -> list[tuple[str, int]]:
    """One getdents64 call with a small buffer: [(name, d_type)]."""
    buf = ctypes.create_string_buffer(bufsize)
    n = libc.syscall(SYS_getdents64, fd, buf, bufsize)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    out, pos, raw = [], 0, buf.raw[:n]
    while pos < n:
        _ino, _off, reclen, dtype = struct.unpack_from("<QqHB", raw, pos)
        name = raw[pos + 19:pos + reclen].split(b"\0", 1)[0]
        out.append((os.fsdecode(name), dtype))
        pos += reclen
    return out


def ftype(mode: int) -> str:
    for t, f in (("reg", stat.S_ISREG), ("dir", stat.S_ISDIR), ("lnk", stat.S_ISLNK),
                 ("fifo", stat.S_ISFIFO), ("chr", stat.S_ISCHR), ("blk", stat.S_ISBLK),
                 ("sock", stat.S_ISSOCK)):
        if f(mode):
            return t
    return "?"


def st(path: str, follow: bool = False) -> dict | str:
    """The stat fields both file systems must agree on."""
    try:
        s = os.stat(path) if follow else os.lstat(path)
    except OSError as e:
        return "E:" + ename(e.errno)
    d = {"type": ftype(s.st_mode), "mode": oct(stat.S_IMODE(s.st_mode)), "nlink": s.st_nlink,
         "uid": s.st_uid, "gid": s.st_gid}
    if not stat.S_ISDIR(s.st_mode):
        d["size"] = s.st_size  # directory sizes are file system specific
    return d


def fst(fd: int) -> dict:
    s = os.fstat(fd)
    return {"type": ftype(s.st_mode), "mode": oct(stat.S_IMODE(s.st_mode)),
            "nlink": s.st_nlink, "size": s.st_size}


def read_file(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return "E:" + ename(e.errno)
    return data.decode("latin-1") if len(data) <= 256 else "sha256:" + hashlib.sha256(data).hexdigest()


def write_file(path: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_all(fd: int) -> bytes:
    """Everything a child writes into a pipe, up to its end."""
    data = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return data
        data += chunk


def J(p: str, *parts: str) -> str:
    return os.path.join(p, *parts)


# --------------------------------------------------------------------------
# checks: each gets a fresh empty directory and returns a JSON-able outcome

def check_create_read_write(d):
    p = J(d, "f")
    r = {}
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    r["write"] = os.write(fd, b"hello world")
    r["lseek0"] = os.lseek(fd, 0, os.SEEK_SET)
    r["read"] = os.read(fd, 100).decode()
    r["read_eof"] = os.read(fd, 100).decode()
    r["pread"] = os.pread(fd, 5, 6).decode()
    r["pwrite"] = os.pwrite(fd, b"WORLD", 6)
    r["pwrite_past_eof"] = os.pwrite(fd, b"!", 20)
    r["fstat"] = fst(fd)
    os.close(fd)
    r["content"] = read_file(p)
    r["excl_again"] = E(os.open, p, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    r["after_trunc"] = fst(fd)
    os.close(fd)
    r["stat"] = st(p)
    # one write much larger than a FUSE request (max_pages), read back at once
    big = bytes(range(256)) * (4 * 4096 + 3)
    fd = os.open(J(d, "big"), os.O_CREAT | os.O_RDWR, 0o600)
    r["big_write"] = os.write(fd, big)
    r["big_read_ok"] = os.pread(fd, len(big) + 10, 0) == big
    os.close(fd)
    r["big_stat"] = st(J(d, "big"))
    return r


def check_append(d):
    p = J(d, "a")
    write_file(p, b"one\n")
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"two\n")
    os.write(fd, b"three\n")
    pos = os.lseek(fd, 0, os.SEEK_CUR)
    os.close(fd)
    return {"content": read_file(p), "pos": pos, "stat": st(p)}


def check_write_only_partial(d):
    """Parts of pages overwritten through a write-only fd the guest just
    opened (so it holds none of the file's pages): with its writeback cache
    (--writeback) the guest reads each page in first, on that open file."""
    p = J(d, "w")
    data = bytearray(bytes(range(256)) * 40)  # 10,240 bytes: 2.5 pages
    write_file(p, bytes(data))
    fd = os.open(p, os.O_WRONLY)
    r = {"mid": os.pwrite(fd, b"XYZ", 5000), "across_eof": os.pwrite(fd, b"end", 10238)}
    os.close(fd)
    data[5000:5003] = b"XYZ"
    data[10238:10241] = b"end"
    with open(p, "rb") as f:
        r["content_ok"] = f.read() == bytes(data)
    r["stat"] = st(p)
    return r


def check_truncate(d):
    p = J(d, "t")
    write_file(p, b"0123456789")
    r = {}
    os.truncate(p, 3)
    r["t3"] = read_file(p)
    os.truncate(p, 10000)
    with open(p, "rb") as f:
        data = f.read()
    r["t10000"] = (len(data), data[:3].decode(), data[3:] == b"\0" * 9997)
    fd = os.open(p, os.O_RDWR)
    os.ftruncate(fd, 5)
    r["ft5"] = fst(fd)
    os.close(fd)
    r["content"] = read_file(p)
    r["truncate_dir"] = E(os.truncate, d, 0)
    r["truncate_missing"] = E(os.truncate, J(d, "missing"), 0)
    fd = os.open(p, os.O_RDONLY)
    r["ftruncate_rdonly"] = E(os.ftruncate, fd, 0)
    os.close(fd)
    return r


def check_mkdir_rmdir(d):
    p = J(d, "sub")
    r = {"mkdir": ok(os.mkdir, p, 0o750), "stat": st(p), "parent": st(d)}
    r["mkdir_again"] = E(os.mkdir, p)
    os.mkdir(J(p, "inner"))
    r["nlink_with_child_dir"] = os.lstat(p).st_nlink
    write_file(J(p, "file"), b"x")
    r["rmdir_nonempty"] = E(os.rmdir, p)
    r["rmdir_file"] = E(os.rmdir, J(p, "file"))
    os.unlink(J(p, "file"))
    os.rmdir(J(p, "inner"))
    r["rmdir"] = ok(os.rmdir, p)
    r["rmdir_again"] = E(os.rmdir, p)
    r["stat_after"] = st(p)
    r["mkdir_in_missing"] = E(os.mkdir, J(d, "nope", "x"))
    r["listing"] = sorted(os.listdir(d))
    return r


def check_unlink(d):
    p = J(d, "u")
    write_file(p, b"data")
    fd = os.open(p, os.O_RDONLY)
    r = {"unlink": ok(os.unlink, p), "stat_after": st(p)}
    r["read_unlinked_open_fd"] = os.read(fd, 10).decode()
    r["fstat_unlinked_nlink"] = os.fstat(fd).st_nlink
    os.close(fd)
    r["unlink_again"] = E(os.unlink, p)
    os.mkdir(J(d, "dir"))
    r["unlink_dir"] = E(os.unlink, J(d, "dir"))
    r["listing"] = sorted(os.listdir(d))
    return r


def check_rename(d):
    r = {}
    write_file(J(d, "a"), b"AAA")
    write_file(J(d, "b"), b"BB")
    ino_a = os.lstat(J(d, "a")).st_ino
    r["simple"] = ok(os.rename, J(d, "a"), J(d, "a2"))
    r["a_gone"] = st(J(d, "a"))
    r["over_existing"] = ok(os.rename, J(d, "a2"), J(d, "b"))
    r["b_content"] = read_file(J(d, "b"))
    r["b_is_old_a"] = os.lstat(J(d, "b")).st_ino == ino_a
    os.makedirs(J(d, "d1", "x"))
    os.mkdir(J(d, "d2"))
    os.makedirs(J(d, "d3", "y"))
    write_file(J(d, "d1", "x", "f"), b"deep")
    r["dir_over_empty_dir"] = ok(os.rename, J(d, "d1"), J(d, "d2"))
    r["child_after_dir_rename"] = read_file(J(d, "d2", "x", "f"))
    r["dir_over_nonempty_dir"] = E(os.rename, J(d, "d2"), J(d, "d3"))
    r["file_over_dir"] = E(os.rename, J(d, "b"), J(d, "d3"))
    r["dir_over_file"] = E(os.rename, J(d, "d3"), J(d, "b"))
    r["dir_into_itself"] = E(os.rename, J(d, "d2"), J(d, "d2", "x", "z"))
    r["missing_src"] = E(os.rename, J(d, "nope"), J(d, "zz"))
    r["to_missing_dir"] = E(os.rename, J(d, "b"), J(d, "nope", "b"))
    r["same_name"] = ok(os.rename, J(d, "b"), J(d, "b"))
    r["listing"] = sorted(os.listdir(d))
    return r


def check_rename_noreplace(d):
    write_file(J(d, "a"), b"A")
    write_file(J(d, "b"), b"B")
    r = {"existing": E(renameat2, J(d, "a"), J(d, "b"), RENAME_NOREPLACE)}
    r["contents_untouched"] = (read_file(J(d, "a")), read_file(J(d, "b")))
    r["new_name"] = E(renameat2, J(d, "a"), J(d, "c"), RENAME_NOREPLACE)
    r["listing"] = sorted(os.listdir(d))
    return r


def check_rename_exchange(d):
    write_file(J(d, "a"), b"A-content")
    os.mkdir(J(d, "b"))
    write_file(J(d, "b", "inside"), b"I")
    r = {"exchange": E(renameat2, J(d, "a"), J(d, "b"), RENAME_EXCHANGE)}
    r["a"] = st(J(d, "a"))
    r["a_inside"] = read_file(J(d, "a", "inside"))
    r["b"] = read_file(J(d, "b"))
    r["missing_target"] = E(renameat2, J(d, "a"), J(d, "nope"), RENAME_EXCHANGE)
    r["both_flags"] = E(renameat2, J(d, "a"), J(d, "b"), RENAME_EXCHANGE | RENAME_NOREPLACE)
    return r


def check_link(d):
    a, b = J(d, "a"), J(d, "b")
    write_file(a, b"linked")
    r = {"link": ok(os.link, a, b)}
    sa, sb = os.lstat(a), os.lstat(b)
    r["same_ino"] = sa.st_ino == sb.st_ino
    r["nlink"] = (sa.st_nlink, sb.st_nlink)
    r["content_b"] = read_file(b)
    with open(b, "ab") as f:
        f.write(b"+more")
    r["content_a_after_write_b"] = read_file(a)
    r["link_existing"] = E(os.link, a, b)
    os.mkdir(J(d, "dir"))
    r["link_dir"] = E(os.link, J(d, "dir"), J(d, "dirlink"))
    r["link_missing"] = E(os.link, J(d, "nope"), J(d, "c"))
    r["unlink_a"] = ok(os.unlink, a)
    r["b_after"] = st(b)
    return r


def check_symlink(d):
    r = {"symlink": ok(os.symlink, "target.txt", J(d, "l"))}
    r["readlink"] = E(os.readlink, J(d, "l"))
    r["lstat"] = st(J(d, "l"))
    r["stat_dangling"] = st(J(d, "l"), follow=True)
    write_file(J(d, "target.txt"), b"via link")
    r["read_through"] = read_file(J(d, "l"))
    r["stat_through"] = st(J(d, "l"), follow=True)
    r["readlink_regular"] = E(os.readlink, J(d, "target.txt"))
    r["symlink_existing"] = E(os.symlink, "x", J(d, "l"))
    long_target = "x/" * 1000 + "end"
    r["long_target"] = ok(os.symlink, long_target, J(d, "long"))
    r["long_readlink_equal"] = E(os.readlink, J(d, "long")) == long_target
    os.mkdir(J(d, "realdir"))
    os.symlink("realdir", J(d, "dirlink"))
    write_file(J(d, "dirlink", "f"), b"in dir via link")
    r["through_dir_link"] = read_file(J(d, "realdir", "f"))
    r["open_nofollow"] = E(os.open, J(d, "l"), os.O_RDONLY | os.O_NOFOLLOW)
    r["listing"] = sorted(os.listdir(d))
    return r


def check_mknod_fifo(d):
    p = J(d, "fifo")
    r = {"mkfifo": ok(os.mkfifo, p, 0o640), "stat": st(p)}
    if r["mkfifo"] == "ok":
        rd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
        wr = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
        os.write(wr, b"through the pipe")
        r["fifo_data"] = os.read(rd, 100).decode()
        os.close(wr)
        os.close(rd)
    r["mknod_reg"] = ok(os.mknod, J(d, "reg"), stat.S_IFREG | 0o600)
    r["reg_stat"] = st(J(d, "reg"))
    r["mknod_existing"] = E(os.mknod, p, stat.S_IFIFO | 0o600)
    return r


def check_chmod_chown_utime(d):
    p = J(d, "f")
    write_file(p, b"attrs")
    r = {}
    os.chmod(p, 0o751)
    r["chmod"] = st(p)
    os.chmod(p, 0o4755)
    r["chmod_suid"] = st(p)
    r["chown"] = ok(os.chown, p, 1234, 5678)
    r["after_chown"] = st(p)   # root chown: the kernel keeps or clears suid the same way on both
    r["chown_keep"] = ok(os.chown, p, -1, -1)
    os.utime(p, ns=(1_000_000_123, 1_500_000_456))
    s = os.lstat(p)
    r["utime_ns"] = (s.st_atime_ns, s.st_mtime_ns)
    t0 = time.time()
    os.utime(p)  # UTIME_NOW
    s = os.lstat(p)
    r["utime_now_recent"] = abs(s.st_mtime - t0) < 10 and abs(s.st_atime - t0) < 10
    fd = os.open(p, os.O_RDWR)
    os.fchmod(fd, 0o600)
    r["fchmod"] = fst(fd)
    before = os.fstat(fd).st_mtime_ns
    time.sleep(0.02)
    os.write(fd, b"X")
    os.close(fd)
    r["write_updates_mtime"] = os.lstat(p).st_mtime_ns > before
    os.symlink("f", J(d, "l"))
    r["lchown_symlink"] = ok(os.lchown, J(d, "l"), 42, 43)
    sl = os.lstat(J(d, "l"))
    r["symlink_owner"] = (sl.st_uid, sl.st_gid)
    r["target_owner_unchanged"] = (os.lstat(p).st_uid, os.lstat(p).st_gid)
    r["chmod_missing"] = E(os.chmod, J(d, "nope"), 0o600)
    os.mkdir(J(d, "dir"))
    os.chmod(J(d, "dir"), 0o1777)
    r["dir_sticky"] = st(J(d, "dir"))
    return r


def check_xattr(d):
    """user.* xattrs. Reference: the expected Linux semantics (tmpfs has no
    user.* xattrs before 6.6)."""
    p = J(d, "f")
    write_file(p, b"x")
    r = {"set": E(os.setxattr, p, "user.test", b"value-1")}
    r["get"] = E(lambda: os.getxattr(p, "user.test").decode())
    r["create_existing"] = E(os.setxattr, p, "user.test", b"v", os.XATTR_CREATE)
    r["replace_missing"] = E(os.setxattr, p, "user.nope", b"v", os.XATTR_REPLACE)
    r["replace"] = E(os.setxattr, p, "user.test", b"value-2", os.XATTR_REPLACE)
    r["get2"] = E(lambda: os.getxattr(p, "user.test").decode())
    big = bytes(range(256)) * 15
    r["set_big"] = E(os.setxattr, p, "user.big", big)
    r["get_big_ok"] = E(os.getxattr, p, "user.big") == big
    r["empty_value"] = E(os.setxattr, p, "user.empty", b"")
    r["get_empty"] = E(lambda: os.getxattr(p, "user.empty").decode())
    r["list"] = E(lambda: sorted(n for n in os.listxattr(p) if n.startswith("user.")))
    r["remove"] = E(os.removexattr, p, "user.test")
    r["get_removed"] = E(os.getxattr, p, "user.test")
    r["remove_again"] = E(os.removexattr, p, "user.test")
    r["list_after"] = E(lambda: sorted(n for n in os.listxattr(p) if n.startswith("user.")))
    os.mkdir(J(d, "dir"))
    r["dir_set"] = E(os.setxattr, J(d, "dir"), "user.d", b"dv")
    r["dir_get"] = E(lambda: os.getxattr(J(d, "dir"), "user.d").decode())
    r["missing_file"] = E(os.getxattr, J(d, "nope"), "user.test")
    return r


XATTR_EXPECTED = {
    "set": None, "get": "value-1", "create_existing": "E:EEXIST", "replace_missing": "E:ENODATA",
    "replace": None, "get2": "value-2", "set_big": None, "get_big_ok": True, "empty_value": None,
    "get_empty": "", "list": ["user.big", "user.empty", "user.test"], "remove": None,
    "get_removed": "E:ENODATA", "remove_again": "E:ENODATA", "list_after": ["user.big", "user.empty"],
    "dir_set": None, "dir_get": "dv", "missing_file": "E:ENOENT",
}


def check_statvfs(d):
    s = os.statvfs(d)
    fd = os.open(d, os.O_RDONLY)
    f = os.fstatvfs(fd)
    os.close(fd)
    return {"bsize_pos": s.f_bsize > 0, "frsize_pos": s.f_frsize > 0, "blocks_pos": s.f_blocks > 0,
            "bfree_le_blocks": s.f_bfree <= s.f_blocks, "bavail_le_bfree": s.f_bavail <= s.f_bfree,
            "ffree_le_files": s.f_ffree <= s.f_files, "namemax": s.f_namemax,
            "fstatvfs_same_blocks": f.f_blocks == s.f_blocks,
            "missing": E(os.statvfs, J(d, "nope"))}


def check_fallocate(d):
    p = J(d, "f")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    r = {"posix_fallocate": ok(os.posix_fallocate, fd, 0, 1 << 20)}
    s = os.fstat(fd)
    r["size"] = s.st_size
    r["allocated"] = s.st_blocks * 512 >= 1 << 20
    r["reads_zero"] = os.pread(fd, 4096, 4096) == b"\0" * 4096
    r["extend"] = ok(os.posix_fallocate, fd, (1 << 20) - 100, 200)
    r["size2"] = os.fstat(fd).st_size
    os.close(fd)
    return r


def check_fallocate_keep_size(d):
    fd = os.open(J(d, "f"), os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, b"a" * 1000)
    r = {"keep_size": E(fallocate, fd, FALLOC_FL_KEEP_SIZE, 0, 1 << 20)}
    r["size"] = os.fstat(fd).st_size
    os.close(fd)
    return r


def check_fallocate_punch_hole(d):
    fd = os.open(J(d, "f"), os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, b"b" * (64 * 1024))
    r = {"punch": E(fallocate, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 8192, 16384)}
    r["size"] = os.fstat(fd).st_size
    data = os.pread(fd, 64 * 1024, 0)
    r["zeros_in_hole"] = data[8192:8192 + 16384] == b"\0" * 16384
    r["kept_around"] = data[:8192] == b"b" * 8192 and data[24576:] == b"b" * (64 * 1024 - 24576)
    r["punch_without_keep"] = E(fallocate, fd, FALLOC_FL_PUNCH_HOLE, 0, 4096)
    os.close(fd)
    return r


def check_seek_data_hole(d):
    fd = os.open(J(d, "sparse"), os.O_CREAT | os.O_RDWR, 0o644)
    os.pwrite(fd, b"D" * 4096, 0)
    os.pwrite(fd, b"E" * 4096, 1 << 20)
    os.fsync(fd)
    size = os.fstat(fd).st_size
    r = {"size": size,
         "data0": E(os.lseek, fd, 0, os.SEEK_DATA),
         "hole0": E(os.lseek, fd, 0, os.SEEK_HOLE),
         "data_after_hole": E(os.lseek, fd, 8192, os.SEEK_DATA),
         "hole_after_data2": E(os.lseek, fd, 1 << 20, os.SEEK_HOLE),
         "data_at_eof": E(os.lseek, fd, size, os.SEEK_DATA),
         "hole_at_eof": E(os.lseek, fd, size, os.SEEK_HOLE),
         "end": E(os.lseek, fd, 0, os.SEEK_END),
         "negative": E(os.lseek, fd, -1, os.SEEK_SET)}
    os.close(fd)
    return r


def check_copy_file_range(d):
    src = J(d, "src")
    data = bytes(i * 31 % 251 for i in range(300_000))
    write_file(src, data)
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(J(d, "dst"), os.O_CREAT | os.O_WRONLY, 0o644)
    total, off = 0, 0
    while off < len(data):
        n = os.copy_file_range(fi, fo, len(data) - off, off, off)
        if n == 0:
            break
        off += n
        total += n
    r = {"copied": total}
    r["partial"] = os.copy_file_range(fi, fo, 1000, 5, len(data) + 10)
    r["eof_returns_0"] = os.copy_file_range(fi, fo, 10, len(data), 0)
    os.close(fi)
    os.close(fo)
    with open(J(d, "dst"), "rb") as f:
        out = f.read()
    r["equal"] = out[:len(data)] == data
    r["tail"] = (len(out), out[len(data):len(data) + 10] == b"\0" * 10, out[len(data) + 10:] == data[5:1005])
    return r


def check_fsync(d):
    p = J(d, "f")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, b"sync me")
    r = {"fsync": ok(os.fsync, fd), "fdatasync": ok(os.fdatasync, fd)}
    os.close(fd)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    r["fsync_dir"] = ok(os.fsync, dfd)
    r["syncfs"] = ok(syncfs, dfd)
    os.close(dfd)
    os.sync()
    r["sync"] = "ok"
    r["content"] = read_file(p)
    return r


def _big_dir_name(i: int) -> str:
    return f"entry-{i:05d}-{'n' * (i % 37)}"


def check_big_dir(d, n=10_000):
    for i in range(n):
        if i % 1000 == 999:
            os.mkdir(J(d, _big_dir_name(i)))
        else:
            os.mknod(J(d, _big_dir_name(i)), stat.S_IFREG | 0o644)
    names = os.listdir(d)
    expected = sorted(_big_dir_name(i) for i in range(n))
    with os.scandir(d) as it:
        types = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
    ndirs = sum(1 for _, isdir in types if isdir)
    return {"count": len(names), "sorted_equal_expected": sorted(names) == expected,
            "no_duplicates": len(set(names)) == len(names), "dirs": ndirs,
            "dir_nlink": os.lstat(d).st_nlink,
            "stat_last": st(J(d, _big_dir_name(n - 2)))}


def check_getdents_unlink_middle(d, n=300):
    names = [f"file-{i:03d}-{'z' * (i % 20)}" for i in range(n)]
    for nm in names:
        os.mknod(J(d, nm), stat.S_IFREG | 0o600)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    first = getdents64(fd, 1024)  # a small buffer: the listing is not done
    seen = [nm for nm, _ in first if nm not in (".", "..")]
    unseen = [nm for nm in names if nm not in set(seen)]
    # unlink every other not-yet-read name
    deleted = set(unseen[::2])
    for nm in deleted:
        os.unlink(J(d, nm))
    rest = []
    while True:
        chunk = getdents64(fd, 1024)
        if not chunk:
            break
        rest.extend(nm for nm, _ in chunk if nm not in (".", ".."))
    os.close(fd)
    allread = seen + rest
    survivors = set(names) - deleted
    return {"first_batch_partial": 0 < len(seen) < n,
            "no_duplicates": len(allread) == len(set(allread)),
            "all_survivors_read": survivors <= set(allread),
            "only_known_names": set(allread) <= set(names),
            "relisting_equal": sorted(os.listdir(d)) == sorted(survivors),
            "dtypes_regular": all(t == 8 for nm, t in first if nm not in (".", ".."))}


def check_big_file(d, mib=256):
    """A deterministic file of `mib` MiB, written in 1 MiB blocks, read back."""
    p = J(d, "big.bin")
    h = hashlib.sha256()
    fd = os.open(p, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    t0 = time.monotonic()
    for i in range(mib):
        b = big_block(i)
        h.update(b)
        view = memoryview(b)
        while view:
            view = view[os.write(fd, view):]
    os.fsync(fd)
    os.close(fd)
    t1 = time.monotonic()
    h2 = hashlib.sha256()
    fd = os.open(p, os.O_RDONLY)
    buf = bytearray(BIG_BLOCK)
    total = 0
    while True:
        n = os.readv(fd, [buf])
        if n == 0:
            break
        h2.update(memoryview(buf)[:n])
        total += n
    os.close(fd)
    t2 = time.monotonic()
    info = {"write_mib_s": round(mib / max(t1 - t0, 1e-6), 1), "read_mib_s": round(mib / max(t2 - t1, 1e-6), 1),
            "sha256": h.hexdigest()}
    print(PREFIX + json.dumps({"info": "big_file", **info}), flush=True)
    return {"size": os.lstat(p).st_size, "read_bytes": total, "sha256_equal": h.hexdigest() == h2.hexdigest()}


def big_file_expected(mib):
    return {"size": mib * BIG_BLOCK, "read_bytes": mib * BIG_BLOCK, "sha256_equal": True}


def check_mmap_shared(d):
    p = J(d, "mmap.bin")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    os.ftruncate(fd, MMAP_SIZE)
    try:
        m = mmap.mmap(fd, MMAP_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        os.close(fd)
        return {"mmap": "E:" + ename(e.errno)}
    exp = mmap_expected()
    for i in range(MMAP_SIZE // 4096):
        off = i * 4096
        m[off:off + 32] = exp[off:off + 32]
        m[off + 100] = exp[off + 100]
    m.flush()  # msync(MS_SYNC)
    m.close()
    os.close(fd)
    with open(p, "rb") as f:
        back = f.read()
    return {"mmap": "ok", "read_back_equal": back == exp}


def check_mmap_private(d):
    p = J(d, "priv.bin")
    write_file(p, b"P" * 8192)
    fd = os.open(p, os.O_RDONLY)
    try:
        m = mmap.mmap(fd, 8192, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        os.close(fd)
        return {"mmap": "E:" + ename(e.errno)}
    first = m[:4]
    m[:4] = b"WXYZ"  # copy-on-write: never reaches the file
    m.close()
    os.close(fd)
    return {"mmap": "ok", "first": first.decode(), "file_unchanged": read_file(p) == "P" * 8192}


def _flock(fd, cmd, ltype, start=0, length=100):
    arg = FLOCK.pack(ltype, os.SEEK_SET, start, length, 0)
    return FLOCK.unpack(fcntl.fcntl(fd, cmd, arg))


def check_fcntl_lock(d):
    p = J(d, "lockfile")
    write_file(p, b"L" * 200)
    fd = os.open(p, os.O_RDWR)
    _flock(fd, fcntl.F_SETLK, fcntl.F_WRLCK)
    ready_r, ready_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.close(res_r)
            fd2 = os.open(p, os.O_RDWR)
            c = {"setlk": E(lambda: _flock(fd2, fcntl.F_SETLK, fcntl.F_WRLCK) and "ok")}
            gl = _flock(fd2, fcntl.F_GETLK, fcntl.F_WRLCK)
            c["getlk_type"] = {fcntl.F_WRLCK: "F_WRLCK", fcntl.F_RDLCK: "F_RDLCK",
                               fcntl.F_UNLCK: "F_UNLCK"}.get(gl[0], gl[0])
            c["getlk_range"] = (gl[2], gl[3])
            c["setlk_other_range"] = E(lambda: _flock(fd2, fcntl.F_SETLK, fcntl.F_WRLCK, 150, 10) and "ok")
            os.write(ready_w, b"1")
            t0 = time.monotonic()
            c["setlkw"] = E(lambda: _flock(fd2, fcntl.F_SETLKW, fcntl.F_WRLCK) and "ok")
            c["waited_s"] = time.monotonic() - t0
            os.write(res_w, json.dumps(c).encode())
        except BaseException as e:  # noqa: BLE001
            os.write(res_w, json.dumps({"child_exception": repr(e)}).encode())
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(res_w)
    r = {"child_ready": os.read(ready_r, 1) == b"1"}
    hold = 1.0
    time.sleep(hold)
    rl, _, _ = select.select([res_r], [], [], 0)
    r["child_still_blocked"] = not rl
    _flock(fd, fcntl.F_SETLK, fcntl.F_UNLCK)
    rl, _, _ = select.select([res_r], [], [], 30)
    data = read_all(res_r) if rl else b""
    os.waitpid(pid, 0)
    os.close(ready_r)
    os.close(res_r)
    os.close(fd)
    c = json.loads(data) if data else {"child": "no answer in 30 s"}
    waited = c.pop("waited_s", None)
    r["child_waited_for_release"] = waited is not None and waited >= hold * 0.8
    r["child"] = c
    return r


def check_fcntl_getlk_pid(d):
    """F_GETLK names the holder: l_pid is the holding guest process (a local
    file system reports it; a daemon that answers 0 or a host pid does not)."""
    p = J(d, "lockfile")
    write_file(p, b"L" * 10)
    fd = os.open(p, os.O_RDWR)
    _flock(fd, fcntl.F_SETLK, fcntl.F_RDLCK, 0, 0)
    res_r, res_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(res_r)
            fd2 = os.open(p, os.O_RDWR)
            gl = _flock(fd2, fcntl.F_GETLK, fcntl.F_WRLCK, 0, 0)
            who = "holder" if gl[4] == parent else ("zero" if gl[4] == 0 else f"other pid {gl[4]}")
            os.write(res_w, json.dumps({"type": gl[0] == fcntl.F_RDLCK, "l_pid": who}).encode())
        finally:
            os._exit(0)
    os.close(res_w)
    data = os.read(res_r, 65536)
    os.close(res_r)
    os.waitpid(pid, 0)
    os.close(fd)
    return json.loads(data) if data else "no answer"


def check_errors(d):
    write_file(J(d, "file"), b"f")
    os.mkdir(J(d, "dir"))
    return {
        "open_missing": E(os.open, J(d, "missing"), os.O_RDONLY),
        "stat_missing": st(J(d, "missing")),
        "mkdir_existing_file": E(os.mkdir, J(d, "file")),
        "mkdir_existing_dir": E(os.mkdir, J(d, "dir")),
        "open_excl_existing": E(os.open, J(d, "file"), os.O_CREAT | os.O_EXCL | os.O_WRONLY),
        "file_as_dir": E(os.open, J(d, "file", "x"), os.O_RDONLY),
        "create_under_file": E(os.open, J(d, "file", "x"), os.O_CREAT | os.O_WRONLY, 0o644),
        "stat_trailing_slash": st(J(d, "file") + "/"),
        "listdir_file": E(os.listdir, J(d, "file")),
        "open_dir_write": E(os.open, J(d, "dir"), os.O_WRONLY),
        "open_dir_rdwr": E(os.open, J(d, "dir"), os.O_RDWR),
        "open_directory_flag_on_file": E(os.open, J(d, "file"), os.O_RDONLY | os.O_DIRECTORY),
        "name_too_long": E(os.open, J(d, "n" * 256), os.O_CREAT | os.O_WRONLY, 0o644),
        "name_255_ok": ok(lambda: os.close(os.open(J(d, "m" * 255), os.O_CREAT | os.O_WRONLY, 0o644))),
        "rmdir_dot": E(os.rmdir, J(d, "dir", ".")),
        "read_dir_fd": E(_on_fd, J(d, "dir"), os.O_RDONLY, lambda fd: os.read(fd, 10)),
        "write_rdonly_fd": E(_on_fd, J(d, "file"), os.O_RDONLY, lambda fd: os.write(fd, b"x")),
    }


def _on_fd(path, flags, fn):
    fd = os.open(path, flags)
    try:
        return fn(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# credentials of unprivileged callers with supplementary groups (issue 20)

USER, GROUPS = 65534, (65532, 65531)


def as_user(fn, uid=USER, gid=USER, groups=GROUPS, umask=0):
    """fn() in a child process that is ``uid``/``gid`` with supplementary
    ``groups`` (what ``setpriv --reuid --regid --groups`` makes); its
    JSON-able result, or {"child_exception": ...}."""
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(res_r)
            os.setgroups(list(groups))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            os.umask(umask)
            out = fn()
        except BaseException as e:  # noqa: BLE001
            out = {"child_exception": repr(e)}
        try:
            os.write(res_w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(res_w)
    data = read_all(res_r)
    os.close(res_r)
    os.waitpid(pid, 0)
    return json.loads(data) if data else "no answer"


def check_credentials(d):
    """A non-root guest caller: files it creates are its own; it cannot read
    root's 0600 file. (The host test checks the owners on the host too.)"""
    os.chmod(d, 0o777)
    write_file(J(d, "root600"), b"secret", 0o600)
    os.chmod(J(d, "root600"), 0o600)

    def child():
        c = {}
        c["create"] = ok(write_file, J(d, "u1234.txt"), b"made by 1234", 0o640)
        c["stat"] = st(J(d, "u1234.txt"))
        c["mkdir"] = ok(os.mkdir, J(d, "u1234dir"), 0o700)
        c["dir_stat"] = st(J(d, "u1234dir"))
        c["read_root600"] = E(os.open, J(d, "root600"), os.O_RDONLY)
        c["chmod_root600"] = E(os.chmod, J(d, "root600"), 0o666)
        c["chown_own"] = E(os.chown, J(d, "u1234.txt"), 0, 0)
        c["utime_root600"] = E(os.utime, J(d, "root600"), (1, 1))
        c["unlink_root600_in_0777_dir"] = ok(os.unlink, J(d, "root600"))
        return c

    return {"child": as_user(child, 1234, 1234, (), umask=0o022), "root_file_owner": st(d)}


def _mode(path):
    return oct(stat.S_IMODE(os.lstat(path).st_mode))


def _write_byte(path, flags):
    fd = os.open(path, flags)
    try:
        return os.write(fd, b"x")
    finally:
        os.close(fd)


def check_suid_write_by_non_owner(d):
    """Root's SUID/SGID files, written, truncated and opened O_TRUNC by
    another user: the write works and the bits go as on a local disk."""
    os.chmod(d, 0o777)
    # (not 02767, SGID without group execute: Linux 6.1's VFS clears it for a
    # writer outside the group, its FUSE client never asks to: a FUSE
    # limit, docs/credentials.md)
    modes = {"s4777": 0o4777, "s2777": 0o2777, "s6777": 0o6777, "rw4777": 0o4777,
             "t4777": 0o4777, "o4777": 0o4777, "root4777": 0o4777}
    for name, mode in modes.items():
        write_file(J(d, name), b"0123456789", mode)
        os.chmod(J(d, name), mode)

    def child():
        r = {}
        for name in ("s4777", "s2777", "s6777"):
            r[name] = E(_write_byte, J(d, name), os.O_WRONLY)
        r["rw4777"] = E(_write_byte, J(d, "rw4777"), os.O_RDWR)
        r["t4777"] = E(os.truncate, J(d, "t4777"), 3)
        r["o4777"] = ok(lambda: os.close(os.open(J(d, "o4777"), os.O_WRONLY | os.O_TRUNC)))
        return r

    r = {"child": as_user(child)}
    r["root4777"] = E(_write_byte, J(d, "root4777"), os.O_WRONLY)  # CAP_FSETID: kept
    r["modes"] = {name: _mode(J(d, name)) for name in modes}
    r["sizes"] = {name: os.lstat(J(d, name)).st_size for name in ("t4777", "o4777", "s4777")}
    return r


# a version-2 file capability (struct vfs_cap_data): CAP_NET_BIND_SERVICE
# permitted, nothing else
FILE_CAP = (0x02000000).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little") + bytes(12)


def _ftruncate(path, size):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _file_cap(path):
    try:
        return os.getxattr(path, "security.capability").hex()
    except OSError as e:
        return "E:" + ename(e.errno)


def check_killpriv(d):
    """What FUSE_HANDLE_KILLPRIV_V2 (our default) leaves to the daemon, by
    callers without CAP_FSETID: a write by the file's owner, ftruncate and
    open(O_TRUNC) by owner and non-owner clear SUID and SGID (SGID only
    with group execute); a write drops a file capability (security.capability)
    whoever writes; root (CAP_FSETID) keeps SUID on ftruncate and
    open(O_TRUNC). Compared with the same operations on tmpfs."""
    os.chmod(d, 0o777)
    # (no SGID without group execute: which writer clears it differs between
    # kernels, docs/credentials.md's known limits)
    mine = {"own_write": 0o6775, "own_ftrunc": 0o4755, "own_otrunc": 0o6755, "own_cap": 0o755}
    roots = {"other_ftrunc": 0o6777, "other_otrunc": 0o2777, "root_ftrunc": 0o6777, "root_otrunc": 0o4777,
             "root_cap": 0o755}
    for name, mode in {**mine, **roots}.items():
        write_file(J(d, name), b"0123456789", mode)
        os.chmod(J(d, name), mode)
        if name in mine:
            os.chown(J(d, name), USER, USER)
            os.chmod(J(d, name), mode)      # chown cleared the bits
    caps = {}
    for name in ("own_cap", "root_cap"):
        caps[name] = ok(os.setxattr, J(d, name), "security.capability", FILE_CAP)

    def child():
        r = {}
        for name in ("own_write", "own_cap"):
            r[name] = E(_write_byte, J(d, name), os.O_WRONLY)
        for name in ("own_ftrunc", "other_ftrunc"):
            r[name] = E(_ftruncate, J(d, name), 4)
        for name in ("own_otrunc", "other_otrunc"):
            r[name] = ok(lambda n=name: os.close(os.open(J(d, n), os.O_WRONLY | os.O_TRUNC)))
        return r

    r = {"set_caps": caps, "child": as_user(child, groups=())}
    r["root_ftrunc"] = E(_ftruncate, J(d, "root_ftrunc"), 4)
    r["root_otrunc"] = ok(lambda: os.close(os.open(J(d, "root_otrunc"), os.O_WRONLY | os.O_TRUNC)))
    r["root_cap"] = E(_write_byte, J(d, "root_cap"), os.O_WRONLY)
    r["modes"] = {name: _mode(J(d, name)) for name in {**mine, **roots}}
    r["caps_after"] = {name: _file_cap(J(d, name)) for name in ("own_cap", "root_cap")}
    r["sizes"] = {name: os.lstat(J(d, name)).st_size for name in ("own_ftrunc", "other_otrunc", "root_ftrunc")}
    return r


def check_chown_supp_group(d):
    """The owner gives its file to one of its supplementary groups (chown,
    lchown), on a plain and a 06555 file; an SGID chmod as a member."""
    os.chmod(d, 0o777)
    for name, mode in (("plain", 0o644), ("bits", 0o6555), ("member", 0o640)):
        write_file(J(d, name), b"x", mode)
        os.chmod(J(d, name), mode)
        os.chown(J(d, name), USER, USER)
    os.chown(J(d, "member"), USER, 65531)
    os.symlink("plain", J(d, "sl"))
    os.lchown(J(d, "sl"), USER, USER)

    def child():
        return {"chown": E(os.chown, J(d, "plain"), USER, 65531),
                "chown_bits": E(os.chown, J(d, "bits"), -1, 65532),
                "lchown": E(os.lchown, J(d, "sl"), USER, 65531),
                "chown_not_member": E(os.chown, J(d, "plain"), -1, 4321),
                "chmod_sgid_member": E(os.chmod, J(d, "member"), 0o2750)}

    r = {"child": as_user(child)}
    r["after"] = {name: st(J(d, name)) for name in ("plain", "bits", "sl", "member")}
    return r


def check_supp_group_create(d):
    """Creating in directories the caller may write only through a
    supplementary group (a plain one and a setgid one)."""
    for name, mode in (("grp", 0o770), ("sgid", 0o2770)):
        os.mkdir(J(d, name))
        os.chown(J(d, name), 0, 65531)
        os.chmod(J(d, name), mode)

    def child():
        r = {}
        for parent in ("grp", "sgid"):
            r[parent + "_file"] = ok(write_file, J(d, parent, "f"), b"made", 0o640)
            r[parent + "_mkdir"] = ok(os.mkdir, J(d, parent, "sub"), 0o750)
            r[parent + "_symlink"] = ok(os.symlink, "f", J(d, parent, "l"))
            r[parent + "_fifo"] = ok(os.mkfifo, J(d, parent, "p"), 0o600)
        return r

    r = {"child": as_user(child)}
    r["after"] = {f"{p}/{n}": st(J(d, p, n)) for p in ("grp", "sgid") for n in ("f", "sub", "l", "p")}
    return r


def check_supp_group_setgid_create(d):
    """A member of a setgid directory's group through a supplementary group
    creates a setgid file there: it keeps the bit. Linux 6.1 cannot tell the
    daemon the caller is in the group (FUSE_CREATE_SUPP_GROUP is 6.6+), so
    there the host clears it: "known" on platform a (docs/credentials.md)."""
    os.mkdir(J(d, "sgid"))
    os.chown(J(d, "sgid"), 0, 65531)
    os.chmod(J(d, "sgid"), 0o2770)

    def child():  # no write: a write would itself clear SGID (group x)
        return {"create": ok(lambda: os.close(os.open(J(d, "sgid", "f"), os.O_WRONLY | os.O_CREAT
                                                      | os.O_EXCL, 0o2750))),
                "mknod": ok(os.mkfifo, J(d, "sgid", "p"), 0o2750)}

    r = {"child": as_user(child)}
    r["after"] = {n: st(J(d, "sgid", n)) for n in ("f", "p")}
    return r


# --------------------------------------------------------------------------
# runner

CHECKS = [
    "create_read_write", "append", "write_only_partial", "truncate", "mkdir_rmdir", "unlink", "rename",
    "rename_noreplace", "rename_exchange", "link", "symlink", "mknod_fifo",
    "chmod_chown_utime", "xattr", "statvfs", "fallocate", "fallocate_keep_size",
    "fallocate_punch_hole", "seek_data_hole", "copy_file_range", "fsync", "big_dir",
    "getdents_unlink_middle", "big_file", "mmap_shared", "mmap_private", "fcntl_lock",
    "fcntl_getlk_pid", "errors", "credentials", "suid_write_by_non_owner", "chown_supp_group",
    "supp_group_create", "supp_group_setgid_create",
]
# run only when named with --only (test_guest_credentials): the reference
# daemons differ on purpose (the Rust one's default is no KILLPRIV_V2 and it
# keeps SUID on another user's open(O_TRUNC); the C one has no xattrs by default)
ONLY_CHECKS = ["killpriv"]


def run_check(fn, d):
    os.makedirs(d)
    try:
        return fn(d)
    except Exception as e:  # noqa: BLE001 - an unexpected exception is an outcome
        tb = traceback.extract_tb(e.__traceback__)[-1]
        errname = ename(e.errno) if isinstance(e, OSError) and e.errno else ""
        return {"raised": f"{type(e).__name__} {errname} at line {tb.lineno}".strip()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default="/tmp/guestops-ref", help="reference dir (tmpfs)")
    ap.add_argument("--target", default="/mnt/guestops", help="dir on the virtiofs mount")
    ap.add_argument("--cache", default="auto", help="the daemon's cache mode (never: no MAP_SHARED)")
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--dir-entries", type=int, default=10_000)
    ap.add_argument("--known", action="append", default=[], help="check whose mismatch is known")
    ap.add_argument("--only", action="append", default=[], help="run only these checks")
    ap.add_argument("--skip", action="append", default=[])
    a = ap.parse_args(argv)
    os.umask(0o022)
    for base in (a.ref, a.target):
        if os.path.exists(base):
            shutil.rmtree(base)
        os.makedirs(base)
    ref_fs = os.statvfs(a.ref)
    tgt_fs = os.statvfs(a.target)
    print(PREFIX + json.dumps({"info": "start", "ref": a.ref, "target": a.target, "cache": a.cache,
                               "same_fs": ref_fs.f_fsid == tgt_fs.f_fsid}), flush=True)
    counts = {"pass": 0, "FAIL": 0, "known": 0, "skip": 0}
    failed, known = [], []
    t_all = time.monotonic()
    for name in CHECKS + [n for n in ONLY_CHECKS if n in a.only]:
        if (a.only and name not in a.only) or name in a.skip:
            counts["skip"] += 1
            print(PREFIX + json.dumps({"check": name, "status": "skip"}), flush=True)
            continue
        fn = globals()["check_" + name]
        kwargs = {}
        if name == "big_dir":
            kwargs = {"n": a.dir_entries}
        if name == "big_file":
            kwargs = {"mib": a.big_mib}
        t0 = time.monotonic()
        # reference outcome
        if name == "xattr":
            ref = XATTR_EXPECTED
        elif name == "big_file":
            ref = big_file_expected(a.big_mib)
        elif name == "mmap_shared" and a.cache in ("never", "none"):
            ref = {"mmap": "E:ENODEV"}  # 6.1: no shared mmap on FOPEN_DIRECT_IO files
        else:
            ref = run_check(lambda dd: fn(dd, **kwargs), J(a.ref, name))  # noqa: B023 - called at once
        t1 = time.monotonic()
        tgt = run_check(lambda dd: fn(dd, **kwargs), J(a.target, name))  # noqa: B023 - called at once
        t2 = time.monotonic()
        same = json.loads(json.dumps(ref)) == json.loads(json.dumps(tgt))
        status = "pass" if same else ("known" if name in a.known else "FAIL")
        counts[status] += 1
        line = {"check": name, "status": status, "ms": round((t2 - t1) * 1000),
                "ref_ms": round((t1 - t0) * 1000)}
        if not same:
            line["ref"] = ref
            line["target"] = tgt
            (failed if status == "FAIL" else known).append(name)
        print(PREFIX + json.dumps(line), flush=True)
    summary = {"summary": True, "passed": counts["pass"], "failed": counts["FAIL"],
               "known": counts["known"], "skipped": counts["skip"], "failed_checks": failed,
               "known_checks": known, "seconds": round(time.monotonic() - t_all, 1)}
    print(PREFIX + json.dumps(summary), flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
