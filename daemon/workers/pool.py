"""The interface between the vhost-user backend and the worker processes.

``vhost_user.backend.Backend`` drives the workers through a ``WorkerPool``
(one worker per vring index); ``supervisor.ProcessPool`` is the real one,
the unit tests use a recording fake. The two exceptions are what a pool
raises: ``WorkerFailure`` for one dead or misbehaving worker (the backend
replaces it), ``WorkerSpawnError`` when no worker can be started (fatal).
"""

from __future__ import annotations

from typing import Iterable, Protocol


class WorkerFailure(Exception):
    """The worker of vring ``index`` is dead or broke the channel protocol.
    The pool has already killed and reaped it and logged why. The backend
    replaces it (``Backend.revive``) where a request to it failed; the
    supervisor calls ``revive`` for a worker found dead while idle."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


class WorkerSpawnError(Exception):
    """A worker cannot be (re)started: the fork failed, it never became
    ready, or it died too often (the pool's restart budget). Fatal: the
    daemon shuts down and exits 1 with this message."""


class WorkerPool(Protocol):
    """What the backend needs from the workers, one worker per vring index.

    Every fd argument is lent: the pool sends a copy (SCM_RIGHTS) and never
    closes it. A request the worker answers with an errno raises OSError with
    that errno; a broken or dead worker raises WorkerFailure.
    """

    def live(self) -> Iterable[int]:
        """Indexes of the vrings whose worker is up."""

    def spawn(self, index: int) -> None:
        """Start the worker of vring ``index`` (request worker, index >= 2)."""

    def mem_table(self, index: int, regions: list[tuple[int, int, int, int]], fds: list[int]) -> None:
        """MEM_TABLE to the worker of vring ``index``: (gpa, size, qva, mmap_offset) each."""

    def set_call(self, index: int, fd: int | None) -> None:
        """VRING_CALL: the newest call eventfd of vring ``index`` (None: do not signal)."""

    def start_ring(self, index: int, num: int, desc: int, avail: int, used: int, base: int,
                   features: int, kick_fd: int, recover: bool = False) -> None:
        """VRING_START with the ring's QVAs and its next avail index;
        ``recover``: the ring's previous worker died serving it (the new one
        answers EIO to what the guest still waits for)."""

    def stop_ring(self, index: int) -> int:
        """VRING_STOP; returns the ring's next avail index."""

    def published_avail(self, index: int) -> int:
        """The next avail index the dead worker of vring ``index`` published
        (its progress record, daemon/workers/progress.py)."""


def worker_role(index: int) -> str:
    """The role of vring ``index``'s worker: its seccomp policy and session kind."""
    return "hiprio" if index == 0 else "request"


def worker_name(index: int) -> str:
    """How logs and ``ps`` name vring ``index``'s worker: ``hiprio``,
    ``request-N``; index -1 is the keeper (workers/keeper.py), which serves
    no vring."""
    if index < 0:
        return "keeper"
    return "hiprio" if index == 0 else f"request-{index}"
