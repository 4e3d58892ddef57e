"""Logging setup and the rate-limited logger (daemon/log.py)."""

import logging
import subprocess
import sys

from daemon import log


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_rate_limited_logger_summarises_a_flood(caplog):
    clock = Clock()
    limited = log.RateLimitedLogger(logging.getLogger("test.ratelimit"), burst=3, interval=10, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        for i in range(100):
            limited.warning("bad chain %d", i)
        assert [r.getMessage() for r in caplog.records] == ["bad chain 0", "bad chain 1", "bad chain 2"]
        clock.now = 10.5
        limited.warning("bad chain %d", 100)
    assert [r.getMessage() for r in caplog.records][3:] == [
        "97 similar messages suppressed in the last 10 s", "bad chain 100"]


def test_rate_limited_logger_respects_the_level(caplog):
    limited = log.RateLimitedLogger(logging.getLogger("test.ratelimit2"), burst=1)
    with caplog.at_level(logging.ERROR, logger="test.ratelimit2"):
        for _ in range(5):
            limited.warning("ignored")
        limited.error("shown")
    assert [r.getMessage() for r in caplog.records] == ["shown"]


def test_lines_name_the_process_role_and_honour_the_level():
    code = ("from daemon import log\n"
            "log.setup('warn')\n"
            "log.get_logger('x').info('hidden')\n"
            "log.get_logger('x').warning('from the supervisor')\n"
            "log.set_role('request-3')\n"
            "log.get_logger('x').error('from a worker')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith("pyvirtiofsd[supervisor ") and lines[0].endswith("] WARNING: from the supervisor")
    assert lines[1].startswith("pyvirtiofsd[request-3 ") and lines[1].endswith("] ERROR: from a worker")
