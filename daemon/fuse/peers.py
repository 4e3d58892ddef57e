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
So an open file whose opener died is still copied, from the keeper, and
not with ``pidfd_getfd``: by a round trip on the keeper's socket
(``from_keeper``: an ASK with the slot id and this worker's answer socket,
the keeper's ANSWER with its copy by SCM_RIGHTS). The keeper never serves
the guest, so it is never busy, and the path is rare (a worker's restart).
So a daemon with one request queue never calls ``pidfd_getfd``, restarts
included, and runs where the service manager forbids it (the systemd unit:
docs/service.md). ``probe_pidfd_getfd`` tells at start whether several
queues can work.

The keeper's socket (SOCK_SEQPACKET: each message whole) carries two
messages, told apart by their size: KEEP (slot id; one fd, the copy to
keep) and ASK (slot id, sequence number; one fd, the socket to answer on).
ANSWER comes back on the asker's own socket pair, which the supervisor
made for it (PEER_KEEPER), so no other worker reads it. An ANSWER of the
wrong size, sequence or slot, or with fds where none belong, means the
keeper is broken or impersonated: the asking worker exits
(``KeeperBroken``) and the supervisor replaces it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import struct
import time

from daemon.fds import close_fds, recv_with_fds
from daemon.log import get_logger

log = get_logger("fuse.peers")

SYS_pidfd_getfd = 438  # x86-64
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# how long a borrower retries an owner caught between a credential switch
# and its PR_SET_DUMPABLE (microseconds in practice)
EPERM_RETRY_S = 0.05
# the keeper's socket: KEEP, the fh or lock description id (one fd: its
# open file); ASK, that id and a sequence number (one fd: the socket to
# answer on); ANSWER, id, sequence and 0 with the keeper's copy attached, or
# an errno and no fd (EBADF: the keeper has no copy)
KEEP = struct.Struct("<Q")
ASK = struct.Struct("<QQ")
ANSWER = struct.Struct("<QQI")
# how long an ASK may wait for its ANSWER (the keeper only ever waits on its
# socket; a restarting keeper answers from the same queue)
ASK_TIMEOUT_S = 2.0
# how long a worker waits for room on the keeper's socket when the keeper lags
KEEP_SEND_WAIT_S = 0.5


def owner_word(serial: int, fd: int) -> int:
    return (serial << 32) | fd


class KeeperBroken(SystemExit):
    """The keeper's ANSWER broke the protocol. A SystemExit, so that no
    request handler's ``except Exception`` keeps the worker serving: it
    exits, and the supervisor starts a fresh one."""

    def __init__(self, why: str):
        super().__init__(1)
        self.why = why

    def __str__(self) -> str:
        return f"the keeper's answer broke the protocol: {self.why}"


def probe_pidfd_getfd() -> int:
    """0 if this process may call ``pidfd_getfd``, else the errno that
    refuses it: ENOSYS (a kernel before 5.6, or a seccomp filter answering
    so) or EPERM (a filter such as a systemd unit's ``SystemCallFilter=``).
    Asks for fd -1 of itself: a kernel that allows the call answers EBADF."""
    pidfd = os.pidfd_open(os.getpid())
    try:
        r = _syscall(SYS_pidfd_getfd, ctypes.c_int(pidfd), ctypes.c_int(-1), ctypes.c_uint(0))
        err = ctypes.get_errno()
    finally:
        os.close(pidfd)
    if r >= 0:              # cannot be: fd -1 does not exist
        os.close(r)
        return 0
    return 0 if err == errno.EBADF else err


class Peers:
    """This worker's serial and the pidfds of the other request workers."""

    def __init__(self):
        self.serial = 0           # 0: not told yet (single worker, tests)
        self._pidfds: dict[int, int] = {}
        # shared: another request worker exists (then fds are borrowed);
        # copied: another process (a request worker or the keeper) may
        # hold copies of this worker's open files. Plain attributes kept
        # by _recount, not properties: C reads them on every cold LOOKUP
        # and RELEASE (_lookup.h once_read, _release.h), where a property
        # would run an interpreter frame
        self.shared = self.copied = False
        self._warned = False
        # the keeper: its serial and pidfd, and our end of its socket
        self.keeper_serial = 0
        self._keeper_sock: socket.socket | None = None
        self._keep_warned = False
        # our socket pair for the keeper's ANSWERs: we read one end, each
        # ASK carries the other; an epoll to wait on it (no poll(2) here)
        self._answers: socket.socket | None = None
        self._answer_end = -1
        self._answer_wait: select.epoll | None = None
        self._asked = 0

    def __len__(self) -> int:
        return len(self._pidfds)

    def _recount(self) -> None:
        self.shared = bool(self._pidfds)
        self.copied = self.shared or self._keeper_sock is not None

    def set_self(self, serial: int) -> None:
        self.serial = serial

    def add(self, serial: int, pidfd: int) -> None:
        """A live request worker (the pidfd becomes ours)."""
        old = self._pidfds.pop(serial, None)
        if old is not None:
            os.close(old)
        self._pidfds[serial] = pidfd
        self._recount()
        from daemon.fuse import credentials
        credentials.keep_dumpable(True)

    def remove(self, serial: int) -> None:
        """A request worker died: its fds are gone with it."""
        old = self._pidfds.pop(serial, None)
        self._recount()
        if old is not None:
            os.close(old)

    def set_keeper(self, serial: int, sock_fd: int, answers_fd: int, answer_end: int) -> None:
        """A (new) keeper: its serial, the socket to send it KEEP and ASK
        on, and our answer socket pair (the end we read, the end each ASK
        carries); the fds become ours."""
        self._drop_keeper()
        self.keeper_serial = serial
        # (CPython still asks getsockname of a socket made from an fd)
        self._keeper_sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=sock_fd)
        self._keeper_sock.setblocking(False)   # never a poll before each send
        self._recount()
        self._answers = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=answers_fd)
        self._answer_end = answer_end
        if self._answer_wait is None:
            self._answer_wait = select.epoll(1)
        self._answer_wait.register(answers_fd, select.EPOLLIN)

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
        try:
            _send_waiting(sock, KEEP.pack(ident), fd)
        except OSError as e:
            if not self._keep_warned:
                self._keep_warned = True
                log.warning("cannot hand an open file to the keeper (%s): it is lost if this "
                            "worker dies", e.strerror or e)

    def from_keeper(self, ident: int) -> int:
        """A copy of the keeper's fd of slot ``ident`` (O_CLOEXEC), by a
        round trip: ASK on its socket, its ANSWER on ours. -1 if there is
        no keeper, it holds no copy (never got one, or a keeper that died
        held it), the ASK cannot be sent or no ANSWER comes within
        ASK_TIMEOUT_S. KeeperBroken for an answer that breaks the protocol.
        The caller checks the slot is still live after the copy."""
        sock, answers, wait = self._keeper_sock, self._answers, self._answer_wait
        if sock is None or answers is None or wait is None:
            return -1
        self._asked += 1
        seq = self._asked
        try:
            _send_waiting(sock, ASK.pack(ident, seq), self._answer_end)
        except OSError as e:
            log.warning("cannot ask the keeper for an open file: %s", e.strerror or e)
            return -1
        deadline = time.monotonic() + ASK_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("the keeper did not answer within %g s: open file lost for this request",
                            ASK_TIMEOUT_S)
                return -1
            if not wait.poll(left):
                continue
            try:
                data, fds, flags = recv_with_fds(answers, ANSWER.size + 1, 2, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            if flags & socket.MSG_CTRUNC:
                close_fds(fds)     # our RLIMIT_NOFILE: not the keeper's fault
                log.warning("cannot receive an open file from the keeper: no fd left (RLIMIT_NOFILE)")
                return -1
            if len(data) != ANSWER.size or flags & socket.MSG_TRUNC or len(fds) > 1:
                close_fds(fds)
                raise KeeperBroken(f"{len(data)} bytes, {len(fds)} fds")
            a_ident, a_seq, err = ANSWER.unpack(data)
            if a_seq < seq:             # the late answer to an ASK that timed out
                close_fds(fds)
                continue
            if a_seq != seq or a_ident != ident or bool(err) == bool(fds):
                close_fds(fds)
                raise KeeperBroken(f"slot {a_ident:#x} seq {a_seq} errno {err} with {len(fds)} fds "
                                   f"to ASK slot {ident:#x} seq {seq}")
            return fds[0] if fds else -1

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
            return -1          # a dead worker, or the keeper (from_keeper)
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
            self._recount()
        if self._answers is not None:
            if self._answer_wait is not None:
                self._answer_wait.unregister(self._answers.fileno())
            self._answers.close()
            self._answers = None
        if self._answer_end >= 0:
            os.close(self._answer_end)
            self._answer_end = -1
        self.keeper_serial = 0

    def close(self) -> None:
        self._drop_keeper()
        if self._answer_wait is not None:
            self._answer_wait.close()
            self._answer_wait = None
        for pidfd in self._pidfds.values():
            try:
                os.close(pidfd)
            except OSError:
                pass
        self._pidfds = {}
        self._recount()


def _send_waiting(sock: socket.socket, data: bytes, fd: int) -> None:
    """One message with one fd on the keeper's (non-blocking) socket,
    waiting up to KEEP_SEND_WAIT_S for room when the keeper lags."""
    msg = [data]
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))]
    deadline = None
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
