"""The keeper: one process that holds a copy of every open file the guest has.

A request worker's host fds die with it. Without the keeper, an open file
(fh), directory handle or lock description that no other live process had
copied is lost when the worker that opened it dies: the guest gets EBADF
for an fd it still holds. So every request worker hands each open file and
lock description it creates to the keeper (``Peers.keep``: one ``sendmsg``
with the fd, before the guest hears of the fh), and the keeper records in
the shared open-file table where its copy is (``FileTable.keep``: the *kept
word*, ``serial << 32 | fd``). A worker that lacks an fd copies it from its
owner (``pidfd_getfd``, several queues only) and, if the owner is dead,
asks the keeper for it (an ASK on the same socket, carrying the socket to
answer on; the keeper answers with its copy by SCM_RIGHTS: fuse/peers.py):
the replacement of a dead worker serves the fhs it had handed out, on the
same open file description (offset, flock and OFD locks, an unlinked
file's data all kept). The keeper never serves the guest, so it answers at
once, and a daemon with one request queue never needs ``pidfd_getfd``.

Why a process of its own (docs/multiqueue.md, "Worker restarts"): it never
sees a guest byte, so confining it tightly costs nothing: an empty root, no
capabilities at all, a seccomp list of a few calls (policy/keeper.policy:
no open, no read, write to stderr only, fcntl for the table's record lock
only). What it reads is the fd socket (KEEP: an 8-byte slot id and one fd;
ASK: a 16-byte slot id and sequence number and one fd, the socket it
answers on without waiting; anything else is closed unread, from request
workers only) and the open-file table; a request worker could already
write that table itself, and could already copy any open file from the
worker that opened it. Not the hiprio
worker: it parses guest requests, and must stay without file system access.
Not the supervisor: it must not hold state the guest controls.

Lifetimes: the keeper closes its copy only after the slot died (RELEASE,
INIT/DESTROY), so a borrower's check of the slot's generation after the copy
holds as for any owner (peers.py). It looks for dead slots after each batch
of messages and once a second while it holds anything (one shared read when
nothing was released), so a released file's last host close may come up to
a second after RELEASE; flock and POSIX locks are released explicitly at
RELEASE and FLUSH (handles.py), so no lock outlives its guest file.

The supervisor starts the keeper before the workers and restarts it if it
dies; a new keeper is introduced to every request worker (``PEER_KEEPER``),
and each sends it every open file it holds. Only what the dead keeper alone
held (its opener died earlier and no worker copied it since) is lost.
"""

from __future__ import annotations

import errno
import os
import resource
import select
import signal
import socket
import sys
from typing import NoReturn

from daemon import log as daemon_log
from daemon.fds import close_fd, close_fds, recv_with_fds
from daemon.fuse.filetable import FileTable
from daemon.fuse.peers import ANSWER, ASK, KEEP, owner_word
from daemon.sandbox import confine
from daemon.workers.channel import Channel, ChannelError, Msg

log = daemon_log.get_logger("keeper")

NAME = "keeper"
IDLE_REAP_S = 1.0      # how long a released file's copy may linger while idle
BATCH = 64             # messages read per wake-up before looking for dead slots
_MAX_FDS = 4            # room for a sender that puts more than one fd (all closed)
_MAX_MSG = max(KEEP.size, ASK.size) + 1   # one byte more: a longer message is truncated, not taken


def become_keeper() -> None:
    """Leave the supervisor's signal handling behind and name the process."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    daemon_log.set_role(NAME)
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(f"vfsd-{NAME}")
    except OSError:
        pass


def keeper_main(channel: Channel, sock: socket.socket, serial: int, config, files: FileTable) -> NoReturn:
    """Confine, READY, keep until SHUTDOWN or the channel closes; never returns."""
    status = 1
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))   # never a core file of the guest's files
        sock.setblocking(False)
        confine(NAME, config)
        channel.send(Msg.READY)
        log.debug("keeping the guest's open files (serial %d)", serial)
        status = Keeper(sock, serial, files).run(channel)
    except ChannelError as e:
        log.error("control channel: %s; exiting", e)
    except BaseException:  # noqa: BLE001 - must end in os._exit
        log.exception("keeper failed")
    finally:
        try:
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        os._exit(status)


class Keeper:
    """The copies: slot id → fd, and the loop that maintains them."""

    def __init__(self, sock: socket.socket, serial: int, files: FileTable):
        self.sock = sock
        self.serial = serial
        self.files = files
        self.fds: dict[int, int] = {}
        self._released = files.released
        self._warned = False

    def run(self, channel: Channel) -> int:
        poller = select.poll()
        poller.register(channel.fileno(), select.POLLIN)
        poller.register(self.sock.fileno(), select.POLLIN)
        cfd, sfd = channel.fileno(), self.sock.fileno()
        while True:
            timeout = int(IDLE_REAP_S * 1000) if self.fds else None
            events = poller.poll(timeout)
            for fd, _ev in events:
                if fd == sfd:
                    self.receive()
                elif fd == cfd:
                    msg, _payload, fds = channel.recv()
                    close_fds(fds)
                    if msg == Msg.SHUTDOWN:
                        self.close()
                        return 0
                    raise ChannelError(f"unexpected {msg.name}")
            self.reap()

    def receive(self) -> int:
        """Take up to BATCH messages off the socket; returns how many."""
        n = 0
        while n < BATCH:
            try:
                data, fds, flags = recv_with_fds(self.sock, _MAX_MSG, _MAX_FDS)
            except (BlockingIOError, InterruptedError):
                break
            if not data and not fds:
                break
            n += 1
            if flags & socket.MSG_CTRUNC and not fds and not self._warned:
                # the kernel could not give us the fd: RLIMIT_NOFILE reached
                self._warned = True
                log.warning("cannot keep more than %d open files (RLIMIT_NOFILE): the ones "
                            "beyond are lost if the worker that opened them dies", len(self.fds))
            if len(fds) != 1 or flags & socket.MSG_TRUNC:
                close_fds(fds)       # not what a request worker sends
            elif len(data) == KEEP.size:
                self.add(KEEP.unpack(data)[0], fds[0])
            elif len(data) == ASK.size:
                ident, seq = ASK.unpack(data)
                self.answer(ident, seq, fds[0])
            else:
                close_fds(fds)
        return n

    def answer(self, ident: int, seq: int, reply_fd: int) -> None:
        """ANSWER an ASK on the socket it carried: our copy of slot
        ``ident`` (the asker checks the slot still lives), or EBADF if we
        hold none. Never waits: an asker whose socket is full (or that sent
        something else than a socket) gets nothing and times out."""
        fd = self.fds.get(ident)
        try:
            reply = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=reply_fd)
        except OSError:         # not a socket (CPython asks getsockname)
            close_fd(reply_fd)
            return
        try:
            if fd is None:
                reply.sendmsg([ANSWER.pack(ident, seq, errno.EBADF)], [], socket.MSG_DONTWAIT)
            else:
                # not socket.send_fds: it drops its flags argument (CPython 3.11)
                reply.sendmsg([ANSWER.pack(ident, seq, 0)],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))],
                              socket.MSG_DONTWAIT)
        except OSError:
            pass
        finally:
            reply.close()

    def add(self, ident: int, fd: int) -> None:
        """Keep ``fd`` as slot ``ident``'s copy, if the slot still lives.
        A copy already kept stays (a borrower may be copying it: it is
        closed only once the slot died); the second one is closed."""
        if ident in self.fds or not self.files.keep(ident, owner_word(self.serial, fd)):
            close_fd(fd)          # a duplicate, or released before we got it
            return
        self.fds[ident] = fd

    def reap(self) -> int:
        """Close the copies of slots freed since the last look."""
        released = self.files.released
        if released == self._released:
            return 0
        self._released = released
        live = self.files.live
        dead = [ident for ident in self.fds if not live(ident)]
        for ident in dead:
            close_fd(self.fds.pop(ident))
        return len(dead)

    def close(self) -> None:
        for fd in self.fds.values():
            close_fd(fd)
        self.fds = {}


