"""Our daemon started the ways service managers start it (tests/start_conditions.py).

For every start condition (supplementary groups as libvirt 9.0 gives them,
ambient capabilities, an empty or a service's environment, ``--fd``, umask
777 and 000, inherited fds beyond 0-2, blocked signals, ignored SIGTERM and
SIGCHLD, a closed stdin, and all of them at once) the daemon must serve
FUSE requests, none of its processes may keep what it was given
(supplementary groups, ambient capabilities, blocked signals, the inherited
fds), a worker killed is replaced, and SIGTERM ends it with status 0.
A caller that is not root gets one clear line.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, DaemonProcess
from tests.frontend.fuse_client import FuseClient
from tests.frontend.vhost import start_frontend
from tests.procfs import children
from tests.start_conditions import START_CONDITIONS, open_fd_targets, process_state

NOBODY = 65534


def serve_once(fc: FuseClient, share, name: str, mode: int = 0o640) -> None:
    """CREATE, WRITE, READ, RELEASE as the guest would; the host sees the
    file with exactly the guest's mode (workers run with umask 0)."""
    entry, opened = fc.create(1, name, mode=stat.S_IFREG | mode)
    fc.write(entry.nodeid, opened.fh, 0, b"served " + name.encode())
    assert fc.read(entry.nodeid, opened.fh, 0, 64) == b"served " + name.encode()
    fc.release(entry.nodeid, opened.fh)
    st = os.stat(share / name)
    assert st.st_mode & 0o7777 == mode
    assert (share / name).read_bytes() == b"served " + name.encode()


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def assert_clean_processes(daemon) -> None:
    """Nothing of the start state survived into the supervisor or a worker."""
    pids = [daemon.pid] + children(daemon.pid)
    assert len(pids) >= 3, f"supervisor + hiprio + request worker expected, got {pids}"
    for pid in pids:
        state = process_state(pid)
        assert state["Groups"] == "", f"pid {pid} kept supplementary groups {state['Groups']}"
        assert int(state["CapAmb"], 16) == 0, f"pid {pid} kept ambient capabilities {state['CapAmb']}"
        assert int(state["SigBlk"], 16) == 0, f"pid {pid} runs with blocked signals {state['SigBlk']}"
        targets = open_fd_targets(pid)
        for path in daemon.inherited:
            assert path not in targets, f"pid {pid} kept the inherited fd of {path}"


@pytest.mark.parametrize("start", sorted(START_CONDITIONS))
def test_started_so_it_serves(daemon_factory, tmp_path, start):
    share = tmp_path / "share"
    share.mkdir()
    daemon = daemon_factory("ours", shared_dir=share, start=start)
    fe = start_frontend(daemon.socket_path, ram_size=64 << 20, num_request_queues=1)
    try:
        fc = FuseClient(fe)
        fc.init()
        serve_once(fc, share, "first")
        assert_clean_processes(daemon)

        # a worker that dies is noticed (SIGCHLD, the channel) and replaced
        before = set(children(daemon.pid))
        victim = next(p for p in before if comm(p) == "vfsd-request-1")
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: "restarted as pid" in daemon.log(), what="the worker's replacement")
        wait_for(lambda: len(set(children(daemon.pid)) - before) == 1, what="the new worker")
        serve_once(fc, share, "after-restart", mode=0o600)

        # SIGTERM stops it, whatever the mask and dispositions it inherited
        os.kill(daemon.pid, signal.SIGTERM)
        status = daemon.wait(10)
    finally:
        fe.close()
    log = daemon.log()
    assert status == 0, f"exit status {status} after SIGTERM:\n{log[-3000:]}"
    assert "Traceback" not in log, log[-3000:]


def test_socket_file_mode_follows_the_umask(daemon_factory, tmp_path):
    """The one thing the daemon's umask decides: who may connect to the
    --socket-path file (the workers use their own umask, 0)."""
    d = daemon_factory("ours", start="umask-777")
    assert os.stat(d.socket_path).st_mode & 0o777 == 0


@pytest.fixture
def nobody_dir():
    """A directory of nobody's own (pytest's tmp_path is root's, mode 700)."""
    base = Path(tempfile.mkdtemp(prefix="vfsd-nobody-"))
    os.chmod(base, 0o755)
    (base / "share").mkdir()
    for p in (base, base / "share"):
        os.chown(p, NOBODY, NOBODY)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _as_nobody(base, *args) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--",
            sys.executable, "-m", "daemon", "--socket-path", str(base / "vfsd.sock"),
            "--shared-dir", str(base / "share"), *args]


def _refusal(cmd: list[str]) -> str:
    """The one line a daemon that refuses to start prints (exit status 1)."""
    r = subprocess.run(cmd, cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_not_root_is_one_clear_line(nobody_dir):
    line = _refusal(_as_nobody(nobody_dir))
    assert line.startswith("pyvirtiofsd: error: --sandbox namespace needs root"), line
    assert "CAP_SYS_ADMIN" in line and "--sandbox none" in line, line


def test_not_root_with_sandbox_none_serves_as_itself(nobody_dir):
    """--sandbox none is the unprivileged debugging run: it starts, and acts
    as its own user (a request from that uid works, root's is refused)."""
    cmd = _as_nobody(nobody_dir, "--sandbox", "none")
    sock, share, log_path = nobody_dir / "vfsd.sock", nobody_dir / "share", nobody_dir / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    daemon = DaemonProcess("ours", proc, str(sock), str(share), str(log_path), cmd)
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, what="the socket")
        fe = start_frontend(str(sock), ram_size=64 << 20, num_request_queues=1)
        try:
            fc = FuseClient(fe, uid=NOBODY, gid=NOBODY)
            fc.init()
            serve_once(fc, share, "mine")
            assert os.stat(share / "mine").st_uid == NOBODY
        finally:
            fe.close()
        status = daemon.wait(15)     # QEMU gone: the daemon ends
    finally:
        daemon.stop()
    assert status == 0, daemon.log()[-3000:]
    assert "WARNING: --sandbox none" in daemon.log()


def test_several_queues_without_pidfd_getfd_is_one_clear_line(tmp_path):
    """Under a filter that refuses pidfd_getfd (the packaged systemd unit's),
    several request queues cannot share open files: the daemon says so at
    start, before it makes its socket, instead of failing a request on the
    second queue later."""
    share = tmp_path / "share"
    share.mkdir()
    cond = START_CONDITIONS["systemd-unit"]
    sock = tmp_path / "vfsd.sock"
    cmd = cond.prefix() + [sys.executable, "-m", "daemon", "--socket-path", str(sock),
                           "--shared-dir", str(share), "--request-queues", "2"]
    line = _refusal(cmd)
    assert line.startswith("pyvirtiofsd: error: --request-queues 2: "), line
    assert "pidfd_getfd" in line and "Operation not permitted" in line, line
    assert "SystemCallFilter=" in line and "--request-queues 1" in line, line
    assert "multiqueue.conf" in line, line
    assert not sock.exists()
