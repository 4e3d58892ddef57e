"""A worker process from fork to exit.

In the child the supervisor forked for vring ``index``, the pool first
calls ``become_worker``: name the process (log prefix, ``/proc/self/comm``)
and take back the supervisor's signal handlers and wakeup fd (SIGINT is the
supervisor's to handle: it then sends SHUTDOWN). It then closes what the
child must not keep and calls ``worker_main`` for the vring's role, which:

1. sets ``umask(0)`` (the guest kernel already applied the guest's umask);
2. confine itself (``daemon.sandbox.confine``): new root, cwd
   ``/proc/self/fd`` for a request worker, capabilities, seccomp;
3. build the role's ``FuseSession`` (hiprio.py / request.py);
4. send READY — no fd and no guest byte has been received before this;
5. serve (loop.py) until SHUTDOWN.

It never returns: ``os._exit`` with 0 after SHUTDOWN, 1 on a channel
violation or any failure, so nothing the supervisor set up (atexit
handlers, buffered files, temp dirs) runs twice.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
from typing import NoReturn

from daemon import log as daemon_log
from daemon.metrics.counters import WorkerMeter
from daemon.sandbox import confine
from daemon.workers import hiprio, request
from daemon.workers.channel import Channel, ChannelError, Msg
from daemon.workers.loop import WorkerLoop
from daemon.workers.pool import worker_name

log = daemon_log.get_logger("workers")

ROLES = {"hiprio": hiprio, "request": request}


def worker_main(role: str, index: int, channel: Channel, config, inodes, progress=None,
                metrics=None, bells=None) -> NoReturn:
    """``progress``: the supervisor's ``RingProgress`` (shared memory), where
    this worker publishes how far it got, for its replacement; ``metrics``:
    its ``MetricsArea`` (shared memory) with --metrics-socket, else None;
    ``bells``: the supervisor's ``ReapBells`` (bells.py), already cut down
    to this worker's (all of them for the hiprio worker), or None."""
    status = 1
    try:
        status = _run(role, index, channel, config, inodes, progress, metrics, bells)
    except ChannelError as e:
        log.error("control channel: %s; exiting", e)
    except BaseException:  # noqa: BLE001 - a worker must end in os._exit, whatever happened
        log.exception("%s worker %d failed", role, index)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(status)


def _run(role: str, index: int, channel: Channel, config, inodes, progress=None, metrics=None, bells=None) -> int:
    module = ROLES.get(role)
    if module is None:
        raise ValueError(f"unknown worker role {role!r}")
    rings = module.ring_indices(index)
    os.umask(0)
    if role == "request":
        # with several request queues the worker stays dumpable (fuse/peers.py):
        # never let that write guest data into a core file
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    inodes.prepare_lock()   # the extension's TableLock, loaded before the new root
    sandbox_info = _confine(role, config)
    session = module.open_session(config, inodes, sandbox_info)
    if metrics is not None:
        nofile = sandbox_info.nofile[0] if sandbox_info is not None else 0
        session.meter = WorkerMeter(metrics.slot(index), fd_limit=nofile)
    loop = WorkerLoop(channel, session, rings, progress=progress, coalesce=module.COALESCE, bells=bells)
    channel.send(Msg.READY)
    log.debug("serving vring(s) %s", ", ".join(map(str, rings)))
    return loop.run()


def become_worker(index: int) -> None:
    """Leave the supervisor's state behind: the handlers its Python code
    installed must not run here, nor write to its signal wakeup pipe."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    name = worker_name(index)
    daemon_log.set_role(name)
    try:  # what ps/top show; 15 bytes at most
        with open("/proc/self/comm", "w") as f:
            f.write(f"vfsd-{name}"[:15])
    except OSError:
        pass


def _confine(role: str, config):
    """Confine before any guest input exists (before READY)."""
    return confine(role, config, config.shared_dir)
