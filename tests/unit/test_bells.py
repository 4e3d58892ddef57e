"""ReapBells (daemon/workers/bells.py): one eventfd per request vring,
rung by the hiprio worker, each request worker keeping only its own."""

from __future__ import annotations

import os
import select

from daemon.workers.bells import ReapBells
from tests import procfs


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_ring_wakes_every_request_vring_once_per_count():
    bells = ReapBells(3)
    try:
        fds = [bells.fd(i) for i in (1, 2, 3)]
        assert len(set(fds)) == 3 and min(fds) >= 0 and bells.fd(0) == -1 and bells.fd(4) == -1
        assert not any(readable(fd) for fd in fds)
        bells.ring()
        bells.ring()
        assert [os.eventfd_read(fd) for fd in fds] == [2, 2, 2]
        assert not any(readable(fd) for fd in fds)
    finally:
        bells.close()


def test_a_full_counter_is_left_readable_without_an_error():
    bells = ReapBells(1)
    try:
        os.eventfd_write(bells.fd(1), 0xFFFF_FFFF_FFFF_FFFE)   # the most an eventfd holds
        bells.ring()
        assert os.eventfd_read(bells.fd(1)) == 0xFFFF_FFFF_FFFF_FFFE
    finally:
        bells.close()


def test_keep_closes_every_other_bell_and_close_the_rest():
    before = procfs.fd_count(os.getpid())
    bells = ReapBells(3)
    assert procfs.fd_count(os.getpid()) == before + 3
    two = bells.fd(2)
    bells.keep(2)
    assert (bells.fd(1), bells.fd(2), bells.fd(3)) == (-1, two, -1)
    assert procfs.fd_count(os.getpid()) == before + 1
    bells.ring()                                  # only its own is left to ring
    assert os.eventfd_read(two) == 1
    bells.keep(None)                              # the keeper's: none
    assert procfs.fd_count(os.getpid()) == before
    bells.close()                                 # twice is harmless (the pool's shutdown)
    bells.close()
    bells.ring()
