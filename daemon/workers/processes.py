"""The supervisor's worker processes: ``ProcessPool``, the real ``WorkerPool``
(workers/pool.py).

One forked, confined process per vring (the hiprio worker for vring 0, a
request worker for each request queue) and the keeper (workers/keeper.py),
each driven over its control channel (workers/channel.py) the OpenSSH
monitor's way: request/answer pairs, size-capped frames, fds by
SCM_RIGHTS. Any channel error, bad answer or timeout means the worker is
broken: it is killed, reaped and logged in one line (``describe_exit``), and
``WorkerFailure`` is raised; the supervisor (supervisor.py) replaces it
within the restart budget (``RESTART_LIMIT`` per ``RESTART_WINDOW``).
Nothing here decodes a guest byte.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import sys
import time
from typing import Callable, NamedTuple, NoReturn

from daemon import log, sandbox
from daemon.config import Config
from daemon.metrics.counters import MetricsArea
from daemon.workers.pool import WorkerFailure, WorkerSpawnError, worker_name, worker_role
from daemon.workers import channel as ch
from daemon.workers.channel import Channel, ChannelError, Msg
from daemon.workers.entry import become_worker
from daemon.workers.bells import ReapBells
from daemon.workers.keeper import become_keeper, keeper_main

logger = log.get_logger("supervisor")

READY_TIMEOUT = 10.0        # fork -> READY
ANSWER_TIMEOUT = 10.0       # any request -> its ANSWER
SHUTDOWN_TIMEOUT = 5.0      # SHUTDOWN -> every worker exited, then SIGKILL
RESTART_LIMIT = 5           # restarts of one vring's worker ...
RESTART_WINDOW = 60.0       # ... within this many seconds; one more death is fatal
KEEPER = -1                 # the keeper's key in the restart budget


# -- workers -------------------------------------------------------------------------

# worker_main(role, index, channel, config, inodes, progress=...) (workers/entry.py)
WorkerMain = Callable[..., None]


class Worker(NamedTuple):
    index: int  # type: ignore[assignment]  # the vring it serves (shadows tuple.index)
    pid: int
    channel: Channel

    @property
    def role(self) -> str:
        return worker_role(self.index)

    @property
    def name(self) -> str:
        return worker_name(self.index)


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def describe_exit(status: int, role: str | None = None) -> str:
    """Why a worker ended, for the log: one line."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGSYS and role is not None:
            return (f"killed by SIGSYS: a system call outside policy/{role}.policy "
                    f"(run with --seccomp log and look for type=1326 in the kernel log to name it)")
        return f"killed by {_signal_name(sig)}"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"wait status 0x{status:x}"


def _death_reason(status: int) -> str:
    """A short, bounded label for why a worker ended (metrics)."""
    if os.WIFSIGNALED(status):
        return _signal_name(os.WTERMSIG(status))
    if os.WIFEXITED(status):
        return f"exit {os.WEXITSTATUS(status)}"
    return "other"


class ProcessPool:
    """The real ``WorkerPool``: one forked process per vring, each driven
    over its control channel. Any channel error, bad answer or timeout means
    the worker is broken: it is killed, reaped and logged in one line, and
    ``WorkerFailure`` is raised."""

    def __init__(self, config: Config, inodes, worker_main: WorkerMain,
                 answer_timeout: float = ANSWER_TIMEOUT, ready_timeout: float = READY_TIMEOUT,
                 restart_limit: int = RESTART_LIMIT, restart_window: float = RESTART_WINDOW):
        from daemon.workers.progress import RingProgress
        self.config = config
        self.inodes = inodes
        self.worker_main = worker_main
        self.answer_timeout = answer_timeout
        self.ready_timeout = ready_timeout
        self.restart_limit = restart_limit
        self.restart_window = restart_window
        self.workers: dict[int, Worker] = {}
        # where workers publish their rings' progress (shared memory that
        # every worker forked later inherits)
        self.progress = RingProgress(1 + config.max_request_workers)
        # --metrics-socket: where workers count (shared memory, as progress)
        self.metrics = MetricsArea(1 + config.max_request_workers) if config.metrics_socket else None
        # the hiprio worker wakes idle request workers to close forgotten
        # inodes' fds (bells.py): one eventfd per request vring
        self.bells = ReapBells(config.max_request_workers)
        self.restarts: dict[tuple[int, str], int] = {}   # (vring, why) -> deaths
        self._deaths: dict[int, list[float]] = {}     # vring -> recent death times
        # request workers copy each other's fds (fuse/peers.py): vring ->
        # (serial, pidfd) of its live worker; serials of dead ones to announce
        self._peers: dict[int, tuple[int, int]] = {}
        self._serial = 0
        self._gone: list[int] = []
        # the keeper (workers/keeper.py): its process, serial, and
        # both ends of its fd socket; the supervisor keeps the reading end
        # too (never reads it) so fds in flight survive the keeper's death
        # and its replacement reads them
        self.keeper: Worker | None = None
        self._keeper_serial: int | None = None
        self._keep_r, self._keep_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # fds (or objects with detach()/fileno()) a new child must not keep:
        # set by the supervisor (listener, QEMU connection, QEMU's fds...)
        self.inherited: Callable[[], list] = lambda: []

    # WorkerPool interface ---------------------------------------------------------

    def live(self):
        return self.workers.keys()

    def spawn(self, index: int) -> None:
        """Fork the worker of vring ``index`` and wait for its READY. A
        restart (the vring's worker died before) counts against the restart
        budget. WorkerSpawnError if the budget is spent, the fork fails or
        the worker never becomes ready."""
        name = worker_name(index)
        restart = self._check_budget(index, f"worker {name}")
        if index >= 1:
            self._share_request_mounts()
        pid, parent_end, child_end = self._fork(f"worker {name}")
        if pid == 0:
            self._run_child(index, child_end, parent_end)
        child_end.close()
        worker = self.workers[index] = Worker(index, pid, parent_end)
        logger.debug("forked %s as pid %d", worker.name, pid)
        try:
            self._wait_ready(worker)
        except ChannelError as e:
            try:
                self._fail(worker, f"while starting: {e}")
            except WorkerFailure as failure:
                raise WorkerSpawnError(str(failure)) from None
        if index >= 1:
            self._introduce(worker)
        if restart:
            logger.warning("worker %s restarted as pid %d (%d restart(s) in the last %g s, at most %d)",
                           name, pid, len(self._deaths[index]), self.restart_window, self.restart_limit)

    def _check_budget(self, key: int, label: str) -> bool:
        """Whether this start of ``key``'s process (a vring, or KEEPER) is
        a restart; WorkerSpawnError if it died too often lately."""
        if key not in self._deaths:
            return False
        now = time.monotonic()
        deaths = [t for t in self._deaths[key] if now - t < self.restart_window]
        self._deaths[key] = deaths
        if len(deaths) > self.restart_limit:
            message = f"{label} died {len(deaths)} times within {self.restart_window:g} s; not restarting it again"
            logger.error("%s", message)
            raise WorkerSpawnError(message)
        return True

    def _share_request_mounts(self) -> None:
        """The mount namespace every request worker joins (sandbox/sharedns.py:
        one mount of the share, so LINK and RENAME work between fds of two
        workers), built before the first one; WorkerSpawnError if it cannot be."""
        try:
            sandbox.share_request_mounts(self.config)
        except sandbox.SandboxError as e:
            logger.error("%s", e)
            raise WorkerSpawnError(str(e)) from None

    def _fork(self, label: str) -> tuple[int, Channel, Channel]:
        """(pid, our channel end, the child's) of a new confined process
        (pid 0 in the child); WorkerSpawnError if the fork fails."""
        parent_end, child_end = Channel.pair()
        sys.stdout.flush()
        sys.stderr.flush()
        # everything allocated so far (modules, config, tables) is shared
        # copy-on-write with the worker; frozen, no garbage collection in
        # either process walks it (writing each object's GC header), which
        # would otherwise copy those pages into every process: 6 MiB more
        # PSS for the tree after the workers' first full collection
        gc.freeze()
        try:
            # a worker is PID 1 of its own pid namespace (and has its own mount,
            # net, ipc, uts namespaces) unless --sandbox or --inherit-namespaces
            # says otherwise
            return (sandbox.fork_confined(self.config.sandbox, self.config.inherit_namespaces),
                    parent_end, child_end)
        except (OSError, sandbox.SandboxError) as e:
            parent_end.close()
            child_end.close()
            reason = e.strerror if isinstance(e, OSError) else str(e)
            logger.error("cannot fork %s: %s", label, reason)
            raise WorkerSpawnError(f"cannot fork {label}: {reason}") from None

    def _introduce(self, worker: Worker) -> None:
        """PEER messages: the new request worker learns its serial and the
        other request workers' pidfds, they learn its pidfd, and every one
        hears which serials died since (their pidfds are closed)."""
        self._serial += 1
        serial = self._serial
        try:
            pidfd = os.pidfd_open(worker.pid)
        except OSError as e:
            self._fail(worker, f"pidfd_open: {e.strerror}")
        self._peers[worker.index] = (serial, pidfd)
        self._request(worker.index, Msg.PEER, ch.PEER.pack(serial, ch.PEER_SELF), [])
        gone, self._gone = self._gone, []
        for other, (other_serial, other_pidfd) in list(self._peers.items()):
            if other == worker.index or other not in self.workers:
                continue
            for dead in gone:
                self._request(other, Msg.PEER, ch.PEER.pack(dead, ch.PEER_GONE), [])
            self._request(worker.index, Msg.PEER, ch.PEER.pack(other_serial, 0), [other_pidfd])
            self._request(other, Msg.PEER, ch.PEER.pack(serial, 0), [pidfd])
        if self._keeper_serial is not None:
            self._introduce_keeper(worker.index)

    def _introduce_keeper(self, index: int) -> None:
        """PEER_KEEPER: the keeper's serial, our writing end of its socket,
        and a socket pair of the worker's own for the keeper's answers
        (fuse/peers.py: the worker reads one end, each ASK carries the other)."""
        assert self._keeper_serial is not None
        answers, answer_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with answers, answer_end:
            self._request(index, Msg.PEER, ch.PEER.pack(self._keeper_serial, ch.PEER_KEEPER),
                          [self._keep_w.fileno(), answers.fileno(), answer_end.fileno()])

    # the keeper ---------------------------------------------------------------------

    @property
    def wants_keeper(self) -> bool:
        """Whether there is a shared open-file table to keep files of."""
        return getattr(self.inodes, "files", None) is not None

    def spawn_keeper(self) -> None:
        """Fork the keeper, wait for its READY and introduce it to every
        live request worker (they send it what they hold). A restart counts
        against the restart budget as a worker's; WorkerSpawnError when it
        is spent or the keeper cannot start."""
        restart = self._check_budget(KEEPER, "the keeper")
        files = getattr(self.inodes, "files", None)
        assert files is not None            # made with the inode table (run())
        self._serial += 1
        serial = self._serial
        pid, parent_end, child_end = self._fork("the keeper")
        if pid == 0:
            try:
                become_keeper()
                _close_inherited([parent_end, self._keep_w] + [w.channel for w in self.workers.values()]
                                 + self.inherited() + [pidfd for _serial, pidfd in self._peers.values()])
                self.bells.keep(None)
                keeper_main(child_end, self._keep_r, serial, self.config, files)
            finally:
                os._exit(1)
        child_end.close()
        keeper = self.keeper = Worker(KEEPER, pid, parent_end)
        try:
            self._wait_ready(keeper)
        except ChannelError as e:
            self._keeper_dead(f"while starting: {e}")
            raise WorkerSpawnError(f"the keeper did not start: {e}") from None
        self._keeper_serial = serial
        for index in list(self._peers):
            if index in self.workers:
                self._introduce_keeper(index)
        if restart:
            logger.warning("keeper restarted as pid %d; open files only it held are lost", pid)

    def keeper_died(self, why: str | None = None) -> None:
        """The keeper's channel spoke or it exited: reap it, start another."""
        self._keeper_dead(why)
        self.spawn_keeper()

    def _keeper_dead(self, why: str | None, status: int | None = None) -> None:
        """Kill and reap the keeper (``status``: already reaped), log why."""
        keeper = self.keeper
        if keeper is None:
            return
        self.keeper = None
        if status is None:
            try:
                os.kill(keeper.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status = os.waitpid(keeper.pid, 0)
        keeper.channel.close()
        self._keeper_serial = None
        self._deaths.setdefault(KEEPER, []).append(time.monotonic())
        key = (KEEPER, _death_reason(status) if why is None else "protocol")
        self.restarts[key] = self.restarts.get(key, 0) + 1
        logger.error("keeper (pid %d) %s: %s", keeper.pid, "died" if why is None else f"failed: {why}",
                     describe_exit(status, "keeper"))

    def mem_table(self, index, regions, fds) -> None:
        self._request(index, Msg.MEM_TABLE, ch.encode_mem_table(regions), fds)

    def set_call(self, index, fd) -> None:
        has_fd = fd is not None
        self._request(index, Msg.VRING_CALL, ch.VRING_CALL.pack(index, has_fd), [fd] if has_fd else [])

    def start_ring(self, index, num, desc, avail, used, base, features, kick_fd, recover=False) -> None:
        flags = ch.VRING_START_RECOVER if recover else 0
        payload = ch.VRING_START.pack(index, num, desc, avail, used, base, flags, features)
        self._request(index, Msg.VRING_START, payload, [kick_fd])

    def stop_ring(self, index) -> int:
        worker = self.workers[index]
        status, value = self._exchange(worker, Msg.VRING_STOP, ch.VRING_STOP.pack(index), [])
        if status != 0 or value > 0xFFFF:
            self._fail(worker, f"VRING_STOP answered status {status}, value {value}")
        return value

    def published_avail(self, index) -> int:
        return self.progress.avail(index)

    # supervisor side ----------------------------------------------------------------

    def worker_at(self, fd: int) -> Worker | None:
        if self.keeper is not None and self.keeper.channel.fileno() == fd:
            return self.keeper
        for worker in self.workers.values():
            if worker.channel.fileno() == fd:
                return worker
        return None

    def channel_readable(self, worker: Worker) -> None:
        """A worker spoke unasked: it died (EOF) or broke the protocol."""
        try:
            msg, _, fds = worker.channel.recv()
            ch.close_fds(fds)
            why: str | None = f"sent {msg.name} unasked"
        except ChannelError as e:
            why = None if str(e) == "peer closed the channel" else str(e)   # None: it died
        if worker is self.keeper:
            self.keeper_died(why)
            return
        self._fail(worker, why)

    def reap(self) -> None:
        """After SIGCHLD: raise WorkerFailure for a worker that has exited
        (a dead keeper is replaced here)."""
        keeper = self.keeper
        if keeper is not None:
            try:
                pid, status = os.waitpid(keeper.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = keeper.pid, 0
            if pid:
                self._keeper_dead(None, status)
                self.spawn_keeper()
        for worker in list(self.workers.values()):
            try:
                pid, status = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = worker.pid, 0
            if pid:
                self._forget(worker)
                self._note_death(worker, _death_reason(status))
                message = f"worker {worker.name} (pid {worker.pid}) died: {describe_exit(status, worker.role)}"
                logger.error("%s", message)
                raise WorkerFailure(message, worker.index)

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """SHUTDOWN to every worker, wait for all of them to exit, SIGKILL
        whoever is still there after ``timeout``."""
        everyone = list(self.workers.values()) + ([self.keeper] if self.keeper is not None else [])
        for worker in everyone:
            try:
                worker.channel.send(Msg.SHUTDOWN)
            except ChannelError:
                pass
        deadline = time.monotonic() + timeout
        for worker in everyone:
            status = self._wait_exit(worker.pid, deadline)
            if status is None:
                logger.warning("worker %s (pid %d) ignored SHUTDOWN; killing it", worker.name, worker.pid)
                os.kill(worker.pid, signal.SIGKILL)
                _, status = os.waitpid(worker.pid, 0)
            elif status != 0:
                logger.warning("worker %s (pid %d) %s at shutdown", worker.name, worker.pid,
                               describe_exit(status))
            if worker is self.keeper:
                self.keeper = None
                worker.channel.close()
            else:
                self._forget(worker)
        self._keeper_serial = None
        self.bells.close()
        sandbox.release_request_mounts()

    # internals ------------------------------------------------------------------------

    def _run_child(self, index: int, channel: Channel, parent_end: Channel):
        try:
            become_worker(index)  # first: before anything logs or a signal reaches our handlers
            # fork_confined set the parent-death signal and checked the parent
            # is still there (getppid() is 0 inside a new pid namespace)
            _close_inherited([parent_end] + [w.channel for w in self.workers.values()] + self.inherited()
                             + [pidfd for _serial, pidfd in self._peers.values()]
                             + self._keeper_fds())
            if index >= 1:
                self.bells.keep(index)
            self.worker_main(worker_role(index), index, channel, self.config, self.inodes, progress=self.progress,
                             metrics=self.metrics, bells=self.bells)
            logger.error("worker_main returned")
        except SystemExit as e:
            os._exit(e.code if isinstance(e.code, int) else 1)
        except BaseException:
            logger.exception("worker failed to run")
        finally:
            os._exit(1)

    def _keeper_fds(self) -> list:
        """What a request or hiprio worker must not inherit of the keeper's
        (a request worker gets its own end with PEER_KEEPER)."""
        fds: list = [self._keep_r, self._keep_w]
        if self.keeper is not None:
            fds.append(self.keeper.channel)
        return fds

    def _request(self, index: int, msg: Msg, payload: bytes, fds: list[int]) -> None:
        worker = self.workers[index]
        status, _ = self._exchange(worker, msg, payload, fds)
        if status < 0:
            self._fail(worker, f"{msg.name} answered status {status}")
        if status:
            raise OSError(status, os.strerror(status))

    def _exchange(self, worker: Worker, msg: Msg, payload: bytes, fds: list[int]) -> tuple[int, int]:
        try:
            worker.channel.send(msg, payload, fds)
            self._wait_readable(worker, self.answer_timeout, f"{msg.name} answer")
            return worker.channel.expect_answer()
        except ChannelError as e:
            self._fail(worker, f"{msg.name}: {e}")

    def _wait_ready(self, worker: Worker) -> None:
        """A new process's first frame, READY; ChannelError otherwise."""
        self._wait_readable(worker, self.ready_timeout, "READY")
        msg, payload, fds = worker.channel.recv()
        ch.close_fds(fds)
        if msg != Msg.READY or payload or fds:
            raise ChannelError(f"expected READY, got {msg.name}")

    def _wait_readable(self, worker: Worker, timeout: float, what: str) -> None:
        poller = select.poll()
        poller.register(worker.channel.fileno(), select.POLLIN)
        if not poller.poll(int(timeout * 1000)):
            raise ChannelError(f"no {what} within {timeout:g} s")

    def _fail(self, worker: Worker, why: str | None) -> NoReturn:
        """Kill and reap a broken worker (``why`` None: it died by itself),
        log one line, raise WorkerFailure."""
        try:
            os.kill(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, status = os.waitpid(worker.pid, 0)
        self._forget(worker)
        self._note_death(worker, _death_reason(status) if why is None else "protocol")
        if why is None:
            message = f"worker {worker.name} (pid {worker.pid}) died: {describe_exit(status, worker.role)}"
        else:
            message = (f"worker {worker.name} (pid {worker.pid}) failed: {why} "
                       f"({describe_exit(status, worker.role)})")
        logger.error("%s", message)
        raise WorkerFailure(message, worker.index)

    def _note_death(self, worker: Worker, reason: str) -> None:
        self._deaths.setdefault(worker.index, []).append(time.monotonic())
        key = (worker.index, reason)
        self.restarts[key] = self.restarts.get(key, 0) + 1

    def _forget(self, worker: Worker) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
            peer = self._peers.pop(worker.index, None)
            if peer is not None:
                self._gone.append(peer[0])
                os.close(peer[1])
        worker.channel.close()

    @staticmethod
    def _wait_exit(pid: int, deadline: float) -> int | None:
        while True:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return 0
            if done:
                return status
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)


def _close_inherited(things) -> None:
    for thing in things:
        if isinstance(thing, int):
            fd = thing
        elif isinstance(thing, Channel):
            fd = thing.sock.detach()
        elif isinstance(thing, socket.socket):
            fd = thing.detach()
        else:
            continue
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
