"""daemon/startup.py: the start state is made safe before the supervisor
opens anything. Each case runs in a forked child (it changes process-wide
state: fds, signal mask, groups, ids)."""

from __future__ import annotations

import os
import pickle
import signal
from types import SimpleNamespace

import pytest

from daemon import startup


def in_child(fn):
    """Run ``fn(result_fd)`` in a forked child; its return value, or the
    exception it raised, comes back pickled through ``result_fd`` (which
    ``fn`` must keep open)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            result = ("ok", fn(w))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            result = ("raised", e)
        with os.fdopen(w, "wb") as f:
            pickle.dump(result, f)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        kind, value = pickle.load(f)
    os.waitpid(pid, 0)
    if kind == "raised":
        raise value
    return value


def config(sandbox="namespace", socket_fd=None):
    return SimpleNamespace(sandbox=sandbox, socket_fd=socket_fd, uid_map=(), gid_map=())


def become_nobody(groups=()) -> None:
    """uid/gid 65534 with ``groups``: every capability is gone."""
    os.setgroups(list(groups))
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)


def test_inherited_fds_are_closed_but_the_ones_kept():
    """Kept: the result pipe here, as the --fd socket and the /dev/log
    socket are in the daemon; one more fd among the closed ones."""
    def child(result_fd):
        fds = [os.open("/", os.O_RDONLY) for _ in range(4)]
        startup.close_inherited_fds({result_fd, fds[2]})
        still = []
        for fd in fds:
            try:
                os.fstat(fd)
                still.append(fd)
            except OSError:
                pass
        return still, fds[2], [fd for fd in (0, 1, 2) if os.isatty(fd) or os.fstat(fd)]
    still, kept, stdio = in_child(child)
    assert still == [kept]
    assert stdio == [0, 1, 2]


def test_signals_unblocked_and_sigchld_default():
    def child(_):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGCHLD})
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        startup.reset_signals()
        return signal.pthread_sigmask(signal.SIG_BLOCK, []), signal.getsignal(signal.SIGCHLD)
    blocked, chld = in_child(child)
    assert blocked == set()
    assert chld == signal.SIG_DFL


def test_supplementary_groups_dropped():
    def child(result_fd):
        os.setgroups([0, 4, 27])
        startup.prepare(config(socket_fd=result_fd))
        return os.getgroups()
    assert in_child(child) == []


@pytest.mark.parametrize("sandbox,missing", [("namespace", "CAP_SYS_ADMIN"), ("chroot", "CAP_SYS_CHROOT")])
def test_without_privileges_start_refused(sandbox, missing):
    def child(_):
        become_nobody()
        startup.check_privileges(config(sandbox))
    with pytest.raises(startup.StartRefused) as e:
        in_child(child)
    assert f"--sandbox {sandbox} needs root" in str(e.value) and missing in str(e.value)


def test_the_namespace_sandbox_needs_sys_chroot_too():
    """The request workers setns into their shared mount namespace
    (sandbox/sharedns.py): the kernel asks CAP_SYS_CHROOT of it, so a
    supervisor without it is refused at start, not its workers one by one."""
    assert {"sys_admin", "sys_chroot"} <= startup.required_caps(config("namespace"))
    assert "sys_admin" not in startup.required_caps(config("chroot"))
    assert startup.required_caps(config("none")) == frozenset()


def test_without_privileges_sandbox_none_keeps_its_groups():
    def child(_):
        become_nobody([4])
        startup.check_privileges(config("none"))
        startup.drop_supplementary_groups(config("none"))
        return os.getgroups()
    assert in_child(child) == [4]


def test_without_setgid_groups_refused_unless_sandbox_none():
    def child(_):
        become_nobody([4])
        startup.drop_supplementary_groups(config("namespace"))
    with pytest.raises(startup.StartRefused, match="supplementary groups"):
        in_child(child)
