"""The running daemon's confinement, checked from outside while a frontend
(a stand-in for QEMU + the guest driver) is attached and has used the share:
every worker is filtered, has no_new_privs and exactly its role's
capabilities, lives in its own mount/pid/net/ipc/uts namespaces, sees the
shared directory (or an empty root) as "/", and holds no socket of the
supervisor's (so not the QEMU connection)."""

from __future__ import annotations

import os

import pytest

from daemon.sandbox import capabilities
from tests.frontend.fuse_client import FuseClient
from tests.frontend.vhost import start_frontend
from tests.procfs import children, ns_inodes


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


@pytest.fixture
def attached(daemon_factory, tmp_path):
    """Our daemon with default options (--sandbox namespace --seccomp kill),
    a frontend attached, FUSE INIT done and a file read through it."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello").write_text("hi\n")
    d = daemon_factory("ours", share)
    fe = start_frontend(d.socket_path, ram_size=64 << 20)
    fc = FuseClient(fe)
    fc.init()
    entry = fc.lookup(1, "hello")
    fh = fc.open(entry.nodeid, os.O_RDONLY).fh
    assert fc.read(entry.nodeid, fh, 0, 100) == b"hi\n"
    yield d, share
    fe.close()


def test_every_worker_is_confined(attached):
    d, share = attached
    workers = children(d.pid)
    assert len(workers) == 3, "one hiprio and one request worker for one request queue, the keeper"
    roles = {}
    for pid in workers:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
        roles[next(r for r in ("hiprio", "keeper", "request") if r in comm)] = pid
    assert set(roles) == {"hiprio", "request", "keeper"}, roles

    sup_ns = ns_inodes(d.pid)
    sup_sockets = socket_inodes(d.pid)
    assert sup_sockets, "the supervisor holds the QEMU connection and the worker channels"
    share_id = (os.stat(share).st_dev, os.stat(share).st_ino)
    shared: dict[str, set] = {}
    for role, pid in roles.items():
        st = status(pid)
        assert st["Seccomp"].strip() == "2", role
        assert st["NoNewPrivs"].strip() == "1", role
        want = capabilities.mask(capabilities.role_caps(role))
        assert int(st["CapEff"], 16) == want, role
        assert int(st["CapPrm"], 16) == want, role
        assert int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0, role
        ns = ns_inodes(pid)
        for kind in ("mnt", "pid", "net", "ipc", "uts"):
            assert ns[kind] != sup_ns[kind], (role, kind)
        root = os.stat(f"/proc/{pid}/root")
        if role == "request":
            assert (root.st_dev, root.st_ino) == share_id
        else:
            assert os.listdir(f"/proc/{pid}/root") == []
            assert (root.st_dev, root.st_ino) != share_id
        worker_sockets = socket_inodes(pid)
        shared[role] = worker_sockets & sup_sockets
        if role == "hiprio":
            assert len(worker_sockets) == 1, (role, worker_sockets)     # its channel end only
            assert not shared[role], role
        elif role == "keeper":
            # its channel end, and the reading end of its fd socket, which
            # the supervisor holds too (never reads) for the next keeper
            assert len(worker_sockets) == 2 and len(shared[role]) == 1, (role, worker_sockets)
        else:
            # its channel end, the writing end of the keeper's fd socket
            # (the supervisor holds it too), and both ends of its own pair
            # for the keeper's answers, which the supervisor does not keep
            assert len(worker_sockets) == 4 and len(shared[role]) == 1, (role, worker_sockets)
    assert shared["request"] != shared["keeper"]
    # the supervisor itself is filtered and keeps no_new_privs too
    sup = status(d.pid)
    assert sup["Seccomp"].strip() == "2" and sup["NoNewPrivs"].strip() == "1"
    assert int(sup["CapEff"], 16) == capabilities.mask(capabilities.role_caps("supervisor"))
