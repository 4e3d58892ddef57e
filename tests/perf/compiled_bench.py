"""The compiled request path against the pure-Python one and the C and
Rust daemons (docs/compiled.md), daemon-bound: the vhost-user test frontend
drives each daemon at depth 1 and 64, rounds interleaved, best round kept.

    python -m tests.perf.compiled_bench [--seconds 2] [--rounds 2]
                                        [--ops getattr,lookup,read4k]

Ours runs four ways: pure (``PYVIRTIOFSD_PURE=1``), stage 1 (the compiled
virtqueue alone, ``PYVIRTIOFSD_FASTOPS=0``), stage 2 (GETATTR and READ in
C on chains popped in Python, ``PYVIRTIOFSD_FASTOPS=2``) and compiled (the
batch loop in C, stage 3, the default). Prints Markdown tables:
requests/s, the daemon's CPU µs per request (its whole process tree, from
/proc), and the worker's CPU per request in one process
(tests/perf/inproc.py) for the ways of ours.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from tests.conftest import C_VIRTIOFSD
from tests.perf.bench import daemon_rates

KINDS = {  # label: (daemon kind, extra environment)
    "pure": ("ours", {"PYVIRTIOFSD_PURE": "1"}),
    "stage 1": ("ours", {"PYVIRTIOFSD_PURE": "0", "PYVIRTIOFSD_FASTOPS": "0"}),
    "stage 2": ("ours", {"PYVIRTIOFSD_PURE": "0", "PYVIRTIOFSD_FASTOPS": "2"}),
    "compiled": ("ours", {"PYVIRTIOFSD_PURE": "0", "PYVIRTIOFSD_FASTOPS": "3"}),
    "C": ("c", None),
    "Rust": ("rust", None),
}
OURS = ("pure", "stage 1", "stage 2", "compiled")


def inproc_us(op: str, depth: int, seconds: float, label: str) -> float:
    env = {**os.environ, **KINDS[label][1]}
    out = subprocess.run([sys.executable, "-m", "tests.perf.inproc", "--op", op, "--depth", str(depth),
                          "--seconds", str(seconds), "--clock", "cpu"],
                         env=env, capture_output=True, text=True, check=True).stdout
    return float(out.split(":")[1].split("µs")[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ops", default="getattr,lookup,read4k")
    a = ap.parse_args(argv)
    ops = a.ops.split(",")
    kinds = [k for k in KINDS if k != "C" or os.path.exists(C_VIRTIOFSD)]
    best: dict[str, dict[str, float]] = {k: {} for k in kinds}
    for rnd in range(a.rounds):
        for label in kinds:
            kind, env = KINDS[label]
            cpu: dict[str, float] = {}
            for key, rate in daemon_rates(kind, ops, (1, 64), a.seconds, env=env, cpu=cpu).items():
                b = best[label]
                b[key] = max(b.get(key, 0.0), rate)
                b["cpu:" + key] = min(b.get("cpu:" + key, cpu[key]), cpu[key])
            print(f"round {rnd + 1} {label}: " + ", ".join(f"{k} {v:,.1f}" for k, v in best[label].items()),
                  f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    bases = [k for k in ("C", "Rust") if k in kinds]
    print("| op | depth | " + " | ".join(kinds) + " | " + " | ".join(f"compiled / {k}" for k in bases) + " |")
    print("|---|---|" + "---|" * (len(kinds) + len(bases)))
    for op in ops:
        for depth in (1, 64):
            key = f"{op}-d{depth}"
            r = {k: best[k][key] for k in kinds}
            cells = " | ".join(f"{r[k]:,.0f}" for k in kinds)
            ratios = " | ".join(f"{r['compiled'] / r[k]:.2f}" for k in bases)
            print(f"| {op} | {depth} | {cells} | {ratios} |")
    print()
    print("| op | depth | " + " | ".join(f"{k} CPU µs" for k in kinds) + " |")
    print("|---|---|" + "---|" * len(kinds))
    for op in ops:
        for depth in (1, 64):
            key = f"cpu:{op}-d{depth}"
            print(f"| {op} | {depth} | " + " | ".join(f"{best[k][key]:.1f}" for k in kinds) + " |")
    print()
    print("| op (in-process, depth 64, CPU µs/request) | " + " | ".join(OURS) + " |")
    print("|---|" + "---|" * len(OURS))
    for op in ops:
        us = [min(inproc_us(op, 64, a.seconds, label) for _ in range(a.rounds)) for label in OURS]
        print(f"| {op} | " + " | ".join(f"{u:.2f}" for u in us) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
