"""Starting a worker in its own namespaces: ``spawn_confined``.

A worker must be PID 1 of a new pid namespace and sit in new mount, net, ipc
and uts namespaces before it sees any guest input. ``unshare(CLONE_NEWPID)``
does not move the caller: it only decides where the caller's *next child* is
born (``/proc/self/ns/pid_for_children``). So the supervisor does, for each
worker (mode ``namespace``)::

    unshare(CLONE_NEWPID)            # supervisor: next child is init of a new pid ns
    pid = os.fork()                  # the real fork: glibc + CPython bookkeeping
    parent: setns(own_pidns, CLONE_NEWPID)   # back to normal at once
    child:  unshare(NEWNS|NEWNET|NEWIPC|NEWUTS); child_fn()

Why this and not the alternatives:

* raw ``clone(2)`` through ``ctypes`` (``syscall(SYS_clone, flags|SIGCHLD, 0...)``
  wrapped in ``PyOS_BeforeFork``/``PyOS_AfterFork_*``): CPython's hooks are
  only half of a fork. glibc's ``fork()`` also runs its own atfork work
  (malloc arena locks, stdio list lock, the TCB's cached tid, robust-mutex
  list); a bare clone syscall skips all of that, and the child's TCB keeps the
  parent's tid. It works today in a single-threaded parent, but it is relying
  on glibc internals we do not control.
* a double fork (fork a helper that unshares and forks the worker): the
  worker is then the supervisor's grandchild, so ``waitpid``, exit status,
  ``SIGCHLD`` and ``PR_SET_PDEATHSIG`` all point at the helper; its host pid
  must be sent back, and the helper is one more process per worker.
* ``unshare`` + ``os.fork`` + ``setns`` back: the worker is the supervisor's
  direct child (``os.fork`` returns its host pid, ``waitpid`` works as
  before), it is PID 1 of its own pid namespace, and every fork handler runs.
  The only cost is two syscalls in the parent. ``setns`` to one's *own*
  active pid namespace is always allowed (needs CAP_SYS_ADMIN, which the
  supervisor keeps anyway to let workers mount and pivot_root).

Consequences the caller must know:

* In the worker, ``os.getppid()`` is 0 (its parent lives outside its pid
  namespace): "is my parent still there?" cannot be asked with getppid.
  ``spawn_confined`` sets ``PR_SET_PDEATHSIG(SIGKILL)`` and then checks a
  pidfd of the supervisor instead, before ``child_fn`` runs.
* PID 1 of a namespace only receives signals it has a handler for (SIGKILL
  and SIGSTOP from the supervisor always arrive). Stop workers with the
  channel's SHUTDOWN and SIGKILL as the fallback, not SIGTERM.
* The new net namespace has only a down loopback: the worker can use its
  inherited socketpair (and SCM_RIGHTS) and nothing else.

Mode ``chroot`` (inside containers, where new namespaces are usually not
permitted) and ``none`` use a plain ``os.fork``.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
from typing import Callable, NoReturn

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

#: namespaces a worker enters besides its pid namespace
WORKER_NAMESPACES = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS

#: the ones --inherit-namespaces may leave to the service manager: a worker's
#: seccomp list has no call that uses them (no socket, bind, connect, SysV or
#: POSIX IPC, sethostname), so they only matter when the supervisor's own
#: are the host's. Mount and pid namespaces are never inherited: the root
#: change and the worker's view of processes depend on them.
INHERITABLE = {"net": CLONE_NEWNET, "ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS}


def parse_inherited(text: str) -> int:
    """``--inherit-namespaces`` (comma-separated net, ipc, uts; empty: none)
    as CLONE_* flags. Raises ValueError naming the bad item."""
    flags = 0
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item not in INHERITABLE:
            raise ValueError(f"{item!r}: only {', '.join(INHERITABLE)} may be inherited")
        flags |= INHERITABLE[item]
    return flags

MODES = ("namespace", "chroot", "none")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)


class SandboxError(Exception):
    """A sandbox step failed; the message is one line naming the step."""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(e)} (errno {e})")


def unshare(flags: int, what: str = "unshare") -> None:
    _check(_libc.unshare(flags), what)


def setns(fd: int, nstype: int, what: str = "setns") -> None:
    _check(_libc.setns(fd, nstype), what)


def fork_confined(mode: str = "namespace", inherited: int = 0) -> int:
    """``os.fork()`` for a worker: returns the child's host pid in the
    parent, 0 in the child, which is then (mode ``namespace``) PID 1 of a new
    pid namespace and in new mount/net/ipc/uts namespaces (but the
    ``inherited`` ones of ``INHERITABLE``, which it shares with the
    supervisor), has
    ``PR_SET_PDEATHSIG(SIGKILL)`` armed, and has checked that the parent was
    still alive after arming it (exits 1 otherwise). A failure to create
    the namespaces raises ``SandboxError`` in the parent (pid namespace) or
    writes one line and exits 1 in the child (the other namespaces)."""
    if mode not in MODES:
        raise ValueError(f"unknown sandbox mode {mode!r}")
    sys.stdout.flush()
    sys.stderr.flush()
    parent_pidfd = os.pidfd_open(os.getpid())
    own_pidns = -1
    pid = -1
    try:
        if mode == "namespace":
            own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            unshare(CLONE_NEWPID, "unshare(CLONE_NEWPID) for a worker (in a container: --sandbox chroot)")
        pid = os.fork()
    finally:
        if pid != 0:                     # the parent, or the fork failed
            try:
                if own_pidns >= 0:
                    setns(own_pidns, CLONE_NEWPID, "setns back to the supervisor's pid namespace")
            finally:
                if own_pidns >= 0:
                    os.close(own_pidns)
                os.close(parent_pidfd)
    if pid != 0:
        return pid
    # the child
    try:
        if own_pidns >= 0:
            os.close(own_pidns)
        import prctl
        prctl.set_pdeathsig(signal.SIGKILL)
        alive = not select.select([parent_pidfd], [], [], 0)[0]
        os.close(parent_pidfd)
        if not alive:                    # the parent died before PDEATHSIG was armed
            os._exit(1)
        if mode == "namespace":
            unshare(WORKER_NAMESPACES & ~(inherited & sum(INHERITABLE.values())),
                    "unshare(mount, net, ipc, uts namespaces)")
    except BaseException as e:  # noqa: BLE001 - never return into the parent's code
        _say(f"sandbox: {e}")
        os._exit(1)
    return 0


def spawn_confined(child_fn: Callable[[], object], mode: str = "namespace", inherited: int = 0) -> int:
    """``fork_confined`` + run ``child_fn()`` in the child and ``os._exit``:
    0 if it returns, the code of a ``SystemExit``, 1 on any other exception
    (printed as one line). Returns the child's host pid."""
    pid = fork_confined(mode, inherited)
    if pid == 0:
        _child(child_fn)
    return pid


def _child(child_fn: Callable[[], object]) -> NoReturn:
    code = 1
    try:
        child_fn()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except SandboxError as e:
        _say(f"sandbox: {e}")
    except BaseException as e:   # noqa: BLE001 - a child must never return into the parent's code
        _say(f"worker failed to start: {type(e).__name__}: {e}")
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)


def _say(line: str) -> None:
    try:
        os.write(2, f"pyvirtiofsd[{os.getpid()}]: error: {line}\n".encode(errors="replace"))
    except OSError:
        pass
