"""The supervisor process: the only one that talks to QEMU.

It opens the vhost-user socket, creates the shared inode table, forks the
hiprio worker (vring 0) and request worker 1 (vring 1) before QEMU connects,
accepts exactly one connection and then runs one poll loop over:

* the QEMU connection (``vhost_user.backend.Backend`` does the protocol),
* every worker's control channel (a worker only speaks when asked, so a
  readable channel means it died or broke the protocol),
* a self-pipe that ``signal.set_wakeup_fd`` writes SIGTERM/SIGINT/SIGCHLD to.

QEMU hanging up, bad frontend input (the backend logs it and closes the
connection), SIGTERM and SIGINT all end the same way: SHUTDOWN to every
worker, reap them, remove the socket file, exit 0.

A worker that dies or breaks the channel (killed by its seccomp filter, a
bug, SIGKILL) is logged with why, and replaced by a fresh one for the same
vring (``Backend.revive``): it gets the memory table, the call fd and, if
the ring was running, VRING_START at the avail index the dead worker
published in its progress record (``daemon/workers/progress.py``, shared
memory created here before any fork) with the RECOVER flag, so it first
answers EIO to the requests the dead one had taken and not answered. The
FUSE session lives in the shared inode table and survives. At most
``RESTART_LIMIT`` restarts of one vring's worker within ``RESTART_WINDOW``
seconds: one more death, a failed fork or a replacement that never becomes
ready shuts everything down and exits 1 with one line saying why.
"""

from __future__ import annotations

import os
import select
import signal
import time

from daemon import log, sandbox, startup
from daemon.config import Config
from daemon.listener import Listener, StartupError, claim_socket_path, open_listener
from daemon.fuse.inodes import InodeTable
from daemon.metrics import exposition
from daemon.metrics.server import MetricsError, MetricsServer
from daemon.vhost_user.backend import Backend
from daemon.workers.pool import WorkerFailure, WorkerSpawnError
from daemon.workers.entry import worker_main
# the worker processes (workers/processes.py); names kept here for callers
from daemon.workers.processes import (RESTART_LIMIT, RESTART_WINDOW, ProcessPool,  # noqa: F401
                                      Worker, describe_exit)

logger = log.get_logger("supervisor")

# -- the supervisor loop -------------------------------------------------------------

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)


class Supervisor:
    def __init__(self, config: Config, listener: Listener, pool: ProcessPool,
                 metrics: MetricsServer | None = None):
        self.config = config
        self.listener = listener
        self.pool = pool
        self.metrics = metrics
        self.backend: Backend | None = None
        self._wakeup_r = self._wakeup_w = -1
        pool.inherited = self._inherited_fds

    def run(self) -> int:
        """Serve one QEMU connection; returns the exit status."""
        old_handlers = self._install_signals()
        try:
            if self.pool.wants_keeper:
                self.pool.spawn_keeper()
            self.pool.spawn(0)
            self.pool.spawn(1)
            rules = sandbox.supervisor_after_setup(self.config)
            logger.debug("supervisor confined (%d seccomp rules)", rules)
            logger.info("waiting for QEMU on %s", self.listener.path or f"fd {self.config.socket_fd}")
            return self._loop()
        except (WorkerFailure, WorkerSpawnError) as e:
            return self._worker_failed(e)
        finally:
            if self.backend is not None:
                self.backend.close()
            self.pool.shutdown()
            self.listener.close()
            self._restore_signals(old_handlers)

    def _loop(self) -> int:
        while True:
            poller = select.poll()
            poller.register(self._wakeup_r, select.POLLIN)
            if self.listener.sock is not None:
                poller.register(self.listener.fileno(), select.POLLIN)
            if self.backend is not None:
                poller.register(self.backend.fileno(), select.POLLIN)
            for live in self.pool.workers.values():
                poller.register(live.channel.fileno(), select.POLLIN)
            if self.pool.keeper is not None:
                poller.register(self.pool.keeper.channel.fileno(), select.POLLIN)
            metrics = self.metrics
            timeout = None
            if metrics is not None:
                poller.register(metrics.fileno(), select.POLLIN)
                for fd in metrics.clients:
                    poller.register(fd, select.POLLOUT)
                due = metrics.next_deadline()
                if due is not None:
                    timeout = max(0, int((due - time.monotonic()) * 1000) + 1)
            events = poller.poll(timeout)
            if metrics is not None:
                metrics.expire()
            for fd, _ in events:
                try:
                    if metrics is not None and fd in metrics.clients:
                        metrics.writable(fd)
                        continue
                    if metrics is not None and fd == metrics.fileno():
                        metrics.accept()
                    elif fd == self._wakeup_r:
                        status = self._signals()
                        if status is not None:
                            return status
                    elif self.listener.sock is not None and fd == self.listener.fileno():
                        self._accept()
                    elif self.backend is not None and fd == self.backend.fileno():
                        if not self.backend.serve_one():
                            logger.info("connection closed, shutting down")
                            return 0
                    else:
                        worker = self.pool.worker_at(fd)
                        if worker is not None:
                            self.pool.channel_readable(worker)
                except WorkerFailure as e:
                    self._replace(e)
                break   # the poll set may have changed: rebuild it

    def _replace(self, failure: WorkerFailure) -> None:
        """A worker died while idle (or a request to it failed outside the
        backend): start its replacement. WorkerSpawnError is fatal."""
        lost = [failure]
        while lost:
            index = lost.pop().index
            if index is None:
                raise failure
            try:
                if self.backend is not None and not self.backend.closed:
                    self.backend.revive(index)
                elif index not in self.pool.live():
                    self.pool.spawn(index)    # QEMU not connected yet: nothing to resend
            except WorkerFailure as e:
                lost.append(e)

    def _accept(self) -> None:
        assert self.listener.sock is not None   # polled only while listening
        try:
            conn, _ = self.listener.sock.accept()
        except OSError as e:
            logger.warning("accept failed: %s", e.strerror)
            return
        self.listener.close()      # exactly one connection; the socket file goes too
        self.backend = Backend(conn, self.pool, queue_count=1 + self.config.max_request_workers,
                               tag=self.config.tag)
        logger.info("QEMU connected")

    def _signals(self) -> int | None:
        try:
            data = os.read(self._wakeup_r, 64)
        except BlockingIOError:
            return None
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                logger.info("%s received, shutting down", signal.Signals(signum).name)
                return 0
        if signal.SIGCHLD in data:
            self.pool.reap()
        return None

    def _worker_failed(self, failure: Exception) -> int:
        """A worker could not be replaced (WorkerSpawnError) or failed
        where no replacement is possible: everything stops, exit 1."""
        logger.error("shutting down: %s", failure)
        return 1

    def _inherited_fds(self) -> list:
        fds: list = [self._wakeup_r, self._wakeup_w]
        if self.listener.sock is not None:
            fds.append(self.listener.sock)
        if self.metrics is not None:
            fds.append(self.metrics.sock)
            fds.extend(client.sock for client in self.metrics.clients.values())
        if self.backend is not None and not self.backend.closed:
            fds.append(self.backend.conn)
            fds.extend(self.backend.region_fds)
            for ring in self.backend.rings.values():
                fds.extend(fd for fd in (ring.kick, ring.call, ring.err) if fd is not None)
        return fds

    def _install_signals(self):
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # the wakeup fd first: a signal caught before it is set would run
        # _note_signal and leave nothing in the pipe, and the loop would
        # never hear of it (a SIGTERM lost so, the daemon waits for QEMU)
        wakeup = signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        old: dict = {sig: signal.signal(sig, _note_signal) for sig in HANDLED_SIGNALS}
        old["wakeup"] = wakeup
        return old

    def _restore_signals(self, old) -> None:
        wakeup = old.pop("wakeup")
        for sig, handler in old.items():    # the reverse order of _install_signals
            signal.signal(sig, handler)
        signal.set_wakeup_fd(wakeup)
        os.close(self._wakeup_r)
        os.close(self._wakeup_w)


def _note_signal(signum, frame) -> None:
    """The signal number reaches the loop through the wakeup fd."""


def run(config: Config) -> int:
    """Run the daemon; StartupError for problems the user can fix."""
    try:
        startup.prepare(config)       # inherited fds, signal mask, privileges, groups: before anything
        startup.check_fd_copying(config)   # several request queues need pidfd_getfd: before any socket
    except startup.StartRefused as e:
        raise StartupError(str(e)) from None
    started = time.monotonic()
    # the metrics socket before the vhost-user one: whoever sees the latter
    # (a service manager, a test) can scrape at once
    metrics = None
    if config.metrics_socket:
        claim_socket_path(config.metrics_socket)
        try:
            metrics = MetricsServer(config.metrics_socket, None)
        except MetricsError as e:
            raise StartupError(str(e)) from None
    try:
        listener = open_listener(config)
    except BaseException:
        if metrics is not None:
            metrics.close()
        raise
    try:
        try:
            startup.enter_user_namespace(config)   # --uid-map: after the sockets, which stay the user's
        except startup.StartRefused as e:
            raise StartupError(str(e)) from None
        try:
            sandbox.validate(config)      # policy files, --modcaps: startup errors, not dead workers
        except sandbox.SandboxError as e:
            raise StartupError(str(e)) from None
        try:
            inodes = InodeTable(config.inode_table_size, open_files=config.max_open_files)
        except OSError as e:
            raise StartupError(f"cannot create the inode table ({config.inode_table_size} entries): "
                               f"{e.strerror or e}") from None
        pool = ProcessPool(config, inodes, worker_main)
        if metrics is not None:
            area = pool.metrics
            assert area is not None          # made by the pool when config.metrics_socket is set
            metrics.render = lambda: exposition.render(
                area, uptime_s=time.monotonic() - started, inodes=len(inodes),
                inode_capacity=config.inode_table_size, restarts=pool.restarts,
                live={i: w.pid for i, w in pool.workers.items()})
        return Supervisor(config, listener, pool, metrics).run()
    finally:
        listener.close()
        if metrics is not None:
            metrics.close()
