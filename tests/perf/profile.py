"""Where the time goes: the evidence behind docs/perf/history.md.

    python -m tests.perf.profile [--files 5000] [--out docs/perf/profile.md]

Three parts, written to ``docs/perf/profile.md``:

1. **In a real guest** (tests/guest, cache=auto), the metadata workload of
   ``make bench`` (create, stat, readdir, unlink of ``--files`` small
   files) against each daemon: the user and system CPU seconds of its whole
   process tree, per process. Both daemons make the same syscalls for the
   same requests (compare them with ``strace -f -c``), so the system time
   is the host file system's work and the user time is each daemon's own.
   Then the same run again with py-spy sampling our request worker
   (``--gil``: only while it runs Python, so waiting in epoll is not
   counted), summed by function. That run uses ``--sandbox none --seccomp
   none``: py-spy cannot read the binary of a process that pivoted into the
   shared directory; the request path is the same code.
2. **In one process** (tests/perf/inproc.py): cProfile of the worker loop
   serving GETATTR and LOOKUP at depth 64 and 1 MiB READs at depth 1,
   no second process competing for the cores.
3. **The floor, and threads**: the least CPU a GETATTR can cost in CPython
   (tests/perf/floor.py: the same ring, every check left out) next to our
   worker loop and the C daemon's whole request; and the C daemon through
   the test frontend at depth 64 with its default ``--thread-pool-size=0``
   (one thread serves the queue) and with a pool of 4, which is what
   several executors per queue would buy on this machine.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import re
import shutil
import subprocess
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
from tests import procfs  # noqa: E402
from tests.perf import bench, inproc  # noqa: E402

METADATA = Path(__file__).resolve().parent / "guest_workloads" / "metadata.py"
PY_SPY = Path(sys.executable).parent / "py-spy"


def _cpu(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds of ``pid``; None once it is gone."""
    try:
        user, system = procfs.cpu_ticks(pid)
    except OSError:
        return None
    return user / procfs.TICKS_PER_SECOND, system / procfs.TICKS_PER_SECOND


def guest_cpu(kind: str, files: int, extra=(), spy_out: Path | None = None) -> dict:
    """One boot running the metadata workload; CPU per process of the tree."""
    work = Path(tempfile.mkdtemp(prefix=f"profile-{kind}-"))
    shared = work / "shared"
    shared.mkdir()
    d = start_daemon(kind, shared, "auto", extra_args=list(extra), run_dir=str(work))
    cpu: dict[tuple[int, str], tuple[float, float]] = {}
    spy: list[subprocess.Popen] = []

    def sample():
        for pid, _ppid, comm in process_tree(d.pid):
            c = _cpu(pid)
            if c is not None:
                cpu[(pid, comm)] = c
            if spy_out and not spy and comm.startswith("vfsd-request"):
                spy.append(subprocess.Popen(
                    [str(PY_SPY), "record", "--gil", "--nonblocking", "-r", "250", "-f", "raw",
                     "-p", str(pid), "-o", str(spy_out)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return None

    script = f"python3 {guest_path(METADATA)} /mnt/m --files {files}"
    try:
        r = run_guest(d.socket_path, script, timeout=900, abort_if=sample)
    finally:
        d.stop(10)
        for p in spy:
            p.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    phases = {k: round(bench.value(k, v)) for k, v in bench.parse_output(r.output)[0].items()}
    if r.exit_status != 0:
        raise RuntimeError(f"{kind}: guest status {r.exit_status}\n{r.describe(tail=20)}")
    return {"phases": phases, "cpu": {f"{comm} ({pid})": v for (pid, comm), v in cpu.items()}}


_LINE_NUMBER = re.compile(r":\d+\)$")


def spy_table(path: Path, top: int = 15) -> str:
    """py-spy raw samples summed by innermost function ("self") and by
    function anywhere on the stack ("total")."""
    own: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    n = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        k = int(count)
        n += k
        frames = [_LINE_NUMBER.sub(")", f) for f in stack.split(";")]  # by function, not line
        own[frames[-1]] += k
        for f in set(frames):
            total[f] += k
    rows = ["| function | self | total |", "|---|---:|---:|"]
    for func, k in own.most_common(top):
        rows.append(f"| `{func}` | {100 * k / n:.1f} % | {100 * total[func] / n:.1f} % |")
    return f"{n} samples while holding the GIL\n\n" + "\n".join(rows)


def inproc_profile(op: str, depth: int, seconds: float) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        us_prof = inproc.per_request_us(op, depth, seconds, "cprofile")
    us = inproc.per_request_us(op, depth, seconds, "none")
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    body = "\n".join(ln.replace(str(REPO) + "/", "") for ln in lines[start:start + 16])
    return (f"{op}, depth {depth}: {us:.1f} µs per request without the profiler "
            f"({us_prof:.1f} µs with it)\n\n```\n{body}\n```")


def floor_and_threads(rounds: int = 2) -> list[str]:
    """Part 3 (see the module docstring): best of ``rounds`` for each figure."""
    from tests.perf import floor

    floor_us = min(floor.per_request_us(64, 2.0) for _ in range(rounds))
    ours_us = min(inproc.per_request_us("getattr", 64, 2.0) for _ in range(rounds))
    variants = {"C, --thread-pool-size=0 (its default)": ("c", ()),
                "C, --thread-pool-size=4": ("c", ("--thread-pool-size=4",)),
                "ours (defaults)": ("ours", ())}
    best: dict[str, dict] = {name: {} for name in variants}
    for _ in range(rounds):
        for name, (kind, extra) in variants.items():
            for key, rate in bench.daemon_rates(kind, ("getattr", "read4k"), (64,), 2.0, extra).items():
                best[name][key] = max(best[name].get(key, 0.0), rate)
    c_us = 1e6 / best["C, --thread-pool-size=0 (its default)"]["getattr-d64"]
    md = ["| GETATTR, depth 64 | µs per request |", "|---|---:|",
          f"| floor: the least a CPython loop can do (tests/perf/floor.py, one process) | {floor_us:.2f} |",
          f"| our worker loop (tests/perf/inproc.py, one process) | {ours_us:.2f} |",
          f"| the C daemon's whole request (1 / its rate through the frontend) | {c_us:.2f} |",
          "", "Through the test frontend, depth 64 (requests/s, best of "
          f"{rounds}; the frontend spins on one of the {os.cpu_count()} cores):", "",
          "| daemon | GETATTR | READ 4 KiB |", "|---|---:|---:|"]
    for name, rates in best.items():
        md.append(f"| {name} | {rates['getattr-d64']:,.0f} | {rates['read4k-d64']:,.0f} |")
    return md


# written by hand (from tests/perf/guest_profile.py's runs): a rewrite of
# the generated parts above it keeps it
KEPT_HEADING = "## Guest figures against Rust: where the time goes"


def kept_section(old: str) -> str:
    """The hand-written tail of an earlier profile.md, from KEPT_HEADING to
    the end ("" if it has none), with a blank line before it."""
    at = old.find("\n" + KEPT_HEADING + "\n")
    return "" if at < 0 else old[at:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--out", default=str(REPO / "docs" / "perf" / "profile.md"))
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    md = ["# Where the time goes", "",
          f"Written by `python -m tests.perf.profile` on {time.strftime('%Y-%m-%d %H:%M')} "
          f"({os.cpu_count()} cores, shared). See docs/perf/history.md.", "",
          f"## A real guest: the metadata workload ({a.files:,} files, cache=auto)", "",
          "| daemon | phases (ops/s) | user CPU s | system CPU s |", "|---|---|---:|---:|"]
    runs = {}
    for kind in ("ours", "c"):
        runs[kind] = res = guest_cpu(kind, a.files)
        user = sum(u for u, _s in res["cpu"].values())
        system = sum(s for _u, s in res["cpu"].values())
        md.append(f"| {kind} | {res['phases']} | {user:.2f} | {system:.2f} |")
        print(kind, res, flush=True)
    md += ["", "Per process (user, system CPU seconds):", ""]
    for kind, res in runs.items():
        md.append(f"- {kind}: " + ", ".join(f"{name} {u:.2f}/{s:.2f}" for name, (u, s) in res["cpu"].items()))
    spy_out = Path(tempfile.mkdtemp(prefix="profile-spy-")) / "request.txt"
    guest_cpu("ours", a.files, ("--sandbox", "none", "--seccomp", "none"), spy_out)
    md += ["", "### py-spy: our request worker on the same workload", "",
           "(`--sandbox none --seccomp none`, see the module docstring)", "",
           spy_table(spy_out) if spy_out.exists() else "py-spy produced no samples"]
    md += ["", "## One process: the worker loop under cProfile", ""]
    for op, depth in (("getattr", 64), ("lookup", 64), ("read1m", 1)):
        md += [inproc_profile(op, depth, 2.0), ""]
    md += ["## The floor, and threads", ""] + floor_and_threads()
    old = Path(a.out).read_text() if Path(a.out).exists() else ""
    Path(a.out).write_text("\n".join(md) + "\n" + kept_section(old))
    print(f"written: {a.out} ({(time.monotonic() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
