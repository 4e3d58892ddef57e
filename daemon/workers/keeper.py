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
no open, no read, write to stderr only, fcntl for the table's lock
only: F_SETLK/F_SETLKW of a record lock, filetable.LockedTable). What it
reads is the fd socket (KEEP: an 8-byte slot id and one fd;
ASK: a 16-byte slot id and sequence number and one fd, the socket it
answers on without waiting; anything else is closed unread, from request
workers only) and the open-file table; a request worker could already
write that table itself, and could already copy any open file from the
worker that opened it. Not the hiprio
worker: it parses guest requests, and must stay without file system access.
Not the supervisor: it must not hold state the guest controls.

Lifetimes: the keeper closes its copy only after the slot died (RELEASE,
INIT/DESTROY), so a borrower's check of the slot's generation after the copy
holds as for any owner (peers.py). It looks for dead slots after a batch of
messages at most every ``REAP_GAP_S`` and once a second while it holds
anything (one shared read when nothing was released), so a released
file's last host close may come up to a second after RELEASE; flock and
POSIX locks are released explicitly at RELEASE and FLUSH (handles.py), so
no lock outlives its guest file. The look is a scan of every copy held,
about 0.4 µs per copy in Python (93 µs for 200 on the development host):
done at each wake-up, it was a large part of a keeper that spent 100 to
200 µs per wake-up under `dpkg -i`, whose RELEASEs move the released count
between nearly every two wake-ups.

Reading in bursts: a KEEP is safe once its ``sendmsg`` returned (the fd
waits in the socket's queue, which the supervisor holds too), so the
keeper need not take it at once. After a wake-up that took messages it
stops listening to the socket for ``SETTLE_S`` (50 ms) and then takes all
that came meanwhile, recording their kept words under one table lock
(``FileTable.keep_many``): one wake-up per burst of CREATEs and OPENs
instead of one per file, and the workers' ``sendmsg`` wakes nobody while
it settles. Only an ASK (a worker's restart) waits, up to ``SETTLE_S``,
and a wake-up that answered one is not followed by settling, so a
restarted worker's next ASK is answered at once; the order on the socket
still puts each KEEP before any ASK sent after it.

Why 50 ms: each wake-up costs the keeper a few hundred µs of CPU on a busy
host, mostly the interpreter around a few system calls, whatever it
takes; `dpkg -i` on a virtio-fs root hands over an open file every 10 to
30 ms, so with 20 ms nearly every burst cost two wake-ups (the one it
woke for and the window's end, which found nothing). In one process, 35
bursts a second of two KEEPs and two frees with 140 copies held: 335–358
µs of keeper CPU per burst with 20 ms, 162–169 with 50, 108–112 with 100
(docs/perf/rootfs.md, "The keeper's scan and RENAME"). Longer windows make
a worker's ASK wait longer and fill the socket's queue sooner.

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
import time
from typing import NoReturn

from daemon import log as daemon_log
from daemon.fds import MSG_CTRUNC, MSG_TRUNC, close_fd, close_fds, recv_with_fds
from daemon.fuse.filetable import FileTable
from daemon.fuse.peers import ANSWER, ASK, KEEP, owner_word
from daemon.sandbox import confine
from daemon.workers.channel import Channel, ChannelError, Msg

log = daemon_log.get_logger("keeper")

NAME = "keeper"
IDLE_REAP_S = 1.0      # how long a released file's copy may linger while idle
REAP_GAP_S = 0.1       # the least time between two scans for released copies
BATCH = 64             # messages read (and KEEPs recorded under one lock) at a time
# After a wake-up that took messages the keeper does not listen to its
# socket for SETTLE_S (it still answers the supervisor's channel), then
# reads everything that came meanwhile in one go. A KEEP is safe from the
# moment its sendmsg returns (the fd is in the socket's queue, which the
# supervisor holds too), so the delay costs no protection; while the
# keeper settles, a KEEP wakes no process, which makes the sender's
# sendmsg cheaper too. An ASK (a worker's restart) waits up to SETTLE_S,
# once: no settling follows a wake-up that answered one.
# The window adapts so that a burst stays well inside the socket's queue
# (about 270 messages of the workers' send buffer): halved after a drain of
# BATCH or more, doubled (up to SETTLE_S) after one of less than BATCH / 2;
# at 0 the keeper reads as soon as messages come.
SETTLE_S = 0.05
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
        files.prepare_lock()        # the extension's TableLock, loaded before the new root
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
        self.settle_ms = 0      # the settling window (run: SETTLE_S, adapted)
        self.answered = 0       # ASKs answered (a drain that answered one is not followed by settling)

    def run(self, channel: Channel) -> int:
        """Keep until SHUTDOWN; see ``SETTLE_S`` for when the socket is read."""
        both = select.poll()
        both.register(channel.fileno(), select.POLLIN)
        both.register(self.sock.fileno(), select.POLLIN)
        control = select.poll()
        control.register(channel.fileno(), select.POLLIN)
        cfd = channel.fileno()
        most = int(SETTLE_S * 1000)
        self.settle_ms = most
        took = 0
        settle = False
        next_reap = 0.0
        while True:
            if settle and self.settle_ms:
                # settling: deaf to the socket for the window, so the KEEPs
                # sent meanwhile wake nobody and are all read at once
                events = control.poll(self.settle_ms)
            else:
                events = both.poll(int(IDLE_REAP_S * 1000) if self.fds else None)
            for fd, _ev in events:
                if fd == cfd:
                    msg, _payload, fds = channel.recv()
                    close_fds(fds)
                    if msg == Msg.SHUTDOWN:
                        self.close()
                        return 0
                    raise ChannelError(f"unexpected {msg.name}")
            answered = self.answered
            took = self.drain()
            # no settling after an ASK: a restarted worker waits on each
            # answer, and its next ASK must not wait out a window
            settle = took > 0 and self.answered == answered
            if took >= BATCH:
                self.settle_ms //= 2
            elif took < BATCH // 2:
                self.settle_ms = min(most, self.settle_ms * 2 or 1)
            now = time.monotonic()
            if now >= next_reap:
                self.reap()
                next_reap = now + REAP_GAP_S

    def drain(self) -> int:
        """Read the socket until it is empty (``BATCH`` at a time); returns
        how many messages were taken."""
        total = 0
        while True:
            n = self.receive()
            total += n
            if n < BATCH:
                return total

    def receive(self) -> int:
        """Take up to BATCH messages off the socket; returns how many.
        The KEEPs among them are recorded in the table under one lock
        (``keep_many``), each before any later ASK is answered."""
        n = 0
        keeps: list[tuple[int, int]] = []
        while n < BATCH:
            try:
                data, fds, flags = recv_with_fds(self.sock, _MAX_MSG, _MAX_FDS)
            except (BlockingIOError, InterruptedError):
                break
            if not data and not fds:
                break
            n += 1
            if flags & MSG_CTRUNC and not fds and not self._warned:
                # the kernel could not give us the fd: RLIMIT_NOFILE reached
                self._warned = True
                log.warning("cannot keep more than %d open files (RLIMIT_NOFILE): the ones "
                            "beyond are lost if the worker that opened them dies", len(self.fds))
            if len(fds) != 1 or flags & MSG_TRUNC:
                close_fds(fds)       # not what a request worker sends
            elif len(data) == KEEP.size:
                keeps.append((KEEP.unpack(data)[0], fds[0]))
            elif len(data) == ASK.size:
                self.add_many(keeps)
                keeps = []
                ident, seq = ASK.unpack(data)
                self.answer(ident, seq, fds[0])
            else:
                close_fds(fds)
        self.add_many(keeps)
        return n

    def answer(self, ident: int, seq: int, reply_fd: int) -> None:
        """ANSWER an ASK on the socket it carried: our copy of slot
        ``ident`` (the asker checks the slot still lives), or EBADF if we
        hold none. Never waits: an asker whose socket is full (or that sent
        something else than a socket) gets nothing and times out."""
        self.answered += 1
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
        self.add_many([(ident, fd)])

    def add_many(self, keeps: list[tuple[int, int]]) -> None:
        """``add`` for each (slot id, fd), in order, under one table lock."""
        if not keeps:
            return
        fresh: list[tuple[int, int]] = []
        taken: set[int] = set()
        for ident, fd in keeps:
            if ident in self.fds or ident in taken:
                close_fd(fd)      # a duplicate
            else:
                taken.add(ident)
                fresh.append((ident, fd))
        serial = self.serial
        recorded = self.files.keep_many([(ident, owner_word(serial, fd)) for ident, fd in fresh])
        for (ident, fd), ok in zip(fresh, recorded):
            if ok:
                self.fds[ident] = fd
            else:
                close_fd(fd)      # released before we got it

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


