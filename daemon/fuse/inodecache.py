"""Each request worker's O_PATH fds of the shared table's inodes: ``InodeCache``.

The shared ``InodeTable`` (inodes.py) says which host inode a nodeid
stands for; a worker still needs an fd of it to act on it. ``InodeCache``
keeps one O_PATH fd per nodeid this worker used, checked against the
table's generation on every use, opened by the LOOKUP that took the count,
copied from the worker that holds it (peers.py), or reopened from the
inode's file handle (``--inode-file-handles``: ``file_handle`` /
``open_by_handle`` here). FORGETs, in any process, free nodeids; ``reap``
closes the fds this worker held for them, and, with a bound on fds, the
oldest ones that can be reopened by handle.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
from typing import Callable

from daemon.fds import close_fd
from daemon.fds import close_fds as fds_close_fds
from daemon.fuse.inodes import _SLOT_WORDS, HANDLE_MAX, InodeTable  # _SLOT_WORDS: fd() inlines generation()
from daemon.fuse.request import FUSEError
from daemon.log import get_logger

log = get_logger("fuse.inodes")


# -- file handles ------------------------------------------------------------------
_AT_EMPTY_PATH = 0x1000
_MAX_HANDLE_SZ = 128
_libc = ctypes.CDLL(None, use_errno=True)
_name_to_handle_at = _libc.name_to_handle_at
_name_to_handle_at.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                               ctypes.POINTER(ctypes.c_int), ctypes.c_int)
_name_to_handle_at.restype = ctypes.c_int
_open_by_handle_at = _libc.open_by_handle_at
_open_by_handle_at.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int)
_open_by_handle_at.restype = ctypes.c_int


def file_handle(fd: int) -> bytes:
    """``struct file_handle`` of the file an fd refers to, b"" if the file
    system cannot export it (or it is larger than we keep)."""
    buf = ctypes.create_string_buffer(8 + _MAX_HANDLE_SZ)
    ctypes.c_uint32.from_buffer(buf).value = _MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    if _name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), _AT_EMPTY_PATH) != 0:
        return b""
    n = 8 + ctypes.c_uint32.from_buffer(buf).value
    return buf.raw[:n] if n <= HANDLE_MAX else b""


def open_by_handle(mount_fd: int, handle: bytes) -> int:
    """O_PATH fd of the inode ``handle`` names (OSError if it cannot)."""
    fd = _open_by_handle_at(mount_fd, handle, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


_O_LOOKUP = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class InodeCache:
    """One request worker's nodeid → (generation, O_PATH fd) map.

    Every fd is validated against the shared table on use (one 64-bit read),
    so a nodeid freed and reused by another process is never confused with
    what this worker cached.

    ``max_fds`` (only with ``use_handles``): the most fds kept. Past it,
    ``reap`` closes the oldest-cached fds of inodes that have a file handle
    in the table, down to 7/8 of the bound, and ``fd`` reopens them by
    handle when the guest names them again. So a guest may know many more
    inodes than RLIMIT_NOFILE allows fds (a ``find`` over a large tree), at
    the cost of an ``open_by_handle_at`` on the next use of an evicted one.
    Inodes without a handle (another file system under the share) stay.
    Eviction runs only in ``reap``, between batches, never while a handler
    may still hold an fd it got from ``fd``. An evicted inode that was
    unlinked on the host since is gone with its last fd: ESTALE.
    """

    def __init__(self, table: InodeTable, use_handles: bool = True,
                 close_fds: Callable[[list[int]], None] | None = None, max_fds: int | None = None,
                 peers=None):
        self.table = table
        # the other request workers (peers.py): a nodeid another worker
        # looked up is served with a copy of its fd
        self.peers = peers
        self._slots = table._q
        self.root_fd = -1
        self._root_dev = -1
        self._fds: dict[int, tuple[int, int]] = {}
        self._cursor = table.cursor
        self._use_handles = use_handles
        # open_by_handle_at wants a real (not O_PATH) fd on the file system
        self._mount_fd = -1
        # how reap() closes the fds of forgotten inodes: the session hands
        # them to a helper thread (the last close of an unlinked file frees
        # its blocks on the host, which can wait for the disk)
        self._close_fds = close_fds or fds_close_fds
        self.max_fds = max_fds if use_handles and max_fds else 0  # 0: unbounded
        self.evicted = 0  # fds closed by the bound (for tests and the log)
        # nodeid -> a new O_PATH fd through an open file on it, or -1
        # (HandleTable.inode_fd): a nodeid whose fd died with its worker
        # is served again while the guest has the file open
        self.through_open_file: Callable[[int], int] | None = None

    def __len__(self) -> int:
        return len(self._fds)

    # -- sessions ------------------------------------------------------------------
    def reset(self, root_fd: int) -> None:
        """Drop every cached fd (the table was reset); nodeid 1 = root_fd,
        which the caller keeps owning."""
        self.clear()
        self.root_fd = root_fd
        self._root_dev = os.fstat(root_fd).st_dev
        self._cursor = self.table.cursor
        if self._use_handles:
            try:
                self._mount_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                                         dir_fd=root_fd)
            except OSError as e:
                log.info("share root not readable (%s): no reopening by file handle", e)

    def clear(self) -> None:
        """Close every cached fd (DESTROY, worker exit)."""
        if self._mount_fd >= 0:
            close_fd(self._mount_fd)
            self._mount_fd = -1
        fds, self._fds = self._fds, {}
        for _gen, fd in fds.values():
            close_fd(fd)

    # -- resolution ---------------------------------------------------------------
    def fd(self, nodeid: int) -> int:
        """The O_PATH fd of a live nodeid; FUSEError(ESTALE) for nodeid 0,
        unknown, forgotten or reused nodeids (and nodes this worker cannot
        reopen)."""
        if nodeid == 1:
            if self.root_fd < 0:
                raise FUSEError(errno.ESTALE)
            return self.root_fd
        e = self._fds.get(nodeid)
        # only valid nodeids are ever cached, so no bounds check: slot word 0
        # is the generation (InodeTable.generation, inlined for GETATTR's sake)
        if e is not None and self._slots[nodeid * _SLOT_WORDS] == e[0]:
            return e[1]
        return self._reopen(nodeid)

    def _reopen(self, nodeid: int) -> int:
        old = self._fds.pop(nodeid, None)
        if old is not None:
            close_fd(old[1])
        info = self.table.get(nodeid)
        if info is None or nodeid == 1:
            raise FUSEError(errno.ESTALE)
        gen, dev, ino, _refs = info
        if self.peers is not None and self.peers.shared:
            fd = self._borrow(nodeid, gen, dev, ino)
            if fd >= 0:
                return fd
        if self.through_open_file is not None:
            fd = self._through_open_file(nodeid, gen, dev, ino)
            if fd >= 0:
                return fd
        handle = self.table.handle(nodeid, gen) if self._use_handles else b""
        if not handle or self._mount_fd < 0:
            raise FUSEError(errno.ESTALE)
        try:
            fd = open_by_handle(self._mount_fd, handle)
        except OSError:
            raise FUSEError(errno.ESTALE) from None
        try:
            st = os.fstat(fd)
        except OSError:
            close_fd(fd)
            raise
        if st.st_dev != dev or st.st_ino != ino or self.table.generation(nodeid) != gen:
            close_fd(fd)
            raise FUSEError(errno.ESTALE)
        self._fds[nodeid] = (gen, fd)
        return fd

    def _borrow(self, nodeid: int, gen: int, dev: int, ino: int) -> int:
        """A copy of the owner's fd of (nodeid, gen) (peers.py), cached;
        -1 if there is no live owner."""
        table = self.table
        word = table.owner(nodeid)
        if not word or table.generation(nodeid) != gen:
            return -1
        try:
            fd = self.peers.borrow(word)
        except OSError as e:
            log.warning("cannot copy inode fd from another request worker: %s", e)
            return -1
        if fd < 0:
            return -1
        if table.owner(nodeid) != word:        # another owner meanwhile: maybe not its fd
            close_fd(fd)
            return -1
        return self._keep_copy(nodeid, gen, dev, ino, fd)   # the last to copy owns

    def _through_open_file(self, nodeid: int, gen: int, dev: int, ino: int) -> int:
        """The inode's fd reopened through an open file on it, cached (and
        owned, for the other workers); -1 if none is open or it is not
        (dev, ino) any more."""
        assert self.through_open_file is not None
        fd = self.through_open_file(nodeid)
        return self._keep_copy(nodeid, gen, dev, ino, fd) if fd >= 0 else -1

    def _keep_copy(self, nodeid: int, gen: int, dev: int, ino: int, fd: int) -> int:
        """Cache ``fd`` (taken over) as (nodeid, gen)'s, and own it for the
        other workers, if it is inode (dev, ino) and the nodeid still means
        it; else close it: -1."""
        try:
            st = os.fstat(fd)
        except OSError:
            close_fd(fd)
            return -1
        table = self.table
        if st.st_dev != dev or st.st_ino != ino or table.generation(nodeid) != gen:
            close_fd(fd)
            return -1
        self._fds[nodeid] = (gen, fd)
        if self.peers is not None:
            table.claim(nodeid, gen, self.peers.mine(fd))
        return fd

    def lookup(self, parent_fd: int, name) -> tuple[int, int, os.stat_result]:
        """Open ``name`` (one validated component) in the parent with
        O_PATH|O_NOFOLLOW, +1 lookup on its inode: (nodeid, generation, st).
        OSError from the host, FUSEError(ENFILE) when the table is full."""
        fd = os.open(name, _O_LOOKUP, dir_fd=parent_fd)
        try:
            st = os.fstat(fd)
            return self.adopt(fd, st)
        except BaseException:
            close_fd(fd)
            raise

    def adopt(self, fd: int, st: os.stat_result) -> tuple[int, int, os.stat_result]:
        """+1 lookup on the inode of ``fd`` (an O_PATH fd this call takes
        over: kept in the cache or closed). (nodeid, generation, st)."""
        peers = self.peers
        nodeid, gen, inserted = self.table.ref(st.st_dev, st.st_ino,
                                               owner=peers.mine(fd) if peers is not None else 0)
        if nodeid == 1:
            close_fd(fd)
            return 1, 0, st
        if inserted and self._use_handles and st.st_dev == self._root_dev:
            handle = file_handle(fd)
            if handle:
                self.table.set_handle(nodeid, gen, handle)
        e = self._fds.get(nodeid)
        if e is not None:
            if e[0] == gen:
                close_fd(fd)
                return nodeid, gen, st
            close_fd(e[1])
        self._fds[nodeid] = (gen, fd)
        if not inserted and peers is not None and peers.shared:
            # the last worker to look an inode up owns it: an owner that
            # died leaves nodeids the others can still serve after the
            # guest's next lookup (a borrower checks dev/ino: a word left
            # in a reused slot is never taken for another inode)
            self.table.claim(nodeid, gen, peers.mine(fd))
        return nodeid, gen, st

    # -- forgotten nodeids -----------------------------------------------------------
    def reap(self) -> int:
        """Close the fds of nodeids freed (by FORGET, in any process) since
        the last call, and trim the cache to ``max_fds``. Returns how many
        fds of freed nodeids were closed."""
        table = self.table
        if self.max_fds and len(self._fds) > self.max_fds:
            self._trim()
        if table.cursor == self._cursor:
            return 0
        freed, self._cursor, overflow = table.freed_since(self._cursor)
        fds = self._fds
        candidates = list(fds) if overflow else freed
        doomed = []
        for nodeid in candidates:
            e = fds.get(nodeid)
            if e is not None and table.generation(nodeid) != e[0]:
                del fds[nodeid]
                doomed.append(e[1])
        if doomed:
            self._close_fds(doomed)
        return len(doomed)

    def _trim(self) -> None:
        """Close the oldest-cached fds that can be reopened by handle until
        7/8 of ``max_fds`` are left; the others move to the back."""
        fds, table = self._fds, self.table
        target = self.max_fds - self.max_fds // 8
        excess = len(fds) - target
        doomed: list[int] = []
        kept: list[int] = []
        for nodeid, e in fds.items():
            if len(doomed) >= excess:
                break
            if table.generation(nodeid) != e[0] or table.handle(nodeid, e[0]):
                doomed.append(nodeid)  # stale (reap would close it) or reopenable
            else:
                kept.append(nodeid)
        closing = [fds.pop(nodeid)[1] for nodeid in doomed]
        if self.peers is not None:
            for nodeid, fd in zip(doomed, closing):
                table.disown(nodeid, self.peers.mine(fd))
        for nodeid in kept:  # looked at: not first in line next time
            fds[nodeid] = fds.pop(nodeid)
        if closing:
            if not self.evicted:
                log.info("more than %d inode fds: closing the oldest, reopened by file handle "
                         "when used again", self.max_fds)
            self.evicted += len(closing)
            self._close_fds(closing)


def inode_fd_budget(max_fds: int | None) -> int:
    """The ``max_fds`` bound for a request worker: ``max_fds`` if given,
    else a quarter of this process's RLIMIT_NOFILE (open files may take
    half, see handles.open_file_budget; the rest is headroom for the
    lookups of one batch and a request's temporary fds), at least 64."""
    if max_fds:
        return max_fds
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(64, soft // 4)


