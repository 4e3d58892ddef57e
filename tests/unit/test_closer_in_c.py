"""The closer thread (daemon/fuse/_closer.h): forgotten inodes' fds closed
off the serving thread without the GIL, and the session using it when the
compiled ops are on (fastpath.fast_ops)."""

import os
import signal
import time

import pytest

from daemon.fuse import fastpath
from tests.unit.fusereq import start_session

pytestmark = pytest.mark.skipif(not fastpath.EXTENSION_BUILT, reason="needs daemon.fuse._fastops")

CLOSER_QUEUE = 4096  # _closer.h


def ext():
    from daemon.fuse import _fastops
    return _fastops


def closed_by_thread() -> int:
    return ext().closer_stats()[1]


def wait_closed(n: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while closed_by_thread() < n:
        assert time.monotonic() < deadline, ext().closer_stats()
        time.sleep(0.002)


def test_queued_fds_are_closed_by_a_thread_that_never_takes_the_gil():
    before = closed_by_thread()
    r, w = os.pipe()
    ext().close_later([w])
    # this thread keeps the GIL (a loop of C calls, no sleep, no I/O): the
    # closer thread still closes the fd meanwhile
    deadline = time.monotonic() + 5.0
    while ext().closer_stats()[1] == before:
        assert time.monotonic() < deadline, "the closer thread waited for the GIL"
    assert os.read(r, 1) == b""     # the write end is gone: EOF
    os.close(r)
    assert ext().closer_stats()[2] == 1


def test_the_closer_thread_blocks_every_signal():
    """Python's handlers run on the main thread only; the closer (started by
    the test above or here) must never take a signal the process expects."""
    r, w = os.pipe()
    ext().close_later([w])
    os.close(r)
    masks = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/status") as f:
            masks[int(tid)] = int(next(ln for ln in f if ln.startswith("SigBlk:")).split()[1], 16)
    wanted = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGCHLD - 1))
    blocking = [tid for tid, mask in masks.items() if mask & wanted == wanted]
    assert blocking and os.getpid() not in blocking, masks


def test_a_bad_fd_rejects_the_whole_call_and_closes_nothing():
    r, w = os.pipe()
    for bad in ([w, -1], [w, 1 << 40], [w, "3"], 7):
        with pytest.raises((ValueError, TypeError, OverflowError)):
            ext().close_later(bad)
    # (the thread's count may move meanwhile: other tests' sessions queue
    # their forgotten inodes' fds in this same process)
    before = closed_by_thread()
    ext().close_later([os.dup(r)])
    wait_closed(before + 1)
    os.fstat(w)                     # still open
    os.close(r)
    os.close(w)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_more_than_the_queue_holds_is_closed_by_the_caller():
    before = closed_by_thread()
    fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(CLOSER_QUEUE + 500)]
    ext().close_later(fds)
    # (these fds only: other tests' sessions may have closes of their own
    # pending in this process, so the process's count is no measure)
    deadline = time.monotonic() + 10.0
    while any(is_open(fd) for fd in fds):
        assert time.monotonic() < deadline, (sum(map(is_open, fds)), ext().closer_stats())
        time.sleep(0.005)
    # the ring took at most CLOSER_QUEUE of them: the rest were the caller's
    assert closed_by_thread() - before <= CLOSER_QUEUE + 64
    assert ext().close_later([]) is None


@pytest.fixture
def share(tmp_path):
    cwd = os.getcwd()
    os.chdir("/proc/self/fd")   # handlers reopen fds relative to it
    yield tmp_path
    os.chdir(cwd)


def test_the_session_closes_through_it_once_the_compiled_ops_are_on(share):
    """fastpath.fast_ops (a worker's start-up) hands the session the C
    closer; under PYVIRTIOFSD_PURE=1 (or FASTOPS=0) the reference stays:
    blocking.py's helper threads."""
    session, _client = start_session(share)
    try:
        assert session._closer is None
        fastpath.make(session)
        assert session._closer is None      # make() alone (the equivalence tests) leaves it
        fast = fastpath.fast_ops(session)
        r, w = os.pipe()
        before = closed_by_thread()
        if fastpath.why_not(session):
            assert fast is None and session._closer is None
            session._close_later([w])
            assert session._blocking.threads == 1
        else:
            assert session._closer is ext().close_later
            session._close_later([w])
            wait_closed(before + 1)
            assert session._blocking.threads == 0   # no Python helper started for it
        assert os.read(r, 1) == b""
        os.close(r)
    finally:
        session.close()
        session.inodes.close()
