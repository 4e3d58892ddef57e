"""A worker process from fork to exit.

``worker_main`` runs in the child the supervisor forked (or spawned into
new namespaces) for one role:

1. name the process (log prefix, ``/proc/self/comm``), take back the
   supervisor's signal handlers (SIGINT is the supervisor's to handle: it
   then sends SHUTDOWN), ``umask(0)`` (the guest kernel already applied
   the guest's umask);
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
from daemon.workers import hiprio, request
from daemon.workers.channel import Channel, ChannelError, Msg
from daemon.workers.loop import WorkerLoop

log = daemon_log.get_logger("workers")

ROLES = {"hiprio": hiprio, "request": request}


def worker_main(role: str, index: int, channel: Channel, config, inodes, progress=None,
                metrics=None) -> NoReturn:
    """``progress``: the supervisor's ``RingProgress`` (shared memory), where
    this worker publishes how far it got, for its replacement; ``metrics``:
    its ``MetricsArea`` (shared memory) with --metrics-socket, else None."""
    status = 1
    try:
        status = _run(role, index, channel, config, inodes, progress, metrics)
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


def _run(role: str, index: int, channel: Channel, config, inodes, progress=None, metrics=None) -> int:
    module = ROLES.get(role)
    if module is None:
        raise ValueError(f"unknown worker role {role!r}")
    rings = module.ring_indices(index)
    _name_process(role if role == "hiprio" else f"{role}-{index}")
    _reset_signals()
    os.umask(0)
    if role == "request":
        # with several request queues the worker stays dumpable (fuse/peers.py):
        # never let that write guest data into a core file
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sandbox_info = _confine(role, config)
    session = module.open_session(config, inodes, sandbox_info)
    if metrics is not None:
        nofile = sandbox_info.nofile[0] if sandbox_info is not None else 0
        session.meter = WorkerMeter(metrics.slot(index), fd_limit=nofile)
    loop = WorkerLoop(channel, session, rings, progress=progress, coalesce=module.COALESCE)
    channel.send(Msg.READY)
    log.debug("serving vring(s) %s", ", ".join(map(str, rings)))
    return loop.run()


def _name_process(name: str) -> None:
    daemon_log.set_role(name)
    try:  # what ps/top show; 15 bytes at most
        with open("/proc/self/comm", "w") as f:
            f.write(f"vfsd-{name}"[:15])
    except OSError:
        pass


def _reset_signals() -> None:
    """Handlers installed by the supervisor's Python code must not run here."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def _confine(role: str, config):
    """The sandbox hook: confine before any guest input exists (before
    READY). Without the sandbox package only ``--sandbox none`` may run."""
    try:
        from daemon.sandbox import confine
    except ImportError as e:
        if getattr(config, "sandbox", "none") != "none" or getattr(config, "seccomp", "none") != "none":
            raise RuntimeError(f"confinement requested but unavailable: {e}") from None
        log.warning("no sandbox module: running unconfined")
        return None
    return confine(role, config, config.shared_dir)
