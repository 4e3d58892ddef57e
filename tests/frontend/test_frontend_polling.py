"""Polling in the confined request worker (``--poll-max-us``,
docs/compiled.md "Polling"): a depth-1 stream from the spinning test
frontend, which kicks only when the ring asks for it as Linux does
(tests/perf/frontend_bench.py), with and without EVENT_IDX. Polling on,
the metrics count windows that found the next request and the time spent
in them, every reply is right, the worker is the same process (the spin
makes no system call its seccomp filter would refuse) and no fd leaks;
off, no window is ever opened. The pure-Python path (and a worker that
waits in Python) never polls: the same tests check the counters are 0."""

from __future__ import annotations

import os
import time

import pytest

from tests.frontend.fuse_client import client_without_event_idx
from tests.frontend.test_frontend_worker_loop import ours_only, worker_pid  # noqa: F401 - ours_only: autouse
from tests.metrics_client import scrape
from tests.perf.frontend_bench import requests_per_second
from tests.procfs import fd_count

METRICS = f"/tmp/pyvirtiofsd-test-polling-{os.getpid()}.sock"
W = {"worker": "request-1"}


def _waits_in_c(daemon) -> bool:
    """The worker's start-up line says it waits in C, where polling is
    (not under PYVIRTIOFSD_PURE=1 or PYVIRTIOFSD_FASTOPS=0, 2 or 3: those
    never poll, which the tests check as well)."""
    return any("wait loop in C" in ln for ln in daemon.log().splitlines() if "FUSE ops: " in ln)


def _polls(outcome: str) -> float:
    return scrape(METRICS).get(("pyvirtiofsd_queue_polls_total", frozenset({"outcome": outcome, **W}.items())), 0)


def _poll_seconds() -> float:
    return scrape(METRICS).get(("pyvirtiofsd_queue_poll_seconds_total", frozenset(W.items())), 0)


@pytest.mark.frontend_opts(extra_args=("--metrics-socket", METRICS, "--poll-max-us", "1000"), queue_size=1024)
def test_a_depth_one_stream_is_found_by_polling(frontend):
    worker = worker_pid(frontend, "request-1")
    ops = ("getattr", "lookup", "read4k")
    for op in ops:      # the ops' files and handles, opened once
        assert requests_per_second(frontend, op, 1, 0.05) > 0, op
    fds = fd_count(worker)
    for op in ops:
        assert requests_per_second(frontend, op, 1, 0.3) > 0, op    # every reply checked
    found, spun = _polls("found"), _poll_seconds()
    if _waits_in_c(frontend.daemon):
        assert found > 100 and spun > 0
    else:
        assert (found, spun) == (0, 0)
    assert frontend.getattr(1).attr.nlink >= 2
    assert worker_pid(frontend, "request-1") == worker and fd_count(worker) == fds


@pytest.mark.frontend_opts(extra_args=("--metrics-socket", METRICS, "--poll-max-us", "0"), queue_size=1024)
def test_off_no_window_opens(frontend):
    assert requests_per_second(frontend, "getattr", 1, 0.3) > 0
    assert (_polls("found"), _polls("missed"), _poll_seconds()) == (0, 0, 0)


@pytest.mark.frontend_opts(extra_args=("--metrics-socket", METRICS, "--poll-max-us", "1000"))
def test_without_event_idx_the_guest_is_told_not_to_kick_while_polled(daemon_proc):
    """Without EVENT_IDX the quiet ring is VRING_USED_F_NO_NOTIFY: the
    stream is served, and the flag is clear again once the worker waits."""
    with client_without_event_idx(daemon_proc.socket_path, ram_size=128 << 20, queue_size=1024) as fc:
        assert requests_per_second(fc, "getattr", 1, 0.3) > 0
        assert (_polls("found") > 100) == _waits_in_c(daemon_proc)
        assert fc.getattr(1).attr.nlink >= 2      # a window ran out: kicks asked for again
        deadline = time.monotonic() + 5            # (the last window lasts up to 1 ms)
        while fc.rq.used_flags() != 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert fc.rq.used_flags() == 0
