"""``--metrics-socket PATH``: the supervisor answers each connection with
the Prometheus text exposition and closes it.

The socket is created (mode 0600; the supervisor has replaced a stale
socket file first) before the supervisor confines itself, and served from the supervisor's poll loop:
never blocking. Each connection gets the whole text rendered at accept and
written as the client reads it; one that has not read it all within
``DEADLINE`` seconds is closed, and at most ``MAX_CLIENTS`` are served at
once (one more is closed at accept), so a client that connects and never
reads costs a bounded buffer for a bounded time and stalls nothing.
"""

from __future__ import annotations

import os
import socket
import time

from daemon.log import get_logger

logger = get_logger("metrics")

DEADLINE = 5.0
MAX_CLIENTS = 8


class MetricsError(Exception):
    """The metrics socket cannot be created (a start-up error)."""


class _Client:
    __slots__ = ("sock", "data", "deadline")

    def __init__(self, sock: socket.socket, data: bytes, deadline: float):
        self.sock = sock
        self.data = memoryview(data)
        self.deadline = deadline


class MetricsServer:
    def __init__(self, path: str, render, clock=time.monotonic):
        """``render()`` returns the exposition as bytes (None until the
        daemon has something to say: connections are closed at once)."""
        self.path = path
        self.render = render
        self.clock = clock
        self.clients: dict[int, _Client] = {}
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            sock.listen(MAX_CLIENTS)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise MetricsError(f"--metrics-socket {path}: {e.strerror}") from None
        self.sock: socket.socket | None = sock
        self._inode = os.stat(path).st_ino

    def fileno(self) -> int:
        assert self.sock is not None, "fileno of a closed metrics server"
        return self.sock.fileno()

    def accept(self) -> None:
        """The listening socket is readable: take one client and start
        answering it."""
        assert self.sock is not None
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            logger.warning("metrics socket: accept: %s", e.strerror)
            return
        if len(self.clients) >= MAX_CLIENTS:
            conn.close()
            return
        conn.setblocking(False)
        if self.render is None:
            conn.close()
            return
        try:
            data = self.render()
        except Exception:  # noqa: BLE001 - metrics never take the supervisor down
            logger.exception("metrics: rendering failed")
            conn.close()
            return
        client = _Client(conn, data, self.clock() + DEADLINE)
        self.clients[conn.fileno()] = client
        self.writable(conn.fileno())

    def writable(self, fd: int) -> None:
        """Write what the client ``fd`` can take; close it when done or broken."""
        client = self.clients.get(fd)
        if client is None:
            return
        try:
            while client.data:
                n = client.sock.send(client.data)
                client.data = client.data[n:]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._drop(fd)

    def expire(self) -> None:
        now = self.clock()
        for fd in [fd for fd, cl in self.clients.items() if now >= cl.deadline]:
            self._drop(fd)

    def next_deadline(self) -> float | None:
        return min((cl.deadline for cl in self.clients.values()), default=None)

    def close(self) -> None:
        for fd in list(self.clients):
            self._drop(fd)
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            try:
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
            except OSError:
                pass

    def _drop(self, fd: int) -> None:
        client = self.clients.pop(fd)
        client.data.release()
        client.sock.close()

