"""The ordinary host user the --uid-map/--gid-map tests start daemons as.

scripts/setup.sh creates ``pyvirtiofsd-idmap`` (a system user, no login)
and gives it the subordinate ids 300000-365535 in /etc/subuid and
/etc/subgid, so ``newuidmap``/``newgidmap`` map them for it.

The maps every test uses (three ranges each, so several --uid-map options
are exercised)::

    namespace 0..999      -> host SUB+0..SUB+999      (guest root: SUB)
    namespace 1000        -> host the user's own id   (a guest user 1000: the user)
    namespace 1001..2999  -> host SUB+1001..SUB+2999

so a guest's root creates files the host sees as SUB, guest user 1000 as the
user itself (who owns the shared directory), guest user 1234 as SUB+1234.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.conftest import REPO_ROOT, DaemonProcess

USER = "pyvirtiofsd-idmap"
UNMAPPED = 5000            # a guest id no range maps


class IdmapUser:
    def __init__(self) -> None:
        pw = pwd.getpwnam(USER)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        self.subuid = _subordinate("/etc/subuid")
        self.subgid = _subordinate("/etc/subgid")

    def maps(self) -> list[str]:
        """--uid-map/--gid-map arguments (the ranges above)."""
        args = []
        for option, sub, own in (("--uid-map", self.subuid, self.uid), ("--gid-map", self.subgid, self.gid)):
            args += [option, f":0:{sub}:1000:", option, f":1000:{own}:1:",
                     option, f":1001:{sub + 1001}:1999:"]
        return args

    def host_uid(self, ns_uid: int) -> int:
        return self.uid if ns_uid == 1000 else self.subuid + ns_uid

    def host_gid(self, ns_gid: int) -> int:
        return self.gid if ns_gid == 1000 else self.subgid + ns_gid

    def setpriv(self) -> list[str]:
        """A command prefix that runs the rest as this user, with no groups."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--"]

    def make_base(self, prefix: str) -> Path:
        """A temporary directory of this user's own with ``share/`` in it
        (mode 755, so root, QEMU included, reaches it); remove with
        ``shutil.rmtree``."""
        base = Path(tempfile.mkdtemp(prefix=prefix))
        (base / "share").mkdir()
        for p in (base, base / "share"):
            os.chown(p, self.uid, self.gid)
            os.chmod(p, 0o755)
        return base


def start(kind: str, cmd: list[str], base: Path, ready) -> DaemonProcess:
    """Popen ``cmd`` (already prefixed with ``IdmapUser.setpriv()``), its
    output in ``base/daemon.log``, its socket ``base/vfsd.sock``; waits up
    to 30 s for ``ready(daemon)``, stopping it and failing with its log if
    it exits or never gets there."""
    log_path = base / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    daemon = DaemonProcess(kind, proc, str(base / "vfsd.sock"), str(base / "share"), str(log_path), cmd)
    deadline = time.monotonic() + 30
    while not ready(daemon):
        if proc.poll() is not None or time.monotonic() > deadline:
            daemon.stop()
            raise AssertionError(f"{kind} did not start:\n{daemon.log()[-3000:]}")
        time.sleep(0.05)
    return daemon


def _subordinate(path: str) -> int:
    with open(path) as f:
        for line in f:
            name, start, count = line.strip().split(":")
            if name == USER and int(count) >= 3000:
                return int(start)
    raise AssertionError(f"{USER} has no subordinate range in {path}: run scripts/setup.sh")


def remove(base: Path) -> None:
    shutil.rmtree(base, ignore_errors=True)
