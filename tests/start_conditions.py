"""The states a service manager starts a daemon in, for the tests' starters.

A root shell starts a daemon with no supplementary groups, no ambient
capabilities, umask 022, only fds 0-2, no blocked or ignored signal and an
open stdin; libvirt, systemd and other managers often do not (libvirtd
9.0 gives its helpers supplementary group 0, see scripts/libvirt-check.sh).
``START_CONDITIONS`` names such states; ``tests/conftest.py``'s
``start_daemon(..., start=NAME)`` starts a daemon in one of them, so a
frontend, hostile or guest test can run against a daemon started so.

Everything but ``listen_fd`` is inherited through exec: supplementary
groups and ambient capabilities by ``setpriv`` (which execs the daemon
in place: the pid stays the daemon's), umask, signal mask and ignored
dispositions, closed stdin and extra fds from the child before exec.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import NamedTuple

GROUPS = (0, 4, 27)     # root, adm, sudo: what a service may carry
AMBIENT = ("net_admin", "sys_time")   # capabilities no role of ours keeps
# what libvirtd's environment reduces to when systemd starts it
SERVICE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
BLOCKED = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP)
IGNORED = (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP)


class StartCondition(NamedTuple):
    groups: tuple[int, ...] = ()       # supplementary groups (setpriv --groups)
    ambient: tuple[str, ...] = ()      # ambient capabilities (setpriv --ambient-caps)
    env: dict | None = None            # the whole environment (None: the test's)
    listen_fd: bool = False            # the starter listens and passes --fd=N, as libvirt does
    umask: int | None = None
    block_signals: bool = False        # BLOCKED in the signal mask
    ignore_signals: bool = False       # IGNORED set to SIG_IGN
    close_stdin: bool = False
    extra_fds: bool = False            # an fd of the share's parent directory and a pipe, inherited
    refused: tuple[str, ...] = ()      # system calls a service filter answers EPERM (refuse_syscalls.py)
    args: tuple[str, ...] = ()         # daemon options the manager adds for this state

    def prefix(self) -> list[str]:
        """The command that starts the daemon in this state (execs it)."""
        cmd = []
        if self.refused:
            cmd = [sys.executable, str(Path(__file__).with_name("refuse_syscalls.py")),
                   ",".join(self.refused), "--"]
        if not self.groups and not self.ambient:
            return cmd
        cmd.append("setpriv")
        if self.groups:
            cmd.append("--groups=" + ",".join(map(str, self.groups)))
        if self.ambient:
            caps = ",".join("+" + c for c in self.ambient)
            cmd += [f"--inh-caps={caps}", f"--ambient-caps={caps}"]
        return cmd + ["--"]

    def preexec(self) -> None:
        """Runs in the child before exec (subprocess's preexec_fn)."""
        if self.umask is not None:
            os.umask(self.umask)
        if self.ignore_signals:
            for sig in IGNORED:
                signal.signal(sig, signal.SIG_IGN)
        if self.block_signals:
            signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED)
        if self.close_stdin:
            os.close(0)


START_CONDITIONS = {
    "plain": StartCondition(),
    "groups": StartCondition(groups=GROUPS),
    "ambient-caps": StartCondition(ambient=AMBIENT),
    "empty-env": StartCondition(env={}),
    "service-env": StartCondition(env=SERVICE_ENV),
    "fd": StartCondition(listen_fd=True),
    "umask-777": StartCondition(umask=0o777),
    "umask-000": StartCondition(umask=0o000),
    "extra-fds": StartCondition(extra_fds=True),
    "signals-blocked": StartCondition(block_signals=True),
    "signals-ignored": StartCondition(ignore_signals=True),
    "stdin-closed": StartCondition(close_stdin=True),
    # libvirt 9.0 as seen (scripts/libvirt-check.sh): group 0, --fd
    "libvirt": StartCondition(groups=(0,), listen_fd=True),
    # the packaged systemd unit: its SystemCallFilter= has no pidfd_getfd,
    # so it offers one request queue (docs/service.md)
    "systemd-unit": StartCondition(refused=("pidfd_getfd",), args=("--request-queues", "1")),
    # all of it at once
    "managed": StartCondition(groups=GROUPS, ambient=AMBIENT, env=SERVICE_ENV, listen_fd=True,
                              umask=0o077, block_signals=True, ignore_signals=True,
                              close_stdin=True, extra_fds=True),
}


def process_state(pid: int) -> dict[str, str]:
    """Groups, CapAmb, SigBlk and SigIgn of ``pid`` as /proc shows them."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Groups", "CapAmb", "SigBlk", "SigIgn"):
                out[key] = value.strip()
    return out


def open_fd_targets(pid: int) -> list[str]:
    """What each of ``pid``'s fds points at (readlink of /proc/PID/fd/N)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out
