"""FUSE attribute ops: GETATTR, SETATTR, READLINK, STATFS.

They act on the inode's O_PATH fd (or, when the guest names an open file
with GETATTR_FH / FATTR_FH, on that open file). Calls that do not accept an
O_PATH fd go through the fd's /proc magic link, ``str(fd)`` relative to the
worker's cwd /proc/self/fd (INTERNALS "per-process facts"): that reaches
exactly the inode, and for a symlink the link itself — checked on Linux 6.x
for utimensat and linkat — never its target.

- chmod: ``fchmod`` on an open fh, else ``chmod`` through the magic link;
  symlinks have no mode of their own on Linux: EOPNOTSUPP (what
  ``fchmodat(AT_SYMLINK_NOFOLLOW)`` says).
- chown: ``fchownat(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)`` (works on
  O_PATH fds, symlinks included; no capability needed beyond chown's own).
- truncate: ``ftruncate`` on an open fh, else ``truncate`` through the magic
  link (no open(2), so no FIFO can block and no device is opened); only
  regular files (directories EISDIR, others EINVAL).
- times: ``utimensat`` with UTIME_NOW / UTIME_OMIT as the guest asked,
  through the magic link (or ``futimens`` on an open fh).
- FATTR_CTIME (writeback cache only, not negotiated) cannot be set on Linux
  and is ignored: ctime changes with every other change anyway.
- Credentials: the worker's own (docs/credentials.md). The guest checked
  the caller's right to each change with its full group list (a non-owner
  clearing SUID before a write, a chown to a supplementary group); acting
  as the caller without those groups would refuse what the guest allowed.
  A truncate with FATTR_KILL_SUIDGID (``--killpriv-v2``) runs without
  CAP_FSETID, so the host clears SUID/SGID; chown clears them on the host
  whoever does it (non-directories), as in the guest.

Order: mode, owner, size, times, as libfuse's passthrough, so a truncate
cannot undo the times the guest set in the same request.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from daemon.fuse import abi, credentials
from daemon.fuse.abi import SetattrValid
from daemon.fuse.fs import FileSystem
from daemon.fuse.handles import KIND_FILE
from daemon.fuse.request import FUSEError, Request

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
_NO_ID = 0xFFFFFFFF  # (uid_t)-1: leave unchanged

_V_MODE = int(SetattrValid.MODE)
_V_UID = int(SetattrValid.UID)
_V_GID = int(SetattrValid.GID)
_V_SIZE = int(SetattrValid.SIZE)
_V_ATIME = int(SetattrValid.ATIME)
_V_MTIME = int(SetattrValid.MTIME)
_V_FH = int(SetattrValid.FH)
_V_ATIME_NOW = int(SetattrValid.ATIME_NOW)
_V_MTIME_NOW = int(SetattrValid.MTIME_NOW)
_V_KILL = int(SetattrValid.KILL_SUIDGID)


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


_libc = ctypes.CDLL(None, use_errno=True)
_fchownat = _libc.fchownat
_fchownat.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int)
_fchownat.restype = ctypes.c_int
_utimensat = _libc.utimensat
_utimensat.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int)
_utimensat.restype = ctypes.c_int
_futimens = _libc.futimens
_futimens.argtypes = (ctypes.c_int, ctypes.POINTER(_Timespec))
_futimens.restype = ctypes.c_int
_getattr_in = abi.GETATTR_IN.unpack_from
_GETATTR_IN = abi.GETATTR_IN.size
_GETATTR_FH = abi.FUSE_GETATTR_FH


def _check(ret: int) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _open_fd(fs: FileSystem, fh: int, nodeid: int) -> int | None:
    """The host fd of the guest's open file ``fh`` on ``nodeid``, or None
    (unknown fh, or an fh of another inode: the caller then works on the
    inode itself)."""
    try:
        handle = fs.handles.get(fh, KIND_FILE)
    except FUSEError:
        return None
    return handle.fd if handle.nodeid == nodeid else None


def do_getattr(fs: FileSystem, req: Request):
    """GETATTR: reply fuse_attr_out with the attribute timeout; with
    GETATTR_FH the open file's fstat (falling back to the inode for an
    unknown fh). ESTALE for a stale nodeid. Lookup count: unchanged."""
    args = req.args
    if len(args) >= _GETATTR_IN:
        flags, _dummy, fh = _getattr_in(args)
        if flags & _GETATTR_FH:
            fd = _open_fd(fs, fh, req.nodeid)
            if fd is not None:
                return fs.attr_reply(os.fstat(fd))
    return fs.attr_reply(os.fstat(fs.cache.fd(req.nodeid)))


def _timespec(valid: int, set_bit: int, now_bit: int, sec: int, nsec: int) -> tuple[int, int]:
    if valid & now_bit:
        return 0, UTIME_NOW
    if valid & set_bit:
        if nsec >= 1_000_000_000:
            raise FUSEError(errno.EINVAL)
        return (sec - (1 << 64) if sec > abi.OFFSET_MAX else sec), nsec
    return 0, UTIME_OMIT


def do_setattr(fs: FileSystem, req: Request):
    """SETATTR: change mode, owner, size and/or times as ``valid`` says,
    then reply fuse_attr_out with the new attributes. Errors from the host
    (EPERM, EACCES, EROFS, EFBIG...), EOPNOTSUPP for chmod on a symlink,
    EISDIR/EINVAL for truncating a directory/non-regular file, EINVAL for a
    size above 2^63-1 or nanoseconds ≥ 1e9; EPERM for an owner or group
that --translate-uid/-gid forbids (checked first). FATTR_KILL_SUIDGID: the size
    change clears SUID/SGID as for an unprivileged caller. A failure part-way leaves the
    earlier changes made (as chmod+chown+truncate from a shell would).
    Lookup count: unchanged."""
    if len(req.args) < abi.SETATTR_IN.size:
        raise FUSEError(errno.EINVAL)
    (valid, fh, size, _owner, atime, mtime, _ctime, atimensec, mtimensec, _ctimensec,
     mode, uid, gid) = abi.SETATTR_IN.unpack_from(req.args)
    owner = (uid if valid & _V_UID else None, gid if valid & _V_GID else None)
    if valid & (_V_UID | _V_GID) and fs.config.ids is not None:
        owner = fs.config.ids.host_owner(*owner)   # --translate-uid/-gid; EPERM before any change
    fd = fs.cache.fd(req.nodeid)
    open_fd = _open_fd(fs, fh, req.nodeid) if valid & _V_FH else None
    ftype = stat.S_IFMT(os.fstat(fd).st_mode)
    path = str(fd)  # the magic link, relative to cwd /proc/self/fd
    if valid & _V_MODE:
        if ftype == stat.S_IFLNK:
            raise FUSEError(errno.EOPNOTSUPP)
        if open_fd is not None:
            os.fchmod(open_fd, stat.S_IMODE(mode))
        else:
            os.chmod(path, stat.S_IMODE(mode))
    if valid & (_V_UID | _V_GID):
        _check(_fchownat(fd, b"", _NO_ID if owner[0] is None else owner[0],
                         _NO_ID if owner[1] is None else owner[1],
                         AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))
    if valid & _V_SIZE:
        if size > abi.OFFSET_MAX:
            raise FUSEError(errno.EINVAL)
        if open_fd is None and ftype == stat.S_IFDIR:
            raise FUSEError(errno.EISDIR)
        if open_fd is None and ftype != stat.S_IFREG:
            raise FUSEError(errno.EINVAL)
        with credentials.without_fsetid(bool(valid & _V_KILL)):
            if open_fd is not None:
                os.ftruncate(open_fd, size)
            else:
                os.truncate(path, size)
    if valid & (_V_ATIME | _V_MTIME | _V_ATIME_NOW | _V_MTIME_NOW):
        times = (_Timespec * 2)(
            _Timespec(*_timespec(valid, _V_ATIME, _V_ATIME_NOW, atime, atimensec)),
            _Timespec(*_timespec(valid, _V_MTIME, _V_MTIME_NOW, mtime, mtimensec)))
        if open_fd is not None:
            _check(_futimens(open_fd, times))
        else:
            _check(_utimensat(AT_FDCWD, path.encode(), times, 0))
    return fs.attr_reply(os.fstat(open_fd if open_fd is not None else fd))


def do_readlink(fs: FileSystem, req: Request):
    """READLINK: the symlink's target bytes (no NUL). EINVAL if nodeid is
    not a symlink; EIO if the target does not fit the reply buffer (the
    kernel's is 4095 bytes, PATH_MAX - 1, the most a target can be).
    Lookup count: unchanged."""
    fd = fs.cache.fd(req.nodeid)
    try:
        return os.readlink(b"", dir_fd=fd)
    except FileNotFoundError:
        # readlinkat(fd, "") on an existing non-symlink says ENOENT
        raise FUSEError(errno.EINVAL) from None


def do_statfs(fs: FileSystem, req: Request):
    """STATFS: fuse_kstatfs of the file system holding nodeid (fstatfs
    works on O_PATH fds). Lookup count: unchanged."""
    st = os.fstatvfs(fs.cache.fd(req.nodeid))
    return abi.STATFS_OUT.pack(st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree,
                               st.f_bsize, st.f_namemax, st.f_frsize)
