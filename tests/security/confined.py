"""Run a function in a confined worker-like child and collect its report.

``run_confined(role, shared_dir, body, sandbox=..., seccomp=...)`` spawns a
child with ``spawn_confined``; the child confines itself exactly as a worker
does, then runs ``body(info)`` and writes ``repr`` of its result to a pipe.
The parent may look at the child from outside while it waits (``hold``).
"""

from __future__ import annotations

import dataclasses
import os
import select
import time

from daemon import sandbox
from daemon.config import Config


def make_config(shared_dir, sandbox_mode="namespace", seccomp_mode="kill", **kw) -> Config:
    return Config(shared_dir=str(shared_dir), sandbox=sandbox_mode, seccomp=seccomp_mode, **kw)


@dataclasses.dataclass
class Result:
    pid: int
    status: int
    report: str          # what body returned (repr), "" if the child died first
    outside: object      # what ``inspect(pid)`` returned while the child was confined


def run_confined(role, config, body, inspect=None, timeout=30.0) -> Result:
    """``body(info)`` runs in the child after ``confine``; ``inspect(pid)`` runs
    in the parent after the child reported it is confined and before it
    continues past that point."""
    r_rep, w_rep = os.pipe()
    r_go, w_go = os.pipe()

    def child():
        os.close(r_rep)
        os.close(w_go)
        info = sandbox.confine(role, config)
        os.write(w_rep, b"C")            # confined
        os.read(r_go, 1)                 # wait until the parent has looked
        out = body(info)
        os.write(w_rep, repr(out).encode())
        os.close(w_rep)

    pid = sandbox.spawn_confined(child, config.sandbox, config.inherit_namespaces)
    os.close(w_rep)
    os.close(r_go)
    outside = None
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        ready, _, _ = select.select([r_rep], [], [], timeout)
        first = os.read(r_rep, 1) if ready else b""
        if first == b"C" and inspect is not None:
            outside = inspect(pid)
        os.write(w_go, b"g") if first == b"C" else None
        os.close(w_go)
        w_go = -1
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r_rep], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(r_rep, 65536)
            if not chunk:
                break
            buf += chunk
    finally:
        if w_go >= 0:
            os.close(w_go)
        os.close(r_rep)
        if time.monotonic() >= deadline:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(pid, 0)
    return Result(pid, status, buf.decode(errors="replace"), outside)
