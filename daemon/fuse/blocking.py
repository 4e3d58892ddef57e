"""Helper threads for system calls that may block for long.

A request worker serves its queue on one thread. FSYNC of a file with
gigabytes of dirty pages, or on a slow disk, can take seconds, and every
other request of that queue would wait behind it. Such calls (``fsync``,
``fdatasync``) run here instead, on one of at most ``MAX_THREADS`` helper
threads, while the loop goes on serving; the request is deferred
(``FuseSession.defer_blocking``) and answered when the call returns.

On the pure-Python path the same threads close the O_PATH fds of inodes
the guest forgot (``InodeCache.reap``): the last close of an unlinked file
is where the host evicts it (truncate, and a synchronous discard on a
``-o discard`` mount), which took 14 % of a request worker's time in a
cold ``unlink`` workload and stalled the guest's next request. Nobody
waits for those closes, so they do not write the wakeup fd. With the
compiled ops a C thread closes them instead, without the GIL hand-offs a
Python thread costs per close (``daemon/fuse/_closer.h``).

What a helper thread may touch is kept to the call itself: it gets its own
``dup`` of the file descriptor (closed when the call returns, so a RELEASE
of the fh meanwhile cannot make it sync a reused fd number), never guest
memory (a new memory table may unmap it at any time) and never the session:
the loop thread collects the outcome and writes the reply. A finished call
writes ``wakeup_fd`` (an eventfd in the loop's epoll set), so the answer
does not wait for the loop's next retry tick.

Threads start on demand, one per call that finds none idle, up to
``MAX_THREADS``; further calls queue. They are daemon threads: a worker
exits with ``os._exit`` and never joins them. The seccomp policy of the
request role allows what thread creation needs (clone with CLONE_THREAD,
set_robust_list, rseq, mprotect for the stack guard).
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from typing import Callable

MAX_THREADS = 4


class BlockingCall:
    """One call handed to the helpers: ``done`` once it returned; then
    ``error`` is its errno (0: it succeeded)."""

    __slots__ = ("fn", "args", "done", "error", "notify")

    def __init__(self, fn: Callable, args: tuple, notify: bool = True):
        self.fn = fn
        self.args = args
        self.done = False
        self.error = 0
        self.notify = notify


class BlockingCalls:
    """The helper threads of one worker, and the eventfd they signal."""

    def __init__(self, max_threads: int = MAX_THREADS):
        self.max_threads = max_threads
        self.wakeup_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._queue: queue.SimpleQueue[BlockingCall | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0

    def submit(self, fn: Callable, *args, notify: bool = True) -> BlockingCall:
        """Queue ``fn(*args)`` (an OSError is its outcome; anything else it
        raises counts as EIO). ``notify=False``: nobody waits for the
        outcome (closing fds), so the wakeup fd is not written. RuntimeError
        if no helper thread exists and none can be started: the caller then
        runs the call itself."""
        call = BlockingCall(fn, args, notify)
        with self._lock:
            # an idle thread is claimed for this call; else a new one starts
            # (it takes this call first), unless all MAX_THREADS are busy
            start = False
            if self._idle:
                self._idle -= 1
            elif self._threads < self.max_threads:
                self._threads += 1
                start = True
        if start:
            try:
                threading.Thread(target=self._serve, name="vfsd-blocking", daemon=True).start()
            except RuntimeError:
                with self._lock:
                    self._threads -= 1
                    if self._threads == 0:
                        raise
        self._queue.put(call)
        return call

    @property
    def threads(self) -> int:
        return self._threads

    def drain(self) -> None:
        """Reset the eventfd (before looking at the calls, so no wakeup is
        lost)."""
        if self.wakeup_fd < 0:
            return
        try:
            os.eventfd_read(self.wakeup_fd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Close the eventfd and let idle threads end (session close). A call
        still running finishes (closing its own fd) and signals nothing."""
        with self._lock:
            fd, self.wakeup_fd = self.wakeup_fd, -1
            threads = self._threads
        if fd >= 0:
            os.close(fd)
        for _ in range(threads):
            self._queue.put(None)

    def _serve(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            try:
                call.fn(*call.args)
            except OSError as e:
                call.error = e.errno or errno.EIO
            except BaseException:  # noqa: BLE001 - the loop answers EIO; the thread goes on
                call.error = errno.EIO
            call.done = True
            with self._lock:  # close() cannot close the fd under this write
                if call.notify and self.wakeup_fd >= 0:
                    try:
                        os.eventfd_write(self.wakeup_fd, 1)
                    except OSError:
                        pass  # the loop's retry tick still collects it
                self._idle += 1
