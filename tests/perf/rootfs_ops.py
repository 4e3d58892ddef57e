"""Where our daemon's time goes during a root boot, by FUSE opcode: ours runs
with ``--metrics-socket``, and a host thread scrapes it each time the root's
check script (tests/guest/rootfs_boot.py) reports the start of a phase on
the serial console, so the per-opcode request counts and latency sums split
into the boot to multi-user, ``dpkg -i`` and ``dpkg --verify``.

The boundaries are as sharp as the console poll (0.1 s) against a TCG guest
that needs seconds per phase. The latency is what the worker spent from
decoding a request to writing its reply; a deferred FSYNC / SETLKW is
counted, its wait not timed (README, Metrics).
"""

from __future__ import annotations

import threading
from pathlib import Path

from tests import metrics_client

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

    def __init__(self, metrics_path: str, console_log: Path):
        self.path, self.console = metrics_path, console_log
        self.snaps: list[tuple[str, dict]] = []
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


def summary(ops: dict[str, list[float]], top: int = 6) -> str:
    """'N requests, S s in the daemon; by time: OP S s (N), ...; most: OP N, ...'."""
    n = sum(v[0] for v in ops.values())
    s = sum(v[1] for v in ops.values())
    by_time = sorted(ops.items(), key=lambda kv: -kv[1][1])[:top]
    by_count = sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]
    return (f"{n:,.0f} requests, {s:.1f} s in the daemon; by time: "
            + ", ".join(f"{op} {v[1]:.1f} s ({v[0]:,.0f})" for op, v in by_time)
            + "; most: " + ", ".join(f"{op} {v[0]:,.0f}" for op, v in by_count))
