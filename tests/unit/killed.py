"""Forked children for the tests across processes: one running a function
(``in_child``), and a worker killed at random moments (SIGKILL), for the
crash tests of the compiled ops' shared-table writes."""

from __future__ import annotations

import os
import random
import signal
import time


def in_child(fn) -> int:
    """Fork a child that runs ``fn()`` and exits 0, or 1 if it raised:
    its pid."""
    pid = os.fork()
    if pid == 0:    # pragma: no cover - the child
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def kill_at_random(work, rounds: int, seed: int, after) -> None:
    """``rounds`` times: fork a child that runs ``work(round)`` until it is
    SIGKILLed 1-20 ms after it started, then call ``after(round)`` in
    this process (the successor's repairs and checks)."""
    rng = random.Random(seed)
    for round_ in range(rounds):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:    # pragma: no cover - the child, killed
            try:
                os.write(w, b"x")
                work(round_)
            finally:
                os._exit(0)
        os.read(r, 1)
        os.close(r)
        os.close(w)
        time.sleep(rng.uniform(0.001, 0.02))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        after(round_)
