"""FUSE ops on open regular files: OPEN, CREATE, READ, WRITE and friends.

An open file is a host open file description reopened from the inode's
O_PATH fd (``handles.reopen``) and registered in ``fs.handles``; the guest
names it by the fh we return. File data moves with ``os.preadv`` and
``os.pwritev`` directly between the host file and guest memory views.

Decisions (and why):

- Only regular files are ever opened for I/O on the host. OPEN checks the
  O_PATH fd's type first: a directory is EISDIR, a symlink ELOOP (what
  ``open(O_NOFOLLOW)`` says), and a device node, FIFO or socket is EACCES,
  as if the share were mounted ``nodev`` (the host's own answer for devices
  there). A guest never sends OPEN for those (its VFS handles special files
  locally), so only a hostile guest sees it, and opening a host device or
  blocking on a FIFO on its behalf is what CVE-2020-35517 was about. CREATE
  opens with O_EXCL first and, when the name exists, goes through the same
  check instead of letting ``open(O_CREAT)`` open whatever is there.
- Guest open flags pass through an allow-list (access mode, O_APPEND,
  O_TRUNC, O_SYNC/O_DSYNC, O_NONBLOCK, and O_NOATIME only with
  ``--preserve-noatime``: as in the Rust daemon it is dropped by default,
  since the host refuses it (EPERM) to a caller who does not own the file
  even when the guest, which checks it itself, allowed it). O_DIRECT is dropped, as
  both reference daemons do by default: the guest's O_DIRECT already
  bypasses the guest page cache, and the host page cache is ours to use
  (O_DIRECT also demands aligned guest buffers, and some host file systems
  refuse it). ``--allow-direct-io`` keeps it, so that the guest's O_DIRECT
  bypasses the host page cache too; then what the host refuses (EINVAL for
  a misaligned buffer or a file system without O_DIRECT) is the guest's
  answer, as it would be on a local disk. O_APPEND is kept: the
  host then appends at its real end of file, which is right when the file
  is shared (the guest's offset may be stale).
- ``--writeback`` (WRITEBACK_CACHE offered at INIT): the guest keeps
  written data in its page cache, places every write itself (O_APPEND
  included) and reads a page in before writing part of it, on whichever
  fh it has. So every file is opened without O_APPEND, and write-only as
  read-write; a file the caller may write but not read stays write-only
  (then a write of part of a page the guest does not hold fails, as its
  READ does). This follows the configuration, not what INIT negotiated,
  so every request worker, and one that replaces a dead worker, opens
  files alike; a Linux guest always accepts WRITEBACK_CACHE when offered.
- SUID/SGID (docs/credentials.md): files are opened and written with the
  worker's own credentials, whose CAP_FSETID would keep the bits where the
  host clears them for an unprivileged writer. So a WRITE with
  FUSE_WRITE_KILL_SUIDGID (the guest sends it for a caller without
  CAP_FSETID on every direct-I/O write, and on every write with
  ``--killpriv-v2``; the compiled WRITE does the same, docs/compiled.md),
  and an OPEN/CREATE with O_TRUNC that carries
  FUSE_OPEN_KILL_SUIDGID or comes from a caller other than root (a guest
  without KILLPRIV_V2 truncates atomically at open and clears nothing
  itself), run without CAP_FSETID (``credentials.without_fsetid``).
- ``--cache``: never and metadata → FOPEN_DIRECT_IO, always →
  FOPEN_KEEP_CACHE, auto → 0 (close-to-open: the guest drops its cache for
  the file on each open).
- Sizes: READ is clipped to the writable part and to ``MAX_IO_SIZE``
  (max_write = max_pages × 4 KiB = 1 MiB, so the kernel never asks for
  more; a short READ reply means EOF to it, so clipping is the only answer
  that cannot corrupt anything). WRITE must carry exactly ``size`` data
  bytes, at most ``MAX_IO_SIZE``, else EINVAL. File offsets above
  2^63 - 1 are EINVAL (the kernel's loff_t is signed).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat

from daemon.config import CacheMode
from daemon.fuse import abi, acl, credentials, seclabel
from daemon.fuse.fs import FileSystem
from daemon.fuse.handles import KIND_FILE, reopen
from daemon.fuse.names import parse_name
from daemon.fuse.request import FUSEError, Request

MAX_IO_SIZE = 1 << 20  # the max_write we negotiate (and max_pages × 4096)
# copy_file_range answers in a u32 (fuse_write_out.size); the kernel itself
# never moves more than MAX_RW_COUNT (INT_MAX & PAGE_MASK) per call.
MAX_COPY_SIZE = 0x7FFFF000
IOV_MAX = os.sysconf("SC_IOV_MAX")  # 1024: most buffers one preadv/pwritev takes

# guest open flags we pass on to the host (see the module docstring)
OPEN_FLAGS_KEPT = (os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC
                   | os.O_NOATIME | os.O_NONBLOCK)

# fallocate(2) modes the FUSE client can send (6.1 sends KEEP_SIZE and
# PUNCH_HOLE; later kernels add ZERO_RANGE); anything else is EOPNOTSUPP,
# which is also what the guest kernel answers locally for other modes.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
FALLOCATE_MODES = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE

SEEK_DATA = 3
SEEK_HOLE = 4

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int
_syncfs = _libc.syncfs
_syncfs.argtypes = (ctypes.c_int,)
_syncfs.restype = ctypes.c_int


# -- helpers shared by OPEN and CREATE --------------------------------------
def host_open_flags(guest_flags: int, allow_direct_io: bool = False,
                    preserve_noatime: bool = False) -> int:
    """The host open(2) flags for a guest's OPEN/CREATE flags."""
    if guest_flags & os.O_ACCMODE == os.O_ACCMODE:
        raise FUSEError(errno.EINVAL)
    kept = OPEN_FLAGS_KEPT if preserve_noatime else OPEN_FLAGS_KEPT & ~os.O_NOATIME
    return guest_flags & (kept | os.O_DIRECT if allow_direct_io else kept)


def open_regular(path_fd: int, flags: int) -> int:
    """Reopen an O_PATH fd for I/O, refusing anything but a regular file."""
    mode = os.fstat(path_fd).st_mode
    if not stat.S_ISREG(mode):
        if stat.S_ISDIR(mode):
            raise FUSEError(errno.EISDIR)
        if stat.S_ISLNK(mode):
            raise FUSEError(errno.ELOOP)
        raise FUSEError(errno.EACCES)  # device, FIFO, socket: never opened
    return reopen(path_fd, flags)


def fopen_flags(cache: CacheMode) -> int:
    if cache is CacheMode.NEVER or cache is CacheMode.METADATA:
        return abi.FOPEN_DIRECT_IO
    if cache is CacheMode.ALWAYS:
        return abi.FOPEN_KEEP_CACHE
    return 0


def writeback_flags(flags: int) -> int:
    """Host open flags under WRITEBACK_CACHE (see the module docstring): no
    O_APPEND, and write-only opened read-write."""
    flags &= ~os.O_APPEND
    if flags & os.O_ACCMODE == os.O_WRONLY:
        flags = flags & ~os.O_ACCMODE | os.O_RDWR
    return flags


def open_file(path_fd: int, flags: int, writeback: bool) -> tuple[int, int]:
    """``open_regular``, with ``writeback_flags`` under --writeback; a file
    the caller may write but not read is then opened write-only after all.
    Returns (fd, the flags it was opened with)."""
    if writeback:
        upgraded = writeback_flags(flags)
        try:
            return open_regular(path_fd, upgraded), upgraded
        except PermissionError:
            if upgraded & os.O_ACCMODE == flags & os.O_ACCMODE:
                raise
            flags &= ~os.O_APPEND
    return open_regular(path_fd, flags), flags


def kill_on_open(req: Request, flags: int, open_flags: int) -> bool:
    """Whether an open with these guest flags must clear SUID/SGID (see the
    module docstring): O_TRUNC, and the guest asked for it or the caller is
    not root."""
    return kills(req.uid, flags, open_flags)


def kills(uid: int, flags: int, open_flags: int) -> bool:
    """``kill_on_open`` for a caller ``uid``."""
    return bool(flags & os.O_TRUNC) and bool(open_flags & abi.FUSE_OPEN_KILL_SUIDGID or uid)


def _create_file(fs, req: Request, parent_fd: int, name: str, flags: int, mode: int,
                 exclusive: bool, kill: bool) -> tuple[int, int]:
    """Create ``name`` in the parent as the caller, or open it (with the
    worker's credentials, as OPEN would) if it exists and the guest did not
    ask for O_EXCL — but only if what exists is a regular file. Returns
    (fd, the flags it was opened with), as ``open_file``."""
    writeback = fs.config.writeback
    new_flags = writeback_flags(flags) if writeback else flags
    try:
        with fs.as_caller(req):
            return os.open(name, new_flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                           mode, dir_fd=parent_fd), new_flags
    except FileExistsError:
        if exclusive:
            raise
    return open_existing(parent_fd, name, flags, writeback, kill)


def open_existing(parent_fd: int, name, flags: int, writeback: bool, kill: bool) -> tuple[int, int]:
    """CREATE of a name that exists, without O_EXCL: open it as OPEN would
    (a regular file only; without CAP_FSETID when ``kill``). Returns (fd,
    the flags it was opened with), as ``open_file``."""
    path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    try:
        with credentials.without_fsetid(kill):
            return open_file(path_fd, flags, writeback)
    finally:
        os.close(path_fd)


def _create_labeled(fs, req: Request, parent_fd: int, name: str, flags: int, mode: int,
                    exclusive: bool, kill: bool, umask: int) -> tuple[int, int]:
    """``_create_file`` with --posix-acl's umask and --security-label's
    label (seclabel.py: a new file under a temporary name, labeled, then
    renamed). If the name appeared meanwhile and the guest did not ask for
    O_EXCL, the existing file is opened as without a label."""
    new = seclabel.NewEntry(fs, req, parent_fd, name)
    with acl.creating(fs, umask):
        fd, opened = _create_file(fs, req, parent_fd, new.target, flags, mode,
                                  exclusive or new.labeled, kill)
    try:
        new.finish()
    except FileExistsError:
        os.close(fd)
        if exclusive:
            raise
        with acl.creating(fs, umask):
            return _create_file(fs, req, parent_fd, name, flags, mode, False, kill)
    except BaseException:
        os.close(fd)
        raise
    return fd, opened


def _preadv(fd: int, views: list, offset: int) -> int:
    """preadv(2), in IOV_MAX-sized batches if the guest's buffer comes in
    more pieces than one call takes; stops at the first short read."""
    if len(views) <= IOV_MAX:
        return os.preadv(fd, views, offset)
    done = 0
    for i in range(0, len(views), IOV_MAX):
        batch = views[i:i + IOV_MAX]
        n = os.preadv(fd, batch, offset + done)
        done += n
        if n < sum(len(v) for v in batch):
            break
    return done


def _pwritev(fd: int, views: list, offset: int) -> int:
    """pwritev(2), batched like ``_preadv``; stops at the first short write
    (an error after some bytes were written reports those bytes)."""
    if len(views) <= IOV_MAX:
        return os.pwritev(fd, views, offset)
    done = 0
    for i in range(0, len(views), IOV_MAX):
        batch = views[i:i + IOV_MAX]
        try:
            n = os.pwritev(fd, batch, offset + done)
        except OSError:
            if done:
                break
            raise
        done += n
        if n < sum(len(v) for v in batch):
            break
    return done


def _args(req: Request, layout) -> tuple:
    if len(req.args) < layout.size:
        raise FUSEError(errno.EINVAL)
    return layout.unpack_from(req.args)


def _offset(value: int) -> int:
    if value > abi.OFFSET_MAX:
        raise FUSEError(errno.EINVAL)
    return value


# -- handlers ------------------------------------------------------------------
def do_open(fs: FileSystem, req: Request):
    """OPEN: reopen the inode for I/O; reply fuse_open_out {fh, FOPEN_*}.

    Errors: EISDIR/ELOOP/EACCES for anything but a regular file, EINVAL for
    access mode 3, ENFILE when the open-file table is full, or the host's
    open(2) errno. Lookup count: unchanged.
    """
    flags, open_flags = _args(req, abi.OPEN_IN)
    flags = host_open_flags(flags, fs.config.allow_direct_io, fs.config.preserve_noatime)
    path_fd = fs.cache.fd(req.nodeid)
    fs.handles.check_room()
    if kill_on_open(req, flags, open_flags):
        with credentials.without_fsetid():
            fd, flags = open_file(path_fd, flags, fs.config.writeback)
    else:
        fd, flags = open_file(path_fd, flags, fs.config.writeback)
    handle = fs.handles.add(fd, req.nodeid, KIND_FILE, flags)
    return abi.OPEN_OUT.pack(handle.fh, fopen_flags(fs.config.cache))


def do_create(fs: FileSystem, req: Request):
    """CREATE: create (or open) a regular file ``name`` in the parent.

    Reply fuse_entry_out + fuse_open_out (144 bytes). The mode's type must be
    S_IFREG (or absent). Lookup count: +1 on the new entry, only on success
    (the table's room is checked before the lookup, so no later step fails).
    """
    flags, mode, umask, open_flags = _args(req, abi.CREATE_IN)
    name = parse_name(req.args[abi.CREATE_IN.size:])
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        raise FUSEError(errno.EINVAL)
    host_flags = host_open_flags(flags, fs.config.allow_direct_io, fs.config.preserve_noatime)
    parent_fd = fs.cache.fd(req.nodeid)
    fs.handles.check_room()
    fd, host_flags = _create_labeled(fs, req, parent_fd, name, host_flags, stat.S_IMODE(mode),
                                     bool(flags & os.O_EXCL), kill_on_open(req, flags, open_flags), umask)
    return created(fs, parent_fd, name, fd, host_flags)


def created(fs: FileSystem, parent_fd: int, name, fd: int, host_flags: int) -> bytes:
    """CREATE's reply once ``fd`` is open on the new (or existing) file:
    the lookup (+1 on the entry) and the fh. The fd is closed on failure
    (FUSEError/OSError: the file stays). Also the compiled CREATE's way
    when its own lookup declined (fastpath.create_rest)."""
    try:
        entry = fs.entry(parent_fd, name)
    except BaseException:
        os.close(fd)
        raise
    nodeid, = abi.ENTRY_OUT_NODEID.unpack_from(entry)
    handle = fs.handles.add(fd, nodeid, KIND_FILE, host_flags)
    return bytes(entry) + abi.OPEN_OUT.pack(handle.fh, fopen_flags(fs.config.cache))


def do_read(fs: FileSystem, req: Request):
    """READ: up to ``size`` bytes at ``offset``, written straight into the
    reply buffer (``os.preadv`` on guest memory). Reply: the data; shorter
    than asked means end of file. Lookup count: unchanged."""
    fh, offset, size, _read_flags, _owner, _flags = _args(req, abi.READ_IN)
    handle = fs.handles.get(fh, KIND_FILE)
    offset = _offset(offset)
    size = min(size, MAX_IO_SIZE, req.out.size - abi.OUT_HEADER.size)
    if size <= 0:
        return 0
    return _preadv(handle.fd, req.out.slice(abi.OUT_HEADER.size, size), offset)


def do_write(fs: FileSystem, req: Request):
    """WRITE: ``size`` bytes of guest data at ``offset`` (``os.pwritev`` from
    guest memory), without CAP_FSETID with FUSE_WRITE_KILL_SUIDGID. Reply
    fuse_write_out {bytes written}; EINVAL when the data
    present is not exactly ``size`` bytes or exceeds MAX_IO_SIZE. Lookup
    count: unchanged."""
    fh, offset, size, write_flags, _owner, _flags = _args(req, abi.WRITE_IN)
    handle = fs.handles.get(fh, KIND_FILE)
    offset = _offset(offset)
    data = req.data
    if size != data.size or size > MAX_IO_SIZE:
        raise FUSEError(errno.EINVAL)
    if not size:
        written = 0
    elif write_flags & abi.FUSE_WRITE_KILL_SUIDGID:
        with credentials.without_fsetid():
            written = _pwritev(handle.fd, data.slice(0, size), offset)
    else:
        written = _pwritev(handle.fd, data.slice(0, size), offset)
    return abi.WRITE_OUT.pack(written)


def do_flush(fs: FileSystem, req: Request):
    """FLUSH (the guest closed one fd of the file): release every POSIX lock
    of ``lock_owner`` on the inode (close(2) semantics, see locks.py) and
    close a dup of the fd so the host file system reports delayed write
    errors (NFS and the like), as libfuse's passthrough does. Reply: empty.
    Lookup count: unchanged."""
    fh, owner = _args(req, abi.FLUSH_IN)
    handle = fs.handles.get(fh, KIND_FILE)
    fs.handles.drop_lock_fd(handle.nodeid, owner)
    try:
        os.close(os.dup(handle.fd))
    except OSError as e:
        # out of fds: the guest's close(2) must not fail for it (the locks
        # are released above; the dup only surfaces delayed write errors)
        if e.errno not in (errno.EMFILE, errno.ENFILE):
            raise
    return b""


def do_release(fs: FileSystem, req: Request):
    """RELEASE (the guest's last reference to the open file is gone): drop
    its flock if RELEASE_FLOCK_UNLOCK, close the fh (and, if it was the last
    one on the inode, every lock description of the inode). Reply: empty;
    EBADF for an unknown fh (the kernel ignores RELEASE errors). Lookup
    count: unchanged."""
    fh, _flags, release_flags, _owner = _args(req, abi.RELEASE_IN)
    handle = fs.handles.get(fh, KIND_FILE)
    if release_flags & abi.FUSE_RELEASE_FLOCK_UNLOCK:
        try:
            fcntl.flock(handle.fd, fcntl.LOCK_UN)
        except OSError:
            pass  # closing the description below releases it anyway
    fs.handles.close(fh, KIND_FILE)
    return b""


def do_fsync(fs: FileSystem, req: Request):
    """FSYNC: fdatasync with FUSE_FSYNC_FDATASYNC, else fsync, on a helper
    thread (the request is deferred meanwhile). Reply: empty, or the
    call's errno. Lookup count: unchanged."""
    fh, fsync_flags = _args(req, abi.FSYNC_IN)
    handle = fs.handles.get(fh, KIND_FILE)
    return sync_on_helper(fs, req, handle.fd, fsync_flags & abi.FUSE_FSYNC_FDATASYNC)


def sync_on_helper(fs: FileSystem, req: Request, fd: int, data_only: bool):
    """fsync/fdatasync ``fd`` on a helper thread (blocking.py): the queue
    goes on meanwhile. The thread syncs its own dup, so a RELEASE of the
    fh in between closes nothing it uses."""
    dup = os.dup(fd)
    return fs.defer_blocking(req, _sync_and_close, dup, bool(data_only))


def _sync_and_close(fd: int, data_only: bool) -> None:
    try:
        if data_only:
            os.fdatasync(fd)
        else:
            os.fsync(fd)
    finally:
        os.close(fd)


def do_fallocate(fs: FileSystem, req: Request):
    """FALLOCATE: fallocate(2) with the guest's mode (KEEP_SIZE, PUNCH_HOLE,
    ZERO_RANGE; others EOPNOTSUPP). Reply: empty. Lookup count: unchanged."""
    fh, offset, length, mode = _args(req, abi.FALLOCATE_IN)
    handle = fs.handles.get(fh, KIND_FILE)
    if mode & ~FALLOCATE_MODES:
        raise FUSEError(errno.EOPNOTSUPP)
    offset = _offset(offset)
    length = _offset(length)
    if _fallocate(handle.fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return b""


def do_lseek(fs: FileSystem, req: Request):
    """LSEEK: lseek(2) on the fh (the kernel sends SEEK_DATA and SEEK_HOLE;
    SET/CUR/END are accepted too, with the offset as a signed loff_t).
    Reply fuse_lseek_out {new offset}; ENXIO from the host when there is no
    data/hole at or after the offset. Lookup count: unchanged."""
    fh, offset, whence = _args(req, abi.LSEEK_IN)
    handle = fs.handles.get(fh, KIND_FILE)
    if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, SEEK_DATA, SEEK_HOLE):
        raise FUSEError(errno.EINVAL)
    if offset > abi.OFFSET_MAX:
        offset -= 1 << 64
    return abi.LSEEK_OUT.pack(os.lseek(handle.fd, offset, whence))


def do_copy_file_range(fs: FileSystem, req: Request):
    """COPY_FILE_RANGE: copy_file_range(2) from fh_in to fh_out (which must
    be open on ``nodeid_out``, else EBADF; ``flags`` must be 0). ``len`` is
    clipped to MAX_COPY_SIZE so the count fits fuse_write_out. Reply
    fuse_write_out {bytes copied}. Lookup count: unchanged."""
    fh_in, off_in, nodeid_out, fh_out, off_out, length, flags = _args(req, abi.COPY_FILE_RANGE_IN)
    source = fs.handles.get(fh_in, KIND_FILE)
    target = fs.handles.get(fh_out, KIND_FILE)
    if target.nodeid != nodeid_out:
        raise FUSEError(errno.EBADF)
    if flags:
        raise FUSEError(errno.EINVAL)
    off_in = _offset(off_in)
    off_out = _offset(off_out)
    length = min(length, MAX_COPY_SIZE)
    copied = os.copy_file_range(source.fd, target.fd, length, off_in, off_out)
    return abi.WRITE_OUT.pack(copied)


def do_syncfs(fs: FileSystem, req: Request):
    """SYNCFS: syncfs(2) on the file system of the node (the mount's root,
    or a submount's root). Reply: empty. Lookup count: unchanged."""
    path_fd = fs.cache.fd(req.nodeid)
    mode = os.fstat(path_fd).st_mode
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise FUSEError(errno.EACCES)
    # syncfs refuses O_PATH fds (EBADF): open the directory for reading.
    fd = reopen(path_fd, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if _syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)
    return b""
