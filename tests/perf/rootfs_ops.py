"""Where our daemon's time goes during a root boot, by FUSE opcode: ours runs
with ``--metrics-socket``, and a host thread scrapes it each time the root's
check script (tests/guest/rootfs_boot.py) reports the start of a phase on
the serial console, so the per-opcode request counts and latency sums split
into the boot to multi-user, ``dpkg -i`` and ``dpkg --verify``.

With the daemon's pid the scraper also reads, at each mark, the CPU time
(user + system, /proc/PID/stat) and the wake-ups (voluntary context
switches of all its threads) of every process of the daemon's tree by
name (``vfsd-request-1``, ``vfsd-keeper``...), so each phase's CPU splits
by process, and per wake-up: what the requests cost against what
surrounds them.

The boundaries are as sharp as the console poll (0.1 s) against a TCG guest
that needs seconds per phase. The latency is what the worker spent from
decoding a request to writing its reply; a deferred FSYNC / SETLKW is
counted, its wait not timed (README, Metrics).
"""

from __future__ import annotations

import threading
from pathlib import Path

from tests import metrics_client, procfs
from tests.guest.harness import process_tree

# (phase that ends, console marker that ends it), in the order they appear
MARKS = (("boot", "@@ROOTFS installing@@"), ("install", "@@ROOTFS verifying@@"),
         ("verify", "@@ROOTFS audit-lines"))
REQS, LAT = "pyvirtiofsd_requests_total", "pyvirtiofsd_request_duration_seconds_sum"


def scrape(path: str) -> dict[str, list[float]]:
    """{op: [requests, latency seconds]}, summed over the workers."""
    out: dict[str, list[float]] = {}
    for (name, labels), value in metrics_client.scrape(path).items():
        if name in (REQS, LAT):
            out.setdefault(dict(labels)["op"], [0.0, 0.0])[name == LAT] += value
    return out


class PhaseScraper:
    """Scrapes ``metrics_path`` at each of MARKS in ``console_log``;
    ``phases()`` then gives each phase's {op: [requests, seconds]}."""

    def __init__(self, metrics_path: str, console_log: Path, daemon_pid: int | None = None):
        self.path, self.console, self.pid = metrics_path, console_log, daemon_pid
        self.snaps: list[tuple[str, dict]] = []
        self.cpu_snaps: list[tuple[str, dict[str, float]]] = []
        self.wake_snaps: list[tuple[str, dict[str, float]]] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PhaseScraper:
        self._t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._t.join(10)

    def _run(self) -> None:
        text, pos, todo = "", 0, list(MARKS)
        while todo and not self._stop.wait(0.1):
            try:
                with open(self.console, "rb") as f:
                    f.seek(pos)
                    new = f.read()
            except OSError:
                continue
            pos += len(new)
            text = text[-200:] + new.decode(errors="replace")
            while todo and todo[0][1] in text:
                phase, mark = todo.pop(0)
                text = text.split(mark, 1)[1]
                if self.pid is not None:
                    self.cpu_snaps.append((phase, tree_cpu(self.pid)))
                    self.wake_snaps.append((phase, tree_wakeups(self.pid)))
                try:
                    self.snaps.append((phase, scrape(self.path)))
                except (OSError, ValueError) as e:
                    self.error = f"scrape at the end of {phase}: {e!r}"
                    return

    def phases(self) -> dict[str, dict[str, list[float]]]:
        out, prev = {}, {}
        for phase, snap in self.snaps:
            out[phase] = {op: [v[0] - prev.get(op, [0, 0])[0], v[1] - prev.get(op, [0, 0])[1]]
                          for op, v in snap.items() if v[0] > prev.get(op, [0, 0])[0]}
            prev = snap
        return out


    def phases_cpu(self) -> dict[str, dict[str, float]]:
        """{phase: {process name: CPU seconds during it}} (a process that
        was not there at the previous mark counts from 0)."""
        return _per_phase(self.cpu_snaps, 2)

    def phases_wakeups(self) -> dict[str, dict[str, float]]:
        """{phase: {process name: wake-ups during it}}, as phases_cpu."""
        return _per_phase(self.wake_snaps, 0)


def _per_phase(snaps: list[tuple[str, dict[str, float]]], digits: int) -> dict[str, dict[str, float]]:
    """Each mark's {name: value} minus the previous mark's (0 for a name
    that was not there)."""
    out, prev = {}, {}
    for phase, snap in snaps:
        out[phase] = {name: round(v - prev.get(name, 0.0), digits) for name, v in snap.items()}
        prev = snap
    return out


def tree_cpu(pid: int) -> dict[str, float]:
    """{process name: user + system CPU seconds} of ``pid`` and every
    process below it (harness.process_tree; names seen twice are summed, a
    process gone before its CPU is read is left out)."""
    out: dict[str, float] = {}
    for p, _ppid, name in process_tree(pid):
        try:
            user, system = procfs.cpu_ticks(p)
        except (OSError, ValueError, IndexError):
            continue
        out[name] = out.get(name, 0.0) + (user + system) / procfs.TICKS_PER_SECOND
    return out


def tree_wakeups(pid: int) -> dict[str, float]:
    """{process name: voluntary context switches, all threads} of ``pid``
    and every process below it, as tree_cpu."""
    out: dict[str, float] = {}
    for p, _ppid, name in process_tree(pid):
        try:
            n = procfs.voluntary_switches(p)
        except (OSError, ValueError, IndexError):
            continue
        out[name] = out.get(name, 0.0) + n
    return out


def cpu_summary(cpu: dict[str, float], wakeups: dict[str, float] | None = None) -> str:
    """'CPU 2.1 s: vfsd-request-1 1.5 s (30,000 wake-ups, 50 µs each), ...'
    (largest first; the wake-ups where ``wakeups`` has the name)."""
    def one(name: str, v: float) -> str:
        n = (wakeups or {}).get(name, 0)
        return f"{name} {v:.1f} s" + (f" ({n:,.0f} wake-ups, {v / n * 1e6:.0f} µs each)" if n > 0 else "")

    parts = sorted(cpu.items(), key=lambda kv: -kv[1])
    return f"CPU {sum(cpu.values()):.1f} s: " + ", ".join(one(name, v) for name, v in parts)


def summary(ops: dict[str, list[float]], top: int = 6) -> str:
    """'N requests, S s in the daemon; by time: OP S s (N), ...; most: OP N, ...'."""
    n = sum(v[0] for v in ops.values())
    s = sum(v[1] for v in ops.values())
    by_time = sorted(ops.items(), key=lambda kv: -kv[1][1])[:top]
    by_count = sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]
    return (f"{n:,.0f} requests, {s:.1f} s in the daemon; by time: "
            + ", ".join(f"{op} {v[1]:.1f} s ({v[0]:,.0f})" for op, v in by_time)
            + "; most: " + ", ".join(f"{op} {v[0]:,.0f}" for op, v in by_count))
