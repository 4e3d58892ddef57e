"""Two metadata.py processes at once, one pinned to each vCPU (stdlib only).

    python3 parallel_meta.py DIR --files N

Each process works in its own directory DIR/0, DIR/1 on N/2 files, so with
Linux 6.11+ and two request queues each sends its requests on its own
queue. The processes start each phase together (metadata.py's --barrier:
a pipe pair each, the parent lets both go once both are ready), so a phase
of one overlaps the same phase of the other and never the other's
drop_caches, whose FORGETs and evictions would land in the middle of a
short phase such as the cold readdir (about 40 ms). For each phase of
metadata.py (create, stat, readdir, unlink) prints
``BENCH {"phase": "par-PHASE", "seconds": s, "ops": n}`` with n the two
processes' operations together and s the slower one's time: a conservative
aggregate rate. A process that fails (an error, or no figure for a phase)
fails the run: exit status 1, after its output. With BENCH_MARKS=1 in the
environment, "@@BENCH-MARK start|end par-PHASE@@" around each phase (both
processes' part of it), each followed by a second's pause, as run.sh's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = ("create", "stat", "readdir", "unlink")
TIMEOUT = 900


def mark(edge: str, phase: str) -> None:
    """With BENCH_MARKS=1 (tests/perf/guest_profile.py --parallel), as
    run.sh's marks: "@@BENCH-MARK start|end par-PHASE@@", then a second's
    pause for the host to read the daemons' counters."""
    if os.environ.get("BENCH_MARKS"):
        print(f"@@BENCH-MARK {edge} par-{phase}@@", flush=True)
        time.sleep(1)


def release_phases(ready: list[int], go: list[int]) -> None:
    """Let the processes into each phase together: once every one of them
    has written its ready byte, write a go byte to each; then wait for
    every one's end-of-phase byte. Ends when a process closes its end (it
    finished, or failed: then the others get EOF instead of a go byte and
    stop)."""
    for phase in PHASES:
        if not all(os.read(fd, 1) == b"r" for fd in ready):
            break
        mark("start", phase)
        for fd in go:
            os.write(fd, b"g")
        if not all(os.read(fd, 1) == b"d" for fd in ready):
            break
        mark("end", phase)
    for fd in ready + go:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--files", type=int, default=10_000)
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    procs = []
    ready, go = [], []
    for cpu in (0, 1):
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(HERE, "metadata.py"), os.path.join(a.dir, str(cpu)),
             "--files", str(a.files // 2), "--barrier", f"{go_r},{ready_w}"],
            stdout=subprocess.PIPE, text=True, pass_fds=(go_r, ready_w),
            preexec_fn=lambda cpu=cpu: os.sched_setaffinity(0, {cpu})))
        os.close(go_r)
        os.close(ready_w)
        ready.append(ready_r)
        go.append(go_w)
    release_phases(ready, go)
    figures: dict[str, list[dict]] = {}
    failed = False
    for cpu, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            print(f"parallel_meta: the process on vCPU {cpu} took over {TIMEOUT} s", flush=True)
        for line in out.splitlines():
            if line.startswith("BENCH {"):
                obj = json.loads(line[6:])
                figures.setdefault(obj["phase"], []).append(obj)
            else:
                print(line, flush=True)
        if p.returncode != 0:
            print(f"parallel_meta: the process on vCPU {cpu} exited with {p.returncode}", flush=True)
            failed = True
    for phase in PHASES:
        got = figures.get(phase, [])
        if len(got) != 2:
            failed = True
            continue
        print("BENCH " + json.dumps({"phase": f"par-{phase}", "ops": sum(o["ops"] for o in got),
                                     "seconds": max(o["seconds"] for o in got)}), flush=True)
    try:
        os.rmdir(a.dir)
    except OSError:
        pass
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
