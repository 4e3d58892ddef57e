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
"""

from __future__ import annotations

import ctypes
import errno
import os
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


def owner_word(serial: int, fd: int) -> int:
    return (serial << 32) | fd


class Peers:
    """This worker's serial and the pidfds of the other request workers."""

    def __init__(self):
        self.serial = 0           # 0: not told yet (single worker, tests)
        self._pidfds: dict[int, int] = {}
        self._warned = False

    def __len__(self) -> int:
        return len(self._pidfds)

    @property
    def shared(self) -> bool:
        """Whether another request worker exists (then fds are borrowed)."""
        return bool(self._pidfds)

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
            return -1
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

    def close(self) -> None:
        for pidfd in self._pidfds.values():
            try:
                os.close(pidfd)
            except OSError:
                pass
        self._pidfds = {}
