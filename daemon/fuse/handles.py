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

Every open file and lock description is also handed to the keeper process
(peers.py ``keep``, workers/keeper.py) when it is made, so when the worker
that opened it dies the others, and its replacement, get a copy from
there by asking (``Peers.from_keeper``: a round trip on the keeper's
socket, no ``pidfd_getfd``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import struct

from daemon.fuse.filetable import FileTable
from daemon.fuse.request import FUSEError
from daemon.log import get_logger

log = get_logger("fuse.handles")


F_OFD_SETLK = 37

# struct flock on x86-64: short l_type; short l_whence; off_t l_start;
# off_t l_len; pid_t l_pid;  (32 bytes with padding)
FLOCK = struct.Struct("<hh4xqqi4x")
# the whole file (l_len 0: to EOF) unlocked
_UNLOCK_ALL = FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0)


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
        # (nodeid, lock owner) → (id, this worker's fd): lock descriptions
        self._locks: dict[tuple[int, int], tuple[int, int]] = {}
        self._warned_full = False

    def __len__(self) -> int:
        return len(self._handles)

    @property
    def host_fd_count(self) -> int:
        """Host fds this table holds: open files and lock descriptions."""
        return len(self._handles) + len(self._locks)

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
        if peers is not None:
            peers.keep(fh, fd)
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
            fd = self._copy(fh, word)
        except OSError as e:
            log.warning("cannot copy an open file from another request worker: %s", e)
            raise FUSEError(errno.EBADF) from None
        if fd < 0:
            raise FUSEError(errno.EBADF)   # its worker and the keeper's copy are gone: lost
        if not self._claim(fh, fd):    # released while we copied: not ours
            _close_quietly(fd)
            raise FUSEError(errno.EBADF)
        return self._keep(OpenHandle(fh, fd, nodeid, kind, flags))

    def _copy(self, ident: int, word: int) -> int:
        """A copy of slot ``ident``'s fd: from its owner (``word``) or, if
        that worker died, from the keeper; -1 if neither has it."""
        peers = self.peers
        fd = peers.borrow(word)
        if fd >= 0 or not peers.has_keeper:
            return fd
        # the owner died (or is the keeper): ask the keeper. Its socket is
        # one queue, so the opener's KEEP, sent before the guest heard of
        # the fh, is read before our ASK: no waiting for the kept word
        return peers.from_keeper(ident)

    def resend(self) -> int:
        """Hand every open file and lock description this worker holds to
        a new keeper (the old one died with its copies); returns how many."""
        peers = self.peers
        if peers is None or not peers.has_keeper:
            return 0
        live = self.files.live
        n = 0
        for fh, handle in self._handles.items():
            if live(fh):
                peers.keep(fh, handle.fd)
                n += 1
        for ident, fd in self._locks.values():
            if live(ident):
                peers.keep(ident, fd)
                n += 1
        return n

    def inode_fd(self, nodeid: int) -> int:
        """A new O_PATH fd of ``nodeid``'s inode, reopened through an open
        file on it (its own, a copy, or the keeper's), -1 if none is open.
        For a worker that lost the inode's fd (its holder died: nodeids are
        not kept); the caller owns the fd and checks it is the inode."""
        found = self.files.open_on(nodeid)
        if found is None:
            return -1
        try:
            handle = self.get(*found)
            # the cwd is /proc/self/fd: this follows the magic link to the
            # open file's inode (an unlinked one too), never a guest path
            return os.open(str(handle.fd), os.O_PATH | os.O_CLOEXEC)
        except (FUSEError, OSError):
            return -1

    def _claim(self, ident: int, fd: int) -> bool:
        """After a copy: whether the slot still lives (then the copy is its
        open file: owners close only after the slot died), and if so make
        this worker its owner, so the open file outlives the death of the
        worker that opened it."""
        files = self.files
        if not files.live(ident):
            return False
        files.claim(ident, self.peers.mine(fd))
        return True

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
        gone = [key for key, (ident, _fd) in self._locks.items() if not live(ident)]
        for key in gone:
            _close_quietly(self._locks.pop(key)[1])
        return len(dead) + len(gone)

    def _freed(self, released: int) -> None:
        """This worker freed a slot, making the table's released count
        ``released``: if no other free came since ``reap`` last looked,
        there is nothing to reap for it (its own fd goes with its own
        free), so ``reap`` need not scan: the released count it saw moves
        on by this one. (_release.h does the same for RELEASE in C.)"""
        if released and released == self._released + 1:
            self._released = released

    def _forget(self, handle: OpenHandle) -> None:
        """Drop this worker's fd of an fh (released elsewhere, or here)."""
        del self._handles[handle.fh]
        nodeid = handle.nodeid
        left = self._open_per_node[nodeid] - 1
        if left:
            self._open_per_node[nodeid] = left
        else:
            del self._open_per_node[nodeid]
        _close_quietly(handle.fd)

    def close(self, fh: int, kind: int) -> None:
        """Close ``fh`` (RELEASE/RELEASEDIR); EBADF if it is not open.

        Releasing the last handle on an inode (on any queue) also closes
        every lock description of that inode: no guest process can hold a
        lock on a file that no guest file is open on any more.
        """
        handle = self.get(fh, kind)
        files = self.files
        freed = files.free(fh)
        if not freed:               # released on another queue meanwhile
            self._forget(handle)
            raise FUSEError(errno.EBADF)
        self._freed(freed)
        if self.peers is not None and self.peers.copied and kind == KIND_FILE:
            # other workers may hold copies a moment longer: the guest's
            # flock locks on this open file end now, as at its last close
            try:
                fcntl.flock(handle.fd, fcntl.LOCK_UN)
            except OSError:
                pass
        nodeid = handle.nodeid
        self._forget(handle)
        if files.lock_count and not files.has_open(nodeid):
            for _ident, owner in files.locks_of(nodeid):
                self.drop_lock_fd(nodeid, owner)

    def reset(self) -> None:
        """Close this worker's fds (INIT/DESTROY: the guest forgot all its
        fhs; the shared table is reset with the inode table)."""
        if self._own_files:
            self.files.reset()
        handles, self._handles = self._handles, {}
        locks, self._locks = self._locks, {}
        self._open_per_node = {}
        self._warned_full = False
        self._released = self.files.released
        for _ident, fd in locks.values():
            _close_quietly(fd)
        for handle in handles.values():
            _close_quietly(handle.fd)

    # -- lock descriptions (locks.py) -----------------------------------------
    # Shared slots of the FileTable (KIND_LOCK), one per (nodeid, lock
    # owner); this worker keeps its fd of each it used in ``_locks``.
    def lock_fd(self, nodeid: int, owner: int) -> int | None:
        """The lock description of ``owner`` on ``nodeid``, if it has one
        (on any queue: copied from the worker that made it)."""
        e = self._locks.get((nodeid, owner))
        if e is not None:
            if self.files.live(e[0]):
                return e[1]
            del self._locks[(nodeid, owner)]
            _close_quietly(e[1])
        ident = self.files.find_lock(nodeid, owner)
        return self._copy_lock(nodeid, owner, ident) if ident else None

    def _copy_lock(self, nodeid: int, owner: int, ident: int) -> int | None:
        info = self.files.lookup(ident)
        if info is None or self.peers is None:
            return None
        if self.host_fd_count >= self.max_open_files:
            self._full()
        try:
            fd = self._copy(ident, info[3])
        except OSError as e:
            log.warning("cannot copy a lock description from another request worker: %s", e)
            return None
        if fd < 0:
            return None            # its worker and the keeper's copy are gone: so are the locks
        if not self._claim(ident, fd):
            _close_quietly(fd)
            return None
        self._locks[(nodeid, owner)] = (ident, fd)
        return fd

    def lock_fds(self, nodeid: int) -> dict[int, int]:
        """Every lock description on ``nodeid``: {owner: fd}."""
        out = {}
        for _ident, owner in self.files.locks_of(nodeid):
            fd = self.lock_fd(nodeid, owner)
            if fd is not None:
                out[owner] = fd
        return out

    def _lock_ident(self, nodeid: int, owner: int) -> int:
        e = self._locks.get((nodeid, owner))
        if e is not None and self.files.live(e[0]):
            return e[0]
        return self.files.find_lock(nodeid, owner)

    def set_lock_pid(self, nodeid: int, owner: int, pid: int) -> None:
        """Remember the guest pid that ``owner`` last took a lock with."""
        ident = self._lock_ident(nodeid, owner)
        if ident:
            self.files.set_pid(ident, pid)

    def lock_pid(self, nodeid: int, owner: int) -> int:
        """The guest pid of ``owner``'s last granted lock, 0 if unknown."""
        ident = self._lock_ident(nodeid, owner)
        return self.files.pid(ident) if ident else 0

    def add_lock_fd(self, nodeid: int, owner: int, fd: int) -> int:
        """Take ownership of ``fd`` as ``owner``'s lock description; returns
        the fd to lock on: ``fd``, or, if another queue made the owner's
        description meanwhile, this worker's copy of that one (``fd`` is
        then closed). Only for an inode with an open handle (the caller
        holds one); ENFILE (fd closed) when full."""
        if nodeid not in self._open_per_node:
            os.close(fd)
            raise FUSEError(errno.EBADF)
        if self.host_fd_count >= self.max_open_files:
            os.close(fd)
            self._full()
        peers = self.peers
        try:
            ident, created = self.files.alloc_lock(nodeid, owner, peers.mine(fd) if peers else 0)
        except BaseException:
            os.close(fd)
            raise
        if created:
            self._locks[(nodeid, owner)] = (ident, fd)
            if peers is not None:
                peers.keep(ident, fd)
            return fd
        os.close(fd)
        copy = self._copy_lock(nodeid, owner, ident)
        if copy is None:
            raise FUSEError(errno.ENOLCK)
        return copy

    def drop_lock_fd(self, nodeid: int, owner: int) -> None:
        """Close ``owner``'s lock description on ``nodeid``: this releases
        every POSIX lock the owner holds on the file (FLUSH = close(2)).
        Copies on other queues may live a moment longer, so the locks are
        released explicitly first."""
        ident = self._lock_ident(nodeid, owner)
        if not ident:
            return
        fd = self.lock_fd(nodeid, owner)
        freed = self.files.free(ident)
        self._freed(freed)
        if not freed:
            fd = None                   # dropped on another queue meanwhile
        elif fd is not None and self.peers is not None and self.peers.copied:
            try:
                fcntl.fcntl(fd, F_OFD_SETLK, _UNLOCK_ALL)
            except OSError:
                pass
        e = self._locks.pop((nodeid, owner), None)
        if e is not None:
            _close_quietly(e[1])

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
