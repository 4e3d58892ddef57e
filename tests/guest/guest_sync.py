"""In-guest helpers (stdlib only) for tests that coordinate with the host or
with another guest through run_guest's ``sync_dir`` (seen at /run/sync in
the guest, 9p without caching) and report on the serial console.

``signal(name)`` creates an empty file; ``wait(name)`` polls for one;
``report(prefix, obj)`` prints one ``prefix{json}`` line.
"""

from __future__ import annotations

import json
import os
import sys
import time

SYNC = "/run/sync"


def signal(name: str) -> None:
    """Create SYNC/name, atomically (a temporary name, then rename)."""
    tmp = os.path.join(SYNC, f".{name}.{os.getpid()}")
    with open(tmp, "w"):
        pass
    os.rename(tmp, os.path.join(SYNC, name))


def wait(name: str, timeout: float = 300.0) -> float:
    """Seconds waited until SYNC/name exists; raises TimeoutError after
    ``timeout`` (the run then reports what it had)."""
    t0 = time.monotonic()
    path = os.path.join(SYNC, name)
    while not os.path.exists(path):
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"no {name} in {SYNC} after {timeout:.0f} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def report(prefix: str, obj) -> None:
    """One console line ``prefix{json}``, flushed at once (the host may be
    about to kill us)."""
    sys.stdout.write(prefix + json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()
