"""Logging: one stderr stream for the supervisor and every worker.

Each line names the process it came from (``supervisor``, ``hiprio``,
``request-1`` ...), so interleaved output from the forked workers stays
readable::

    pyvirtiofsd[request-1 4242] WARNING: vring 1: descriptor loop

Guest-triggered events go through ``RateLimitedLogger``: a guest must not be
able to flood the host's journal.

``--syslog``: lines go to syslog instead (facility daemon, RFC 3164 without
timestamp, as glibc's syslog(3) sends them to /dev/log). The supervisor
connects one datagram socket to /dev/log at start, before any worker is
forked; every worker inherits it and sends with write(2) on that connected
socket, so logging needs neither a path (workers pivot_root away from
/dev/log) nor a system call beyond what stderr logging uses. A syslog
daemon restarted later is not reconnected: its new socket is another
inode, and the lines are lost (write fails, silently, as syslog(3)).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time

LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG,
          # the Rust daemon's other two: trace is our debug, off logs nothing
          "trace": logging.DEBUG, "off": logging.CRITICAL + 10}
SYSLOG_PATH = "/dev/log"
LOG_DAEMON = 3 << 3
_SEVERITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

_role = "supervisor"


class _RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        return True


class _SyslogHandler(logging.Handler):
    """Records as syslog datagrams on a socket connected to /dev/log."""

    def __init__(self, path: str):
        super().__init__()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        self.fd = sock.detach()   # inherited by every forked worker

    def emit(self, record: logging.LogRecord) -> None:
        priority = LOG_DAEMON | _SEVERITY.get(record.levelno, 6)
        line = f"<{priority}>pyvirtiofsd[{record.process}]: {self.format(record)}"
        try:
            os.write(self.fd, line.encode("utf-8", "replace")[:8192])
        except OSError:
            pass


def setup(level: str, role: str = "supervisor", syslog: bool = False) -> None:
    """Send the ``pyvirtiofsd`` logger's records at ``level`` and above to
    stderr, or with ``syslog`` to /dev/log (OSError if it cannot be
    reached). Call once in the supervisor; forked workers inherit it and
    only call ``set_role``."""
    set_role(role)
    handler: logging.Handler
    if syslog:
        handler = _SyslogHandler(SYSLOG_PATH)
        handler.setFormatter(logging.Formatter("%(role)s %(levelname)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pyvirtiofsd[%(role)s %(process)d] %(levelname)s: %(message)s"))
    handler.addFilter(_RoleFilter())
    root = logging.getLogger("pyvirtiofsd")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    root.propagate = False


def held_fds() -> list[int]:
    """Descriptors logging holds open (the /dev/log socket with --syslog):
    the start-up's close of inherited fds keeps them."""
    return [h.fd for h in logging.getLogger("pyvirtiofsd").handlers if isinstance(h, _SyslogHandler)]


def set_role(role: str) -> None:
    """Name this process in every line it logs from now on (after fork)."""
    global _role
    _role = role


def get_logger(name: str) -> logging.Logger:
    """A child of the ``pyvirtiofsd`` logger, e.g. ``get_logger("vhost_user")``."""
    return logging.getLogger(f"pyvirtiofsd.{name}")


class RateLimitedLogger:
    """At most ``burst`` records per ``interval`` seconds; the rest are
    counted and reported in one line when logging resumes.

    For events a guest can trigger at will (bad descriptor chains, odd FUSE
    requests): the first ones are logged in full, a flood is summarised.
    """

    def __init__(self, logger: logging.Logger, burst: int = 10, interval: float = 60.0,
                 clock=time.monotonic):
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._window_start = clock()
        self._in_window = 0
        self._suppressed = 0

    def log(self, level: int, msg: str, *args) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = self._clock()
        if now - self._window_start >= self.interval:
            if self._suppressed:
                self.logger.log(level, "%d similar messages suppressed in the last %.0f s",
                                self._suppressed, now - self._window_start)
            self._window_start, self._in_window, self._suppressed = now, 0, 0
        if self._in_window < self.burst:
            self._in_window += 1
            self.logger.log(level, msg, *args)
        else:
            self._suppressed += 1

    def warning(self, msg: str, *args) -> None:
        self.log(logging.WARNING, msg, *args)

    def error(self, msg: str, *args) -> None:
        self.log(logging.ERROR, msg, *args)

    def info(self, msg: str, *args) -> None:
        self.log(logging.INFO, msg, *args)
