"""Our daemon started the way libvirt starts a virtiofsd (daemon/compat.py).

libvirt opens and listens on the socket itself, passes it as ``--fd=N`` and,
before it knew about ``separate-options`` (Debian 12's libvirt 9.0), the
C daemon's ``-o source=...,cache=...`` list and ``-d``. The test frontend
then does what QEMU and the guest driver do; the options must have taken
effect, not merely parsed.
"""

from __future__ import annotations

import socket
import subprocess
import sys

from daemon.fuse import abi
from daemon.fuse.abi import InitFlag
from tests.conftest import REPO_ROOT
from tests.frontend.fuse_client import FuseClient
from tests.frontend.vhost import start_frontend


def test_started_as_libvirt_9_0_starts_it(tmp_path):
    share = tmp_path / "share,with comma"  # libvirt doubles the comma
    share.mkdir()
    sock_path = str(tmp_path / "vfsd.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)
    fd = listener.fileno()
    source = str(share).replace(",", ",,")
    cmd = [sys.executable, "-m", "daemon", f"--fd={fd}", "-o",
           f"source={source},cache=none,sandbox=chroot,xattr,no_flock", "--thread-pool-size=1", "-d"]
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), pass_fds=[fd], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    listener.close()
    fe = None
    try:
        fe = start_frontend(sock_path, ram_size=64 << 20, num_request_queues=1)
        fc = FuseClient(fe)
        flags = fc.init().flags
        assert flags & InitFlag.POSIX_LOCKS and not flags & InitFlag.FLOCK_LOCKS  # no_flock
        assert not flags & InitFlag.DO_READDIRPLUS  # cache=none: never offered by default
        entry, opened = fc.create(1, "from-libvirt")
        assert opened.open_flags & abi.FOPEN_DIRECT_IO  # cache=none
        fc.write(entry.nodeid, opened.fh, 0, b"hello")
        fc.release(entry.nodeid, opened.fh)
        assert (share / "from-libvirt").read_bytes() == b"hello"
        assert entry.attr_valid == 0 and entry.entry_valid == 0  # cache=none: 0 s timeouts
    finally:
        if fe is not None:
            fe.close()
        try:
            status = proc.wait(15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text(errors="replace")
    assert status == 0, text[-3000:]
    assert "DEBUG" in text, text[-3000:]  # -d
