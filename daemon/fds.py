"""Closing and receiving file descriptors: the helpers every process uses.

The supervisor, the workers and the keeper all receive fds with
SCM_RIGHTS and close lists of them on every error path; one copy of each
helper lives here (stdlib only, so any process may import it).
"""

from __future__ import annotations

import os
import socket

# socket.MSG_* are IntFlag members: an | or & with one builds an enum
# member in Python (~1.2 µs each, 3.11), on every message received; these
# are plain ints, for recv_with_fds and for its callers' msg_flags tests
_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
MSG_CTRUNC = int(socket.MSG_CTRUNC)
MSG_TRUNC = int(socket.MSG_TRUNC)


def close_fd(fd: int) -> None:
    """Close ``fd``, ignoring errors (it may already be gone)."""
    try:
        os.close(fd)
    except OSError:
        pass


def close_fds(fds) -> None:
    """Close every fd of ``fds``, ignoring errors."""
    for fd in fds:
        close_fd(fd)


def recv_with_fds(sock: socket.socket, size: int, maxfds: int, flags: int = 0) -> tuple[bytes, list[int], int]:
    """(data, fds, msg_flags) of one message, the fds O_CLOEXEC.

    Not ``socket.recv_fds``: CPython 3.11's ignores its flags argument, so
    it cannot ask for MSG_CMSG_CLOEXEC. Room is made for at least
    ``maxfds`` (CMSG_SPACE's alignment may fit one more); a truncated
    control message (MSG_CTRUNC in msg_flags) still returns the fds that
    did arrive, for the caller to close (the kernel closed the rest)."""
    data, ancdata, msg_flags, _addr = sock.recvmsg(size, socket.CMSG_SPACE(maxfds * 4),
                                                   flags | _CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, cmsg in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(int.from_bytes(cmsg[i:i + 4], "little", signed=True)
                       for i in range(0, len(cmsg) - len(cmsg) % 4, 4))
    return data, fds, msg_flags
