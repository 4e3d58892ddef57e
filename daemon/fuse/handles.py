"""The open-file table of one request worker: FUSE fh → host open file.

OPEN, CREATE and OPENDIR reopen an inode's O_PATH fd into a real open file
description and hand the guest an ``fh`` for it; every later READ, WRITE,
READDIR, lock or RELEASE names that fh. ``HandleTable`` owns every such host
fd from the moment it is added until RELEASE/RELEASEDIR, ``reset()`` (INIT and
DESTROY) or the worker's exit.

It also owns the *lock descriptions* of ``locks.py``: one extra open file
description per (nodeid, guest lock owner) that carries that owner's POSIX
locks as host OFD locks (see locks.py for why). They live here because their
lifetime is tied to the open files: they are closed when the owner FLUSHes
the file and when the last fh on the inode is released, and they count
against the same bound.

Bounds: at most ``max_open_files`` host fds (open files plus lock
descriptions) per table; one more is ``FUSEError(ENFILE)`` and one log line
per session. ``open_file_budget`` caps that at half the worker's
RLIMIT_NOFILE, so a guest holding all it may still leaves fds for the O_PATH
fds of its inodes and for the temporary fds any request needs (stat, mkdir
and close keep working when the table is full). fh values come from a 64-bit counter that starts at 1 and is
never reset, so an fh is never 0 and never names two open files, even across
sessions (a stale fh from before INIT is simply unknown: EBADF).
"""

from __future__ import annotations

import errno
import os
import resource

from daemon.fuse.request import FUSEError
from daemon.log import get_logger

log = get_logger("fuse.handles")


def open_file_budget(max_open_files: int) -> int:
    """``max_open_files``, capped at half of this process's RLIMIT_NOFILE."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_open_files
    budget = max(1, min(max_open_files, soft // 2))
    if budget < max_open_files:
        log.info("open files the guest may hold: %d (half of RLIMIT_NOFILE %d)", budget, soft)
    return budget

# OpenHandle.kind
KIND_FILE = 1
KIND_DIR = 2


class OpenHandle:
    """One guest fh: the host fd, the inode it was opened from, how."""

    __slots__ = ("fh", "fd", "nodeid", "kind", "flags", "dir_stream")

    def __init__(self, fh: int, fd: int, nodeid: int, kind: int, flags: int):
        self.fh = fh
        self.fd = fd
        self.nodeid = nodeid
        self.kind = kind
        # the host open(2) flags (access mode, O_APPEND...)
        self.flags = flags
        # dirs.py keeps its getdents read-ahead here (DirStream), files: None
        self.dir_stream = None

    @property
    def access_mode(self) -> int:
        return self.flags & os.O_ACCMODE


class HandleTable:
    """fh → OpenHandle, plus the lock descriptions; bounded, resettable."""

    def __init__(self, max_open_files: int):
        if max_open_files < 1:
            raise ValueError("max_open_files must be positive")
        self.max_open_files = max_open_files
        self._handles: dict[int, OpenHandle] = {}
        self._next_fh = 1
        # nodeid → number of open handles on it (files and dirs)
        self._open_per_node: dict[int, int] = {}
        # nodeid → {lock owner → fd}: lock descriptions (locks.py)
        self._lock_fds: dict[int, dict[int, int]] = {}
        # nodeid → {lock owner → guest pid of its last granted lock} (GETLK)
        self._lock_pids: dict[int, dict[int, int]] = {}
        self._lock_fd_count = 0
        self._warned_full = False

    def __len__(self) -> int:
        return len(self._handles)

    @property
    def host_fd_count(self) -> int:
        """Host fds this table holds: open files and lock descriptions."""
        return len(self._handles) + self._lock_fd_count

    # -- open files ----------------------------------------------------------
    def check_room(self) -> None:
        """FUSEError(ENFILE) unless one more host fd may be added.

        Ops that take a lookup reference before adding their fd (CREATE) call
        this first, so ``add`` cannot fail after the reference is taken (the
        worker is single-threaded: nothing else adds in between).
        """
        if self.host_fd_count >= self.max_open_files:
            self._full()

    def add(self, fd: int, nodeid: int, kind: int, flags: int) -> OpenHandle:
        """Take ownership of ``fd`` and return its new handle.

        The table owns ``fd`` from this call on: when it is full the fd is
        closed here and FUSEError(ENFILE) raised.
        """
        if self.host_fd_count >= self.max_open_files:
            os.close(fd)
            self._full()
        fh = self._next_fh
        self._next_fh = fh + 1
        handle = OpenHandle(fh, fd, nodeid, kind, flags)
        self._handles[fh] = handle
        self._open_per_node[nodeid] = self._open_per_node.get(nodeid, 0) + 1
        return handle

    def get(self, fh: int, kind: int) -> OpenHandle:
        """The open handle ``fh`` of ``kind``; FUSEError(EBADF) otherwise."""
        handle = self._handles.get(fh)
        if handle is None or handle.kind != kind:
            raise FUSEError(errno.EBADF)
        return handle

    def close(self, fh: int, kind: int) -> None:
        """Close ``fh`` (RELEASE/RELEASEDIR); EBADF if it is not open.

        Releasing the last handle on an inode also closes every lock
        description of that inode: no guest process can hold a lock on a file
        that no guest file is open on any more.
        """
        handle = self.get(fh, kind)
        del self._handles[fh]
        nodeid = handle.nodeid
        left = self._open_per_node[nodeid] - 1
        if left:
            self._open_per_node[nodeid] = left
        else:
            del self._open_per_node[nodeid]
            self._lock_pids.pop(nodeid, None)
            owners = self._lock_fds.pop(nodeid, None)
            if owners:
                self._lock_fd_count -= len(owners)
                for lock_fd in owners.values():
                    _close_quietly(lock_fd)
        _close_quietly(handle.fd)

    def reset(self) -> None:
        """Close everything (INIT/DESTROY: the guest forgot all its fhs)."""
        handles, self._handles = self._handles, {}
        lock_fds, self._lock_fds = self._lock_fds, {}
        self._lock_pids = {}
        self._open_per_node = {}
        self._lock_fd_count = 0
        self._warned_full = False
        for owners in lock_fds.values():
            for fd in owners.values():
                _close_quietly(fd)
        for handle in handles.values():
            _close_quietly(handle.fd)

    # -- lock descriptions (locks.py) -----------------------------------------
    def lock_fd(self, nodeid: int, owner: int) -> int | None:
        """The lock description of ``owner`` on ``nodeid``, if it has one."""
        owners = self._lock_fds.get(nodeid)
        return owners.get(owner) if owners else None

    def lock_fds(self, nodeid: int) -> dict[int, int]:
        """Every lock description on ``nodeid``: {owner: fd} (do not modify)."""
        return self._lock_fds.get(nodeid) or {}

    def set_lock_pid(self, nodeid: int, owner: int, pid: int) -> None:
        """Remember the guest pid that ``owner`` last took a lock with."""
        self._lock_pids.setdefault(nodeid, {})[owner] = pid

    def lock_pid(self, nodeid: int, owner: int) -> int:
        """The guest pid of ``owner``'s last granted lock, 0 if unknown."""
        return self._lock_pids.get(nodeid, {}).get(owner, 0)

    def add_lock_fd(self, nodeid: int, owner: int, fd: int) -> None:
        """Take ownership of ``fd`` as ``owner``'s lock description.

        Only for an inode with an open handle (the caller holds one); ENFILE
        (fd closed) when full; replacing an existing description is a bug.
        """
        if nodeid not in self._open_per_node:
            os.close(fd)
            raise FUSEError(errno.EBADF)
        if self.host_fd_count >= self.max_open_files:
            os.close(fd)
            self._full()
        owners = self._lock_fds.setdefault(nodeid, {})
        if owner in owners:
            os.close(fd)
            raise AssertionError("lock description already exists")
        owners[owner] = fd
        self._lock_fd_count += 1

    def drop_lock_fd(self, nodeid: int, owner: int) -> None:
        """Close ``owner``'s lock description on ``nodeid``: this releases
        every POSIX lock the owner holds on the file (FLUSH = close(2))."""
        owners = self._lock_fds.get(nodeid)
        if not owners:
            return
        fd = owners.pop(owner, None)
        if fd is None:
            return
        self._lock_pids.get(nodeid, {}).pop(owner, None)
        if not owners:
            del self._lock_fds[nodeid]
        self._lock_fd_count -= 1
        _close_quietly(fd)

    # -- internals -------------------------------------------------------------
    def _full(self) -> None:
        if not self._warned_full:
            self._warned_full = True
            log.warning("open file table full (%d host fds): answering ENFILE",
                        self.max_open_files)
        raise FUSEError(errno.ENFILE)


def reopen(path_fd: int, flags: int) -> int:
    """Open the file an O_PATH fd refers to, with ``flags``.

    Goes through the fd's /proc magic link (the worker's cwd is /proc/self/fd,
    see INTERNALS "per-process facts"), which reaches exactly that inode and
    never resolves a guest-controlled path. O_NOFOLLOW would make the open
    fail on the magic link itself, so it is dropped; O_CLOEXEC is added.
    """
    return os.open(str(path_fd), (flags & ~os.O_NOFOLLOW) | os.O_CLOEXEC)


def _close_quietly(fd: int) -> None:
    # close(2) always releases the fd, even when it reports an error; the
    # error (EIO from a network fs) has no one to go to at this point.
    try:
        os.close(fd)
    except OSError:
        pass
