"""One mount namespace for every request worker (``--sandbox namespace``).

Why: linkat(2) and renameat2(2) refuse two paths on different *mounts*
(EXDEV), and a bind mount made in one mount namespace is a different mount
from the "same" bind mount made in another. With several request queues a
worker uses O_PATH fds that another worker opened (copied with
``pidfd_getfd``, docs/multiqueue.md): LINK of an inode request-1 looked up
into a directory request-2 looked up, or RENAME between two such
directories, then failed with EXDEV when each worker had pivoted into its
own bind mount of the share (``cp -a`` of a tree with hard links on a
2-queue Linux 6.12 guest). The same holds for a restarted worker and the
copies the keeper hands it.

So the share's mount tree is made once: ``make`` forks a short-lived
helper that does what a request worker did for itself (unshare the mount
namespace, make "/" a recursive slave, bind-mount the shared directory onto
itself, read-only with ``--readonly``, pivot_root into it and detach the old
root: mounts.py) and sends the parent an fd of its namespace (its
``/proc/self/ns/mnt``, by SCM_RIGHTS) before it exits. The pool holds that fd for
the daemon's life; each request worker still unshares a mount namespace of
its own to mount a proc for its pid namespace and open ``/proc/self/fd``
(that proc must belong to the worker's pid namespace), and then joins
the shared one: ``setns`` makes its root and cwd the share, on the mount
every request worker uses. Nothing else is shared: the workers' pid, net,
ipc and uts namespaces stay their own, and the namespace holds no proc, no
host path, nothing but the share and its submounts. (Joining it is
mounts.setup_request_root's ``shared_ns``.)

Cost: one fork at the first request worker's start; a worker's confinement
does one ``setns`` in place of the bind mount and pivot_root.
"""

from __future__ import annotations

import os
import socket

from daemon.sandbox import mounts
from daemon.sandbox.namespaces import CLONE_NEWNS, SandboxError, unshare

_READY = b"ready"
_ERROR_MAX = 1024


def make(shared_dir: str, readonly: bool = False) -> int:
    """A new mount namespace whose root is ``shared_dir`` (a read-only bind
    mount with ``readonly``): an O_RDONLY|O_CLOEXEC fd of it. Raises
    SandboxError naming the step that failed (in the helper or here)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = os.fork()
    except OSError as e:
        ours.close()
        theirs.close()
        raise SandboxError(f"fork the mount namespace helper: {e.strerror}") from None
    if pid == 0:
        ours.close()
        _helper(theirs, shared_dir, readonly)       # never returns
    theirs.close()
    try:
        with ours:
            answer, fds, _flags, _addr = socket.recv_fds(ours, _ERROR_MAX, 1)
            if answer == _READY and len(fds) == 1:
                return fds[0]
            for fd in fds:
                os.close(fd)
            reason = answer.decode(errors="replace") or "the helper exited"
            raise SandboxError(f"the request workers' mount namespace: {reason}")
    finally:
        os.waitpid(pid, 0)


def _helper(sock: socket.socket, shared_dir: str, readonly: bool):
    """The forked helper: build the namespace, send an fd of it (its own
    /proc/self/ns/mnt, opened while the host's /proc is reachable: another
    process's needs ptrace access, which a supervisor in a user namespace
    lacks) or the reason it could not, exit. Never returns."""
    code = 1
    try:
        try:
            unshare(CLONE_NEWNS, "unshare(CLONE_NEWNS)")
            try:
                ns_fd = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise SandboxError(f"open /proc/self/ns/mnt: {e.strerror}") from None
            mounts.make_root_slave()
            mounts.setup_share_root(shared_dir, readonly)
        except SandboxError as e:
            sock.send(str(e).encode()[:_ERROR_MAX])
        else:
            socket.send_fds(sock, [_READY], [ns_fd])
            code = 0
    except BaseException:   # noqa: BLE001 - a forked child must never return into the parent's code
        pass
    finally:
        os._exit(code)
