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
and close keep working when the table is full).

fh values are slots of the ``FileTable`` every request worker shares
(filetable.py): never 0, never reused for another open file, unknown after
INIT (EBADF). With several request queues a guest process may use an fh
on a queue whose worker did not open it: that worker copies the opener's
host fd (``pidfd_getfd``, peers.py) the first time and keeps the copy, one
more fd on the same open file description (same offset, same flock and
OFD locks). RELEASE on any queue frees the fh in the shared table at once
(every worker then answers EBADF for it); each worker closes its own copy
when it next looks at it or at its next ``reap`` (after each batch, and
at least once a second while it has peers). flock locks are released at
RELEASE (LOCK_UN on the description) so a copy that lingers a moment holds
none.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource

from daemon.fuse.filetable import FileTable
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

    def __init__(self, max_open_files: int, files: FileTable | None = None, peers=None):
        """``files``: the shared open-file table (a private one if None);
        ``peers``: the other request workers (peers.py), None alone."""
        if max_open_files < 1:
            raise ValueError("max_open_files must be positive")
        self.max_open_files = max_open_files
        self._own_files = files is None
        self.files = files if files is not None else FileTable(max_open_files, shared=False)
        self._slots = self.files.slots
        self.peers = peers
        self._released = self.files.released
        # fh → this worker's OpenHandle (its own fd, or its copy of another's)
        self._handles: dict[int, OpenHandle] = {}
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
        peers = self.peers
        try:
            fh = self.files.alloc(nodeid, kind, flags, peers.mine(fd) if peers is not None else 0)
        except BaseException:
            os.close(fd)
            raise
        return self._keep(OpenHandle(fh, fd, nodeid, kind, flags))

    def _keep(self, handle: OpenHandle) -> OpenHandle:
        self._handles[handle.fh] = handle
        nodeid = handle.nodeid
        self._open_per_node[nodeid] = self._open_per_node.get(nodeid, 0) + 1
        return handle

    def get(self, fh: int, kind: int) -> OpenHandle:
        """The open handle ``fh`` of ``kind``; FUSEError(EBADF) otherwise
        (released, on any queue, or never opened)."""
        handle = self._handles.get(fh)
        # still live in the shared table (word 0 of its slot: the generation)
        if handle is not None and handle.kind == kind \
                and self._slots[(fh & 0xFFFFFF) << 3] == fh >> 24:
            return handle
        return self._find(fh, kind)

    def _find(self, fh: int, kind: int) -> OpenHandle:
        """Slow path of ``get``: drop a copy of a released fh, or copy the
        fd of an fh another worker opened."""
        handle = self._handles.get(fh)
        if handle is not None and not self.files.live(fh):
            self._forget(handle)
            raise FUSEError(errno.EBADF)
        if handle is not None:           # live, but another kind
            raise FUSEError(errno.EBADF)
        info = self.files.lookup(fh)
        peers = self.peers
        if info is None or peers is None or info[1] != kind:
            raise FUSEError(errno.EBADF)
        nodeid, kind, flags, word = info
        if self.host_fd_count >= self.max_open_files:
            self._full()
        try:
            fd = peers.borrow(word)
        except OSError as e:
            log.warning("cannot copy an open file from another request worker: %s", e)
            raise FUSEError(errno.EBADF) from None
        if fd < 0:
            raise FUSEError(errno.EBADF)   # its worker died: the open file is lost
        if self.files.lookup(fh) != info:  # released while we copied: not ours
            _close_quietly(fd)
            raise FUSEError(errno.EBADF)
        return self._keep(OpenHandle(fh, fd, nodeid, kind, flags))

    def reap(self) -> int:
        """Close this worker's fds of fhs released on other queues (one
        shared read when none was); returns how many."""
        released = self.files.released
        if released == self._released:
            return 0
        self._released = released
        live = self.files.live
        dead = [h for fh, h in self._handles.items() if not live(fh)]
        for handle in dead:
            self._forget(handle)
        return len(dead)

    def _forget(self, handle: OpenHandle) -> None:
        """Drop this worker's fd of an fh (released elsewhere, or here)."""
        del self._handles[handle.fh]
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

    def close(self, fh: int, kind: int) -> None:
        """Close ``fh`` (RELEASE/RELEASEDIR); EBADF if it is not open.

        Releasing the last handle on an inode also closes every lock
        description of that inode: no guest process can hold a lock on a file
        that no guest file is open on any more.
        """
        handle = self.get(fh, kind)
        if not self.files.free(fh):     # released on another queue meanwhile
            self._forget(handle)
            raise FUSEError(errno.EBADF)
        if self.peers is not None and self.peers.shared and kind == KIND_FILE:
            # other workers may hold copies a moment longer: the guest's
            # flock locks on this open file end now, as at its last close
            try:
                fcntl.flock(handle.fd, fcntl.LOCK_UN)
            except OSError:
                pass
        self._forget(handle)

    def reset(self) -> None:
        """Close this worker's fds (INIT/DESTROY: the guest forgot all its
        fhs; the shared table is reset with the inode table)."""
        if self._own_files:
            self.files.reset()
        handles, self._handles = self._handles, {}
        lock_fds, self._lock_fds = self._lock_fds, {}
        self._lock_pids = {}
        self._open_per_node = {}
        self._lock_fd_count = 0
        self._warned_full = False
        self._released = self.files.released
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
