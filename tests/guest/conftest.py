"""Fixtures for the real-guest tests: one guest boot per (daemon, cache mode),
module scoped, shared by the cheap assertions of a test module."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .harness import boot_and_run

REPO = Path(__file__).resolve().parents[2]


def guest_prerequisites() -> str | None:
    """Why guest tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "guest tests need root (QEMU's 9p export of /, the C virtiofsd)"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 missing: apt-get install qemu-system-x86"
    if not (Path("/bin/busybox").exists() or Path("/usr/bin/busybox").exists()):
        return "busybox missing: apt-get install busybox-static"
    if shutil.which("fio") is None:
        return "fio missing: apt-get install fio"
    return None


def _start_daemon(kind: str, shared_dir: Path, cache: str, run_dir: Path, extra_args=()):
    """tests/conftest.py's start_daemon (the same options as every other test),
    or our stand-alone helper if that is not importable."""
    try:
        from tests.conftest import start_daemon
    except ImportError:
        start_daemon = None
    if start_daemon is not None:
        return start_daemon(kind, shared_dir, cache, extra_args=extra_args, run_dir=str(run_dir),
                            startup_timeout=30.0)
    if extra_args:
        raise RuntimeError("daemon options need tests/conftest.py")
    from .daemons import Daemon
    return Daemon(kind, str(shared_dir), cache=cache, socket_path=str(run_dir / "vfs.sock"))


def guest_dirs(tmp_path_factory, name: str) -> tuple[Path, Path, Path]:
    """(base, base/shared, base/run) for one guest boot, after checking that
    guests can run here at all (a missing prerequisite fails the test)."""
    why = guest_prerequisites()
    if why:  # scripts/setup.sh installs all of it: missing means broken, not "skip"
        pytest.fail(f"guest tests cannot run: {why}")
    base = tmp_path_factory.mktemp(name)
    shared = base / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)  # a non-root guest caller must be able to enter it
    run_dir = base / "run"
    run_dir.mkdir()
    return base, shared, run_dir


@pytest.fixture(scope="module")
def guest_run_factory(tmp_path_factory):
    """factory(kind, cache, tools=True, known=(), extra_args=(), platform="a",
    num_request_queues=1, smp=2) -> harness.Run; boots once per configuration."""
    why = guest_prerequisites()
    if why:  # scripts/setup.sh installs all of it: missing means broken, not "skip"
        pytest.fail(f"guest tests cannot run: {why}")
    daemons = []
    runs = {}

    def factory(kind: str, cache: str, tools: bool = True, known=(), extra_args=(),
                platform: str = "a", num_request_queues: int = 1, smp: int = 2):
        """One boot per configuration in this module; ``extra_args``: more
        daemon options; the rest as run_guest's."""
        key = (kind, cache, tools, tuple(known), tuple(extra_args), platform, num_request_queues, smp)
        if key not in runs:
            runs[key] = boot(*key)
        return runs[key]

    def boot(kind, cache, tools, known, extra_args, platform, num_request_queues, smp):
        base, shared, run_dir = guest_dirs(tmp_path_factory, f"guest-{kind}-{cache}-{platform}")
        d = _start_daemon(kind, shared, cache, run_dir, extra_args)
        daemons.append(d)
        run = boot_and_run(d, kind, cache, shared, tools=tools, known=known,
                           console_log=base / "console.log", platform=platform, smp=smp,
                           num_request_queues=num_request_queues)
        o, t = run.ops_summary or {}, run.tools_summary or {}
        where = f"{platform}/{num_request_queues}q" + (f"/{smp}cpu" if smp != 2 else "")
        BOOTS.append((f"{kind} {where}", " ".join((cache,) + extra_args), run.boot_seconds,
                      f"ops {o.get('passed', '?')} pass/{o.get('failed', '?')} fail/{o.get('known', 0)} known"
                      f" in {o.get('seconds', '?')} s; tools {t.get('passed', '-')} pass/{t.get('failed', '-')} fail;"
                      f" console {base / 'console.log'}"))
        return run

    yield factory
    for d in daemons:
        d.stop()


# boot timings, printed at the end of the session
BOOTS: list[tuple[str, str, float, str]] = []


def pytest_terminal_summary(terminalreporter):
    if not BOOTS:
        return
    terminalreporter.section("guest boots")
    for kind, cache, secs, summary in BOOTS:
        terminalreporter.write_line(f"{kind:10s} cache={cache:6s} {secs:6.1f} s  {summary}")
