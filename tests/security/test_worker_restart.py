"""Worker death: a worker that dies — killed by its seccomp
filter, by a bug, by SIGKILL — is logged with why and replaced; the guest
requests it had taken are answered EIO, the mount keeps working for new
requests, and a worker that keeps dying ends the daemon with exit status 1
and one clear line, never a hang.

Driven through the vhost-user test frontend against the real daemon (full
sandbox: namespaces, seccomp kill, the supervisor under its own filter when
the replacements are forked).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from daemon.fuse.abi import Opcode
from tests.frontend.fuse_client import F_WRLCK, FuseClient, FuseErrorReply
from tests.frontend.vhost import start_frontend
from tests.procfs import children, settled_fd_count, steady_fd_count

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandboxed daemon needs root")


# -- helpers ------------------------------------------------------------------------------

def connect(daemon) -> FuseClient:
    fe = start_frontend(daemon.socket_path, ram_size=64 << 20, queue_size=128)
    fc = FuseClient(fe, timeout=15.0)
    fc.init()
    return fc


@pytest.fixture
def session(daemon_factory, shared_dir):
    """start(**kw) -> (daemon, FuseClient); everything closed at teardown."""
    clients = []

    def start(extra_args=(), env=None):
        d = daemon_factory("ours", shared_dir, extra_args=extra_args, env=env)
        fc = connect(d)
        clients.append(fc)
        return d, fc

    yield start
    for fc in clients:
        fc.vhost.close()


def worker_pid(daemon, name: str, not_pid: int | None = None, timeout: float = 15.0) -> int:
    """Host pid of the daemon's child whose comm is vfsd-<name> (other than
    ``not_pid``), waiting for it to appear."""
    deadline = time.monotonic() + timeout
    while True:
        for pid in children(daemon.pid):
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm == f"vfsd-{name}"[:15] and pid != not_pid and alive(pid):
                return pid
        assert time.monotonic() < deadline, f"no worker {name} (besides {not_pid}):\n{daemon.log()}"
        assert daemon.proc.poll() is None, f"daemon exited {daemon.proc.returncode}:\n{daemon.log()}"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_and_wait_replaced(daemon, name: str, restarts_before: int) -> int:
    """SIGKILL worker ``name``; wait until the supervisor logged its
    replacement; returns the new worker's pid."""
    pid = worker_pid(daemon, name)
    os.kill(pid, signal.SIGKILL)
    wait_for_log(daemon, rf"worker {name} restarted as pid \d+", restarts_before + 1)
    return worker_pid(daemon, name, not_pid=pid)


def wait_for_log(daemon, pattern: str, count: int = 1, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = daemon.log()
        if len(re.findall(pattern, log)) >= count:
            return log
        assert time.monotonic() < deadline, f"{pattern!r} x{count} not in the log:\n{log}"
        assert daemon.proc.poll() is None, f"daemon exited {daemon.proc.returncode}:\n{log}"
        time.sleep(0.02)


def policy_without(tmp_path, role: str, syscall: str) -> str:
    """A copy of policy/ where ``role``'s list lacks ``syscall``."""
    copy = tmp_path / "policy"
    shutil.copytree(os.environ.get("PYVIRTIOFSD_POLICY_DIR") or REPO / "policy", copy)
    path = copy / f"{role}.policy"
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.split("#")[0].split()[:1] != [syscall]]
    assert len(kept) == len(lines) - 1, f"{syscall} not listed once in {role}.policy"
    path.write_text("".join(kept))
    return str(copy)


# -- tests --------------------------------------------------------------------------------

def test_idle_request_worker_killed_is_replaced_and_the_mount_works(session):
    d, fc = session()
    (Path(d.shared_dir) / "f").write_bytes(b"hello after restart")
    assert fc.getattr(1).attr.nlink >= 2
    fds_before = steady_fd_count(d.pid)
    old = worker_pid(d, "request-1")
    new = kill_and_wait_replaced(d, "request-1", 0)
    assert new != old
    assert fc.getattr(1).attr.nlink >= 2
    e = fc.lookup(1, "f")
    fh = fc.open(e.nodeid).fh
    assert fc.read(e.nodeid, fh, 0, 100) == b"hello after restart"
    fc.release(e.nodeid, fh)
    assert settled_fd_count(d.pid, fds_before) == fds_before, os.listdir(f"/proc/{d.pid}/fd")
    log = d.log()
    assert re.search(r"worker request-1 \(pid \d+\) (died|failed): .*killed by SIGKILL", log), log
    assert "Traceback" not in log


def test_nodeids_of_the_dead_worker_are_stale_until_looked_up_again(session):
    """Default --inode-file-handles=never: the replacement cannot reopen a
    nodeid only the dead worker held (ESTALE); a new LOOKUP of the same name
    gives back the same nodeid, now served."""
    d, fc = session()
    (Path(d.shared_dir) / "g").write_bytes(b"g")
    e = fc.lookup(1, "g")
    kill_and_wait_replaced(d, "request-1", 0)
    with pytest.raises(FuseErrorReply) as err:
        fc.getattr(e.nodeid)
    assert err.value.errno == errno.ESTALE
    again = fc.lookup(1, "g")
    assert (again.nodeid, again.generation) == (e.nodeid, e.generation)
    assert fc.getattr(e.nodeid).attr.size == 1


def test_worker_killed_by_seccomp_answers_eio_and_is_replaced(session, tmp_path):
    # STATFS is the only op that calls fstatfs (attrs.do_statfs: os.fstatvfs)
    policy = policy_without(tmp_path, "request", "fstatfs")
    d, fc = session(env={"PYVIRTIOFSD_POLICY_DIR": policy})
    assert fc.getattr(1).attr.nlink >= 2
    with pytest.raises(FuseErrorReply) as err:
        fc.statfs()
    assert err.value.errno == errno.EIO            # answered by the replacement
    assert fc.getattr(1).attr.nlink >= 2
    log = wait_for_log(d, r"worker request-1 restarted as pid \d+")
    assert re.search(r"worker request-1 \(pid \d+\) (died|failed): .*killed by SIGSYS: a system call outside "
                     r"policy/request\.policy", log), log
    assert "answered 1 request(s) of the previous worker with EIO" in log


def test_request_in_flight_when_the_worker_dies_gets_eio(session):
    d, fc = session()
    path = Path(d.shared_dir) / "locked"
    path.write_bytes(b"x" * 10)
    e = fc.lookup(1, "locked")
    fh = fc.open(e.nodeid, os.O_RDWR).fh
    with open(path, "r+b") as host:
        fcntl.lockf(host, fcntl.LOCK_EX)           # a host process holds the lock
        p = fc.send_setlkw(e.nodeid, fh, owner=0x1234, type_=F_WRLCK)
        with pytest.raises(TimeoutError):
            fc.complete(p, timeout=0.5)            # deferred: waits for the host lock
        others = [fc.send(Opcode.GETATTR, 1, bytes(16), [104]) for _ in range(3)]
        for q in others:
            assert fc.complete(q).error == 0       # the ring is still served meanwhile
        kill_and_wait_replaced(d, "request-1", 0)
        r = fc.complete(p, timeout=10)
        assert r.error == -errno.EIO
    assert fc.getattr(1).attr.nlink >= 2


def test_hiprio_worker_killed_is_replaced_and_forget_still_counts(session):
    d, fc = session()
    (Path(d.shared_dir) / "h").write_bytes(b"h")
    e1 = fc.lookup(1, "h")
    again = fc.lookup(1, "h")
    assert (again.nodeid, again.generation) == (e1.nodeid, e1.generation)   # lookup count 2
    fds_before = steady_fd_count(d.pid)
    kill_and_wait_replaced(d, "hiprio", 0)
    fc.forget(e1.nodeid, 1)                         # served by the new hiprio worker
    e2 = fc.lookup(1, "h")
    assert (e2.nodeid, e2.generation) == (e1.nodeid, e1.generation)   # one lookup left: still live
    fc.forget(e1.nodeid, 2)                         # -> 0: the nodeid is freed
    e3 = fc.lookup(1, "h")
    assert e3.generation != e1.generation, "FORGET after the restart did not drop the lookup count"
    assert settled_fd_count(d.pid, fds_before) == fds_before
    log = d.log()
    assert re.search(r"worker hiprio \(pid \d+\) (died|failed): .*killed by SIGKILL", log), log


def test_get_vring_base_right_after_a_death_answers_the_published_index(session):
    """QEMU stops the rings (VM pause, reboot) while the worker is dead or
    being replaced: GET_VRING_BASE still answers where the ring really is."""
    d, fc = session()
    for _ in range(4):
        fc.getattr(1)
    pid = worker_pid(d, "request-1")
    os.kill(pid, signal.SIGKILL)
    while alive(pid):
        time.sleep(0.01)
    assert fc.vhost.stop() == [0, 5]               # INIT + 4 GETATTR
    fc.vhost.start()
    assert fc.getattr(1).attr.nlink >= 2
    assert fc.vhost.stop() == [0, 6]
    assert "Traceback" not in d.log()


def test_worker_dying_too_often_ends_the_daemon_with_exit_1(session):
    from daemon.supervisor import RESTART_LIMIT
    d, fc = session()
    for n in range(RESTART_LIMIT):
        kill_and_wait_replaced(d, "request-1", n)
        assert fc.getattr(1).attr.nlink >= 2
    os.kill(worker_pid(d, "request-1"), signal.SIGKILL)
    status = d.wait(20)
    assert status == 1, d.log()
    log = d.log()
    assert re.search(rf"ERROR: shutting down: worker request-1 died {RESTART_LIMIT + 1} times within 60 s; "
                     r"not restarting it again", log), log
    assert "Traceback" not in log


@pytest.mark.parametrize("name", ["request-1", "hiprio"])
def test_chroot_mode_worker_killed_is_replaced(session, tmp_path, name):
    """--sandbox chroot (for containers that forbid namespaces): a killed
    worker is replaced the same way and confines itself again (the hiprio
    worker into a fresh deleted empty directory, nothing left behind in
    TMPDIR), the mount goes on, no fd leaks in the supervisor."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    d, fc = session(extra_args=("--sandbox", "chroot"), env={"TMPDIR": str(tmpdir)})
    (Path(d.shared_dir) / "c").write_bytes(b"chroot")
    e = fc.lookup(1, "c")
    fds_before = steady_fd_count(d.pid)
    old = worker_pid(d, name)
    new = kill_and_wait_replaced(d, name, 0)
    assert new != old
    root = os.readlink(f"/proc/{new}/root")
    if name == "hiprio":
        assert root.endswith("(deleted)"), root
        fc.forget(e.nodeid, 1)                      # served by the new hiprio worker
        assert fc.lookup(1, "c").generation != e.generation
    else:
        assert root == d.shared_dir, root
        e = fc.lookup(1, "c")
        fh = fc.open(e.nodeid).fh
        assert fc.read(e.nodeid, fh, 0, 100) == b"chroot"
        fc.release(e.nodeid, fh)
    assert settled_fd_count(d.pid, fds_before) == fds_before, os.listdir(f"/proc/{d.pid}/fd")
    assert list(tmpdir.iterdir()) == []
    log = d.log()
    assert re.search(rf"worker {name} \(pid \d+\) (died|failed): .*killed by SIGKILL", log), log
    assert "Traceback" not in log


def test_metrics_count_restarts_and_survive_them(session, tmp_path):
    """--metrics-socket: a killed worker shows as a restart with its signal,
    the counts it made before dying stay, its replacement counts on, and
    the supervisor's metrics socket is not among a worker's fds."""
    from tests.guest.test_guest_metrics import get, scrape

    path = str(tmp_path / "metrics.sock")
    d, fc = session(extra_args=("--metrics-socket", path))
    for _ in range(5):
        fc.getattr(1)
    before = scrape(path)
    w = {"worker": "request-1"}
    assert get(before, "pyvirtiofsd_requests_total", op="GETATTR", **w) == 5
    old = worker_pid(d, "request-1")
    # the listening socket's inode, from the supervisor's view of its sockets
    listening = [line.split()[6] for line in Path(f"/proc/{d.pid}/net/unix").read_text().splitlines()[1:]
                 if line.split()[-1] == path]
    assert len(listening) == 1
    held = [os.readlink(f"/proc/{old}/fd/{fd}") for fd in os.listdir(f"/proc/{old}/fd")]
    assert any(h.startswith("socket:[") for h in held)          # its channel, at least
    assert f"socket:[{listening[0]}]" not in held
    kill_and_wait_replaced(d, "request-1", 0)
    fc.getattr(1)
    after = scrape(path)
    assert get(after, "pyvirtiofsd_worker_restarts_total", reason="SIGKILL", **w) == 1
    assert get(after, "pyvirtiofsd_requests_total", op="GETATTR", **w) == 6
    assert get(after, "pyvirtiofsd_worker_up", **w) == 1
    assert "Traceback" not in d.log()
    from daemon.fuse import fastpath
    if fastpath.EXTENSION_BUILT and os.environ.get("PYVIRTIOFSD_PURE", "") != "1" \
            and os.environ.get(fastpath.FASTOPS_ENV, "") != "0":
        # the GETATTRs above were served and counted by C, sandboxed (seccomp)
        assert len(re.findall(r"GETATTR, READ and WRITE compiled .*\(counted by C\)", d.log())) == 2
