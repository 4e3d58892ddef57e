"""Memory and start-up footprint of a daemon's whole process tree.

- ``tree_memory(pid)``: summed PSS, RSS, USS (private) of ``pid`` and every
  descendant, from ``/proc/PID/smaps``, without the guest's RAM (the memfd
  QEMU shares: pages of it a daemon touched count in its RSS, but they are
  the guest's memory, for either daemon). PSS splits
  pages shared between the processes (our forked workers share the
  interpreter and the imported modules with the supervisor), so the sum
  of PSS is what the tree really costs; the sum of RSS counts shared pages
  once per process.
- ``startup_seconds(kind)``: from ``exec`` of the daemon to the moment its
  vhost-user socket accepts a connection (the probe connection is then
  closed and the daemon stopped: both daemons serve exactly one front-end).
- ``populate(dir, n)``: n empty files for the "guest looked up N files" run.
- ``interpreter_floor()``: the tree PSS of the smallest possible
  three-process Python daemon: one ``python3`` started as the daemon is
  (same interpreter, site imported), importing nothing, that forks two
  children, all idle. Our design needs three interpreters (supervisor,
  hiprio worker, request worker), so no change to our code can bring the
  tree below this figure; the bench reports it beside the memory goal.

    python -m tests.perf.footprint [--runs 5]     # start-up times of both daemons
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import daemon_command
from tests.guest.harness import process_tree
from tests.procfs import fd_count

import subprocess


# QEMU's guest RAM (tests/guest/vm.py: memory-backend-memfd,id=mem; QEMU
# names the memfd after the backend type, as /proc/PID/maps shows): both
# daemons map it and every page they read or write a request into counts in
# their RSS, although it is the guest's memory, not the daemon's.
GUEST_RAM_MAPPING = "/memfd:memory-backend-memfd (deleted)"


def _smaps(pid: int, exclude: str | None) -> dict[str, int]:
    """Rss/Pss/Private_* of one process, in bytes, leaving out the mappings
    named ``exclude``."""
    out = {"Rss": 0, "Pss": 0, "Private_Clean": 0, "Private_Dirty": 0}
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return {}
    skip = False
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if not parts[0].endswith(":"):  # a mapping header: "start-end perms offset dev inode [name]"
            name = " ".join(parts[5:]) if len(parts) > 5 else ""
            skip = exclude is not None and name == exclude
            continue
        if not skip and len(parts) >= 3 and parts[2] == "kB":
            key = parts[0][:-1]
            if key in out:
                out[key] += int(parts[1]) * 1024
    return out


def tree_memory(pid: int, exclude: str | None = GUEST_RAM_MAPPING) -> dict:
    """{'pss', 'rss', 'uss', 'processes': [(pid, comm, pss, rss)]} of pid's
    tree, without the guest RAM mapping (``exclude``)."""
    total = {"pss": 0, "rss": 0, "uss": 0, "processes": []}
    for p, _ppid, comm in process_tree(pid):
        r = _smaps(p, exclude)
        if not r:
            continue
        uss = r["Private_Clean"] + r["Private_Dirty"]
        total["pss"] += r["Pss"]
        total["rss"] += r["Rss"]
        total["uss"] += uss
        total["processes"].append((p, comm, r["Pss"], r["Rss"]))
    return total


def tree_fds(pid: int) -> list[tuple[str, int]]:
    """(comm, open fd count) of every process of pid's tree."""
    out = []
    for p, _ppid, comm in process_tree(pid):
        try:
            out.append((comm, fd_count(p)))
        except OSError:
            pass
    return out


def startup_seconds(kind: str, extra_args=(), timeout: float = 20.0) -> float:
    """Seconds from spawning the daemon until its socket accepts a connection."""
    run_dir = tempfile.mkdtemp(prefix=f"bench-start-{kind}-")
    shared = os.path.join(run_dir, "shared")
    os.mkdir(shared)
    sock_path = os.path.join(run_dir, "vhost.sock")
    cmd = daemon_command(kind, sock_path, shared, "auto", extra_args)
    repo = Path(__file__).resolve().parents[2]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=str(repo), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(sock_path)
                took = time.monotonic() - t0
                return took
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            finally:
                s.close()
            if proc.poll() is not None:
                raise RuntimeError(f"{kind} daemon exited with {proc.returncode} before accepting")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"{kind} daemon did not accept within {timeout} s")
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def startup_median(kind: str, runs: int = 5, extra_args=()) -> dict:
    times = [startup_seconds(kind, extra_args) for _ in range(runs)]
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": runs}


_FLOOR_SCRIPT = """
import os, sys, time
for _ in range(2):
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
sys.stdout.write("ready\\n")
sys.stdout.flush()
time.sleep(60)
"""


def interpreter_floor(settle: float = 1.0) -> dict:
    """``tree_memory`` of a bare ``python3`` (this interpreter) that has
    forked two idle children: three interpreters sharing what fork shares."""
    proc = subprocess.Popen([sys.executable, "-c", _FLOOR_SCRIPT], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, start_new_session=True)
    try:
        if proc.stdout.readline() != b"ready\n":
            raise RuntimeError("the floor interpreter did not start")
        time.sleep(settle)
        mem = tree_memory(proc.pid)
        if len(mem["processes"]) != 3:
            raise RuntimeError(f"floor tree has {len(mem['processes'])} processes, not 3")
        return mem
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
        proc.stdout.close()


def populate(directory: str | os.PathLike, n: int) -> None:
    """``n`` empty files f0000000... in ``directory`` (created if needed)."""
    os.makedirs(directory, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(n):
            os.close(os.open(f"f{i:07d}", flags, 0o644, dir_fd=dfd))
    finally:
        os.close(dfd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="start-up time of both daemons")
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args(argv)
    for kind in ("ours", "c"):
        r = startup_median(kind, a.runs)
        print(f"{kind:5s} socket accepting after {r['median'] * 1000:.0f} ms "
              f"(min {r['min'] * 1000:.0f}, max {r['max'] * 1000:.0f}, {a.runs} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
