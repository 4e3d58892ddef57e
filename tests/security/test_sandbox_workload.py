"""Each worker allow-list is sufficient: a confined worker under
``--seccomp kill`` runs a real FUSE session through every op (as root and
as uid 1000) plus the event-loop/channel/guest-memory work around it, and
survives. (The end-to-end proof with a real guest is in tests/guest.)"""

from __future__ import annotations

import os
import socket

import pytest

from daemon import sandbox
from daemon.fuse import abi
from daemon.fuse.abi import Opcode
from daemon.fuse.inodes import InodeTable
from daemon.fuse.session import FuseSession
from tests.security import workload
from tests.security.confined import make_config, run_confined
from tests.unit.fusereq import INIT_FLAGS2_LINUX_6_1, INIT_FLAGS_LINUX_6_1, FuseClient

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture(scope="module", autouse=True)
def _preload():
    sandbox.validate()


@pytest.fixture
def env(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    memfd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 1 << 16)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    chan, peer = socket.socketpair()
    inodes = InodeTable(1 << 10)
    yield shared, memfd, efd, chan, peer, inodes
    inodes.close()
    for fd in (memfd, efd):
        os.close(fd)
    chan.close()
    peer.close()


@pytest.mark.parametrize("mode", ["namespace", "chroot"])
def test_request_list_is_sufficient(env, mode):
    shared, memfd, efd, chan, peer, inodes = env
    cfg = make_config(shared, mode, "kill")

    def body(info):
        session = FuseSession(cfg, inodes, root_fd=info.root_fd)
        client = FuseClient(session)
        init = abi.INIT_IN.pack(7, 38, 131072, INIT_FLAGS_LINUX_6_1, INIT_FLAGS2_LINUX_6_1)
        client.call(Opcode.INIT, 0, init, abi.INIT_OUT.size).ok()
        return workload.all_work(client, memfd, chan, peer, efd)

    res = run_confined("request", cfg, body, timeout=60)
    assert os.WIFEXITED(res.status) and os.WEXITSTATUS(res.status) == 0, \
        f"request worker died: status {res.status:#x} (SIGSYS=31: see dmesg for the syscall number)"
    assert res.report == "[]", res.report
    assert os.listdir(shared) == []          # every op ran on the share, and cleaned up


def test_hiprio_list_is_sufficient(env):
    shared, memfd, efd, chan, peer, inodes = env
    cfg = make_config(shared, "namespace", "kill")

    def body(info):
        problems = workload.runtime_work(memfd, chan, peer, efd, threads=False, file_io=False)
        inodes.unref(1, 0) if hasattr(inodes, "unref") else None
        return problems

    res = run_confined("hiprio", cfg, body)
    assert os.WIFEXITED(res.status) and os.WEXITSTATUS(res.status) == 0, \
        f"hiprio worker died: status {res.status:#x}"
    assert res.report == "[]", res.report
