"""Logging: one stderr stream for the supervisor and every worker.

Each line names the process it came from (``supervisor``, ``hiprio``,
``request-1`` ...), so interleaved output from the forked workers stays
readable::

    pyvirtiofsd[request-1 4242] WARNING: vring 1: descriptor loop

Guest-triggered events go through ``RateLimitedLogger``: a guest must not be
able to flood the host's journal.
"""

from __future__ import annotations

import logging
import sys
import time

LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}

_role = "supervisor"


class _RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        return True


def setup(level: str, role: str = "supervisor") -> None:
    """Send the ``pyvirtiofsd`` logger's records at ``level`` and above to
    stderr. Call once in the supervisor; forked workers inherit it and only
    call ``set_role``."""
    set_role(role)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RoleFilter())
    handler.setFormatter(logging.Formatter("pyvirtiofsd[%(role)s %(process)d] %(levelname)s: %(message)s"))
    root = logging.getLogger("pyvirtiofsd")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    root.propagate = False


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
