"""The compiled request path against the pure-Python one and the C daemon
(docs/compiled.md), daemon-bound: the vhost-user test frontend drives each
daemon at depth 1 and 64, rounds interleaved, best round kept.

    python -m tests.perf.compiled_bench [--seconds 2] [--rounds 2]
                                        [--ops getattr,lookup,read4k]

Also times the worker's CPU per request in one process (tests/perf/inproc.py)
for both paths. Prints a Markdown table.
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
    "compiled": ("ours", {"PYVIRTIOFSD_PURE": "0"}),
    "C": ("c", None),
}


def inproc_us(op: str, depth: int, seconds: float, pure: bool) -> float:
    out = subprocess.run([sys.executable, "-m", "tests.perf.inproc", "--op", op, "--depth", str(depth),
                          "--seconds", str(seconds), "--clock", "cpu"],
                         env={**os.environ, "PYVIRTIOFSD_PURE": "1" if pure else "0"},
                         capture_output=True, text=True, check=True).stdout
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
            for key, rate in daemon_rates(kind, ops, (1, 64), a.seconds, env=env).items():
                best[label][key] = max(best[label].get(key, 0.0), rate)
            print(f"round {rnd + 1} {label}: " + ", ".join(f"{k} {v:,.0f}" for k, v in best[label].items()),
                  file=sys.stderr, flush=True)
    print("| op | depth | " + " | ".join(kinds) + " | compiled / pure | compiled / C |")
    print("|---|---|" + "---|" * (len(kinds) + 2))
    for op in ops:
        for depth in (1, 64):
            key = f"{op}-d{depth}"
            r = {k: best[k][key] for k in kinds}
            cells = " | ".join(f"{r[k]:,.0f}" for k in kinds)
            vs_c = f"{r['compiled'] / r['C']:.2f}" if "C" in r else "-"
            print(f"| {op} | {depth} | {cells} | {r['compiled'] / r['pure']:.2f} | {vs_c} |")
    print()
    print("| op (in-process, depth 64, CPU µs/request) | pure | compiled |")
    print("|---|---|---|")
    for op in ops:
        p = min(inproc_us(op, 64, a.seconds, True) for _ in range(a.rounds))
        c = min(inproc_us(op, 64, a.seconds, False) for _ in range(a.rounds))
        print(f"| {op} | {p:.2f} | {c:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
