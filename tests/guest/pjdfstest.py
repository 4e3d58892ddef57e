"""pjdfstest, the POSIX file-system conformance suite, fetched and built into
the guest cache, and run as root in a real guest against a daemon's mount.

The suite (github.com/pjd/pjdfstest, BSD licence) is not part of this
repository: ``ensure_pjdfstest()`` clones it at ``COMMIT`` (from
``$PYVIRTIOFSD_PJDFSTEST_GIT``, default GitHub; a local mirror or bare
clone works too), checks that HEAD is that commit, and builds its one C
program (``autoreconf -fi``, ``./configure``, ``make``) under
``<cache>/pjdfstest-<commit>/``. A ``.complete`` marker is written last, so
a second call does nothing; a half-built tree is rebuilt. scripts/setup.sh
installs the build tools (autoconf, automake, make, gcc) and perl's ``prove``;
the clone happens on first use (``make pjdfstest``), since only there may
GitHub be reachable (CI reaches Debian's and PyPI's archives only).

The guest sees the host's root (tests/guest/vm.py), so it runs the built
tree and the host's ``prove`` (perl) in place: ``run_pjdfstest(kind, paths)``
starts one daemon (ours with ``--cache auto --xattr``, the C and Rust
virtiofsd with cache auto and xattrs), boots one guest, runs ``prove -v``
as root in a fresh directory of the mount and writes prove's output to a
9p directory the host reads (not through the mount under test).
``parse_prove()`` turns that output into, per test file, the list of failed
assertion numbers (TAP ``not ok`` lines that are not ``# TODO``).

``python -m tests.guest.pjdfstest`` (``make pjdfstest``) runs the full
suite against ours, the C and the Rust virtiofsd one after the other and
prints the comparison; ``--quick`` runs ``QUICK_FILES`` only.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .kernel import cache_dir

COMMIT = "85a8aea9e685999ef0540392fd80535f873d7ff7"   # master of 2026-08-07
DEFAULT_GIT = "https://github.com/pjd/pjdfstest.git"
GIT_ENV = "PYVIRTIOFSD_PJDFSTEST_GIT"

# The test directories about the credentials a request runs with (issue 20:
# SUID/SGID clearing by non-owners, chown to a supplementary group,
# ownership of new inodes, permission checks of non-root callers).
CREDENTIAL_DIRS = ("chmod", "chown", "open", "truncate", "ftruncate", "unlink", "rename",
                   "mkdir", "link", "symlink", "mknod", "mkfifo")
# Quick mode (CI): one file of each, one that runs as user 65534 (under TCG
# the suite does about one assertion a second: the whole of it takes hours).
# chmod/12.t: a non-owner's write clears SUID/SGID; the others: EACCES/EPERM
# of a non-root caller, with the guest's permission checks.
QUICK_FILES = ("chmod/12.t", "chown/05.t", "open/05.t", "truncate/06.t", "ftruncate/06.t",
               "unlink/05.t", "rename/04.t", "mkdir/05.t", "link/06.t", "symlink/05.t",
               "mknod/05.t", "mkfifo/05.t")


def _log(msg: str) -> None:
    print(f"pjdfstest: {msg}", file=sys.stderr, flush=True)


def _run(argv, cwd, log) -> None:
    log.write(f"$ {' '.join(map(str, argv))}\n".encode())
    log.flush()
    r = subprocess.run(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode:
        raise RuntimeError(f"pjdfstest build: {' '.join(map(str, argv))} exited with {r.returncode} "
                           f"(see {log.name})")


def build_dir() -> Path:
    return cache_dir() / f"pjdfstest-{COMMIT[:12]}"


def ensure_pjdfstest() -> Path:
    """The built pjdfstest tree (``pjdfstest`` binary and ``tests/``)."""
    final = build_dir()
    if (final / ".complete").is_file():
        return final
    source = os.environ.get(GIT_ENV, DEFAULT_GIT)
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="pjdfstest-build-") as tmp:
        src = Path(tmp) / "src"
        logp = Path(tmp) / "build.log"
        _log(f"fetching {source} at {COMMIT[:12]} and building it")
        with open(logp, "wb") as log:
            _run(["git", "clone", "-q", "--no-checkout", source, str(src)], tmp, log)
            if subprocess.run(["git", "cat-file", "-e", f"{COMMIT}^{{commit}}"], cwd=src,
                              stderr=subprocess.DEVNULL).returncode:
                _run(["git", "fetch", "-q", "origin", COMMIT], src, log)
            _run(["git", "-c", "advice.detachedHead=false", "checkout", "-q", "--detach", COMMIT], src, log)
            head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True,
                                  text=True, check=True).stdout.strip()
            if head != COMMIT:
                raise RuntimeError(f"pjdfstest checkout is {head}, not {COMMIT}")
            shutil.rmtree(src / ".git")
            _run(["autoreconf", "-fi"], src, log)
            _run(["./configure", "-q"], src, log)
            _run(["make", "-s", "pjdfstest"], src, log)
        if not os.access(src / "pjdfstest", os.X_OK) or not (src / "tests" / "misc.sh").is_file():
            raise RuntimeError(f"pjdfstest build produced no pjdfstest binary (see {logp})")
        shutil.move(str(logp), src / "build.log")
        (src / ".complete").write_text(f"{source} {COMMIT}\n")
        shutil.rmtree(final, ignore_errors=True)
        src.rename(final)
    _log(f"built {final}")
    return final


# --------------------------------------------------------------------------
# prove's output

FILE_RE = re.compile(r"^(?:\[[\d:]+\] )?(\S+\.t) \.+\s*(.*)$")   # prove --timer: "[12:00:01] "
TIME_RE = re.compile(r"^(?:ok|Failed \S+ subtests)\s+(\d+) ms")
NOT_OK_RE = re.compile(r"^not ok (\d+)\b(.*)$")
OK_RE = re.compile(r"^ok (\d+)\b")
PLAN_RE = re.compile(r"^1\.\.(\d+)")
TOTAL_RE = re.compile(r"^Files=(\d+), Tests=(\d+),")


@dataclasses.dataclass
class FileResult:
    planned: int | None = None
    ran: int = 0
    failed: dict[int, str] = dataclasses.field(default_factory=dict)   # number -> "tried ..."
    verdict: str = ""      # prove's last word on the file: "ok", "Failed 2/14 subtests", ...
    ms: int | None = None  # wall time of the file (prove --timer)


@dataclasses.dataclass
class ProveResult:
    files: dict[str, FileResult]   # "chmod/12.t" -> its result
    total_files: int | None        # prove's "Files=N, Tests=M" line (None: prove did not finish)
    total_tests: int | None

    @property
    def failed(self) -> dict[str, list[int]]:
        """Per file, the failed assertion numbers (files without one left out)."""
        return {f: sorted(r.failed) for f, r in self.files.items() if r.failed}

    @property
    def failed_count(self) -> int:
        return sum(len(r.failed) for r in self.files.values())

    def incomplete(self) -> list[str]:
        """Files whose run is not a full TAP plan: none, a die, missing lines."""
        return [f for f, r in self.files.items() if r.planned is None or r.ran != r.planned]


def _short(path: str) -> str:
    """chmod/12.t from .../tests/chmod/12.t."""
    parts = path.split("/")
    return "/".join(parts[parts.index("tests") + 1:]) if "tests" in parts else path


def parse_prove(text: str) -> ProveResult:
    """``prove -v`` output -> per-file TAP results. A ``not ok`` with a
    ``# TODO`` directive is expected to fail (prove counts it as passing)."""
    files: dict[str, FileResult] = {}
    cur: FileResult | None = None
    total = None
    for line in text.replace("\r\n", "\n").splitlines():
        m = FILE_RE.match(line)
        if m and "/tests/" in "/" + m.group(1):
            cur = files.setdefault(_short(m.group(1)), FileResult())
            rest = m.group(2).strip()
            if rest:  # prove prints the plan on the name's line in some versions
                line = rest
            else:
                continue
        m = TOTAL_RE.match(line)
        if m:
            total = (int(m.group(1)), int(m.group(2)))
            cur = None
            continue
        if cur is None:
            continue
        if line.startswith("Test Summary Report"):
            cur = None
            continue
        m = PLAN_RE.match(line)
        if m and cur.planned is None:
            cur.planned = int(m.group(1))
            continue
        m = TIME_RE.match(line)
        if m or line == "ok":  # the verdict (before the TAP "ok N" test: "ok  1234 ms")
            cur.verdict, cur.ms = line, int(m.group(1)) if m else None
            continue
        m = NOT_OK_RE.match(line)
        if m:
            cur.ran += 1
            if "# TODO" not in m.group(2):
                cur.failed[int(m.group(1))] = m.group(2).lstrip(" -").strip()
            continue
        if OK_RE.match(line):
            cur.ran += 1
            continue
        if line.startswith(("skipped", "Failed ", "Dubious", "No subtests")):
            cur.verdict = line
    return ProveResult(files, total[0] if total else None, total[1] if total else None)


# --------------------------------------------------------------------------
# one daemon, one guest

DAEMONS = ("ours", "c", "rust")
# ours as the run had it; the C and Rust daemons get xattrs (and the
# C one POSIX locks) from tests/conftest.py's defaults
EXTRA_ARGS = {"ours": ("--xattr",)}
LOG_NAME = "prove.log"


@dataclasses.dataclass
class DaemonRun:
    kind: str
    platform: str
    paths: tuple[str, ...]
    result: ProveResult
    seconds: float
    log: Path                 # prove's output, kept on the host
    guest_status: int | None


def guest_command(tree: Path, paths, sync_mnt: str) -> str:
    """prove -v as root in a fresh directory of the mount, its output to
    the 9p sync directory; paths () means every test directory."""
    args = " ".join(f"$T/{p}" for p in paths) if paths else "$T"
    return (f"T={tree / 'tests'}; cd /mnt && mkdir pjdfstest && cd pjdfstest && "
            f"prove -v --timer -r {args} > {sync_mnt}/{LOG_NAME} 2>&1; "
            f"echo PJDFSTEST-PROVE-STATUS=$?; tail -n 3 {sync_mnt}/{LOG_NAME}")


def run_pjdfstest(kind: str, paths=(), *, platform: str = "a", workdir: Path | None = None,
                  timeout: float = 4 * 3600) -> DaemonRun:
    """Start ``kind``'s daemon with cache auto on a fresh directory, boot one
    guest of ``platform``, run the suite's ``paths`` (test directories or
    files under tests/, e.g. "chmod" or "chmod/12.t"; all when empty)."""
    from tests.conftest import start_daemon

    from .vm import SYNC_MNT, run_guest

    tests = ensure_pjdfstest() / "tests"
    unknown = [p for p in paths if ".." in p.split("/") or not (tests / p).exists()]
    if unknown:
        raise ValueError(f"no such pjdfstest tests: {unknown}")
    tree = tests.parent
    base = Path(workdir or tempfile.mkdtemp(prefix=f"pjdfstest-{kind}-"))
    shared, run_dir, sync = base / "shared", base / "run", base / "sync"
    for d in (shared, run_dir, sync):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(shared, 0o755)
    daemon = start_daemon(kind, shared, "auto", extra_args=EXTRA_ARGS.get(kind, ()),
                          run_dir=str(run_dir), startup_timeout=30)
    start = time.monotonic()
    try:
        g = run_guest(daemon.socket_path, guest_command(tree, paths, SYNC_MNT), timeout=timeout,
                      platform=platform, sync_dir=sync, console_log=base / "console.log",
                      abort_if=lambda: daemon.proc.poll() is not None and "the daemon exited")
    finally:
        daemon.stop()
    seconds = time.monotonic() - start
    log = base / LOG_NAME
    text = (sync / LOG_NAME).read_text(errors="replace") if (sync / LOG_NAME).exists() else ""
    log.write_text(text)
    result = parse_prove(text)
    if result.total_tests is None:
        raise RuntimeError(f"pjdfstest on {kind} did not finish (prove log {log}, console "
                           f"{base / 'console.log'}):\n{g.describe(tail=20)}")
    return DaemonRun(kind, platform, tuple(paths), result, seconds, log, g.exit_status)


# --------------------------------------------------------------------------
# the comparison


def only_ours(runs: dict[str, DaemonRun]) -> dict[str, list[int]]:
    """Assertions ours fails and neither the C nor the Rust daemon fails."""
    ours = runs["ours"].result.failed
    others = [r.result.failed for k, r in runs.items() if k != "ours"]
    out = {}
    for f, nums in ours.items():
        extra = [n for n in nums if all(n not in o.get(f, ()) for o in others)]
        if extra:
            out[f] = extra
    return out


def _ranges(nums) -> str:
    out, nums = [], sorted(nums)
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ",".join(out)


def describe_only_ours(runs: dict[str, DaemonRun]) -> str:
    ours = runs["ours"].result.files
    lines = []
    for f, nums in only_ours(runs).items():
        for n in nums:
            lines.append(f"  {f} #{n}: {ours[f].failed[n]}")
    return "\n".join(lines)


def report(runs: dict[str, DaemonRun]) -> str:
    """The per-daemon counts, failing files, and ours-only failures."""
    lines = [f"{'daemon':6s} {'files':>5s} {'tests':>6s} {'failed':>6s} {'time':>7s}  failing files (assertions)"]
    for k, r in runs.items():
        res = r.result
        failing = "; ".join(f"{f} ({_ranges(n)})" for f, n in res.failed.items()) or "-"
        lines.append(f"{k:6s} {res.total_files:5d} {res.total_tests:6d} {res.failed_count:6d} "
                     f"{r.seconds / 60:6.1f}m  {failing}")
        if res.incomplete():
            lines.append(f"       incomplete TAP: {', '.join(res.incomplete())}")
    if "ours" in runs and len(runs) > 1:
        mine = describe_only_ours(runs)
        lines.append("failures only ours has: " + ("none" if not mine else "\n" + mine))
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description="pjdfstest as root in a real guest: ours, the C and "
                                 "the Rust virtiofsd (one boot each, one after another)")
    ap.add_argument("--platform", choices=("a", "b"), default="a")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_FILES)}")
    ap.add_argument("--credentials", action="store_true", help=f"only {', '.join(CREDENTIAL_DIRS)}")
    ap.add_argument("--tests", nargs="+", help="these test directories or files only (chmod, chown/00.t)")
    ap.add_argument("--daemons", nargs="+", choices=DAEMONS, default=list(DAEMONS))
    ap.add_argument("--workdir", type=Path, help="keep each daemon's share and logs here")
    a = ap.parse_args(argv)
    paths = tuple(a.tests or (QUICK_FILES if a.quick else CREDENTIAL_DIRS if a.credentials else ()))
    ensure_pjdfstest()
    runs = {}
    for kind in a.daemons:
        _log(f"{kind} on platform {a.platform}: {' '.join(paths) or 'all tests'}")
        wd = a.workdir / kind if a.workdir else None
        runs[kind] = run_pjdfstest(kind, paths, platform=a.platform, workdir=wd)
        r = runs[kind]
        _log(f"{kind}: {r.result.total_tests} tests, {r.result.failed_count} failed, "
             f"{r.seconds:.0f} s, log {r.log}")
        for f, fr in r.result.files.items():
            for n, why in fr.failed.items():
                print(f"{kind} {f} #{n}: {why}")
    print(report(runs))
    return 1 if "ours" in runs and only_ours(runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
