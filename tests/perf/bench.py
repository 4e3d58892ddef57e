"""``make bench``: pyvirtiofsd against QEMU 7.2's C virtiofsd and the Rust
virtiofsd 1.13, as ratios.

    python -m tests.perf.bench [--quick] [--rounds N] [--parallel-rounds N] [--platforms a,b]
                               [--skip-guest] [--skip-frontend] [--skip-parallel]
                               [--skip-rootfs] [--out docs/perf]

Five parts, each run against our daemon first and the baselines after it,
in the same run (absolute figures depend on the machine and on whatever
else runs on it; only ratios measured side by side mean anything):

1. **Real guest** (tests/guest, 2 vCPUs, one request queue) on each
   platform: a = Debian's 6.1 kernel under QEMU 7.2 TCG, b = Linux 6.12
   under QEMU 10 (tests/guest/platforms.py); once with ``--cache never`` /
   ``-o cache=none`` and once with ``auto``: fio psync sequential write and read (1 MiB blocks, a 256 MiB
   file), random read and write (4 KiB, time based); per-request round
   trips (fstat, stat of a path, 4 KiB direct read); the metadata workload
   (create, stat, readdir, unlink of 10,000 small files; untar and rm -rf
   of a source tree of 3,000 files). See tests/perf/guest_workloads/.
2. **Parallel, platform b**: the guest runs fio with two jobs and two
   metadata processes, each pinned to its own vCPU and both starting each
   phase together (tests/perf/guest_workloads/parallel.sh): ours with 2 request queues
   (with its defaults, and again with ``--no-xattr``, the Rust daemon's
   default: with extended attributes a guest asks GETXATTR before every
   WRITE) against the Rust daemon with its one (a second queue hangs it),
   ``--parallel-rounds`` interleaved runs of each (ours, Rust, ours,
   Rust...), the median of each figure kept and its spread reported. A run
   that fails is reported as such, never waited on forever (idle and hard
   timeouts of run_guest).
3. **Daemon-bound, no guest**: the vhost-user test frontend keeps 1 or 64
   requests in flight (tests/perf/frontend_bench.py) and counts GETATTR,
   LOOKUP, 4 KiB READ, 1 MiB READ and 4 KiB READDIR and READDIRPLUS
   replies per second, and the CPU time
   the daemon's whole process tree spent per request (user + system from
   /proc, over exactly the requests it served: ours is supervisor + workers,
   the C and Rust daemons are one process with threads).
4. **Footprint**: PSS (and RSS) of each daemon's whole process tree with the
   guest attached and idle, and after the guest looked up 100,000 files
   (cache=auto boot; fewer, for both, where the hard RLIMIT_NOFILE cannot
   hold an fd per inode); time from exec to the socket accepting. Then,
   ours only, one more boot where the guest looks up 100,000 files with
   ``--inode-file-handles=prefer`` (fds bounded, so the limit does not
   apply); and the tree PSS of three bare python3 processes, the floor of
   any daemon of our shape.
5. **Root file system** (tests/perf/rootfs_bench.py): a Debian 12 minimal
   root on virtio-fs booted to multi-user, ``dpkg -i`` of python3 and its
   dependencies, ``dpkg --verify``, a reboot to multi-user; ours, C and
   Rust on platforms a and b (each started as for a root: ROOT_DAEMON_OPTS
   of tests/guest/rootfs_boot.py); seconds, so those ratios are baseline /
   ours; and ours' FUSE requests and time per opcode in each phase.

Every throughput ratio is ours / C and ours / Rust (> 1: we are faster).
Each guest boot and each frontend measurement is repeated ``--rounds``
times, alternating the daemons, and the best of each is kept: the machine is shared
(2 cores), and a neighbour's burst only ever makes a run slower. The guest
part also reports every round, and ours / each baseline within each round,
and counts the rows below a baseline in every round apart from those below
in the best-of only (the rounds disagree: within their spread).

Writes ``docs/perf/results.md``, ``docs/perf/results.json`` and
``docs/perf/ratios.png`` (matplotlib, the ``bench`` extra). Prints the ratio table. Never fails on a ratio:
the benchmark only reports.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.conftest import C_VIRTIOFSD, start_daemon  # noqa: E402
from tests.guest.platforms import PLATFORMS, qemu_version, rust_virtiofsd_argv  # noqa: E402
from tests.guest.vm import guest_path  # noqa: E402
from tests.perf import footprint, frontend_bench, rootfs_bench  # noqa: E402

WORKLOADS = Path(__file__).resolve().parent / "guest_workloads"
# the guest sees the host root read-only (tests/guest/vm.py), except where
# it mounts its own tmpfs: keep the tarball cache out of /tmp and /run
CACHE_DIR = (REPO / ".cache" / "bench" if not str(REPO).startswith(("/tmp/", "/run/"))
             else Path("/var/tmp/pyvirtiofsd-bench"))
KINDS = ("ours", "c", "rust")
BASELINES = ("c", "rust")
KIND_LABEL = {"ours": "ours", "c": "C", "rust": "Rust", "ours-noxattr": "ours --no-xattr"}
# the parallel part: (name, daemon, request queues, more daemon options).
# "ours-noxattr" is ours without extended attributes, as the Rust daemon
# runs by default: with them a guest sends a GETXATTR of
# security.capability before every WRITE (docs/perf/queues.md), so only
# that pair compares the same work
PARALLEL = (("ours", "ours", 2, ()), ("ours-noxattr", "ours", 2, ("--no-xattr",)), ("rust", "rust", 1, ()))

# the parallel part has its own sizes and rounds: its figures are medians of
# interleaved rounds (ours, Rust, ours, Rust...), and each fio job of it must
# move enough data (par_seq_mib / 2) that a neighbour's burst is not the figure.
# Seven rounds: one daemon's sequential read moves 3x between boots and a cold
# stat phase lasts a second, so five left a median within noise of 1.0
# (docs/perf/queues.md, "Page faults"); seven cost the bench 7 minutes more
FULL = dict(seq_mib=256, rand_seconds=8, files=10_000, tar_files=3000, lat_count=2000,
            footprint_files=100_000, large_files=100_000, frontend_seconds=3.0, rounds=2, startup_runs=5,
            par_files=10_000, par_seq_mib=512, par_rand_seconds=8, par_rounds=7,
            rootfs_set="python3", rootfs_verify_all=True)
QUICK = dict(seq_mib=32, rand_seconds=3, files=1000, tar_files=500, lat_count=500,
             footprint_files=10_000, large_files=20_000, frontend_seconds=1.0, rounds=1, startup_runs=3,
             par_files=1000, par_seq_mib=256, par_rand_seconds=4, par_rounds=3,
             rootfs_set="small", rootfs_verify_all=False)

# (key, label, section) in table order; the value of a key is "higher is better"
GUEST_PHASES = [
    ("seq-write", "seq write 1 MiB (MiB/s)"),
    ("seq-read", "seq read 1 MiB (MiB/s)"),
    ("rand-read", "rand read 4 KiB (IOPS)"),
    ("rand-write", "rand write 4 KiB (IOPS)"),
    ("lat-getattr", "fstat round trips (/s)"),
    ("lat-lookup", "stat path round trips (/s)"),
    ("lat-read4k", "4 KiB read round trips (/s)"),
    ("create", "create small files (/s)"),
    ("stat", "stat, cold (/s)"),
    ("readdir", "readdir, cold (entries/s)"),
    ("unlink", "unlink, cold (/s)"),
    ("untar", "untar source tree (files/s)"),
    ("rmtree", "rm -rf source tree (files/s)"),
    ("lookup", "look up N files, cold (/s)"),
]
PARALLEL_PHASES = [
    ("par-seq-write", "seq write 1 MiB, 2 jobs (MiB/s)"),
    ("par-seq-read", "seq read 1 MiB, 2 jobs (MiB/s)"),
    ("par-rand-read", "rand read 4 KiB, 2 jobs (IOPS)"),
    ("par-rand-write", "rand write 4 KiB, 2 jobs (IOPS)"),
    ("par-create", "create small files, 2 processes (/s)"),
    ("par-stat", "stat, cold, 2 processes (/s)"),
    ("par-readdir", "readdir, cold, 2 processes (entries/s)"),
    ("par-unlink", "unlink, cold, 2 processes (/s)"),
]
FRONTEND_OPS = frontend_bench.OPS
FRONTEND_DEPTHS = (1, 64)
OP_LABEL = {"getattr": "GETATTR", "lookup": "LOOKUP", "read4k": "READ 4 KiB", "read1m": "READ 1 MiB",
            "readdir": "READDIR 4 KiB", "readdirplus": "READDIRPLUS 4 KiB"}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- setup -------------------------------------------------------------------------
def ensure_matplotlib():
    try:
        import matplotlib
    except ImportError:
        sys.exit("bench: matplotlib is missing: pip install -e '.[bench]' (make bench does)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def source_tarball(n_files: int) -> Path:
    """A tar of the first ``n_files`` regular files under /usr/include (cached)."""
    path = CACHE_DIR / f"src-tree-{n_files}.tar"
    if path.exists():
        return path
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    files = []
    for root, dirs, names in os.walk("/usr/include"):
        dirs.sort()
        for name in sorted(names):
            p = os.path.join(root, name)
            if os.path.isfile(p) and not os.path.islink(p):
                files.append(p)
                if len(files) == n_files:
                    break
        if len(files) == n_files:
            break
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as t:
        for p in files:
            t.add(p, arcname=os.path.relpath(p, "/usr/include"))
    tmp.rename(path)
    return path


def _version(argv) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "?"


def machine_info() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    guest = {}
    for name, plat in PLATFORMS.items():
        try:
            from tests.guest.kernel import ensure_kernel
            kernel = Path(ensure_kernel(plat.kernel)[0]).parent.name.removeprefix("kernel-")
        except Exception:  # noqa: BLE001
            kernel = "?"
        guest[name] = f"{qemu_version(name)}, Linux {kernel}"
    commit = _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "host_kernel": platform.release(),
        "os": _version(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"]),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "python": platform.python_version(),
        "platform_a": guest["a"],
        "platform_b": guest["b"],
        "c_virtiofsd": _version([C_VIRTIOFSD, "--version"]),
        "rust_virtiofsd": _version([*rust_virtiofsd_argv(), "--version"]),
        "fio": _version(["fio", "--version"]),
        "pyvirtiofsd": f"{commit}{' (modified)' if dirty else ''}",
        "loadavg_start": os.getloadavg(),
    }


def raise_nofile() -> int:
    """Both daemons inherit our RLIMIT_NOFILE, and each holds one fd per
    inode the guest knows: give them what a service manager would (the C
    daemon raises its own soft limit to the hard one; ours may not be able
    to raise the hard limit once confined)."""
    import resource
    try:
        want = int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        want = 1 << 20
    want = min(want, 1 << 20)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- part 1: real guest ------------------------------------------------------------------
def guest_command(p: dict, tarball: Path | None, footprint_dir: str | None, cache: str) -> str:
    """run.sh with every workload; ``tarball=None``: only the footprint
    (no fio, no round trips, no file phases)."""
    if tarball is None:
        return " ".join(shlex.quote(str(x)) for x in (
            "python3", guest_path(WORKLOADS / "metadata.py"), "/mnt/bench-meta", "--files", 0,
            "--footprint", f"/mnt/{footprint_dir}"))
    # round trips only where the guest cannot answer them from its caches
    lat = p["lat_count"] if cache == "never" else 0
    return " ".join(shlex.quote(str(x)) for x in (
        "sh", guest_path(WORKLOADS / "run.sh"), "/mnt", p["seq_mib"], p["rand_seconds"], p["files"], tarball,
        footprint_dir or "-", lat))


def parallel_command(p: dict) -> str:
    return " ".join(shlex.quote(str(x)) for x in (
        "sh", guest_path(WORKLOADS / "parallel.sh"), "/mnt", p["par_seq_mib"], p["par_rand_seconds"],
        p["par_files"]))


def guest_run(kind: str, cache: str, p: dict, tarball: Path | None, with_footprint: bool,
              footprint_files: int | None = None, extra_args=(), platform: str = "a",
              num_request_queues: int = 1, command: str | None = None) -> dict:
    """One boot against a fresh daemon; {phase: {...}} plus 'memory'.
    ``tarball=None``: the footprint only, of ``footprint_files`` files;
    ``command``: this guest command instead of run.sh's."""
    from tests.guest.vm import run_guest

    work = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-{cache}-{platform}-"))
    shared = work / "shared"
    shared.mkdir()
    fp_dir = None
    if with_footprint:
        fp_dir = "footprint"
        footprint.populate(shared / fp_dir, footprint_files or p["footprint_files"])
    d = start_daemon(kind, shared, cache, extra_args, run_dir=str(work))
    console = work / "console.log"
    memory: dict = {}
    state = {"idle": False, "looked": False}

    def at_marks(text: str) -> None:
        # measure memory at the guest's markers
        if not state["idle"] and "@@BENCH-IDLE@@" in text:
            state["idle"] = True
            time.sleep(1.0)
            memory["idle"] = footprint.tree_memory(d.pid)
        if not state["looked"] and "@@BENCH-LOOKED-UP@@" in text:
            state["looked"] = True
            time.sleep(1.0)
            memory["looked_up"] = footprint.tree_memory(d.pid)
            memory["looked_up"]["fds"] = footprint.tree_fds(d.pid)

    watch = console_watch(console, d, kind, at_marks)
    t0 = time.monotonic()
    where = f"platform {platform}" + (f", {num_request_queues} queues" if num_request_queues > 1 else "")
    try:
        r = run_guest(d.socket_path, command or guest_command(p, tarball, fp_dir, cache), timeout=1500,
                      console_log=console, idle_timeout=300, abort_if=watch, platform=platform,
                      num_request_queues=num_request_queues)
    finally:
        d.stop(10)
    took = time.monotonic() - t0
    phases, failures = parse_output(r.output)
    failed = r.exit_status != 0 or bool(failures)
    if failed:
        log(f"  {kind} cache={cache} {where}: guest status {r.exit_status} {failures}\n"
            + r.describe(tail=25) + "\ndaemon log tail:\n" + "\n".join(d.log().splitlines()[-15:]))
    log(f"  {kind:4s} cache={cache} {where}: {took:.0f} s, " + ", ".join(
        f"{k} {value(k, v):,.0f}" for k, v in phases.items()))
    shutil.rmtree(work, ignore_errors=True)
    return {"phases": phases, "memory": memory, "seconds": took, "status": r.exit_status,
            "failures": failures + ([r.aborted or "timed out"] if r.aborted or r.timed_out else [])}


def parse_output(output: str) -> tuple[dict, list[str]]:
    """The guest's ``BENCH {...}`` lines as {phase: fields}, and its
    ``BENCH-FAIL`` lines (tests/perf/guest_workloads/run.sh)."""
    phases, failures = {}, []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("BENCH {"):
            obj = json.loads(line[6:])
            phases[obj.pop("phase")] = obj
        elif line.startswith("BENCH-FAIL"):
            failures.append(line)
    return phases, failures


def value(phase: str, obj: dict) -> float:
    """The higher-is-better figure of a guest phase."""
    if "bw_bytes" in obj and phase.startswith("seq"):
        return obj["bw_bytes"] / (1 << 20)
    if "iops" in obj:
        return obj["iops"]
    return obj["ops"] / obj["seconds"] if obj.get("seconds") else 0.0


def console_watch(console: Path, daemon, kind: str, on_text):
    """``run_guest``'s ``abort_if`` (polled every 0.2 s): hand the guest
    console's text so far to ``on_text`` (nothing while the file cannot be
    read yet), then stop the run if the daemon exited."""
    def watch():
        try:
            text = console.read_text(errors="replace")
        except OSError:
            return None
        on_text(text)
        if daemon.proc.poll() is not None:
            return f"the {kind} daemon exited with {daemon.proc.returncode}"
        return None
    return watch


def round_order(kinds, rnd: int) -> list:
    """The daemons of round ``rnd`` in the order they run: as given in
    even rounds, reversed in odd ones (ours, C, Rust, then Rust, C,
    ours...), so that the host's speed drifting through a round does not
    favour whoever runs first in every round."""
    return list(kinds) if rnd % 2 == 0 else list(reversed(kinds))


def guest_part(p: dict, rounds: int, platform: str) -> dict:
    """{cache: {"best": {kind: {phase: value}}, "runs": {kind: {phase:
    [value or None, one per round]}}, "memory": {kind: ...}}} of one
    platform; the footprint lookup only on platform a, in each daemon's
    first cache=auto boot. ``runs`` keeps every round, so a figure below a
    baseline can be told from the rounds' own spread (paired_rounds)."""
    tarball = source_tarball(p["tar_files"])
    out = {}
    for cache in ("never", "auto"):
        best = {k: {} for k in KINDS}
        runs: dict = {k: {} for k in KINDS}
        memory = {}
        for rnd in range(rounds):
            for kind in round_order(KINDS, rnd):
                res = guest_run(kind, cache, p, tarball, platform=platform,
                                with_footprint=(cache == "auto" and rnd == 0 and platform == "a"))
                for phase, obj in res["phases"].items():
                    v = value(phase, obj)
                    if v > best[kind].get(phase, -1):
                        best[kind][phase] = v
                    runs[kind].setdefault(phase, [None] * rounds)[rnd] = v
                # every boot measures "idle"; only the first also "looked_up"
                memory.setdefault(kind, {}).update(res["memory"])
        out[cache] = {"best": best, "runs": runs, "memory": memory}
    return out


def paired_rounds(ours: list, base: list) -> list[float]:
    """ours / baseline within each round that measured both: the two ran
    minutes apart in the same round, so a host drifting over the whole run
    moves both (round_order also swaps who goes first)."""
    return [o / b for o, b in zip(ours, base) if o is not None and b]


def round_verdict(ratios: list[float]) -> str | None:
    """"below": ours below the baseline in every round (at least two);
    "above": in none; "mixed": the rounds disagree, so the best-of ratio
    is within the rounds' own spread. None: fewer than two rounds."""
    if len(ratios) < 2:
        return None
    below = sum(r < 1.0 for r in ratios)
    return "below" if below == len(ratios) else "above" if below == 0 else "mixed"


def parallel_part(p: dict, rounds: int) -> dict:
    """Platform b, cache=auto: {kind: {"queues": n, "runs": {phase: [value
    per round]}, "median": {phase: value}, "failures": [...]}} for
    PARALLEL's daemons, run interleaved (ours, Rust, ours, Rust...) so that
    a change of load on the shared machine hits both alike. The figure of a
    phase is the median of its rounds, its spread the lowest and highest
    (spread()). A failed run keeps the figures it printed and says what
    failed."""
    out: dict = {}
    for rnd in range(rounds):
        for name, kind, queues, extra in PARALLEL:
            load = os.getloadavg()[0]
            res = guest_run(kind, "auto", p, None, False, extra_args=extra, platform="b",
                            num_request_queues=queues, command=parallel_command(p))
            o = out.setdefault(name, {"queues": queues, "runs": {}, "median": {}, "failures": [], "load": []})
            o["load"].append(round(max(load, os.getloadavg()[0]), 1))
            for phase, obj in res["phases"].items():
                o["runs"].setdefault(phase, []).append(value(phase, obj))
            if res["status"] != 0 or res["failures"]:
                o["failures"].append(f"round {rnd + 1}: guest status {res['status']} "
                                     + "; ".join(res["failures"]))
    for o in out.values():
        o["median"] = {phase: statistics.median(vals) for phase, vals in o["runs"].items()}
    return out


def spread(vals: list[float]) -> str:
    """``median (lowest–highest, n runs)`` of one phase's rounds."""
    if not vals:
        return "–"
    return f"{_fmt(statistics.median(vals))} ({_fmt(min(vals))}–{_fmt(max(vals))}, n={len(vals)})"


def large_footprint_part(p: dict) -> dict | None:
    """Ours only: the guest looks up ``large_files`` files (the issue's
    100,000) with --inode-file-handles=prefer, whose bounded fd cache lets
    a guest know more inodes than RLIMIT_NOFILE allows fds. The C daemon
    holds one O_PATH fd per inode, so it cannot on a machine whose hard
    RLIMIT_NOFILE is below that (20,000 on ours): no C figure."""
    n = p["large_files"]
    res = guest_run("ours", "auto", p, None, True, footprint_files=n,
                    extra_args=("--inode-file-handles", "prefer"))
    looked = res["memory"].get("looked_up")
    lookup = res["phases"].get("lookup")
    if not looked or not lookup or lookup.get("ops") != n:
        log(f"  large footprint: no figure (phases {res['phases']}, status {res['status']})")
        return None
    return {"files": n, "memory": looked, "idle": res["memory"].get("idle"),
            "lookups_per_second": value("lookup", lookup)}


# -- part 2: daemon-bound ---------------------------------------------------------------
def daemon_rates(kind: str, ops, depths, seconds: float, extra_args=(), env=None,
                 cpu: dict | None = None) -> dict:
    """{"op-dDEPTH": requests/s} of one daemon started on a fresh share and
    driven by the vhost-user test frontend (no guest). ``env``: extra
    environment of the daemon (PYVIRTIOFSD_PURE=1: docs/compiled.md).
    ``cpu``: filled with {"op-dDEPTH": the daemon's CPU µs per request}."""
    from tests.frontend.fuse_client import FuseClient
    from tests.frontend.vhost import start_frontend
    from tests.perf.frontend_bench import rate_and_cpu, requests_per_second

    shared = tempfile.mkdtemp(prefix=f"bench-fe-{kind}-")
    d = start_daemon(kind, shared, "auto", extra_args=extra_args, env=env)
    fe = None
    try:
        fe = start_frontend(d.socket_path, ram_size=256 << 20, num_request_queues=1, queue_size=1024)
        fc = FuseClient(fe)
        fc.init()
        requests_per_second(fc, "read1m", 1, 0.2)  # creates the data file; warms up
        rates = {}
        for op in ops:
            for depth in depths:
                key = f"{op}-d{depth}"
                rates[key], us = rate_and_cpu(fc, d.pid, op, depth, seconds)
                if cpu is not None:
                    cpu[key] = us
        return rates
    finally:
        if fe is not None:
            fe.close()
        d.stop(5)
        shutil.rmtree(shared, ignore_errors=True)


def frontend_part(p: dict, rounds: int) -> dict:
    """{kind: {"op-dDEPTH": best requests/s, "cpu:op-dDEPTH": least daemon
    CPU µs per request}} (one request queue)."""
    best: dict = {k: {} for k in KINDS}
    for rnd in range(rounds):
        for kind in round_order(KINDS, rnd):
            cpu: dict = {}
            rates = None
            for attempt in (1, 2):
                try:
                    rates = daemon_rates(kind, FRONTEND_OPS, FRONTEND_DEPTHS, p["frontend_seconds"], cpu=cpu)
                    break
                except (OSError, TimeoutError, RuntimeError) as e:
                    # one daemon failing one run (seen once: Rust 1.13 never
                    # completing an INIT) costs that run, not the whole bench
                    log(f"  {kind:4s} round {rnd + 1}, attempt {attempt}: FAILED: {e!r}")
            if rates is None:
                continue
            for key, rate in rates.items():
                best[kind][key] = max(best[kind].get(key, 0.0), rate)
                best[kind]["cpu:" + key] = min(best[kind].get("cpu:" + key, cpu[key]), cpu[key])
            log(f"  {kind:4s} round {rnd + 1}: " + ", ".join(
                f"{k} {best[kind][k]:,.0f}/s {best[kind]['cpu:' + k]:.1f} µs CPU" for k in rates))
    return best


# -- report ----------------------------------------------------------------------------
def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def _row(section: str, name: str, label: str, figures: dict, **more) -> dict:
    """A table row: each daemon's figure (None: not measured) and ours /
    each baseline ("ratio": ours / C, "ratio_rust": ours / Rust)."""
    o = figures.get("ours")
    return {"section": section, "name": name, "label": label, **{k: figures.get(k) for k in KINDS},
            "ratio": _ratio(o, figures.get("c")), "ratio_rust": _ratio(o, figures.get("rust")), **more}


def build_rows(guest: dict | None, fe: dict | None, start: dict, p: dict, parallel: dict | None = None,
               rootfs: dict | None = None) -> list[dict]:
    rows = []
    if rootfs:
        rows += rootfs_bench.rows(rootfs, _row)
    for plat, g in (guest or {}).items():
        for cache in ("never", "auto"):
            b = g[cache]["best"]
            runs = g[cache].get("runs", {})   # results written before runs were kept have none
            for key, label in GUEST_PHASES:
                if key in b["ours"] and any(key in b[k] for k in BASELINES):
                    if key == "lookup":
                        label = f"look up {p['footprint_files']:,} files, cold (/s)"
                    more = {}
                    if runs:
                        rounds = {k: runs.get(k, {}).get(key, []) for k in KINDS}
                        more["rounds"] = rounds
                        for base, field in (("c", "rounds_ratio"), ("rust", "rounds_ratio_rust")):
                            more[field] = paired_rounds(rounds["ours"], rounds[base])
                    rows.append(_row(f"guest, platform {plat}, cache={cache}", f"{plat}/{cache}/{key}", label,
                                     {k: b[k].get(key) for k in KINDS}, **more))
    if parallel:
        # each daemon with its defaults; then, if measured, ours without
        # extended attributes against the same Rust runs (its default)
        pairs = [("", {k: k for k in parallel if k in KINDS})]
        if "ours-noxattr" in parallel:
            pairs.append(("-noxattr", {"ours": "ours-noxattr", **{k: k for k in BASELINES if k in parallel}}))
        for suffix, names in pairs:
            section = ("parallel, platform b, cache=auto: "
                       + ", ".join(f"{KIND_LABEL[n]} with {parallel[n]['queues']} request queue"
                                   f"{'s' if parallel[n]['queues'] > 1 else ''}" for n in names.values()))
            for key, label in PARALLEL_PHASES:
                figs = {k: parallel[n]["median"].get(key) for k, n in names.items()}
                if any(v is not None for v in figs.values()):
                    rows.append(_row(section, f"b{suffix}/{key}", label, figs))
    if fe:
        for op in FRONTEND_OPS:
            for depth in FRONTEND_DEPTHS:
                key = f"{op}-d{depth}"
                label = OP_LABEL[op] + f", depth {depth} (/s)"
                if all(key in fe[k] for k in KINDS):
                    rows.append(_row("daemon-bound (vhost-user test frontend)", key, label,
                                     {k: fe[k][key] for k in KINDS}))
        for op in FRONTEND_OPS:
            for depth in FRONTEND_DEPTHS:
                key = f"{op}-d{depth}"
                if not all("cpu:" + key in fe[k] for k in KINDS):
                    continue
                label = OP_LABEL[op] + f", depth {depth} (µs)"
                figs = {k: fe[k]["cpu:" + key] for k in KINDS}
                row = _row("daemon CPU per request, whole process tree (lower is better)",
                           "cpu-" + key, label, figs, lower_better=True)
                # lower is better: the ratios are baseline / ours
                row["ratio"] = _ratio(figs["c"], figs["ours"])
                row["ratio_rust"] = _ratio(figs["rust"], figs["ours"])
                rows.append(row)
    if start:
        o = start["ours"]["median"]
        row = _row("footprint (without the guest RAM mapping)", "startup", "exec → socket accepting (ms)",
                   {k: start[k]["median"] * 1000 for k in KINDS}, lower_better=True,
                   goal=f"ours ≤ 250 ms: {'met' if o <= 0.25 else 'NOT met'}")
        # lower is better: the ratios are baseline / ours
        row["ratio"] = _ratio(start["c"]["median"], o)
        row["ratio_rust"] = _ratio(start["rust"]["median"], o)
        rows.append(row)
    if guest and "a" in guest:
        mem = guest["a"]["auto"]["memory"]
        for when, label in (("idle", "PSS, guest attached, idle (MiB)"),
                            ("looked_up", f"PSS, {p['footprint_files']:,} files looked up (MiB)")):
            if when in mem.get("ours", {}) and when in mem.get("c", {}):
                o = mem["ours"][when]
                c = mem["c"][when]
                r = mem.get("rust", {}).get(when)
                bound = 1.5 * c["rss"]
                row = _row("footprint (without the guest RAM mapping)", f"pss-{when}", label,
                           {"ours": o["pss"] / (1 << 20), "c": c["pss"] / (1 << 20),
                            "rust": r["pss"] / (1 << 20) if r else None},
                           c_rss=c["rss"] / (1 << 20), ours_rss=o["rss"] / (1 << 20), lower_better=True,
                           goal=f"ours PSS {o['pss'] / (1 << 20):.1f} ≤ 1.5 × C RSS "
                                f"{c['rss'] / (1 << 20):.1f} = {bound / (1 << 20):.1f}: "
                                f"{'met' if o['pss'] <= bound else 'NOT met'}")
                row["ratio"] = _ratio(bound, o["pss"])
                row["ratio_rust"] = _ratio(1.5 * r["rss"], o["pss"]) if r else None
                rows.append(row)
    return rows


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


def _fmt_ratio(v, note: str = "") -> str:
    if v is None:
        return "–"
    return f"{v:.2f}{'' if v >= 1.0 else ' ⚠'}{note}"


def render_table(rows: list[dict]) -> str:
    lines = []
    section = None
    for r in rows:
        if r["section"] != section:
            section = r["section"]
            lines += ["", f"**{section}**", "", "| measurement | ours | C | Rust | ours / C | ours / Rust |",
                      "|---|---:|---:|---:|---:|---:|"]
        note = ""
        if r["name"].startswith("pss-"):
            note = " (1.5 × RSS / ours PSS)"
        elif r["name"] == "startup" or r["name"].startswith(("cpu-", "rootfs/")):
            note = " (baseline / ours)"
        lines.append(f"| {r['label']} | {_fmt(r['ours'])} | {_fmt(r['c'])} | {_fmt(r['rust'])} | "
                     f"{_fmt_ratio(r['ratio'], note)} | {_fmt_ratio(r['ratio_rust'], note)} |")
    return "\n".join(lines).lstrip("\n")


def rounds_goal_lines(rows: list[dict]) -> list[str]:
    """The guest rows below a baseline, split by their rounds: below in
    every round, or below in the best-of only (the rounds disagree)."""
    lines = []
    for base, key, field in (("Rust", "ratio_rust", "rounds_ratio_rust"), ("C", "ratio", "rounds_ratio")):
        verdicts = {r["name"]: round_verdict(r.get(field, [])) for r in rows}
        judged = [r for r in rows if verdicts[r["name"]] is not None]
        if not judged:
            continue
        every = [r for r in judged if verdicts[r["name"]] == "below"]
        mixed = [r for r in judged if r[key] is not None and r[key] < 1.0 and verdicts[r["name"]] != "below"]
        # were the daemons equal, a row of k rounds is below in all of them
        # with probability 2**-k (each round a fair coin)
        chance = sum(0.5 ** len(r[field]) for r in judged)
        lines.append(f"- guest rows below {base} in every round (ours / {base} of each round): "
                     f"{len(every)} of {len(judged)} (about {chance:.1f} by chance alone were the daemons equal)"
                     + ("" if not every else ": " + ", ".join(f"{r['name']} ({_fmt_rounds(r[field])})"
                                                              for r in every)))
        if mixed:
            lines.append(f"- below {base} in the best-of only, above it in some round: "
                         + ", ".join(f"{r['name']} ({_fmt_rounds(r[field])})" for r in mixed))
    return lines


def _fmt_rounds(ratios: list[float]) -> str:
    """One row's per-round ratios: "0.94, 0.92, 0.96"."""
    return ", ".join(f"{x:.2f}" for x in ratios)


def render_rounds(rows: list[dict]) -> list[str]:
    """A table of every guest row's rounds: each daemon's figure per
    round and ours / each baseline within the round."""
    rows = [r for r in rows if r.get("rounds")]
    if not rows:
        return []
    md = ["", "## Guest part: every round", "",
          "Each daemon's figure in each round (rounds alternate the order of the daemons), "
          "and ours / C and ours / Rust within each round.", "",
          "| measurement | ours | C | Rust | ours / C | ours / Rust |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [", ".join(_fmt(v) for v in r["rounds"].get(k, [])) or "–" for k in KINDS]
        ratios = [_fmt_rounds(r.get(f, [])) or "–" for f in ("rounds_ratio", "rounds_ratio_rust")]
        md.append(f"| {r['name']} | " + " | ".join(cells + ratios) + " |")
    return md


def render_markdown(rows, info, p, args, guest, elapsed, floor=None, parallel=None, rootfs=None,
                    pending=()) -> str:
    goals = [r["goal"] for r in rows if r.get("goal")]
    ratios = [(r["name"], base, r[key]) for r in rows
              for base, key in (("C", "ratio"), ("Rust", "ratio_rust")) if r[key] is not None]
    below = [(n, b, v) for n, b, v in ratios if v < 1.0]
    md = [
        "# pyvirtiofsd vs QEMU 7.2's C virtiofsd and the Rust virtiofsd 1.13",
        "",
        f"Written by `python -m tests.perf.bench{' --quick' if args.quick else ''}` (`make bench`) "
        f"on {info['date']} in {elapsed / 60:.1f} min. Ratios are ours / C and ours / Rust for throughput "
        "(> 1: ours is faster); every figure is the best of "
        f"{p['rounds']} alternating runs of each daemon (the order reversed every other round) "
        "on a shared 2-core machine"
        + (f" (the parallel part: the median of {p['par_rounds']} interleaved runs)" if parallel else "")
        + ". Platform a: "
        f"{info['platform_a']}; platform b: {info['platform_b']}.",
        "",
    ]
    if pending:
        md += ["**Incomplete:** written after a part finished; not measured (yet): "
               + ", ".join(pending) + ".", ""]
    md += [
        "![ratios](ratios.png)",
        "",
        render_table(rows),
        "",
        "## Goals",
        "",
        f"- every ratio ≥ 1.0: {len(ratios) - len(below)} of {len(ratios)} met"
        + ("" if not below else "; below: " + ", ".join(f"{n} (/{b}) {v:.2f}" for n, b, v in below)),
    ]
    md += [f"- {g}" for g in goals]
    md += rounds_goal_lines(rows)
    for kind, res in (parallel or {}).items():
        for failure in res["failures"]:
            md.append(f"- parallel, {KIND_LABEL[kind]} with {res['queues']} request queue(s) FAILED: {failure}")
    if rootfs:
        md += rootfs_bench.markdown(rootfs)
    md += render_rounds(rows)
    if guest and "a" in guest:
        md += ["", "## Process trees (platform a, cache=auto boot)", ""]
        for kind in KINDS:
            for when, m in guest["a"]["auto"]["memory"].get(kind, {}).items():
                procs = ", ".join(f"{comm} {pss / (1 << 20):.1f}/{rss / (1 << 20):.1f}"
                                  for _pid, comm, pss, rss in m["processes"])
                md.append(f"- {kind} {when}: PSS {m['pss'] / (1 << 20):.1f} MiB, RSS {m['rss'] / (1 << 20):.1f} MiB, "
                          f"USS {m['uss'] / (1 << 20):.1f} MiB — per process PSS/RSS MiB: {procs}")
    large = (guest or {}).get("large")
    if large:
        m = large["memory"]
        fds = ", ".join(f"{comm} {n:,}" for comm, n in m.get("fds", []))
        md.append(f"- ours, {large['files']:,} files looked up (`--inode-file-handles=prefer`: fds bounded, "
                  f"evicted inodes reopened by handle; {large['lookups_per_second']:,.0f} lookups/s): "
                  f"PSS {m['pss'] / (1 << 20):.1f} MiB, RSS {m['rss'] / (1 << 20):.1f} MiB; open fds: {fds}. "
                  "No C figure: it holds one fd per inode, and the hard RLIMIT_NOFILE here is "
                  f"{info.get('daemons_rlimit_nofile', '?')}")
    if floor:
        md.append(f"- floor: three idle python3 processes (one that imported nothing and forked two), "
                  f"what any daemon of our shape costs before its own code: PSS {floor['pss'] / (1 << 20):.1f} MiB, "
                  f"RSS {floor['rss'] / (1 << 20):.1f} MiB (footprint.interpreter_floor)")
    if parallel:
        md += ["", "## Parallel part: median (lowest–highest) of the interleaved rounds", "",
               "| measurement | " + " | ".join(f"{KIND_LABEL[k]}, {v['queues']} q" for k, v in parallel.items())
               + " |", "|---|" + "---:|" * len(parallel)]
        for key, label in PARALLEL_PHASES:
            if any(key in v["runs"] for v in parallel.values()):
                md.append(f"| {label} | " + " | ".join(spread(v["runs"].get(key, [])) for v in parallel.values())
                          + " |")
        md.append("| load average (1 min) at each run | "
                  + " | ".join(", ".join(map(str, v["load"])) for v in parallel.values()) + " |")
    md += ["", "## Workloads", "",
           f"- parallel (platform b): the same fio jobs as two fio jobs ({p['par_seq_mib']} MiB sequential in all, "
           f"random phases {p['par_rand_seconds']} s) and {p['par_files']:,} small files "
           "as two metadata.py processes, each pinned to one vCPU, both starting each phase together "
           "(tests/perf/guest_workloads/parallel.sh); "
           "ours offers 2 request queues, the Rust daemon 1 (it hangs on a second); ours runs twice per round, "
           "with its defaults and with --no-xattr (the Rust daemon's default: with extended attributes the "
           "guest sends a GETXATTR of security.capability before every WRITE).",
           f"- guest: QEMU TCG, 2 vCPUs, 1 GiB, queue size 1024; fio psync, {p['seq_mib']} MiB file, "
           f"random phases {p['rand_seconds']} s; round trips ×{p['lat_count']} (best of 3; cache=never only); "
           f"{p['files']:,} small files; a {p['tar_files']:,}-file tree from /usr/include; "
           f"{p['footprint_files']:,} files looked up for the memory figure. Guest caches are dropped "
           "before each cold phase. Daemons: `--cache never|auto` / `-o cache=none|auto -o xattr -o posix_lock` / "
           "Rust `--cache never|auto --xattr`, otherwise defaults (ours and Rust: sandbox and seccomp on).",
           f"- daemon-bound: tests/perf/frontend_bench.py, {p['frontend_seconds']} s per figure, queue size 1024; "
           "the frontend spins on the used ring (one of the two cores) and kicks only when the daemon asks.",
           f"- root file system: the Debian 12 minimal root of tests/guest/rootfs.py, a fresh copy per boot pair, "
           f"`rootfstype=virtiofs root=TAG rw`, all daemons cache=auto; install set {p['rootfs_set']!r} "
           "(tests/perf/rootfs_bench.py; where the time goes: docs/perf/rootfs.md).",
           "", "## Machine", ""]
    info = dict(info, loadavg_end=os.getloadavg())
    md += [f"- {k}: {v}" for k, v in info.items()]
    return "\n".join(md) + "\n"


def render_chart(rows: list[dict], path: Path) -> None:
    plt = ensure_matplotlib()
    rows = [r for r in rows if r["ratio"] or r["ratio_rust"]]
    labels = [f"{r['section'].split(' (')[0].split(':')[0]}: {r['label']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(rows) + 1.5))
    y = list(range(len(rows)))[::-1]
    for key, offset, color, name in (("ratio", 0.2, "#2a9d8f", "ours / C"),
                                     ("ratio_rust", -0.2, "#e9c46a", "ours / Rust")):
        ys = [yi + offset for yi, r in zip(y, rows) if r[key]]
        xs = [r[key] for r in rows if r[key]]
        ax.barh(ys, xs, height=0.38, color=color, label=name)
        for yi, x in zip(ys, xs):
            ax.text(x, yi, f" {x:.2f}", va="center", fontsize=6)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("ours / baseline (higher is better; footprint rows: goal / ours)")
    ax.set_title("pyvirtiofsd vs the C virtiofsd (QEMU 7.2) and the Rust virtiofsd 1.13")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one round (development)")
    ap.add_argument("--rounds", type=int, help="alternating runs of each daemon (best kept)")
    ap.add_argument("--parallel-rounds", type=int,
                    help="interleaved runs of each daemon in the parallel part (median kept; "
                         "default 7, --quick 3)")
    ap.add_argument("--skip-guest", action="store_true")
    ap.add_argument("--skip-frontend", action="store_true")
    ap.add_argument("--skip-parallel", action="store_true")
    ap.add_argument("--skip-rootfs", action="store_true")
    ap.add_argument("--platforms", default="a,b", help="guest platforms of the guest part (a, b or a,b)")
    ap.add_argument("--out", default=str(REPO / "docs" / "perf"))
    args = ap.parse_args(argv)
    platforms = [x for x in args.platforms.split(",") if x]
    if not platforms or any(x not in PLATFORMS for x in platforms):
        ap.error(f"--platforms: a comma-separated list of {sorted(PLATFORMS)}")
    if os.geteuid() != 0:
        print("bench: needs root (QEMU guest, both daemons)", file=sys.stderr)
        return 2
    nofile = raise_nofile()
    p = dict(QUICK if args.quick else FULL)
    if args.rounds:
        p["rounds"] = args.rounds
    if args.parallel_rounds:
        p["par_rounds"] = args.parallel_rounds
    # both daemons hold one O_PATH fd per inode the guest knows: where the
    # hard RLIMIT_NOFILE is low (20,000 on our CI machines) the "looked up N
    # files" figure uses fewer files than asked, and says so in its label
    fit = max(1000, nofile // 2 - 1000)
    if p["footprint_files"] > fit:
        log(f"RLIMIT_NOFILE {nofile}: footprint lookup of {fit:,} files, not {p['footprint_files']:,}")
        p["footprint_files"] = fit
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_matplotlib()
    t0 = time.monotonic()
    info = machine_info()
    info["daemons_rlimit_nofile"] = nofile
    log(f"machine: {info['cpu']}, {info['cores']} cores, load {info['loadavg_start']}")
    log("start-up time")
    start = {k: footprint.startup_median(k, p["startup_runs"]) for k in KINDS}
    floor = footprint.interpreter_floor()
    parts = {"frontend": not args.skip_frontend, "guest": not args.skip_guest,
             "parallel": not args.skip_parallel, "rootfs": not args.skip_rootfs}
    res = {"guest": None, "large": None, "frontend": None, "parallel": None, "rootfs": None}

    def write(done: str | None) -> tuple[list, float]:
        """Write results.json, results.md and ratios.png from the parts run so
        far: a run stopped later (a session's end, a crash in a later part)
        still leaves the figures it measured, marked incomplete."""
        if done:
            parts[done] = False
        pending = [k for k, todo in parts.items() if todo]
        elapsed = time.monotonic() - t0
        rows = build_rows(res["guest"], res["frontend"], start, p, res["parallel"], res["rootfs"])
        (out / "results.json").write_text(json.dumps(
            {"machine": info, "params": p, "rows": rows, "interpreter_floor": floor, "startup": start,
             "pending": pending, **res}, indent=1, default=str))
        (out / "results.md").write_text(render_markdown(
            rows, info, p, args, dict(res["guest"] or {}, large=res["large"]), elapsed, floor,
            res["parallel"], res["rootfs"], pending))
        render_chart(rows, out / "ratios.png")
        return rows, elapsed

    if parts["frontend"]:
        log("daemon-bound: vhost-user test frontend")
        res["frontend"] = frontend_part(p, p["rounds"])
        write("frontend")
    if parts["guest"]:
        res["guest"] = {}
        for plat in platforms:
            log(f"real guest (QEMU TCG), platform {plat}")
            res["guest"][plat] = guest_part(p, p["rounds"], plat)
            write(None)
        if "a" in res["guest"]:
            log(f"real guest: {p['large_files']:,} files looked up, ours with --inode-file-handles=prefer")
            res["large"] = large_footprint_part(p)
        write("guest")
    if parts["parallel"]:
        log("parallel workloads, platform b: " + ", ".join(f"{KIND_LABEL[n]} with {q} request queue(s)"
                                                           for n, _, q, _ in PARALLEL))
        res["parallel"] = parallel_part(p, p["par_rounds"])
        write("parallel")
    if parts["rootfs"]:
        log(f"root file system on virtio-fs, platform(s) {','.join(platforms)}: boot, dpkg -i, reboot")
        res["rootfs"] = rootfs_bench.rootfs_part(platforms, p["rounds"], p["rootfs_set"], log,
                                                 p["rootfs_verify_all"])
        write("rootfs")
    rows, elapsed = write(None)
    print()
    print(render_table(rows))
    print(f"\nwritten: {out / 'results.md'}, {out / 'ratios.png'} ({elapsed / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
