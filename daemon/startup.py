"""The process state a service manager hands the daemon, made safe first.

libvirt, systemd and shells start the daemon in states our own tests never
used to: libvirtd (Debian 12's 9.0) runs it with supplementary group 0, a
unit may pass sockets or other descriptors beyond 0-2, a parent may have
blocked signals (the mask survives exec) or ignored SIGCHLD. Before the
supervisor opens anything, ``prepare`` puts the process in the one state
the rest of the daemon assumes:

* **descriptors**: every inherited fd above 2 is closed except the
  ``--fd`` socket. A worker inherits the supervisor's fds before it
  confines itself, so an inherited descriptor of a host directory would
  be a way out of its new root.
* **signals**: none blocked, SIGCHLD at its default. A blocked SIGTERM
  would never reach the supervisor's handler (the daemon could not be
  stopped), a blocked SIGCHLD would hide worker deaths from its loop, and
  an ignored SIGCHLD makes the kernel reap children before ``waitpid``.
  The supervisor installs its own handlers for SIGTERM, SIGINT and SIGCHLD
  later (supervisor.py), whatever they were.
* **privileges**: the sandbox needs the capabilities it later cuts down
  to (namespaces or chroot, the bounding set, per-request fsuid/fsgid);
  without them (not root) the start fails here with one line naming what
  is missing, instead of a worker dying half-way through its confinement.
  ``--sandbox none`` runs without them. With ``--uid-map``/``--gid-map``
  (an ordinary user's start, or root's confined to the maps) the check waits
  until the supervisor is root
  of its own user namespace (``enter_user_namespace``).
* **supplementary groups**: dropped here, once, before any worker is
  forked and before the supervisor's seccomp filter (no policy allows
  ``setgroups``): every worker inherits the empty list, and no request is
  ever checked against the daemon's own groups (CVE-2022-0358).
  ``sandbox.confine`` makes sure again in each worker, before its filter.

Right after, before any socket is made, ``check_fd_copying`` makes sure
several request queues can work: their workers copy each other's fds with ``pidfd_getfd``
(fuse/peers.py), which a service manager's system call filter may refuse
(the packaged systemd unit does: docs/service.md) and Linux < 5.6 lacks.
With ``--request-queues`` above 1 the daemon then refuses to start, in one
line naming the cause and the fix, instead of failing a guest's request on
its second queue. One request queue never calls it (restarts included).

The umask and the environment are left as they are: the umask decides the
mode of the ``--socket-path`` file (workers set their own, 0, since the
guest kernel applied the guest's), and no code of ours reads the
environment.
"""

from __future__ import annotations

import errno
import os
import signal

from daemon import log
from daemon.fuse import credentials
from daemon.fuse.peers import probe_pidfd_getfd
from daemon.sandbox import capabilities, userns

logger = log.get_logger("startup")

FD_LIMIT = 0x7FFFFFFF     # os.closerange's upper bound (a C int); close_range(2) takes any


class StartRefused(Exception):
    """The process cannot run the daemon as it was started (one line)."""


def prepare(config) -> None:
    """All of the above, in this order (the fds first: nothing of ours is
    open yet). Raises StartRefused."""
    close_inherited_fds({config.socket_fd, *log.held_fds()} - {None})
    reset_signals()
    if config.uid_map:
        # an ordinary user, or root confining itself to the maps (libvirt
        # passes a system domain's <idmap>): enter_user_namespace checks,
        # once the sockets exist
        if os.geteuid() == 0:
            drop_supplementary_groups(config)   # host groups (libvirt 9.0's 0) never enter the namespace
        return
    check_privileges(config)
    drop_supplementary_groups(config)


def enter_user_namespace(config) -> None:
    """With --uid-map/--gid-map: into a user namespace with those maps, as
    its root (daemon/sandbox/userns.py), then the privilege check and the
    group drop of ``prepare``. Called once the supervisor's sockets exist
    (they belong to the user who started it). StartRefused."""
    if not config.uid_map:
        return
    try:
        userns.enter(config.uid_map, config.gid_map)
    except userns.UsernsError as e:
        raise StartRefused(str(e)) from None
    logger.info("user namespace: uid map %s, gid map %s",
                " ".join(map(str, config.uid_map)), " ".join(map(str, config.gid_map)))
    check_privileges(config)
    drop_supplementary_groups(config)


def close_inherited_fds(keep=()) -> None:
    """Close every descriptor above 2, except those in ``keep`` (the --fd
    socket, the /dev/log socket logging opened)."""
    low = 3
    for fd in sorted(fd for fd in keep if fd > 2):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, FD_LIMIT)


def reset_signals() -> None:
    """No signal blocked (the mask is inherited by our workers too), SIGCHLD
    delivered."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def required_caps(config) -> frozenset[str]:
    """What the supervisor must hold to confine its workers in
    ``config.sandbox`` mode: a new root (namespaces and pivot_root, and
    the setns of a mount namespace, which the kernel allows only with
    CAP_SYS_CHROOT too: sandbox/sharedns.py; or chroot), cutting the
    bounding set, and the workers' per-request credentials and group drop."""
    if config.sandbox == "none":
        return frozenset()
    root_change = {"sys_admin", "sys_chroot"} if config.sandbox == "namespace" else {"sys_chroot"}
    return frozenset(root_change | {"setpcap", "setuid", "setgid"})


def check_privileges(config) -> None:
    effective = capabilities.capget()[0]
    missing = sorted(c for c in required_caps(config) if not effective & (1 << capabilities.CAP_NUMBERS[c]))
    if missing:
        names = ", ".join("CAP_" + c.upper() for c in missing)
        raise StartRefused(f"--sandbox {config.sandbox} needs root (missing {names}; running as uid "
                           f"{os.geteuid()}); an ordinary user gives --uid-map/--gid-map (a user "
                           f"namespace); --sandbox none runs unconfined, for debugging only")


def drop_supplementary_groups(config) -> None:
    """Without CAP_SETGID (only possible with ``--sandbox none``), or in a
    user namespace whose setgroups is denied (only the user's own gid in
    --gid-map), the daemon keeps its groups: those of the unprivileged user
    it acts as anyway."""
    try:
        credentials.drop_supplementary_groups()
    except PermissionError:
        if config.sandbox != "none" and userns.setgroups_allowed():
            raise StartRefused("cannot drop the supplementary groups (setgroups: permission denied)") from None
        logger.warning("not root: requests are checked against this user's supplementary groups %s",
                       os.getgroups())


# the packaged unit's drop-in that gives back pidfd_getfd (packaging/systemd/)
MULTIQUEUE_DROP_IN = "/usr/share/doc/pyvirtiofsd/examples/multiqueue.conf"


def check_fd_copying(config) -> None:
    """StartRefused if several request queues are offered and this process
    may not call ``pidfd_getfd`` (the workers inherit what refuses it)."""
    queues = config.max_request_workers
    if queues <= 1:
        return
    err = probe_pidfd_getfd()
    if not err:
        return
    cause = ("a seccomp filter refuses it (a systemd unit's SystemCallFilter=: the packaged unit "
             f"allows it only with the drop-in {MULTIQUEUE_DROP_IN})" if err == errno.EPERM else
             "this kernel lacks it (Linux < 5.6) or a seccomp filter answers ENOSYS")
    raise StartRefused(f"--request-queues {queues}: the request workers copy each other's files with "
                       f"pidfd_getfd(2), which is refused here ({os.strerror(err)}): {cause}; "
                       f"allow it, or run with --request-queues 1")
