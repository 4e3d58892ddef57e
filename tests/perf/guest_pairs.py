"""One fio job in a real guest, in interleaved pairs of boots: ours against
the Rust virtiofsd, with each daemon's CPU per I/O.

    python -m tests.perf.guest_pairs [--platform a] [--cache never] [--pairs 3]
                                     [--kinds ours,rust] [--size-mib 32] [--seconds 6]
                                     [--job "--rw=randwrite --bs=4k"]

Where the bench (tests/perf/bench.py) shows a row below a baseline in
every round, this asks the narrower question: is that operation slower
with our daemon, taken alone? Each pair boots one guest per daemon, the
order reversed every other pair (bench.round_order), on a fresh share;
the guest writes a ``--size-mib`` file, drops its caches and runs the
fio job (psync, time based, ``--seconds``, ``invalidate=1``) on it. From
the job's start to its end (console marks) this reads, from /proc, the
daemon's whole process tree (guest_profile.counters: the exact
``schedstat`` run time of every thread, voluntary switches). Prints, per
pair, each daemon's IOPS and MiB/s and its CPU µs and wake-ups per I/O,
then the medians. Nothing here asserts: it only reports.
"""

from __future__ import annotations

import argparse
import json
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
from tests.guest.vm import run_guest  # noqa: E402
from tests.perf.bench import console_watch, round_order  # noqa: E402
from tests.perf.guest_profile import counters, descendants  # noqa: E402

GO, DONE = "@@PAIR-GO@@", "@@PAIR-DONE@@"
RESULT = "PAIR "


def guest_command(job: str, size_mib: int, seconds: float) -> str:
    """The guest's shell command: prepare the file, drop caches, mark, run
    the job, mark, print one ``PAIR {json}`` line (fio's read and write
    sides summed: iops, bw_bytes, total_ios)."""
    fio = (f"fio --name=j --filename=/mnt/pair/f --size={size_mib}M --ioengine=psync --time_based=1 "
           f"--runtime={seconds:g} --invalidate=1 {job} --output-format=json --output=/tmp/pair.json")
    summary = ("import json; j = json.load(open('/tmp/pair.json'))['jobs'][0]; "
               "print('" + RESULT + "' + json.dumps({k: j['read'][k] + j['write'][k] "
               "for k in ('iops', 'bw_bytes', 'total_ios')}), flush=True)")
    return (f"mkdir -p /mnt/pair && fio --name=prep --filename=/mnt/pair/f --size={size_mib}M --rw=write "
            f"--bs=1M --end_fsync=1 --output=/dev/null && sync && echo 3 > /proc/sys/vm/drop_caches && "
            f"echo {GO} && sleep 1 && {fio} && echo {DONE} && sleep 1 && python3 -c {shlex.quote(summary)}")


def parse_result(output: str) -> dict | None:
    """The guest's ``PAIR {json}`` line, or None."""
    for line in output.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    return None


def per_io(result: dict, before: dict, after: dict) -> dict:
    """The figures of one boot: IOPS, MiB/s, and the daemon tree's CPU µs
    and voluntary switches per I/O between the two marks."""
    ios = result["total_ios"] or 1
    return {"iops": result["iops"], "mib_s": result["bw_bytes"] / (1 << 20),
            "cpu_us": (after["run_s"] - before["run_s"]) * 1e6 / ios,
            "wakeups": (after["vcsw"] - before["vcsw"]) / ios}


def one_boot(kind: str, platform: str, cache: str, job: str, size_mib: int, seconds: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"pairs-{kind}-"))
    shared = work / "shared"
    shared.mkdir()
    d = start_daemon(kind, shared, cache, run_dir=str(work))
    console = work / "console.log"
    marks: dict = {}

    def at_marks(text: str) -> None:
        for mark in (GO, DONE):
            if mark in text and mark not in marks:
                marks[mark] = counters(descendants(d.pid))["total"]

    watch = console_watch(console, d, kind, at_marks)

    try:
        r = run_guest(d.socket_path, guest_command(job, size_mib, seconds), timeout=300, console_log=console,
                      idle_timeout=100, abort_if=watch, platform=platform)
    finally:
        d.stop(10)
        shutil.rmtree(work, ignore_errors=True)
    result = parse_result(r.output)
    if result is None or GO not in marks or DONE not in marks:
        raise RuntimeError(f"{kind}: no result (exit {r.exit_status}): {r.output[-500:]}")
    return per_io(result, marks[GO], marks[DONE])


def report(runs: dict) -> list[str]:
    """Markdown: a row per daemon, each pair's figures, then the medians."""
    lines = ["| daemon | IOPS | MiB/s | daemon CPU µs per I/O | daemon wake-ups per I/O |", "|---|---|---|---|---|"]
    for kind, boots in runs.items():
        cells = []
        for key, fmt in (("iops", "{:,.0f}"), ("mib_s", "{:,.1f}"), ("cpu_us", "{:.1f}"), ("wakeups", "{:.2f}")):
            vals = [b[key] for b in boots]
            cells.append(", ".join(fmt.format(v) for v in vals)
                         + (f" (median {fmt.format(statistics.median(vals))})" if len(vals) > 1 else ""))
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--platform", default="a", choices=("a", "b"))
    ap.add_argument("--cache", default="never", choices=("never", "auto"))
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--kinds", default="ours,rust")
    ap.add_argument("--size-mib", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--job", default="--rw=randwrite --bs=4k", help="fio options of the measured job")
    a = ap.parse_args(argv)
    kinds = a.kinds.split(",")
    runs: dict = {k: [] for k in kinds}
    for rnd in range(a.pairs):
        for kind in round_order(kinds, rnd):
            res = one_boot(kind, a.platform, a.cache, a.job, a.size_mib, a.seconds)
            runs[kind].append(res)
            print(f"[{time.strftime('%H:%M:%S')}] pair {rnd + 1} {kind}: {res['iops']:,.0f} IOPS, "
                  f"{res['mib_s']:,.1f} MiB/s, {res['cpu_us']:.1f} µs CPU and {res['wakeups']:.2f} wake-ups "
                  "per I/O", file=sys.stderr, flush=True)
    print(f"platform {a.platform}, cache={a.cache}, fio {a.job} ({a.size_mib} MiB, {a.seconds:g} s), "
          f"{a.pairs} pairs\n")
    print("\n".join(report(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
