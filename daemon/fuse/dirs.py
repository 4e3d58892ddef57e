"""FUSE ops on open directories: OPENDIR, READDIR, READDIRPLUS, RELEASEDIR,
FSYNCDIR.

Cookies. A FUSE dirent carries ``off``, the cookie of the *next* entry, and
the guest sends it back as the next READDIR's offset (telldir/seekdir too).
We use the host's own cookie: ``getdents64`` (raw syscall through ctypes:
Python has no binding that exposes ``d_off``) returns ``d_off`` with every
entry, and ``lseek(dirfd, cookie, SEEK_SET)`` goes back to it. The host file
system guarantees that cookie's stability (ext4 hash cookies, tmpfs
offsets), so an entry is listed exactly once even when the listing takes
many requests, and a cookie stays valid across RELEASEDIR/OPENDIR.

Read-ahead. One getdents64 call fills up to 32 KiB, more than one 4 KiB
READDIR reply holds. Each directory handle keeps a ``DirStream``: the bytes
of the last getdents64 call, the position of the first entry not yet sent,
and that entry's cookie. A request whose offset equals that cookie (the
normal sequential listing) continues from the buffer; any other offset
(rewinddir, seekdir, a retry) seeks the host directory to it and refills.
Like glibc's readdir buffer, buffered names can be up to one buffer old.

READDIRPLUS looks up every entry but "." and ".." (+1 lookup each, as the
kernel counts it), and only once the record is known to fit. "." and ".."
go out with nodeid 0: the kernel never links them and never FORGETs them.
An entry that vanished between getdents64 and the lookup (ENOENT) is
skipped; one whose lookup fails otherwise (EACCES in a directory without
search permission, ENFILE from a full inode table...) goes out with nodeid
0, which the kernel documents as "list the name, no attributes", so a
listing never fails because one entry could not be looked up.

An error from the host directory after some records were written ends the
reply with those records; the next request resumes at the first record
not sent. Replies never exceed the request's size, the writable part, or
``MAX_READDIR_SIZE``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from daemon.config import CacheMode
from daemon.fuse import abi
from daemon.fuse.files import sync_on_helper
from daemon.fuse.fs import FileSystem
from daemon.fuse.handles import KIND_DIR, reopen
from daemon.fuse.request import FUSEError, Request
from daemon.log import get_logger

log = get_logger("fuse.session")

SYS_getdents64 = 217  # x86-64
GETDENTS_BUF_SIZE = 32 * 1024
MAX_READDIR_SIZE = 1 << 20  # bound on one reply (the kernel asks for 4 KiB)

# struct linux_dirent64 { u64 d_ino; s64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
LINUX_DIRENT64 = struct.Struct("<QqHB")

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
# One buffer for the (single-threaded) worker; DirStream copies what it got.
_getdents_buf = ctypes.create_string_buffer(GETDENTS_BUF_SIZE)



def _getdents64(fd: int) -> bytes:
    n = _syscall(ctypes.c_long(SYS_getdents64), ctypes.c_long(fd),
                 _getdents_buf, ctypes.c_long(GETDENTS_BUF_SIZE))
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return _getdents_buf.raw[:n]


class DirStream:
    """A host directory read through getdents64, positioned by cookie."""

    __slots__ = ("buf", "pos", "cookie", "reseek")

    def __init__(self):
        self.buf = b""
        self.pos = 0
        # the cookie of the entry at ``pos``; -1: the host position is unknown
        self.cookie = -1
        # the open file description may be shared with another request
        # worker (several request queues, fuse/peers.py), which moves its
        # position: seek to our cookie before each refill
        self.reseek = False

    def peek(self, fd: int, cookie: int) -> tuple[int, int, int, bytes, int] | None:
        """The entry at ``cookie`` as (ino, next cookie, DT_ type, name,
        record length), or None at the end of the directory."""
        if cookie != self.cookie:
            self.buf = b""
            self.pos = 0
            self.cookie = -1
            os.lseek(fd, cookie, os.SEEK_SET)
            self.cookie = cookie
        if self.pos >= len(self.buf):
            self.buf = b""
            self.pos = 0
            try:
                if self.reseek:
                    os.lseek(fd, self.cookie, os.SEEK_SET)
                self.buf = _getdents64(fd)
            except OSError:
                self.cookie = -1
                raise
            if not self.buf:
                return None
        buf, pos = self.buf, self.pos
        if pos + LINUX_DIRENT64.size > len(buf):
            raise self._corrupt()
        ino, next_cookie, reclen, dtype = LINUX_DIRENT64.unpack_from(buf, pos)
        end = pos + reclen
        if reclen <= LINUX_DIRENT64.size or end > len(buf):
            raise self._corrupt()
        nul = buf.find(b"\0", pos + LINUX_DIRENT64.size, end)
        if nul < 0:
            raise self._corrupt()
        return ino, next_cookie, dtype, buf[pos + LINUX_DIRENT64.size:nul], reclen

    def advance(self, reclen: int, next_cookie: int) -> None:
        """Step past the entry ``peek`` returned."""
        self.pos += reclen
        self.cookie = next_cookie

    def _corrupt(self) -> OSError:
        self.buf = b""
        self.pos = 0
        self.cookie = -1
        return OSError(errno.EIO, "malformed getdents64 record")


def _stream(handle) -> DirStream:
    stream = handle.dir_stream
    if stream is None:
        stream = handle.dir_stream = DirStream()
    return stream


def _read_args(req: Request, fs):
    if len(req.args) < abi.READ_IN.size:
        raise FUSEError(errno.EINVAL)
    fh, cookie, size, _read_flags, _owner, _flags = abi.READ_IN.unpack_from(req.args)
    handle = fs.handles.get(fh, KIND_DIR)
    peers = getattr(fs, "peers", None)
    if peers is not None and peers.shared:
        _stream(handle).reseek = True
    if cookie > abi.OFFSET_MAX:
        raise FUSEError(errno.EINVAL)
    limit = min(size, MAX_READDIR_SIZE, req.out.size - abi.OUT_HEADER.size)
    return handle, cookie, max(limit, 0)


def _name_ok(name: bytes) -> bool:
    # host names are 1..255 bytes without '/'; the kernel would EIO the
    # whole reply on anything else, so such an entry is left out
    return 0 < len(name) <= abi.FUSE_NAME_MAX and b"/" not in name


# -- handlers ----------------------------------------------------------------
def do_opendir(fs: FileSystem, req: Request):
    """OPENDIR: reopen the inode as O_RDONLY|O_DIRECTORY (the host refuses a
    non-directory with ENOTDIR before opening anything, so no device is ever
    opened). Reply fuse_open_out {fh, FOPEN_CACHE_DIR|FOPEN_KEEP_CACHE with
    cache=always or metadata, else 0}; ENFILE when the table is full. Lookup count:
    unchanged."""
    if len(req.args) < abi.OPEN_IN.size:
        raise FUSEError(errno.EINVAL)
    path_fd = fs.cache.fd(req.nodeid)
    fs.handles.check_room()
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK
    fd = reopen(path_fd, flags)
    handle = fs.handles.add(fd, req.nodeid, KIND_DIR, flags)
    open_flags = 0
    if fs.config.cache is CacheMode.ALWAYS or fs.config.cache is CacheMode.METADATA:
        open_flags = abi.FOPEN_CACHE_DIR | abi.FOPEN_KEEP_CACHE
    return abi.OPEN_OUT.pack(handle.fh, open_flags)


def do_readdir(fs: FileSystem, req: Request):
    """READDIR: packed fuse_dirent records from the cookie on, as many as fit
    in ``size``; an empty reply is the end of the directory. Lookup count:
    unchanged."""
    handle, cookie, limit = _read_args(req, fs)
    return _fill_names(handle, cookie, limit)


def do_readdirplus(fs: FileSystem, req: Request):
    """READDIRPLUS: packed fuse_direntplus records (entry + dirent) from the
    cookie on. Lookup count: +1 for every record with a nonzero nodeid (all
    entries but "." and ".." and the ones whose lookup failed); an entry is
    looked up only after its record is known to fit, so nothing is undone."""
    handle, cookie, limit = _read_args(req, fs)
    fd = handle.fd

    def pack(out, at, ino, next_cookie, dtype, name):
        return _pack_plus(fs, fd, out, at, ino, next_cookie, dtype, name)

    return _fill(handle, cookie, limit, abi.direntplus_size, pack)


def _fill(handle, cookie: int, limit: int, record_size, pack) -> bytearray:
    """The READDIR/READDIRPLUS loop: from ``cookie`` on, every entry with a
    valid name whose record (``record_size(namelen)`` bytes) still fits in
    ``limit`` is written by ``pack(out, at, ino, next_cookie, dtype, name)``,
    which returns False to leave an entry out (it vanished). The stream
    advances past an entry only once it is written or left out, so the next
    call resumes at the first one that did not fit. A host error after some
    records ends the reply early; before any, it is the reply."""
    stream = _stream(handle)
    out = bytearray(limit)
    used = 0
    fd = handle.fd
    while True:
        try:
            entry = stream.peek(fd, cookie)
        except OSError:
            if used:
                break
            raise
        if entry is None:
            break
        ino, next_cookie, dtype, name, reclen = entry
        if _name_ok(name):
            size = record_size(len(name))
            if used + size > limit:
                break
            if pack(out, used, ino, next_cookie, dtype, name):
                used += size
        stream.advance(reclen, next_cookie)
        cookie = next_cookie
    del out[used:]
    return out


def _fill_names(handle, cookie: int, limit: int) -> bytearray:
    """READDIR's loop: what ``_fill`` does with fuse_dirent records, written
    out for one whole getdents64 buffer at a time (a fuse_dirent is the
    host's linux_dirent64 with a u32 name length: one unpack, one find, one
    pack and one copy per entry, no call), since a plain listing is all
    entries and no lookups. Same rules: names that are not valid are left
    out, the stream stops at the first record that does not fit, a host
    error (or a malformed host record) after some records ends the reply
    early."""
    stream = _stream(handle)
    out = bytearray(limit)
    used = 0
    fd = handle.fd
    unpack = LINUX_DIRENT64.unpack_from
    pack = abi.DIRENT.pack_into
    head = LINUX_DIRENT64.size          # 19: the name starts here
    out_head = abi.DIRENT.size          # 24
    while True:
        try:
            if stream.peek(fd, cookie) is None:  # seeks or refills as needed
                break
        except OSError:
            if used:
                break
            raise
        buf, pos = stream.buf, stream.pos
        n = len(buf)
        while pos < n:
            if pos + head > n:
                break
            ino, next_cookie, reclen, dtype = unpack(buf, pos)
            end = pos + reclen
            if reclen <= head or end > n:
                break
            nul = buf.find(b"\0", pos + head, end)
            if nul < 0:
                break
            namelen = nul - pos - head
            if 0 < namelen <= abi.FUSE_NAME_MAX and buf.find(b"/", pos + head, nul) < 0:
                size = (out_head + namelen + 7) & ~7
                if used + size > limit:
                    stream.pos, stream.cookie = pos, cookie
                    del out[used:]
                    return out
                pack(out, used, ino, next_cookie, namelen, dtype)
                out[used + out_head:used + out_head + namelen] = buf[pos + head:nul]
                used += size
            pos = end
            cookie = next_cookie
        else:
            stream.pos, stream.cookie = pos, cookie
            continue
        error = stream._corrupt()  # a malformed record in this buffer
        if used:
            break
        raise error
    del out[used:]
    return out


def _lookup_entry(fs: FileSystem, dir_fd: int, name: bytes) -> bytes | None | bool:
    """The lookup of a READDIRPLUS entry (not "." or ".."): its
    fuse_entry_out (+1 lookup), False if it vanished (ENOENT), None if the
    lookup failed otherwise (a nodeid-0 record)."""
    try:
        return fs.entry(dir_fd, os.fsdecode(name))
    except (FUSEError, OSError) as e:
        if e.errno == errno.ENOENT:
            return False
        return None


def plus_entry(fs: FileSystem, dir_fd: int, name: bytes) -> bytes | None | bool | int:
    """``_lookup_entry`` for the compiled READDIRPLUS (_readdir.h), for an
    entry its C declined: what ``_pack_plus`` does with it; any other
    exception (which fails Python's whole request with EIO, as
    ``FuseSession._handle`` answers it) logged and given as EIO."""
    try:
        return _lookup_entry(fs, dir_fd, name)
    except Exception:  # noqa: BLE001 - as FuseSession._handle: EIO, keep serving
        log.exception("FUSE READDIRPLUS (compiled, an entry's lookup in Python) failed")
        return errno.EIO


def _pack_plus(fs: FileSystem, dir_fd: int, out: bytearray, at: int, ino: int, next_cookie: int,
               dtype: int, name: bytes) -> bool:
    """Write one direntplus record at ``at``; False if the entry vanished."""
    entry = None
    if name != b"." and name != b"..":
        got = _lookup_entry(fs, dir_fd, name)
        if got is False:
            return False
        entry = got if isinstance(got, bytes) else None
    namelen = len(name)
    if entry is None:
        # nodeid 0: listed by name only, no lookup count (libfuse fills the
        # same two attr fields for "." and "..")
        abi.DIRENTPLUS.pack_into(
            out, at,
            0, 0, 0, 0, 0, 0,  # nodeid, generation, entry/attr valid (+nsec)
            ino, 0, 0, 0, 0, 0, 0, 0, 0, dtype << 12, 0, 0, 0, 0, 0, 0,  # attr
            ino, next_cookie, namelen, dtype)
    else:
        out[at:at + abi.ENTRY_OUT.size] = entry
        attr_ino, mode = abi.ENTRY_OUT_INO_MODE.unpack_from(entry)
        abi.DIRENT.pack_into(out, at + abi.ENTRY_OUT.size, attr_ino, next_cookie, namelen,
                             (mode >> 12) & 0o17)
    start = at + abi.DIRENTPLUS.size
    out[start:start + namelen] = name
    return True


def do_releasedir(fs: FileSystem, req: Request):
    """RELEASEDIR: close the directory handle. Reply: empty; EBADF for an
    unknown fh (ignored by the kernel). Lookup count: unchanged."""
    if len(req.args) < abi.RELEASE_IN.size:
        raise FUSEError(errno.EINVAL)
    fh = abi.RELEASE_IN.unpack_from(req.args)[0]
    fs.handles.close(fh, KIND_DIR)
    return b""


def do_fsyncdir(fs: FileSystem, req: Request):
    """FSYNCDIR: fsync (or fdatasync with FUSE_FSYNC_FDATASYNC) the open
    directory on a helper thread, as FSYNC. Reply: empty, or the call's
    errno. Lookup count: unchanged."""
    if len(req.args) < abi.FSYNC_IN.size:
        raise FUSEError(errno.EINVAL)
    fh, fsync_flags = abi.FSYNC_IN.unpack_from(req.args)
    handle = fs.handles.get(fh, KIND_DIR)
    return sync_on_helper(fs, req, handle.fd, fsync_flags & abi.FUSE_FSYNC_FDATASYNC)
