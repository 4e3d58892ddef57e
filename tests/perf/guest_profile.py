"""Where a real guest's time goes: ours against the Rust virtiofsd, step by
step, on the same workloads as ``make bench``'s guest part.

    python -m tests.perf.guest_profile [--platform b] [--cache never] [--rounds 3]
                                       [--kinds ours,rust,ours:--no-xattr] [--seq-mib 64]
                                       [--rand-seconds 5] [--files 500] [--lat-count 500]
                                       [--json FILE]

Each round boots one guest per daemon, in turn (ours, Rust, ours, Rust...:
the machine is shared, so only figures taken side by side compare). The
guest runs tests/perf/guest_workloads/run.sh with ``BENCH_MARKS=1``, which
marks the start and end of each step (idle, seq-write, seq-read, rand-read,
rand-write, latency, metadata) and pauses a second at each mark; at each
mark this reads, from /proc, for the daemon's whole process tree (ours:
supervisor and workers; Rust: one process, its threads) and for QEMU:

- user and system CPU time (``/proc/PID/stat``, all threads: sampled at
  the tick, so short wake-ups are charged unevenly), and exactly, from
  ``/proc/PID/task/TID/schedstat``, the time each thread ran and the time
  it waited on a run queue after being woken (``run_s``, ``wait_s``),
  summed over the threads alive at both marks (the daemons' are),
- voluntary and involuntary context switches of every thread
  (``/proc/PID/task/TID/status``: a voluntary one is one sleep, i.e. one
  wake-up to come),
- minor page faults (``/proc/PID/stat``, the whole process: a daemon's
  first touch of a guest page it had not mapped yet is one),
- read- and write-type system calls (``/proc/PID/io`` syscr/syscw: eventfd
  reads and writes, preadv/pwritev and the like) and the bytes they moved
  (rchar/wchar: a daemon's file data and 8 bytes per eventfd access).

It prints, per step, the guest's figure and those counters divided by the
step's operations (fio's I/Os, the metadata phases' operations), so the
cost per request of each daemon and what it makes QEMU do can be compared.
metadata.py marks its phases too (create, stat, readdir, unlink: steps
within the metadata step, without its drop_caches and their FORGETs),
each with a table of our daemon's run time by process name.
``--kinds`` names the daemons, ``kind:OPTION:OPTION`` with extra options.

``--parallel`` profiles the bench's parallel workloads instead
(tests/perf/guest_workloads/parallel.sh: two fio jobs, ``--seq-mib`` MiB
sequential in all, then parallel_meta.py's two processes pinned to the two
vCPUs, ``--files`` files in all, both starting each phase together), on
platform b with ours offering 2 request queues and Rust its one; the steps
are its phases (par-seq-write ... par-rand-write, par-create, par-stat,
par-readdir, par-unlink), and
a table per step splits our daemon's run time and wake-ups by process
name (supervisor, workers, keeper).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.conftest import start_daemon  # noqa: E402
from tests.guest.harness import process_tree  # noqa: E402
from tests.guest.vm import guest_path, run_guest  # noqa: E402
from tests.perf.bench import WORKLOADS, console_watch, parse_output, value  # noqa: E402
from tests.procfs import TICKS_PER_SECOND  # noqa: E402

MARK = re.compile(r"@@BENCH-MARK (start|end) ([\w-]+)@@")
COUNTERS = ("cpu_user", "cpu_sys", "run_s", "wait_s", "vcsw", "ivcsw", "syscr", "syscw", "rchar", "wchar",
            "minflt")


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it (harness.process_tree)."""
    return [pid for pid, _, _ in process_tree(root)]


def counters(pids) -> dict:
    """COUNTERS summed over ``pids`` and all their threads; and per process
    name, its [CPU seconds, voluntary switches, run seconds]."""
    total = dict.fromkeys(COUNTERS, 0.0)
    by_name: dict[str, list[float]] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            user, system = int(fields[11]) / TICKS_PER_SECOND, int(fields[12]) / TICKS_PER_SECOND
            total["cpu_user"] += user
            total["cpu_sys"] += system
            total["minflt"] += int(fields[7])
            mine = by_name.setdefault(name, [0.0, 0, 0.0])
            mine[0] += user + system
            with open(f"/proc/{pid}/io") as f:
                for line in f:
                    key, _, val = line.partition(":")
                    if key in ("syscr", "syscw", "rchar", "wchar"):
                        total[key] += int(val)
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    run_ns, wait_ns = (int(x) for x in f.read().split()[:2])
                total["run_s"] += run_ns / 1e9
                total["wait_s"] += wait_ns / 1e9
                mine[2] += run_ns / 1e9
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches"):
                            total["vcsw"] += int(line.split()[1])
                            mine[1] += int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches"):
                            total["ivcsw"] += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue  # a process that just exited
    return {"total": total, "by_name": by_name}


def opcounts(path: str) -> dict[str, float]:
    """{opcode: FUSE requests served} from our --metrics-socket (summed
    over the workers by rootfs_ops.scrape)."""
    from tests.perf.rootfs_ops import scrape
    return {op: reqs for op, (reqs, _seconds) in scrape(path).items()}


def profile_run(kind: str, extra: tuple, cache: str, platform: str, a) -> dict:
    """One boot: {"phases": {phase: figure fields}, "steps": {step:
    {"daemon": deltas, "qemu": deltas, "daemon_by_name": ...}}}."""
    work = Path(tempfile.mkdtemp(prefix=f"gprof-{kind}-"))
    shared = work / "shared"
    shared.mkdir()
    metrics = str(work / "metrics.sock") if a.requests and kind == "ours" else None
    if metrics:
        extra = (*extra, "--metrics-socket", metrics)
    d = start_daemon(kind, shared, cache, extra, run_dir=str(work))
    console = work / "console.log"
    qemu: dict = {}
    seen: set = set()
    snaps: dict = {}

    def at_marks(text: str) -> None:
        for m in MARK.finditer(text):
            key = (m.group(1), m.group(2))
            if key in seen:
                continue
            seen.add(key)
            if metrics:
                snaps.setdefault(key, {})["ops"] = opcounts(metrics)
            snaps.setdefault(key, {}).update({"daemon": counters(descendants(d.pid)),
                          "qemu": counters(descendants(qemu["pid"])) if "pid" in qemu else None,
                          "t": time.monotonic()})

    watch = console_watch(console, d, kind, at_marks)

    if a.parallel:
        argv = ("sh", guest_path(WORKLOADS / "parallel.sh"), "/mnt", a.seq_mib, a.rand_seconds, a.files)
    else:
        argv = ("sh", guest_path(WORKLOADS / "run.sh"), "/mnt", a.seq_mib, a.rand_seconds, a.files, "-", "-",
                a.lat_count if cache == "never" else 0)
    cmd = "BENCH_MARKS=1 " + " ".join(shlex.quote(str(x)) for x in argv)
    queues = 2 if a.parallel and kind == "ours" else 1
    try:
        r = run_guest(d.socket_path, cmd, timeout=900, console_log=console, idle_timeout=200,
                      abort_if=watch, platform=platform, on_start=lambda p: qemu.update(pid=p.pid),
                      num_request_queues=queues)
    finally:
        d.stop(10)
    phases, failures = parse_output(r.output)
    steps = {}
    for (edge, step), snap in snaps.items():
        if edge != "start" or ("end", step) not in snaps:
            continue
        end = snaps[("end", step)]
        out = {"seconds": end["t"] - snap["t"]}
        for who in ("daemon", "qemu"):
            if snap[who] and end[who]:
                out[who] = {k: end[who]["total"][k] - snap[who]["total"][k] for k in COUNTERS}
        out["daemon_by_name"] = {n: [e - b for e, b in zip(end["daemon"]["by_name"].get(n, v), v)]
                                 for n, v in snap["daemon"]["by_name"].items()}
        if "ops" in snap:
            out["requests"] = {op: n - snap["ops"].get(op, 0) for op, n in end["ops"].items()
                               if n > snap["ops"].get(op, 0)}
        steps[step] = out
    shutil.rmtree(work, ignore_errors=True)
    return {"phases": phases, "steps": steps, "failures": failures, "status": r.exit_status}


# the metadata step's operations: the sum of its phases'
METADATA = ("create", "stat", "readdir", "unlink")
# run.sh's fio steps
FIO_STEPS = ("seq-write", "seq-read", "rand-read", "rand-write")
# --parallel: parallel.sh's fio steps and parallel_meta.py's phases
PAR_STEPS = tuple("par-" + p for p in (*FIO_STEPS, *METADATA))


def step_ops(step: str, phases: dict) -> int:
    if step == "metadata":
        return sum(int(phases[p]["ops"]) for p in METADATA if p in phases)
    if step == "latency":
        return sum(int(phases[p]["ops"]) for p in phases if p.startswith("lat-"))
    return int(phases.get(step, {}).get("ops", 0))


def summarize(runs: dict) -> list[str]:
    """Per step: median figure and per-operation counters of each kind."""
    lines = []
    steps = [s for s in ("idle", *FIO_STEPS, "latency", "metadata", *METADATA,
                         *PAR_STEPS)
             if any(s in r["steps"] for rs in runs.values() for r in rs)]
    for step in steps:
        lines.append(f"## {step}")
        lines.append("| daemon | figure | daemon ran µs/op | daemon run-queue wait µs/op | daemon wake-ups/op "
                     "| daemon syscalls r+w/op | daemon minor faults/op | QEMU ran µs/op | QEMU run-queue wait µs/op "
                     "| QEMU wake-ups/op | step s |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for kind, rs in runs.items():
            rows = []
            for r in rs:
                s = r["steps"].get(step)
                if not s or "qemu" not in s:
                    continue
                ops = step_ops(step, r["phases"]) or 1
                dd, qq = s["daemon"], s["qemu"]
                fig = value(step, r["phases"][step]) if step in r["phases"] else float("nan")
                rows.append((fig, dd["run_s"] * 1e6 / ops, dd["wait_s"] * 1e6 / ops, dd["vcsw"] / ops,
                             (dd["syscr"] + dd["syscw"]) / ops, dd["minflt"] / ops,
                             qq["run_s"] * 1e6 / ops, qq["wait_s"] * 1e6 / ops,
                             qq["vcsw"] / ops, s["seconds"]))
            if not rows:
                continue
            med = [statistics.median(col) for col in zip(*rows)]
            lines.append(f"| {kind} (n={len(rows)}) | {med[0]:,.0f} | {med[1]:.1f} | {med[2]:.1f} | {med[3]:.2f} "
                         f"| {med[4]:.2f} | {med[5]:.2f} | {med[6]:.0f} | {med[7]:.0f} | {med[8]:.2f} | {med[9]:.1f} |")
        lines.append("")
        if step in PAR_STEPS or step in METADATA:
            lines += by_name(runs, step)
    return lines


def by_name(runs: dict, step: str) -> list[str]:
    """Per daemon process name (threads of one process, processes of one
    name summed): median run µs and wake-ups per operation of ``step``."""
    lines = [f"{step}, per process name: | daemon | process | ran µs/op | wake-ups/op |", "|---|---|---:|---:|"]
    for kind, rs in runs.items():
        per: dict[str, list[tuple[float, float]]] = {}
        for r in rs:
            s = r["steps"].get(step)
            if not s:
                continue
            ops = step_ops(step, r["phases"]) or 1
            for name, (_cpu, vcsw, run_s) in s["daemon_by_name"].items():
                per.setdefault(name, []).append((run_s * 1e6 / ops, vcsw / ops))
        for name, vals in sorted(per.items()):
            ran, woke = (statistics.median(c) for c in zip(*vals))
            lines.append(f"| {kind} | {name} | {ran:.1f} | {woke:.2f} |")
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--platform", default="b")
    ap.add_argument("--cache", default="never")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kinds", default="ours,rust,ours:--no-xattr")
    ap.add_argument("--seq-mib", type=int, default=64)
    ap.add_argument("--rand-seconds", type=int, default=5)
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--lat-count", type=int, default=500)
    ap.add_argument("--requests", action="store_true",
                    help="ours with --metrics-socket: FUSE requests per opcode in each step (this "
                         "takes ours off the compiled wait loop, so its figures are not the default's)")
    ap.add_argument("--json", help="write every run's raw counters here")
    ap.add_argument("--parallel", action="store_true",
                    help="the bench's parallel workloads (fio, then metadata), platform b, ours with 2 "
                         "request queues")
    a = ap.parse_args()
    if a.parallel:
        a.platform = "b"
    kinds = [(spec, spec.split(":")[0], tuple(spec.split(":")[1:])) for spec in a.kinds.split(",")]
    runs: dict = {spec: [] for spec, _, _ in kinds}
    for rnd in range(a.rounds):
        for spec, kind, extra in kinds:
            load = os.getloadavg()[0]
            r = profile_run(kind, extra, a.cache, a.platform, a)
            r["load"] = load
            runs[spec].append(r)
            print(f"[gprof] round {rnd + 1} {spec} load {load:.1f}: "
                  + ", ".join(f"{p} {value(p, o):,.0f}" for p, o in r["phases"].items())
                  + (f" FAILED {r['failures']} status {r['status']}" if r["failures"] or r["status"] else ""),
                  flush=True)
            if a.json:
                Path(a.json).write_text(json.dumps(runs, indent=1))
    print("\n".join(summarize(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
