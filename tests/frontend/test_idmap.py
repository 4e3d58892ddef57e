"""--uid-map/--gid-map: the daemon started by an ordinary host user
(tests/idmap_user.py) in a user namespace newuidmap/newgidmap mapped,
driven through the test frontend.

Files the guest creates get the host ids the maps give the guest's ids,
the guest sees its own ids back, an id no range maps is refused, the
sandbox still applies in every worker, and a map the user is not entitled
to is one line at start, promptly.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT, DaemonProcess
from tests.frontend.fuse_client import FuseClient, FuseErrorReply
from tests.frontend.vhost import start_frontend
from tests.idmap_user import UNMAPPED, IdmapUser, remove, start
from daemon.sandbox import userns
from tests.procfs import children

REQUEST_CAPS = {"chown", "dac_override", "fowner", "fsetid", "setgid", "setuid", "mknod", "setfcap"}
CAP_BITS = {"chown": 0, "dac_override": 1, "fowner": 3, "fsetid": 4, "setgid": 6, "setuid": 7,
            "mknod": 27, "setfcap": 31}


@pytest.fixture
def user():
    return IdmapUser()


@pytest.fixture
def base(user):
    path = user.make_base("vfsd-idmap-")
    yield path
    remove(path)


def _command(user: IdmapUser, base, *args) -> list[str]:
    return [*user.setpriv(), sys.executable, "-m", "daemon", "--socket-path", str(base / "vfsd.sock"),
            "--shared-dir", str(base / "share"), *args]


def _start(user: IdmapUser, base, *args) -> DaemonProcess:
    return start("ours", _command(user, base, *args), base, lambda d: "waiting for QEMU" in d.log())


def ns_inodes(pid: int | str) -> dict[str, int]:
    return {n: os.stat(f"/proc/{pid}/ns/{n}").st_ino for n in ("user", "mnt", "pid", "net", "ipc", "uts")}


def process_state(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def test_guest_ids_become_the_mapped_host_ids(user, base):
    daemon = _start(user, base, *user.maps())
    share = base / "share"
    try:
        sock = os.stat(daemon.socket_path)
        assert (sock.st_uid, sock.st_gid) == (user.uid, user.gid), "the socket is the user's, for QEMU"
        fe = start_frontend(daemon.socket_path, ram_size=64 << 20, num_request_queues=1)
        try:
            fc = FuseClient(fe)
            fc.init()
            made = {}
            for name, ns_id in (("by-root", 0), ("by-user", 1000), ("by-1234", 1234)):
                entry, opened = fc.create(1, name, mode=stat.S_IFREG | 0o640, uid=ns_id, gid=ns_id)
                fc.write(entry.nodeid, opened.fh, 0, name.encode())
                fc.release(entry.nodeid, opened.fh)
                made[name] = (entry.nodeid, ns_id)
            fc.mkdir(1, "dir-1234", 0o755, uid=1234, gid=1234)
            for name, (nodeid, ns_id) in made.items():
                st = os.stat(share / name)
                assert (st.st_uid, st.st_gid) == (user.host_uid(ns_id), user.host_gid(ns_id)), name
                assert (share / name).read_bytes() == name.encode()
                attr = fc.getattr(nodeid).attr
                assert (attr.uid, attr.gid) == (ns_id, ns_id), f"the guest sees its own ids for {name}"
            st = os.stat(share / "dir-1234")
            assert (st.st_uid, st.st_gid) == (user.subuid + 1234, user.subgid + 1234)
            # the shared directory itself: the user's own ids are namespace id 1000
            root_attr = fc.getattr(1).attr
            assert (root_attr.uid, root_attr.gid) == (1000, 1000)
            # a host file of an id outside every map is nobody's to the guest
            os.close(os.open(share / "host-root", os.O_CREAT | os.O_WRONLY, 0o644))
            assert (fc.lookup(1, "host-root").attr.uid, fc.lookup(1, "host-root").attr.gid) == (65534, 65534)
            # a guest id no range maps cannot own a new file
            with pytest.raises(FuseErrorReply) as e:
                fc.mkdir(1, "unmapped", 0o755, uid=UNMAPPED, gid=UNMAPPED)
            assert e.value.errno in (errno.EPERM, errno.EINVAL, errno.EOVERFLOW)
            assert not (share / "unmapped").exists()
            # chown through the guest: to a mapped id works, to an unmapped one does not
            fc.setattr(made["by-root"][0], uid=1234, gid=1234)
            st = os.stat(share / "by-root")
            assert (st.st_uid, st.st_gid) == (user.subuid + 1234, user.subgid + 1234)
            with pytest.raises(FuseErrorReply):
                fc.setattr(made["by-root"][0], uid=UNMAPPED)
            _check_confined(daemon, user, share)
        finally:
            fe.close()
        assert daemon.wait(15) == 0, daemon.log()[-3000:]
    finally:
        daemon.stop()
    log = daemon.log()
    assert "Traceback" not in log, log[-3000:]
    assert f"user namespace: uid map :0:{user.subuid}:1000: :1000:{user.uid}:1:" in log


def _check_confined(daemon: DaemonProcess, user: IdmapUser, share) -> None:
    """Every process of the tree is in one user namespace that is not the
    host's; each worker also has pid/mount/net namespaces of its own,
    no_new_privs, a seccomp filter and the role's capabilities."""
    host = ns_inodes("self")
    procs = _descendants(daemon.pid)
    assert len(procs) >= 3, procs             # supervisor + hiprio + request-1 (and the keeper above)
    supervisor = procs[0]
    keeper = process_state(daemon.pid)               # the process started: it only waits
    assert keeper["CapEff"] == keeper["CapPrm"] == keeper["CapBnd"] == "0000000000000000", keeper
    assert keeper["NoNewPrivs"] == "1", keeper
    sup_ns = ns_inodes(supervisor)
    assert sup_ns["user"] != host["user"]
    workers = _descendants(supervisor)
    assert len(workers) >= 2, workers
    for pid in workers:
        ns = ns_inodes(pid)
        assert ns["user"] == sup_ns["user"]
        for kind in ("pid", "mnt", "net", "ipc", "uts"):
            assert ns[kind] != sup_ns[kind] and ns[kind] != host[kind], (pid, kind)
        state = process_state(pid)
        assert state["NoNewPrivs"] == "1" and state["Seccomp"] == "2", state
        assert state["Uid"].split()[0] == str(user.subuid), "root in the namespace is the mapped host id"
        caps = int(state["CapEff"], 16)
        root = set(os.listdir(f"/proc/{pid}/root"))     # its "/" after pivot_root
        if caps:                                  # request worker: root is the share
            assert caps == sum(1 << CAP_BITS[c] for c in REQUEST_CAPS), hex(caps)
            assert root == set(os.listdir(share)), root
        else:                                     # hiprio: no capabilities, an empty root
            assert root == set(), root


def test_a_map_the_user_does_not_own_is_one_line_at_start(user, base):
    """newuidmap refuses host ids outside the user's /etc/subuid ranges: the
    daemon says so on one line and exits 1 within seconds, it never hangs."""
    not_ours = user.subuid + 100000
    r = subprocess.run(_command(user, base, "--uid-map", f":0:{not_ours}:10:"), cwd=str(REPO_ROOT),
                       capture_output=True, text=True, timeout=40)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"pyvirtiofsd: error: --uid-map :0:{not_ours}:10:: newuidmap refused"), lines[0]
    assert "/etc/subuid" in lines[0]


def test_a_gid_map_the_user_does_not_own_is_one_line_at_start(user, base):
    r = subprocess.run(_command(user, base, "--uid-map", f":0:{user.uid}:1:", "--gid-map", ":0:0:1:"),
                       cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=40)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "--gid-map :0:0:1:: newgidmap refused" in lines[0], lines[0]


ROOT_MAP_BASE = 400000     # host ids no /etc/subuid line gives anyone: only root may map them
DEBIAN_PYTHON = "/usr/bin/python3"   # with python3-prctl and python3-seccomp (scripts/setup.sh)


def test_root_confines_itself_to_the_maps(user, base):
    """libvirt passes a system domain's <idmap> to the daemon it starts as
    root: the daemon writes the maps itself (no newuidmap, no /etc/subuid)
    and runs as root of that namespace, so a guest's root creates files the
    host sees as the mapped id, a host file of a mapped id is the guest's
    own id, and the host's root is nobody. (The Rust virtiofsd 1.13 refuses
    the maps as root.)"""
    share = base / "share"
    os.chown(share, ROOT_MAP_BASE, ROOT_MAP_BASE)
    # Debian's python3, not the venv's: that one's standard library may lie
    # under /root (mode 700), which root confined to the maps cannot read
    cmd = [DEBIAN_PYTHON, "-m", "daemon", "--socket-path", str(base / "vfsd.sock"), "--shared-dir", str(share),
           f"--uid-map=:0:{ROOT_MAP_BASE}:65536:", f"--gid-map=:0:{ROOT_MAP_BASE}:65536:"]
    daemon = start("ours", cmd, base, lambda d: "waiting for QEMU" in d.log())
    try:
        assert os.stat(daemon.socket_path).st_uid == 0, "root's socket, as root made it"
        with open(share / "by-host-1234", "w") as f:
            f.write("host")
        os.chown(share / "by-host-1234", ROOT_MAP_BASE + 1234, ROOT_MAP_BASE + 1234)
        os.close(os.open(share / "host-root", os.O_CREAT | os.O_WRONLY, 0o644))
        fe = start_frontend(daemon.socket_path, ram_size=64 << 20, num_request_queues=1)
        try:
            fc = FuseClient(fe)
            fc.init()
            assert (fc.getattr(1).attr.uid, fc.getattr(1).attr.gid) == (0, 0)
            entry, opened = fc.create(1, "by-guest-root", mode=stat.S_IFREG | 0o644, uid=0, gid=0)
            fc.release(entry.nodeid, opened.fh)
            fc.mkdir(1, "dir-77", 0o755, uid=77, gid=77)
            assert os.stat(share / "by-guest-root")[4:6] == (ROOT_MAP_BASE, ROOT_MAP_BASE)
            assert os.stat(share / "dir-77")[4:6] == (ROOT_MAP_BASE + 77, ROOT_MAP_BASE + 77)
            attr = fc.lookup(1, "by-host-1234").attr
            assert (attr.uid, attr.gid) == (1234, 1234)
            attr = fc.lookup(1, "host-root").attr
            assert (attr.uid, attr.gid) == (65534, 65534)
            with pytest.raises(FuseErrorReply):
                fc.mkdir(1, "unmapped", 0o755, uid=70000, gid=70000)
            supervisor = _descendants(daemon.pid)[0]
            with open(f"/proc/{supervisor}/uid_map") as f:
                assert f.read().split() == ["0", str(ROOT_MAP_BASE), "65536"]
            assert process_state(supervisor)["Uid"].split()[0] == str(ROOT_MAP_BASE)
            with open(f"/proc/{supervisor}/setgroups") as f:
                assert f.read().strip() == "allow"
            assert process_state(supervisor)["Groups"] == "", "no host group reaches the namespace"
        finally:
            fe.close()
        assert daemon.wait(15) == 0, daemon.log()[-3000:]
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.log(), daemon.log()[-3000:]


def test_only_the_users_own_ids_without_subordinate_ranges(user, base):
    """:0:OWN:1: needs no /etc/subuid entry (newuidmap allows one's own id):
    guest root's files are the user's on the host, and with setgroups then
    denied in the namespace the daemon still starts (keeping no groups,
    since setpriv cleared them)."""
    daemon = _start(user, base, "--uid-map", f":0:{user.uid}:1:")
    try:
        fe = start_frontend(daemon.socket_path, ram_size=64 << 20, num_request_queues=1)
        try:
            fc = FuseClient(fe)
            fc.init()
            fc.mkdir(1, "d", 0o700)
            st = os.stat(base / "share" / "d")
            assert (st.st_uid, st.st_gid) == (user.uid, user.gid)
            with pytest.raises(FuseErrorReply):
                fc.mkdir(1, "e", 0o700, uid=1000, gid=1000)
        finally:
            fe.close()
        assert daemon.wait(15) == 0, daemon.log()[-3000:]
    finally:
        daemon.stop()


def test_two_queues_a_worker_restart_and_sigterm(user, base):
    """In the user namespace as outside it: request workers borrow each
    other's fds (pidfd_getfd: same namespace, same ids), a SIGKILLed worker
    is replaced, and SIGTERM to the process started (the keeper) stops the
    supervisor, whose status it returns."""
    daemon = _start(user, base, *user.maps())
    try:
        fe = start_frontend(daemon.socket_path, ram_size=64 << 20, num_request_queues=2)
        try:
            q1 = FuseClient(fe, request_queue=1)
            q1.init()
            q2 = FuseClient(fe, request_queue=2, uid=1000, gid=1000)
            entry, opened = q1.create(1, "shared", mode=stat.S_IFREG | 0o644, uid=1000, gid=1000)
            q1.write(entry.nodeid, opened.fh, 0, b"from queue 1")
            assert q2.read(entry.nodeid, opened.fh, 0, 64) == b"from queue 1"   # fd borrowed from request-1
            q2.release(entry.nodeid, opened.fh)
            supervisor = _descendants(daemon.pid)[0]
            before = children(supervisor)
            victim = max(before)                     # a request worker (hiprio is forked first)
            assert process_state(victim)["CapEff"] != "0000000000000000"
            os.kill(victim, 9)
            deadline = time.monotonic() + 15
            while True:
                now = children(supervisor)
                if victim not in now and len(now) == len(before):
                    break
                assert time.monotonic() < deadline, f"no replacement for {victim}: {now}"
                time.sleep(0.05)
            q1.mkdir(1, "after-restart", 0o755, uid=1234, gid=1234)
            q2.mkdir(1, "after-restart-2", 0o755, uid=1234, gid=1234)
            for name in ("after-restart", "after-restart-2"):
                st = os.stat(base / "share" / name)
                assert (st.st_uid, st.st_gid) == (user.subuid + 1234, user.subgid + 1234)
            assert daemon.stop(10) == 0, daemon.log()[-3000:]
            assert not os.path.exists(f"/proc/{supervisor}"), "the supervisor ended with its keeper"
        finally:
            fe.close()
    finally:
        daemon.stop()


def _fake_newuidmap(base, body: str):
    """A directory whose only program is a ``newuidmap`` running ``body``."""
    bin_dir = base / "bin"
    bin_dir.mkdir()
    prog = bin_dir / "newuidmap"
    prog.write_text(f"#!/bin/sh\n{body}\n")
    os.chmod(prog, 0o755)
    os.chmod(bin_dir, 0o755)
    return bin_dir


@pytest.mark.parametrize("body, message", [
    ("exec /bin/sleep 60", "newuidmap did not finish within"),
    ("echo 'newuidmap: nope' >&2; exit 1", "newuidmap refused: newuidmap: nope"),
])
def test_a_hanging_or_failing_map_program_is_one_line_promptly(user, base, body, message):
    """Whatever newuidmap does, the start ends within the daemon's bound
    (userns.MAP_TIMEOUT) with one line, and leaves no process behind."""
    bin_dir = _fake_newuidmap(base, body)
    cmd = _command(user, base, *user.maps())
    cmd[0] = shutil.which("setpriv")
    started = time.monotonic()
    r = subprocess.run(cmd, cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=60,
                       env={"PATH": str(bin_dir)})
    took = time.monotonic() - started
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert message in lines[0], lines[0]
    assert took < userns.MAP_TIMEOUT + 10, took
    leftover = subprocess.run(["pgrep", "-u", str(user.uid), "-f", str(bin_dir)], capture_output=True)
    assert leftover.returncode == 1, leftover.stdout


def test_no_map_program_is_one_line(user, base):
    empty = base / "empty"
    empty.mkdir()
    cmd = _command(user, base, *user.maps())
    cmd[0] = shutil.which("setpriv")
    r = subprocess.run(cmd, cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=60,
                       env={"PATH": str(empty)})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "newuidmap not found (Debian's uidmap package provides it)" in lines[0]
