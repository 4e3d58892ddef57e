"""In-guest metadata workload (stdlib only; runs under the host's python3).

    python3 metadata.py DIR --files N [--tar TARBALL] [--footprint FPDIR]   (N = 0: no file phases)

Phases, each timed on its own and printed as one line
``BENCH {"phase": ..., "seconds": s, "ops": n}``:

- ``create``:  N small files (100 bytes each: CREATE, WRITE, FLUSH, RELEASE)
- ``stat``:    lstat of each (after dropping the guest's dentry/inode cache,
  so each is a LOOKUP)
- ``readdir``: listing the N-entry directory (READDIR/READDIRPLUS), cold
- ``unlink``:  unlink of each, cold
- ``untar``:   ``tar xf`` of a source tree (the tarball is first copied to
  the guest's tmpfs, untimed) — ops = files in the tree
- ``rmtree``:  ``rm -rf`` of that tree, cold
- ``footprint`` (with --footprint): lstat every entry of FPDIR (files the
  host created), print ``@@BENCH-LOOKED-UP@@`` and hold the inodes for a
  while, so the host can measure the daemon's memory with that many
  nodeids live (run.sh prints ``@@BENCH-IDLE@@`` before anything ran).

"Cold": ``echo 3 > /proc/sys/vm/drop_caches`` right before the phase, so
the guest asks the daemon instead of answering from its own caches (the
FORGETs that this sends are outside the timed part).

``--barrier R,W`` (parallel_meta.py): before each file phase, after its
drop_caches, write one byte to fd W and wait for one byte on fd R, so that
two processes start every phase together: each phase then overlaps the
same phase of the other process, never its drop_caches or another phase;
after each phase, one byte more on W (the parent's end-of-phase mark).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

PAYLOAD = b"x" * 100


def emit(phase: str, seconds: float, ops: int, **extra) -> None:
    print("BENCH " + json.dumps({"phase": phase, "seconds": round(seconds, 4), "ops": ops, **extra}),
          flush=True)


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        print(f"drop_caches: {e}", file=sys.stderr)
    time.sleep(0.5)  # let the FORGETs it causes reach the daemon


class Barrier:
    """One side of parallel_meta.py's phase barrier (two pipe fds)."""

    def __init__(self, spec: str | None) -> None:
        self.fds = tuple(int(x) for x in spec.split(",")) if spec else None

    def _say(self, byte: bytes) -> None:
        try:
            os.write(self.fds[1], byte)
        except BrokenPipeError:
            raise SystemExit("barrier: the parent went away") from None

    def wait(self) -> None:
        if self.fds is not None:
            self._say(b"r")
            if os.read(self.fds[0], 1) != b"g":
                raise SystemExit("barrier: the parent went away")

    def done(self) -> None:
        if self.fds is not None:
            self._say(b"d")

    def timed(self, phase: str, ops: int, fn) -> None:
        """``timed``, started together with the other process and its end
        said to the parent."""
        self.wait()
        timed(phase, ops, fn, marks=self.fds is None)    # parallel_meta.py marks its own
        self.done()


def mark(edge: str, phase: str) -> None:
    """run.sh's step mark, with BENCH_MARKS=1 (tests/perf/guest_profile.py
    reads the daemons' counters at each): each phase is its own step."""
    if os.environ.get("BENCH_MARKS"):
        print(f"@@BENCH-MARK {edge} {phase}@@", flush=True)
        time.sleep(1)


def timed(phase: str, ops: int, fn, marks: bool = True) -> None:
    if marks:
        mark("start", phase)
    t0 = time.monotonic()
    fn()
    emit(phase, time.monotonic() - t0, ops)
    if marks:
        mark("end", phase)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--tar")
    ap.add_argument("--footprint")
    ap.add_argument("--hold", type=float, default=8.0, help="seconds to hold the footprint inodes")
    ap.add_argument("--barrier", help="R,W: pipe fds of parallel_meta.py's phase barrier")
    a = ap.parse_args()
    barrier = Barrier(a.barrier)
    base = a.dir
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    names = [os.path.join(base, f"f{i:06d}") for i in range(a.files)]

    def create():
        for p in names:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, PAYLOAD)
            os.close(fd)

    def stat_all():
        for p in names:
            os.lstat(p)

    def readdir():
        n = len(os.listdir(base))
        if n != a.files:
            raise SystemExit(f"readdir saw {n} entries, not {a.files}")

    def unlink():
        for p in names:
            os.unlink(p)

    if a.files:  # 0: only the footprint (bench.py's large-footprint boot)
        barrier.timed("create", a.files, create)
        drop_caches()
        barrier.timed("stat", a.files, stat_all)
        drop_caches()
        barrier.timed("readdir", a.files, readdir)
        drop_caches()
        barrier.timed("unlink", a.files, unlink)

    if a.tar:
        local = "/tmp/bench-src.tar"
        shutil.copyfile(a.tar, local)
        with subprocess.Popen(["tar", "tf", local], stdout=subprocess.PIPE) as p:
            entries = sum(1 for line in p.stdout if not line.endswith(b"/\n"))
        tree = os.path.join(base, "tree")
        os.makedirs(tree)
        drop_caches()
        timed("untar", entries, lambda: subprocess.run(["tar", "xf", local, "-C", tree], check=True))
        drop_caches()
        timed("rmtree", entries, lambda: subprocess.run(["rm", "-rf", tree], check=True))
        os.unlink(local)
    os.rmdir(base)

    if a.footprint:
        drop_caches()
        t0 = time.monotonic()
        n = 0
        keep = []
        with os.scandir(a.footprint) as it:
            for entry in it:
                keep.append(os.lstat(entry.path))
                n += 1
        emit("lookup", time.monotonic() - t0, n)
        print("@@BENCH-LOOKED-UP@@", flush=True)
        time.sleep(a.hold)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
