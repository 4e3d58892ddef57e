"""Shared pytest fixtures: start daemons, connect the vhost-user test frontend.

``daemon_factory(kind, shared_dir, cache='auto', extra_args=())`` starts
our daemon (``kind='ours'``), QEMU 7.2's C virtiofsd (``kind='c'``) or the
Rust virtiofsd 1.13 (``kind='rust'``, unpacked by tests/guest/platforms.py;
the two baselines) on a fresh socket, waits until the socket exists, and stops it
at teardown. ``--daemon=ours|c|both`` selects which daemon(s) the
``daemon_kind``-parametrized tests (the frontend tests) run against.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

C_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
# our program as the Debian package installs it (tests/guest/test_guest_debian_package.py)
INSTALLED_PYVIRTIOFSD = "/usr/bin/pyvirtiofsd"
# our --cache value -> C virtiofsd's -o cache=
C_CACHE = {"never": "none", "auto": "auto", "always": "always"}
# Options that make the C daemon offer what ours offers by default: xattrs
# (our Config.xattr defaults to True) and POSIX locks (we implement GETLK/SETLK).
C_DEFAULT_OPTS = ("-o", "xattr", "-o", "posix_lock")
# The Rust virtiofsd's equivalent: xattrs (it has no POSIX lock support; the
# guest kernel then keeps locks local). Its default sandbox and seccomp stay.
RUST_DEFAULT_OPTS = ("--xattr",)


def pytest_addoption(parser):
    parser.addoption(
        "--daemon", action="store", default="ours", choices=("ours", "c", "both"),
        help="which virtio-fs daemon the frontend tests drive: ours (default), "
             "c (QEMU 7.2's C virtiofsd, the baseline) or both",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "frontend_opts(**kw): keyword arguments for the frontend fixture "
        "(queue_size, num_request_queues, cache, ram_size, extra_args, protocol_mask, "
        "start: a tests/start_conditions.py name)")


def pytest_generate_tests(metafunc):
    if "daemon_kind" in metafunc.fixturenames:
        choice = metafunc.config.getoption("--daemon")
        kinds = ["ours", "c"] if choice == "both" else [choice]
        metafunc.parametrize("daemon_kind", kinds, scope="function")


class DaemonProcess:
    """A running daemon: ``.socket_path``, ``.proc``, ``.pid``, ``.kind``,
    ``.start_condition``."""

    def __init__(self, kind: str, proc: subprocess.Popen, socket_path: str,
                 shared_dir: str, log_path: str, cmd: list[str]):
        self.kind = kind
        self.proc = proc
        self.pid = proc.pid
        self.socket_path = socket_path
        self.shared_dir = shared_dir
        self.log_path = log_path
        self.cmd = cmd
        self.start_condition = "plain"   # tests/start_conditions.py
        self.inherited: list[str] = []   # paths of extra fds it was started with

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def wait(self, timeout: float) -> int | None:
        """Exit status within ``timeout`` seconds, or None if still running."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode


def daemon_command(kind: str, socket_path: str, shared_dir: str, cache: str,
                   extra_args=(), socket_fd: int | None = None, default_opts=None) -> list[str]:
    """``socket_fd``: an inherited listening socket (``--fd=N``) instead of
    ``socket_path``. ``default_opts``: the baseline's options in place of
    C_DEFAULT_OPTS / RUST_DEFAULT_OPTS (None: those)."""
    if kind == "ours":
        where = ["--socket-path", socket_path] if socket_fd is None else [f"--fd={socket_fd}"]
        return [sys.executable, "-m", "daemon", *where,
                "--shared-dir", shared_dir, "--cache", cache, *extra_args]
    if kind == "installed":
        return [INSTALLED_PYVIRTIOFSD, "--socket-path", socket_path,
                "--shared-dir", shared_dir, "--cache", cache, *extra_args]
    if kind == "c":
        where = f"--socket-path={socket_path}" if socket_fd is None else f"--fd={socket_fd}"
        return [C_VIRTIOFSD, where, "-o", f"source={shared_dir}",
                "-o", f"cache={C_CACHE.get(cache, cache)}",
                *(C_DEFAULT_OPTS if default_opts is None else default_opts), *extra_args]
    if kind == "rust":
        from tests.guest.platforms import rust_virtiofsd_argv
        return [*rust_virtiofsd_argv(), f"--socket-path={socket_path}", f"--shared-dir={shared_dir}",
                f"--cache={cache}", *(RUST_DEFAULT_OPTS if default_opts is None else default_opts), *extra_args]
    raise ValueError(f"unknown daemon kind {kind!r}")


def start_daemon(kind: str, shared_dir, cache: str = "auto", extra_args=(),
                 run_dir: str | None = None, startup_timeout: float = 15.0,
                 env: dict | None = None, start: str = "plain", default_opts=None) -> DaemonProcess:
    """Start a daemon and wait until its socket exists (no probe connection:
    both daemons serve exactly one front-end connection). ``env``: extra
    environment variables for the daemon. ``default_opts``: see daemon_command. ``start``: the state it is
    started in, a name from tests/start_conditions.py (supplementary
    groups, ``--fd`` as libvirt does, blocked signals...)."""
    from tests.start_conditions import START_CONDITIONS

    cond = START_CONDITIONS[start]
    run_dir = run_dir or tempfile.mkdtemp(prefix=f"vfsd-{kind}-")
    socket_path = os.path.join(run_dir, "vhost.sock")
    log_path = os.path.join(run_dir, "daemon.log")
    passed: list[int] = []      # fds the daemon inherits; ours are closed once it runs
    inherited: list[str] = []
    if cond.listen_fd:          # libvirt listens itself and passes the socket
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(socket_path)
        listener.listen(1)
        passed.append(listener.detach())
    if cond.extra_fds:          # a way out of the share, if a worker kept it
        outside = os.path.dirname(os.path.abspath(shared_dir))
        passed.append(os.open(outside, os.O_RDONLY | os.O_DIRECTORY))
        pipe = os.pipe()
        passed.extend(pipe)
        inherited += [outside, os.readlink(f"/proc/self/fd/{pipe[0]}")]
    cmd = cond.prefix() + daemon_command(kind, socket_path, str(shared_dir), cache, (*extra_args, *cond.args),
                                         socket_fd=passed[0] if cond.listen_fd else None,
                                         default_opts=default_opts)
    environ = dict(os.environ) if cond.env is None else dict(cond.env)
    environ.update(env or {})
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=environ, pass_fds=passed, preexec_fn=cond.preexec)
    finally:
        for fd in passed:
            os.close(fd)
    d = DaemonProcess(kind, proc, socket_path, str(shared_dir), log_path, cmd)
    d.start_condition, d.inherited = start, inherited
    deadline = time.monotonic() + startup_timeout
    while True:
        try:
            if stat.S_ISSOCK(os.stat(socket_path).st_mode):
                return d
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} daemon exited with {proc.returncode} before "
                               f"creating its socket:\n{' '.join(cmd)}\n{d.log()[-3000:]}")
        if time.monotonic() > deadline:
            d.stop(2)
            raise RuntimeError(f"{kind} daemon did not create {socket_path} within "
                               f"{startup_timeout}s:\n{d.log()[-3000:]}")
        time.sleep(0.01)


@pytest.fixture
def daemon_factory(tmp_path):
    started: list[DaemonProcess] = []
    n = 0

    def factory(kind: str = "ours", shared_dir=None, cache: str = "auto", extra_args=(), env=None,
                start: str = "plain"):
        nonlocal n
        n += 1
        run_dir = tmp_path / f"run{n}"
        run_dir.mkdir()
        if shared_dir is None:
            shared_dir = tmp_path / f"shared{n}"
            shared_dir.mkdir()
        d = start_daemon(kind, shared_dir, cache, extra_args, str(run_dir), env=env, start=start)
        started.append(d)
        return d

    yield factory
    for d in started:
        d.stop(5.0)


@pytest.fixture
def shared_dir(tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    return d


def _frontend_opts(request) -> dict:
    m = request.node.get_closest_marker("frontend_opts")
    return dict(m.kwargs) if m else {}


@pytest.fixture
def daemon_proc(daemon_factory, daemon_kind, shared_dir, request):
    opts = _frontend_opts(request)
    return daemon_factory(daemon_kind, shared_dir, cache=opts.get("cache", "auto"),
                          extra_args=opts.get("extra_args", ()), start=opts.get("start", "plain"))


@pytest.fixture
def vhost(daemon_proc, request):
    """A connected, realized and started VhostUserFrontend (no FUSE INIT yet)."""
    from tests.frontend.vhost import start_frontend

    opts = _frontend_opts(request)
    fe = start_frontend(
        daemon_proc.socket_path, ram_size=opts.get("ram_size", 128 << 20),
        num_request_queues=opts.get("num_request_queues", 1),
        queue_size=opts.get("queue_size", 128),
        **({"protocol_mask": opts["protocol_mask"]} if "protocol_mask" in opts else {}))
    fe.daemon = daemon_proc
    yield fe
    fe.close()


@pytest.fixture
def frontend(vhost, daemon_proc, shared_dir):
    """A FuseClient after FUSE INIT (as Linux 6.1 sends it), with
    ``.vhost``, ``.daemon``, ``.kind`` and ``.shared_dir`` attached."""
    from tests.frontend.fuse_client import FuseClient

    fc = FuseClient(vhost)
    fc.daemon = daemon_proc
    fc.kind = daemon_proc.kind
    fc.shared_dir = Path(shared_dir)
    fc.init()
    return fc
