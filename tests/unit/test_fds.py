"""daemon/fds.py: closing lists of fds, receiving fds O_CLOEXEC."""

import fcntl
import os
import socket

from daemon import fds


def _cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def test_close_fds_closes_every_fd_and_ignores_bad_ones():
    r, w = os.pipe()
    fds.close_fds([r, -1, w, r])          # -1 and a second close: ignored
    for fd in (r, w):
        try:
            os.fstat(fd)
        except OSError:
            continue
        raise AssertionError(f"fd {fd} still open")


def test_recv_with_fds_gives_cloexec_fds_and_the_data():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe2(0)                    # sent without CLOEXEC
    try:
        socket.send_fds(a, [b"frame"], [r, w])
        data, got, flags = fds.recv_with_fds(b, 64, 4)
        assert data == b"frame" and len(got) == 2 and not flags & socket.MSG_CTRUNC
        assert all(_cloexec(fd) for fd in got)
        os.write(w, b"x")
        assert os.read(got[0], 1) == b"x"  # the same pipe
        fds.close_fds(got)
    finally:
        fds.close_fds([r, w])
        a.close()
        b.close()


def test_recv_with_fds_reports_truncated_fds_and_returns_those_that_came():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pipes = [os.pipe() for _ in range(3)]
    sent = [fd for p in pipes for fd in p]
    try:
        socket.send_fds(a, [b"x"], sent)
        before = len(os.listdir("/proc/self/fd"))
        # room for one fd; CMSG_SPACE's alignment may leave room for two
        data, got, flags = fds.recv_with_fds(b, 64, 1)
        assert flags & socket.MSG_CTRUNC and 1 <= len(got) <= 2
        fds.close_fds(got)
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        fds.close_fds(sent)
        a.close()
        b.close()
