"""FUSE lock ops: GETLK, SETLK, SETLKW, forwarded to the host.

POSIX (fcntl) locks → host OFD locks on one description per owner.
The guest tells lock owners apart by ``lock_owner`` (its files_struct, i.e.
the process), and POSIX says a process's locks on a file do not conflict
with each other, whichever fd they were taken through, and all go away when
the process closes *any* fd of that file. Host OFD locks belong to an open
file description instead. So each (inode, lock_owner) gets its own
description — the file reopened through the fh's /proc magic link — and
that owner's locks live there:

- two guest processes, even sharing one fh (fork), hold different
  descriptions, so their locks really exclude each other on the host, and
  exclude any host process using OFD or classic POSIX locks;
- one process with two fhs on the same file uses one description, so its
  own locks merge and never conflict (keying by (fh, owner) would deadlock
  such a process against itself);
- FLUSH (sent on every close(2) in the guest, with the closer's owner)
  closes the owner's description: all its locks on the file are released,
  exactly the POSIX close rule; and when the last fh on the inode is
  released the table closes whatever descriptions are left.

That is the design of QEMU's C virtiofsd (``lo_inode_plock`` per inode and
owner); ``HandleTable`` holds the descriptions (they count against the
open-file bound). A description is opened O_RDWR (and O_NONBLOCK, so that a
lease never blocks us) so it can carry read and write locks, falling back
to the fh's own access mode when the caller may not open the file for
writing; such a description then refuses a write lock with EBADF, which can
only happen if the file's permissions changed while the guest held a
writable fd. Opening for writing has the usual host-visible side effects
(inotify IN_CLOSE_WRITE when it is closed, ETXTBSY for execve meanwhile).

flock locks (FUSE_LK_FLOCK) belong to the guest's open file (the kernel
passes its struct file as the owner), which is our fh: they are taken with
``flock(2)`` on the fh's own description, so processes sharing one guest
open file share the lock, as flock(2) specifies. RELEASE unlocks them.

SETLKW never blocks the worker: it tries the non-blocking form and, while
the lock is held elsewhere, registers a retry with the session and answers
DEFERRED; the session retries it every ~10 ms until it is granted, fails,
or the request is interrupted (EINTR). At most 64 requests wait at once
(request.MAX_DEFERRED, what a worker restart can answer); one more that
would wait gets ENOLCK, fcntl(2)'s "lock table full". Polling grants no
FIFO fairness between waiters and, since OFD locks have no deadlock
detection, two guest processes waiting on each other wait forever, as
with OFD locks on a host.

Ranges: the kernel sends [start, end] inclusive, with end = OFFSET_MAX
(2^63 - 1) meaning "to end of file" (l_len 0); end = 2^64 - 1 is taken the
same way. GETLK answers a conflict with the guest pid that took it when
the holder is another lock owner of this worker (its description is found
through /proc/self/fdinfo, which lists the OFD locks each description
holds), else pid 0: a host process's pid means nothing in the guest, and
OFD locks report -1, which the guest cannot represent.
"""

from __future__ import annotations

import errno
import fcntl
import os

from daemon.fuse import abi
from daemon.fuse.fs import FileSystem
from daemon.fuse.handles import F_OFD_SETLK, FLOCK, KIND_FILE, reopen
from daemon.fuse.request import DEFERRED, MAX_DEFERRED, FUSEError, Request

F_OFD_GETLK = 36
F_OFD_SETLKW = 38  # never used: it would block the worker
F_RDLCK = fcntl.F_RDLCK
F_WRLCK = fcntl.F_WRLCK
F_UNLCK = fcntl.F_UNLCK


_FLOCK_OPS = {F_RDLCK: fcntl.LOCK_SH, F_WRLCK: fcntl.LOCK_EX, F_UNLCK: fcntl.LOCK_UN}
# errnos on which a lock description falls back to the fh's access mode
_NO_WRITE_OPEN = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ETXTBSY,
                            errno.EWOULDBLOCK})


class LockRequest:
    """A decoded fuse_lk_in."""

    __slots__ = ("fh", "owner", "start", "length", "type", "flock", "pid")

    def __init__(self, args):
        if len(args) < abi.LK_IN.size:
            raise FUSEError(errno.EINVAL)
        fh, owner, start, end, lock_type, pid, lk_flags = abi.LK_IN.unpack_from(args)
        if lock_type not in (F_RDLCK, F_WRLCK, F_UNLCK):
            raise FUSEError(errno.EINVAL)
        if start > abi.OFFSET_MAX:
            raise FUSEError(errno.EINVAL)
        if end >= abi.OFFSET_MAX:
            length = 0  # to end of file
        elif end < start:
            raise FUSEError(errno.EINVAL)
        else:
            length = end - start + 1
        self.fh = fh
        self.owner = owner
        self.start = start
        self.length = length
        self.type = lock_type
        self.flock = bool(lk_flags & abi.FUSE_LK_FLOCK)
        self.pid = pid

    def flock_struct(self, lock_type: int) -> bytes:
        return FLOCK.pack(lock_type, os.SEEK_SET, self.start, self.length, 0)


def _lock_description(fs: FileSystem, handle, owner: int) -> int:
    """The owner's lock description on the handle's inode, opened if new."""
    fd = fs.handles.lock_fd(handle.nodeid, owner)
    if fd is not None:
        return fd
    fs.handles.check_room()
    try:
        fd = reopen(handle.fd, os.O_RDWR | os.O_NONBLOCK)
    except OSError as e:
        if e.errno not in _NO_WRITE_OPEN or handle.access_mode == os.O_RDWR:
            raise
        fd = reopen(handle.fd, handle.access_mode | os.O_NONBLOCK)
    return fs.handles.add_lock_fd(handle.nodeid, owner, fd)


def _try_lock(fs: FileSystem, lk: LockRequest) -> bool:
    """One non-blocking attempt: True when done, False while it conflicts.
    Any other failure raises (OSError → its errno)."""
    handle = fs.handles.get(lk.fh, KIND_FILE)
    if lk.flock:
        op = _FLOCK_OPS[lk.type]
        try:
            fcntl.flock(handle.fd, op if op == fcntl.LOCK_UN else op | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    if lk.type == F_UNLCK:
        fd = fs.handles.lock_fd(handle.nodeid, lk.owner)
        if fd is not None:  # no description: the owner holds nothing here
            fcntl.fcntl(fd, F_OFD_SETLK, lk.flock_struct(F_UNLCK))
        return True
    fd = _lock_description(fs, handle, lk.owner)
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, lk.flock_struct(lk.type))
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    fs.handles.set_lock_pid(handle.nodeid, lk.owner, lk.pid)
    return True


_FDINFO_TYPES = {"READ": F_RDLCK, "WRITE": F_WRLCK}


def _holds(fd: int, lock_type: int, start: int) -> bool:
    """Whether description ``fd`` holds an OFD lock of ``lock_type`` that
    starts at ``start``. fdinfo lines look like
    ``lock:\t1: OFDLCK  ADVISORY  WRITE -1 00:2b:1234 0 EOF``; the path is
    relative to the worker's cwd, /proc/self/fd (INTERNALS.md)."""
    try:
        with open(f"../fdinfo/{fd}", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return False
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 8 and words[0] == "lock:" and words[2] == "OFDLCK" \
                and _FDINFO_TYPES.get(words[4]) == lock_type and words[-2] == str(start):
            return True
    return False


def _holder_pid(fs: FileSystem, nodeid: int, asker: int, lock_type: int, start: int) -> int:
    """The guest pid of the other owner holding the conflicting lock, or 0."""
    for owner, fd in fs.handles.lock_fds(nodeid).items():
        if owner != asker and _holds(fd, lock_type, start):
            return fs.handles.lock_pid(nodeid, owner)
    return 0


# -- handlers ----------------------------------------------------------------
def do_getlk(fs: FileSystem, req: Request):
    """GETLK: test whether ``owner`` could take the lock. Reply fuse_lk_out:
    type F_UNLCK (and the asked range) when it could, else the first
    conflicting lock's type, range and holder's guest pid (0 if not one of
    this worker's lock owners). EINVAL for flock requests (the
    kernel never sends them) and F_UNLCK. Lookup count: unchanged."""
    lk = LockRequest(req.args)
    if lk.flock or lk.type == F_UNLCK:
        raise FUSEError(errno.EINVAL)
    handle = fs.handles.get(lk.fh, KIND_FILE)
    # An owner without a description holds no locks; the fh's own
    # description never carries OFD locks, so it tests as "nobody".
    fd = fs.handles.lock_fd(handle.nodeid, lk.owner)
    if fd is None:
        fd = handle.fd
    found = fcntl.fcntl(fd, F_OFD_GETLK, lk.flock_struct(lk.type))
    lock_type, _whence, start, length, _pid = FLOCK.unpack(found)
    if lock_type == F_UNLCK:
        end = abi.OFFSET_MAX if lk.length == 0 else lk.start + lk.length - 1
        return abi.LK_OUT.pack(lk.start, end, F_UNLCK, 0)
    end = abi.OFFSET_MAX if length == 0 else start + length - 1
    pid = _holder_pid(fs, handle.nodeid, lk.owner, lock_type, start)
    return abi.LK_OUT.pack(start, end, lock_type, pid)


def do_setlk(fs: FileSystem, req: Request):
    """SETLK: take or release the lock without waiting; EAGAIN on conflict.
    Reply: empty. Lookup count: unchanged."""
    lk = LockRequest(req.args)
    if not _try_lock(fs, lk):
        raise FUSEError(errno.EAGAIN)
    return b""


def do_setlkw(fs: FileSystem, req: Request):
    """SETLKW: as SETLK, but on conflict the request is DEFERRED and retried
    by the session until granted (empty reply), failed (its errno; EBADF if
    the fh was released meanwhile) or interrupted (EINTR, by the session).
    ENOLCK when it would wait and MAX_DEFERRED requests wait already (the
    most a worker restart can answer: progress.py). Lookup count: unchanged."""
    lk = LockRequest(req.args)
    if _try_lock(fs, lk):
        return b""
    if not fs.can_defer():
        fs.warn("SETLKW: %d requests wait already; ENOLCK", MAX_DEFERRED)
        raise FUSEError(errno.ENOLCK)

    def retry():
        return b"" if _try_lock(fs, lk) else DEFERRED

    fs.defer(req, retry)
    return DEFERRED
