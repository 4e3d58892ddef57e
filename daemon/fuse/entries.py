"""FUSE ops on directory entries: LOOKUP, FORGET, BATCH_FORGET, MKNOD,
MKDIR, SYMLINK, LINK, UNLINK, RMDIR, RENAME, RENAME2.

Every op works relative to the parent's O_PATH fd from ``fs.cache.fd``
with one validated name component (names.py) and ``*at`` calls; nothing is
ever resolved from a path built out of guest strings, and the last
component is never followed (O_NOFOLLOW / the ``*at`` calls' own
no-follow semantics). The creating syscall (mknodat, mkdirat, symlinkat)
runs as the caller (``fs.as_caller``: its fsuid/fsgid and the
supplementary group the guest names), so the new inode gets the caller's
ownership and the host's setgid rules; every other op runs with the
worker's own credentials (docs/credentials.md). With ``--security-label``
the new entry gets the guest's label before its name appears
(seclabel.py).

Lookup counts (docs/protocol.md, "Lookup counts"): every reply that carries a nodeid — the
``fuse_entry_out`` of LOOKUP, MKNOD, MKDIR, SYMLINK and LINK — takes exactly
one reference in the shared table, and nothing else does. A creating op
that fails after the host object exists (the table is full, the process
is out of fds) reports the error and leaves the object, as libfuse does.

Decisions:

- LOOKUP of a missing name is ENOENT, except with ``--cache=always``, where
  it is a negative entry (nodeid 0, valid for the entry timeout: no count).
  With ``auto`` a negative entry would hide a file another host process
  creates for a second; ``always`` means the guest owns the tree.
- LOOKUP of "." is the directory itself; ".." is the real parent, except at
  the share root, where it is the root itself, and except when the parent
  is not inside the share (the host moved the directory out): EACCES. The
  kernel only sends these with EXPORT_SUPPORT, which we never negotiate, so
  this path is for hostile guests and costs what it costs.
- MKNOD creates what the caller's host credentials allow (regular files,
  FIFOs, sockets, and device nodes if it may); other file types are EINVAL.
  The guest kernel already checked the caller's capability for devices.
- RENAME2: NOREPLACE and EXCHANGE via renameat2(2); WHITEOUT (an overlayfs
  detail that needs CAP_MKNOD on the host) and unknown flags are EINVAL.
"""

from __future__ import annotations

import errno
import os
import stat

from daemon.config import CacheMode
from daemon.fuse import abi, acl, seclabel
from daemon.fuse.fs import FileSystem
from daemon.fuse.names import parse_lookup_name, parse_name, parse_two
from daemon.fuse.request import FUSEError, Request

_O_DIR = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
MAX_DEPTH = 4096  # ".." containment walk: deeper than any real tree (PATH_MAX/2)
_MKNOD_TYPES = (stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)


def _decode_dev(rdev: int) -> int:
    """The kernel's new_encode_dev() u32 (fuse_mknod_in.rdev) → host dev_t."""
    major = (rdev & 0xFFF00) >> 8
    minor = (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)
    return os.makedev(major, minor)


# -- LOOKUP ---------------------------------------------------------------------------
def do_lookup(fs: FileSystem, req: Request):
    """LOOKUP name in the directory nodeid. Reply fuse_entry_out; ENOENT
    (or a negative entry with --cache=always), ENOTDIR, EACCES, ESTALE for a
    stale parent, EINVAL/ENAMETOOLONG for a bad name, ENFILE when the inode
    table is full. Lookup count: +1 on the entry's nodeid on success (none
    for a negative entry)."""
    name = parse_lookup_name(req.args)
    parent_fd = fs.cache.fd(req.nodeid)
    if name == ".":
        return fs.entry(parent_fd, ".")
    if name == "..":
        return _lookup_dotdot(fs, req.nodeid, parent_fd)
    try:
        return fs.entry(parent_fd, name)
    except FileNotFoundError:
        if fs.config.cache is CacheMode.ALWAYS:
            return fs.negative_entry()
        raise


def _lookup_dotdot(fs: FileSystem, nodeid: int, parent_fd: int) -> bytes:
    root_fd = fs.root_fd
    if nodeid == 1:
        return fs.entry(root_fd, ".")
    up = os.open("..", _O_DIR, dir_fd=parent_fd)
    try:
        if not _inside(up, os.fstat(root_fd)):
            raise FUSEError(errno.EACCES)
        nodeid, generation, st = fs.cache.adopt(up, os.fstat(up))
    except BaseException:
        os.close(up)
        raise
    return fs.entry_reply(st, nodeid, generation)


def _inside(fd: int, root: os.stat_result) -> bool:
    """Whether directory ``fd`` is the share root or below it (walks up)."""
    key = (root.st_dev, root.st_ino)
    cur = os.open(".", _O_DIR, dir_fd=fd)
    try:
        for _ in range(MAX_DEPTH):
            st = os.fstat(cur)
            if (st.st_dev, st.st_ino) == key:
                return True
            up = os.open("..", _O_DIR, dir_fd=cur)
            st_up = os.fstat(up)
            os.close(cur)
            cur = up
            if (st_up.st_dev, st_up.st_ino) == (st.st_dev, st.st_ino):
                return False  # the host's (or the sandbox's) "/" and not the share
        return False
    finally:
        os.close(cur)


# -- FORGET ---------------------------------------------------------------------------
def do_forget(fs: FileSystem, req: Request):
    """FORGET nodeid nlookup: drop nlookup references; the nodeid is freed
    at 0 (its fd is closed by the worker holding it, see InodeCache.reap).
    Never replied to. Unknown nodeids, the root and short args are ignored.
    Lookup count: -nlookup."""
    if len(req.args) >= abi.FORGET_IN.size:
        fs.inodes.unref(req.nodeid, abi.FORGET_IN.unpack_from(req.args)[0])
    return None


def do_batch_forget(fs: FileSystem, req: Request):
    """BATCH_FORGET: FORGET for each of ``count`` (nodeid, nlookup) pairs.
    Never replied to. A count larger than the pairs actually present marks
    a malformed request: the whole batch is ignored (logged). Lookup count:
    -nlookup for each pair."""
    args = req.args
    if len(args) < abi.BATCH_FORGET_IN.size:
        return None
    count, = abi.BATCH_FORGET_IN.unpack_from(args)
    body = len(args) - abi.BATCH_FORGET_IN.size
    if count * abi.FORGET_ONE.size != body:
        fs.warn("BATCH_FORGET: count %d but %d bytes of entries: ignored", count, body)
        return None
    if count:
        fs.inodes.unref_many(abi.FORGET_ONE.iter_unpack(args[abi.BATCH_FORGET_IN.size:]))
    return None


# -- creating entries ---------------------------------------------------------------------
def _args(req: Request, layout) -> tuple:
    if len(req.args) < layout.size:
        raise FUSEError(errno.EINVAL)
    return layout.unpack_from(req.args)


def do_mknod(fs: FileSystem, req: Request):
    """MKNOD name in the directory nodeid with mode (type + permissions) and
    rdev. Reply fuse_entry_out; EINVAL for a directory/symlink/unknown type,
    EEXIST, EACCES, EPERM (devices without the right), ENOSPC... from the
    host. Lookup count: +1 on the new nodeid on success."""
    mode, rdev, umask = _args(req, abi.MKNOD_IN)
    name = parse_name(req.args[abi.MKNOD_IN.size:])
    ftype = stat.S_IFMT(mode) or stat.S_IFREG
    if ftype not in _MKNOD_TYPES:
        raise FUSEError(errno.EINVAL)
    parent_fd = fs.cache.fd(req.nodeid)
    device = _decode_dev(rdev) if ftype in (stat.S_IFCHR, stat.S_IFBLK) else 0
    new = seclabel.NewEntry(fs, req, parent_fd, name)
    with acl.creating(fs, umask), fs.as_caller(req):
        os.mknod(new.target, ftype | stat.S_IMODE(mode), device, dir_fd=parent_fd)
    new.finish()
    return fs.entry(parent_fd, name)


def do_mkdir(fs: FileSystem, req: Request):
    """MKDIR name in the directory nodeid (mode: permission bits, the guest
    already applied its umask, except with --posix-acl: acl.py). Reply fuse_entry_out; EEXIST, EACCES,
    ENOSPC, EMLINK... from the host. Lookup count: +1 on the new nodeid on
    success."""
    mode, umask = _args(req, abi.MKDIR_IN)
    name = parse_name(req.args[abi.MKDIR_IN.size:])
    parent_fd = fs.cache.fd(req.nodeid)
    new = seclabel.NewEntry(fs, req, parent_fd, name)
    with acl.creating(fs, umask), fs.as_caller(req):
        os.mkdir(new.target, stat.S_IMODE(mode), dir_fd=parent_fd)
    new.finish()
    return fs.entry(parent_fd, name)


def do_symlink(fs: FileSystem, req: Request):
    """SYMLINK name → target in the directory nodeid (the target is stored
    verbatim and never resolved here). Reply fuse_entry_out; EEXIST,
    EACCES, ENOENT (empty target), ENAMETOOLONG... Lookup count: +1 on the
    new nodeid on success."""
    name, target = parse_two(req.args, target=True)
    parent_fd = fs.cache.fd(req.nodeid)
    new = seclabel.NewEntry(fs, req, parent_fd, name)
    with fs.as_caller(req):
        os.symlink(target, new.target, dir_fd=parent_fd)
    new.finish()
    return fs.entry(parent_fd, name)


def do_link(fs: FileSystem, req: Request):
    """LINK: a new name in the directory nodeid for the inode oldnodeid,
    via the inode's /proc/self/fd magic link (reaches exactly that inode,
    symlinks included). Reply fuse_entry_out with oldnodeid's nodeid (hard
    links share one); EPERM for directories, EXDEV, EEXIST, EMLINK...
    Lookup count: +1 on oldnodeid's nodeid on success."""
    oldnodeid, = _args(req, abi.LINK_IN)
    name = parse_name(req.args[abi.LINK_IN.size:])
    source_fd = fs.cache.fd(oldnodeid)
    parent_fd = fs.cache.fd(req.nodeid)
    # cwd is /proc/self/fd (INTERNALS "per-process facts")
    os.link(str(source_fd), name, dst_dir_fd=parent_fd, follow_symlinks=True)
    return fs.entry(parent_fd, name)


# -- removing and renaming ----------------------------------------------------------------
def do_unlink(fs: FileSystem, req: Request):
    """UNLINK name (not a directory) from the directory nodeid. Reply:
    empty; ENOENT, EISDIR, EACCES, EPERM (sticky)... Lookup count:
    unchanged (the guest FORGETs the inode when it drops it)."""
    name = parse_name(req.args)
    os.unlink(name, dir_fd=fs.cache.fd(req.nodeid))
    return b""


def do_rmdir(fs: FileSystem, req: Request):
    """RMDIR name (an empty directory) from the directory nodeid. Reply:
    empty; ENOENT, ENOTDIR, ENOTEMPTY, EBUSY, EACCES... Lookup count:
    unchanged."""
    name = parse_name(req.args)
    os.rmdir(name, dir_fd=fs.cache.fd(req.nodeid))
    return b""


def do_rename(fs: FileSystem, req: Request):
    """RENAME old (in directory nodeid) to new (in directory newdir),
    replacing new if it exists. Reply: empty; ENOENT, EXDEV, ENOTEMPTY,
    EISDIR, ENOTDIR, EINVAL (into itself)... Lookup count: unchanged
    (nodeids follow their inodes)."""
    newdir, = _args(req, abi.RENAME_IN)
    old, new = parse_two(req.args[abi.RENAME_IN.size:])
    olddir_fd = fs.cache.fd(req.nodeid)
    newdir_fd = fs.cache.fd(newdir)
    os.rename(old, new, src_dir_fd=olddir_fd, dst_dir_fd=newdir_fd)
    return b""


def do_rename2(fs: FileSystem, req: Request):
    """RENAME2: RENAME with flags NOREPLACE (EEXIST if new exists) or
    EXCHANGE (swap the two; ENOENT if new is missing). WHITEOUT, both
    flags together and unknown flags: EINVAL. Reply: empty. Lookup count:
    unchanged."""
    newdir, flags = _args(req, abi.RENAME2_IN)
    old, new = parse_two(req.args[abi.RENAME2_IN.size:])
    if flags & ~(abi.RENAME_NOREPLACE | abi.RENAME_EXCHANGE) or \
            flags == abi.RENAME_NOREPLACE | abi.RENAME_EXCHANGE:
        raise FUSEError(errno.EINVAL)
    olddir_fd = fs.cache.fd(req.nodeid)
    newdir_fd = fs.cache.fd(newdir)
    if not flags:
        os.rename(old, new, src_dir_fd=olddir_fd, dst_dir_fd=newdir_fd)
        return b""
    seclabel.renameat2(olddir_fd, old, newdir_fd, new, flags)
    return b""
