"""Reap bells: the hiprio worker tells idle request workers that the guest
forgot inodes, so they close those inodes' fds while the guest is idle.

A FORGET that takes a nodeid's count to zero frees it in the shared inode
table and appends it to the table's freed ring (inodes.py); the O_PATH fds
of that inode are each request worker's own, and only it can close them
(``InodeCache.reap``). A request worker looks at the freed ring whenever
it wakes for a request, but one that sleeps while the FORGETs arrive (a
guest's ``echo 3 > drop_caches``, then its next step) would do all of that
at the first request of the guest's next step: a thousand closes and the
Python walk over the freed ring while the guest waits for that request's
answer. Measured on a platform b guest (QEMU 10, Linux 6.12, 1,000 files,
cache auto): the cold ``lstat`` loop that followed a dropped cache lost
about 20 ms to stalls in its first 60 ms with ours and not with the Rust
daemon, which closes an inode's fd when it handles the FORGET; with one
request sent and answered before the loop, ours was even with it
(docs/perf/history.md, "The first request after the FORGETs").

So the supervisor makes one eventfd per request vring before it forks
anyone: the hiprio worker keeps them all and writes 1 to each after a
batch that freed a nodeid (``ring``; the hiprio worker's kicks are
coalesced, so at most about one batch per 10 ms); request worker ``i``
keeps bell ``i`` in its epoll (level-triggered: any number of rings before
it runs cost one wake-up) and reaps when it is readable. The keeper keeps
none. An eventfd is the smallest thing a process can sleep on with its
other fds; the system calls are the ``read`` and ``write`` both roles
already make on their kick and call eventfds (no seccomp change).

Confinement: a bell carries nothing but a count. A compromised hiprio
worker that rings at will makes the request workers look at the freed
ring (one shared read when nothing was freed) and costs them wake-ups; it
can already free any nodeid in the shared table by FORGET. A request
worker holds only its own bell, the keeper none.
"""

from __future__ import annotations

import os


class ReapBells:
    """One eventfd per request vring (1 .. ``count``), made in the
    supervisor and inherited by every worker it forks."""

    def __init__(self, count: int):
        self._fds: dict[int, int] = {}
        try:
            for index in range(1, count + 1):
                self._fds[index] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            self.close()
            raise

    def fd(self, index: int) -> int:
        """Request vring ``index``'s bell, or -1 (none: ``keep`` dropped it)."""
        return self._fds.get(index, -1)

    def ring(self) -> None:
        """Wake every request worker's loop (the hiprio worker, after a
        batch that freed nodeids). A counter that cannot take one more is
        readable already: nothing to do."""
        for fd in self._fds.values():
            try:
                os.eventfd_write(fd, 1)
            except BlockingIOError:
                pass

    def keep(self, index: int | None) -> None:
        """In a forked child: close every bell but request vring ``index``'s
        (``None``: close them all, the keeper's case)."""
        for other in [i for i in self._fds if i != index]:
            os.close(self._fds.pop(other))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

