"""FUSE extended-attribute ops: SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR.

The inode is reached through its O_PATH fd's /proc magic link, as the path
``str(fd)`` relative to the worker's cwd /proc/self/fd, with the path-based
xattr calls in their following form. No file is opened for this, so it is
safe for every file type, and it acts on the inode itself: following the
magic link of an O_PATH fd on a symlink lands on the symlink, not on its
target (checked on Linux 6.x: ``setxattr("/proc/self/fd/N", "trusted.x")``
on an O_PATH|O_NOFOLLOW fd of a symlink sets it on the link). That is the
approach of the C and the Rust virtiofsd for non-regular files (they fchdir
to /proc/self/fd for it); we use it for all types, which saves them the
extra open for regular files and directories. The host kernel then applies
its own rules: ``user.*`` on a symlink or device node is EPERM, as on any
Linux file system.

Names are NUL-terminated, 1..255 bytes (XATTR_NAME_MAX), and may contain
'/' (they are not path components), so they are checked here rather than by
``names.parse_name``; they are passed to the host as bytes, undecoded.
Values and lists are bounded by 64 KiB (XATTR_SIZE_MAX, XATTR_LIST_MAX).

``--xattr`` off: all four answer ENOSYS, which the kernel remembers, so it
stops asking and answers EOPNOTSUPP itself.

SETXATTR's in-struct is the 8-byte ``fuse_setxattr_in``: we never
negotiate FUSE_SETXATTR_EXT (the 16-byte form).

``--xattrmap`` (xattrmap.py): the guest's names in GETXATTR, SETXATTR and
REMOVEXATTR become the host's before any host call (a refused name is
EPERM/ENOTSUP with no host call at all; GETXATTR answers ENODATA instead
of EPERM, as the Rust and C daemons do), and LISTXATTR's host names become
the guest's, hidden ones left out, before the size is counted.
"""

from __future__ import annotations

import errno
import os

from daemon.fuse import abi, acl
from daemon.fuse.fs import FileSystem
from daemon.fuse.request import FUSEError, Request

XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 1 << 16
XATTR_LIST_MAX = 1 << 16
XATTR_CREATE = 1
XATTR_REPLACE = 2


def parse_xattr_name(buf, start: int = 0) -> tuple[bytes, int]:
    """The NUL-terminated attribute name at ``start`` and the offset just
    past its NUL; EINVAL if unterminated, ERANGE if empty or too long (what
    the host's syscalls say for those)."""
    data = bytes(buf[start:start + XATTR_NAME_MAX + 1])
    nul = data.find(b"\0")
    if nul < 0:
        raise FUSEError(errno.ERANGE if len(data) > XATTR_NAME_MAX else errno.EINVAL)
    if nul == 0:
        raise FUSEError(errno.ERANGE)
    return data[:nul], start + nul + 1


def _inode_path(fs: FileSystem, nodeid: int) -> str:
    if not fs.config.xattr:
        raise FUSEError(errno.ENOSYS)
    return str(fs.cache.fd(nodeid))


def _host_name(fs, name: bytes) -> bytes:
    """The host's name for the guest's attribute ``name`` (--xattrmap);
    ENOTSUP for an ACL name without --posix-acl (acl.py)."""
    acl.check_name(fs, name)
    xattrmap = fs.config.xattrmap
    return name if xattrmap is None else xattrmap.to_host(name)


def _reply_sized(req: Request, value: bytes, asked: int):
    """The GETXATTR/LISTXATTR convention: size 0 asks for the size needed;
    otherwise the value itself, or ERANGE when it is larger than asked (or
    than the reply buffer, which is the same thing to the guest)."""
    if asked == 0:
        return abi.GETXATTR_OUT.pack(len(value))
    if len(value) > asked or len(value) > req.out.size - abi.OUT_HEADER.size:
        raise FUSEError(errno.ERANGE)
    return value


# -- handlers ----------------------------------------------------------------
def do_setxattr(fs: FileSystem, req: Request):
    """SETXATTR: set ``name`` to the ``size`` value bytes that follow it.
    ``flags`` may be XATTR_CREATE or XATTR_REPLACE. EINVAL when the data
    present is not exactly ``size`` bytes, E2BIG above 64 KiB. Reply: empty.
    Lookup count: unchanged."""
    path = _inode_path(fs, req.nodeid)
    args = req.args
    if len(args) < abi.SETXATTR_IN.size:
        raise FUSEError(errno.EINVAL)
    size, flags = abi.SETXATTR_IN.unpack_from(args)
    if size > XATTR_SIZE_MAX:
        raise FUSEError(errno.E2BIG)
    if flags & ~(XATTR_CREATE | XATTR_REPLACE):
        raise FUSEError(errno.EINVAL)
    name, value_at = parse_xattr_name(args, abi.SETXATTR_IN.size)
    if len(args) - value_at != size:
        raise FUSEError(errno.EINVAL)
    os.setxattr(path, _host_name(fs, name), bytes(args[value_at:]), flags)
    return b""


def do_getxattr(fs: FileSystem, req: Request):
    """GETXATTR: size 0 → fuse_getxattr_out {value size}; else the value, or
    ERANGE if it is longer than ``size``. Lookup count: unchanged."""
    path = _inode_path(fs, req.nodeid)
    args = req.args
    if len(args) < abi.GETXATTR_IN.size:
        raise FUSEError(errno.EINVAL)
    asked, = abi.GETXATTR_IN.unpack_from(args)
    name, end = parse_xattr_name(args, abi.GETXATTR_IN.size)
    if end != len(args):
        raise FUSEError(errno.EINVAL)
    try:
        host_name = _host_name(fs, name)
    except FUSEError as e:
        # a name the rules refuse reads as absent, as in both reference daemons
        raise FUSEError(errno.ENODATA if e.errno == errno.EPERM else e.errno) from None
    return _reply_sized(req, os.getxattr(path, host_name), asked)


def do_listxattr(fs: FileSystem, req: Request):
    """LISTXATTR: the names, each NUL-terminated (size 0 → the size needed,
    ERANGE if longer than ``size``, E2BIG above 64 KiB as the host's own
    listxattr). Lookup count: unchanged."""
    path = _inode_path(fs, req.nodeid)
    args = req.args
    if len(args) < abi.GETXATTR_IN.size:
        raise FUSEError(errno.EINVAL)
    asked, = abi.GETXATTR_IN.unpack_from(args)
    host = acl.visible(fs, [os.fsencode(n) for n in os.listxattr(path)])
    xattrmap = fs.config.xattrmap
    if xattrmap is None:
        names = b"".join(n + b"\0" for n in host)
    else:
        names = xattrmap.list_to_guest(host)
    if len(names) > XATTR_LIST_MAX:
        raise FUSEError(errno.E2BIG)
    return _reply_sized(req, names, asked)


def do_removexattr(fs: FileSystem, req: Request):
    """REMOVEXATTR: remove ``name``. Reply: empty. Lookup count: unchanged."""
    path = _inode_path(fs, req.nodeid)
    name, end = parse_xattr_name(req.args, 0)
    if end != len(req.args):
        raise FUSEError(errno.EINVAL)
    os.removexattr(path, _host_name(fs, name))
    return b""
