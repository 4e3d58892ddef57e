"""The other request workers, and how to borrow a host fd from one of them.

With several request queues (Linux >= 6.11 spreads a guest's requests over
all of them) one nodeid, one open file or one lock is used through several
request workers, each a process with its own fd table. The worker that
opened a host fd stays its *owner*; the shared tables (``InodeTable`` for
O_PATH fds, ``handles.FileTable`` for open files and lock descriptions)
record in one 64-bit *owner word* which worker that is and its fd number:
``serial << 32 | fd``. Another worker that needs the fd copies it from the
owner with ``pidfd_getfd(2)`` (Linux 5.6), one system call, the first time
it needs it, and keeps the copy (docs/multiqueue.md says why this and not a
shared fd table or a round trip to the owner).

``serial`` numbers worker processes, not queues: the supervisor gives each
request worker it starts (a replacement too) a new one, and pidfds of the
live ones (``Msg.PEER``). A dead owner's serial has no pidfd any more, so an
owner word can never name the fd of another process that took its number.

Safety of a copy: the owner clears the owner word (or frees the slot: the
generation changes) *before* it closes the fd. A borrower reads the slot's
generation and owner word, copies, and reads both again: unchanged means
the fd was still the owner's at the copy, so the copy is the right open
file, never a reused number. Callers check the copy's (st_dev, st_ino) too.

``pidfd_getfd`` needs ptrace access to the owner: same uid (all workers
are root), the borrower's capabilities a superset of the owner's (all
request workers have the same), and the owner *dumpable*. The kernel
clears "dumpable" whenever a process changes its fsuid/fsgid (each
credential switch), so with more than one request worker,
``credentials.switch`` sets it again (``PR_SET_DUMPABLE``, only when the ids
really change); a borrower that catches an owner in between retries.
Workers have RLIMIT_CORE 0, so dumpable never writes a core file.

The keeper (workers/keeper.py) is one more process to borrow from: each
request worker sends it every open file and lock description it creates
(``keep``: one ``sendmsg`` with the fd, before the guest hears of the fh),
and the keeper records its own copy's word in the slot (``FileTable.kept``).
So an open file whose opener died is still copied, from the keeper.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import time

from daemon.log import get_logger

log = get_logger("fuse.peers")

SYS_pidfd_getfd = 438  # x86-64
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# how long a borrower retries an owner caught between a credential switch
# and its PR_SET_DUMPABLE (microseconds in practice)
EPERM_RETRY_S = 0.05
# one message to the keeper: the fh or lock description id, and its fd
KEEP = struct.Struct("<Q")
# how long a worker waits for room on the keeper's socket when the keeper lags
KEEP_SEND_WAIT_S = 0.5


def owner_word(serial: int, fd: int) -> int:
    return (serial << 32) | fd


class Peers:
    """This worker's serial and the pidfds of the other request workers."""

    def __init__(self):
        self.serial = 0           # 0: not told yet (single worker, tests)
        self._pidfds: dict[int, int] = {}
        self._warned = False
        # the keeper: its serial and pidfd, and our end of its socket
        self.keeper_serial = 0
        self._keeper_pidfd = -1
        self._keeper_sock: socket.socket | None = None
        self._keep_warned = False

    def __len__(self) -> int:
        return len(self._pidfds)

    @property
    def shared(self) -> bool:
        """Whether another request worker exists (then fds are borrowed)."""
        return bool(self._pidfds)

    @property
    def copied(self) -> bool:
        """Whether another process may hold copies of this worker's open
        files (another request worker, or the keeper)."""
        return bool(self._pidfds) or self._keeper_sock is not None

    def set_self(self, serial: int) -> None:
        self.serial = serial

    def add(self, serial: int, pidfd: int) -> None:
        """A live request worker (the pidfd becomes ours)."""
        old = self._pidfds.pop(serial, None)
        if old is not None:
            os.close(old)
        self._pidfds[serial] = pidfd
        from daemon.fuse import credentials
        credentials.keep_dumpable(True)

    def remove(self, serial: int) -> None:
        """A request worker died: its fds are gone with it."""
        old = self._pidfds.pop(serial, None)
        if old is not None:
            os.close(old)

    def set_keeper(self, serial: int, pidfd: int, sock_fd: int) -> None:
        """A (new) keeper: its serial, its pidfd and the socket to send it
        fds on (both become ours)."""
        self._drop_keeper()
        self.keeper_serial = serial
        self._keeper_pidfd = pidfd
        # family, type and protocol given: CPython asks the kernel nothing
        self._keeper_sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=sock_fd)
        self._keeper_sock.setblocking(False)   # never a poll before each send

    @property
    def has_keeper(self) -> bool:
        return self._keeper_sock is not None

    def keep(self, ident: int, fd: int) -> None:
        """Send the keeper a copy of ``fd``, the open file (or lock
        description) of slot ``ident``. One sendmsg; once it returns the
        open file is in the socket's queue, and outlives this process. A
        full queue (the keeper stuck) or any error: logged once, the file
        is then not protected against this worker's death."""
        sock = self._keeper_sock
        if sock is None:
            return
        msg = [KEEP.pack(ident)]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))]
        deadline = None
        try:
            while True:
                try:
                    sock.sendmsg(msg, anc)
                    return
                except BlockingIOError:
                    now = time.monotonic()
                    if deadline is None:
                        deadline = now + KEEP_SEND_WAIT_S
                    elif now > deadline:
                        raise
                    time.sleep(0.0005)
        except OSError as e:
            if not self._keep_warned:
                self._keep_warned = True
                log.warning("cannot hand an open file to the keeper (%s): it is lost if this "
                            "worker dies", e.strerror or e)

    def mine(self, fd: int) -> int:
        """The owner word for an fd of this worker (0 when unnamed)."""
        return (self.serial << 32) | fd if self.serial else 0

    def borrow(self, word: int) -> int:
        """A copy of the fd ``word`` names (O_CLOEXEC), -1 if its owner is
        gone or the word names nothing. OSError for other failures."""
        serial, fd = word >> 32, word & 0xFFFFFFFF
        if not serial or serial == self.serial:
            return -1
        pidfd = self._pidfds.get(serial)
        if pidfd is None:
            if serial != self.keeper_serial or self._keeper_pidfd < 0:
                return -1
            pidfd = self._keeper_pidfd
        deadline = None
        while True:
            r = _syscall(SYS_pidfd_getfd, ctypes.c_int(pidfd), ctypes.c_int(fd), ctypes.c_uint(0))
            if r >= 0:
                return r
            err = ctypes.get_errno()
            if err in (errno.ESRCH, errno.EBADF):
                return -1      # owner dead, or it closed the fd (the caller re-checks)
            if err == errno.ENOSYS:
                if not self._warned:
                    self._warned = True
                    log.error("this kernel has no pidfd_getfd (Linux 5.6): files opened "
                              "through one request queue cannot be used through another; "
                              "run with --request-queues 1")
                return -1
            if err != errno.EPERM:
                raise OSError(err, os.strerror(err))
            now = time.monotonic()
            if deadline is None:
                deadline = now + EPERM_RETRY_S
            elif now > deadline:
                raise OSError(err, "pidfd_getfd: the owner stays not dumpable")
            time.sleep(0.0002)

    def _drop_keeper(self) -> None:
        if self._keeper_sock is not None:
            self._keeper_sock.close()
            self._keeper_sock = None
        if self._keeper_pidfd >= 0:
            os.close(self._keeper_pidfd)
            self._keeper_pidfd = -1
        self.keeper_serial = 0

    def close(self) -> None:
        self._drop_keeper()
        for pidfd in self._pidfds.values():
            try:
                os.close(pidfd)
            except OSError:
                pass
        self._pidfds = {}
