"""The compiled request path against the pure-Python one and the C and
Rust daemons (docs/compiled.md), daemon-bound: the vhost-user test frontend
drives each daemon at depth 1 and 64, rounds interleaved, best round kept.

    python -m tests.perf.compiled_bench [--seconds 2] [--rounds 2]
                                        [--ops getattr,lookup,read4k]
                                        [--depths 1,64] [--kinds compiled,C,Rust]
                                        [--stat best|median]

Ours runs five ways: pure (``PYVIRTIOFSD_PURE=1``), stage 1 (the compiled
virtqueue alone, ``PYVIRTIOFSD_FASTOPS=0``), stage 2 (GETATTR and READ in
C on chains popped in Python, ``PYVIRTIOFSD_FASTOPS=2``), stage 3 (the
batch loop in C, the wait in Python, ``PYVIRTIOFSD_FASTOPS=3``) and
compiled (the batch loop and the wait loop in C, the default). Prints
Markdown tables: requests/s (the best or the median round), the daemon's
CPU µs per request (its whole process tree, from /proc; the least or the
median), and the worker's CPU per request in one process
(tests/perf/inproc.py) for the ways of ours. ``--kinds``: only these
ways (rounds alternate them). A daemon round that fails (a daemon that
never answers INIT) is reported and left out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from tests.conftest import C_VIRTIOFSD
from tests.perf.bench import daemon_rates

KINDS = {  # label: (daemon kind, extra environment)
    "pure": ("ours", {"PYVIRTIOFSD_PURE": "1"}),
    "stage 1": ("ours", {"PYVIRTIOFSD_PURE": "0", "PYVIRTIOFSD_FASTOPS": "0"}),
    "stage 2": ("ours", {"PYVIRTIOFSD_PURE": "0", "PYVIRTIOFSD_FASTOPS": "2"}),
    "stage 3": ("ours", {"PYVIRTIOFSD_PURE": "0", "PYVIRTIOFSD_FASTOPS": "3"}),
    "compiled": ("ours", {"PYVIRTIOFSD_PURE": "0", "PYVIRTIOFSD_FASTOPS": ""}),
    "C": ("c", None),
    "Rust": ("rust", None),
}
OURS = ("pure", "stage 1", "stage 2", "stage 3", "compiled")
# frontend ops that tests/perf/inproc.py measures the same way (its readdir
# ops list whole directories, not one re-posted buffer)
INPROC_SAME = ("getattr", "lookup", "read4k", "read1m")


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
    ap.add_argument("--depths", default="1,64")
    ap.add_argument("--kinds", default=",".join(KINDS), help="ways to run, of: " + ", ".join(KINDS))
    ap.add_argument("--stat", choices=("best", "median"), default="best")
    a = ap.parse_args(argv)
    ops = a.ops.split(",")
    depths = tuple(int(d) for d in a.depths.split(","))
    kinds = [k for k in a.kinds.split(",") if k != "C" or os.path.exists(C_VIRTIOFSD)]
    if "compiled" not in kinds or not set(kinds) <= set(KINDS):
        ap.error(f"--kinds: some of {', '.join(KINDS)}, compiled among them")
    seen: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
    for rnd in range(a.rounds):
        for label in kinds:
            kind, env = KINDS[label]
            cpu: dict[str, float] = {}
            try:
                rates = daemon_rates(kind, ops, depths, a.seconds, env=env, cpu=cpu)
            except (OSError, RuntimeError) as e:   # TimeoutError: a daemon that never answered
                print(f"round {rnd + 1} {label}: failed, round left out: {e}", file=sys.stderr, flush=True)
                continue
            for key, rate in rates.items():
                seen[label].setdefault(key, []).append(rate)
                seen[label].setdefault("cpu:" + key, []).append(cpu[key])
            print(f"round {rnd + 1} {label}: " + ", ".join(f"{k} {v[-1]:,.1f}" for k, v in seen[label].items()),
                  f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    pick = {"best": (max, min), "median": (statistics.median, statistics.median)}[a.stat]
    best = {k: {key: pick[key.startswith("cpu:")](v) for key, v in seen[k].items()} for k in kinds}
    for k in kinds:
        for op in ops:
            for depth in depths:
                for key in (f"{op}-d{depth}", f"cpu:{op}-d{depth}"):
                    best[k].setdefault(key, float("nan"))    # every round of it failed
    bases = [k for k in ("C", "Rust") if k in kinds]
    print("| op | depth | " + " | ".join(kinds) + " | " + " | ".join(f"compiled / {k}" for k in bases) + " |")
    print("|---|---|" + "---|" * (len(kinds) + len(bases)))
    for op in ops:
        for depth in depths:
            key = f"{op}-d{depth}"
            r = {k: best[k][key] for k in kinds}
            cells = " | ".join(f"{r[k]:,.0f}" for k in kinds)
            ratios = " | ".join(f"{r['compiled'] / r[k]:.2f}" for k in bases)
            print(f"| {op} | {depth} | {cells} | {ratios} |")
    print()
    print("| op | depth | " + " | ".join(f"{k} CPU µs" for k in kinds) + " |")
    print("|---|---|" + "---|" * len(kinds))
    for op in ops:
        for depth in depths:
            key = f"cpu:{op}-d{depth}"
            print(f"| {op} | {depth} | " + " | ".join(f"{best[k][key]:.1f}" for k in kinds) + " |")
    print()
    ours = [k for k in OURS if k in kinds]
    print("| op (in-process, depth 64, CPU µs/request) | " + " | ".join(ours) + " |")
    print("|---|" + "---|" * len(ours))
    for op in (o for o in ops if o in INPROC_SAME):
        us = [min(inproc_us(op, 64, a.seconds, label) for _ in range(a.rounds)) for label in ours]
        print(f"| {op} | " + " | ".join(f"{u:.2f}" for u in us) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
