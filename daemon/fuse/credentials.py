"""Per-request file-system credentials: fsuid/fsgid of the guest caller.

Every op that touches the share runs with the caller's uid/gid from the
``fuse_in_header`` as the thread's fsuid/fsgid, so the host kernel does the
permission checks and new files get the caller as owner (the C virtiofsd
switches euid/egid per request for the same reason; passthrough_ll does not
and fails ~160 pjdfstest assertions).

Why fsuid/fsgid through raw ``syscall(2)``: they are per *thread* in the
kernel and only govern file-system access (not signals, not resource
limits), and glibc's ``setfsuid`` wrapper is per-thread too, but Python's
``os.setresuid`` & co. are broadcast by glibc to every thread of the process.
Calling the syscalls directly keeps the switch to the calling thread, so a
helper thread (SETLKW) can run with other credentials than the loop.

``setfsuid`` never fails in a way it reports: it returns the *previous*
value whether or not it changed anything. So a switch is verified with the
usual pair of calls: ``setfsuid(uid)`` then ``setfsuid(-1)`` (an invalid id,
which changes nothing and returns the current one) must give ``uid``.

Changing fsuid from 0 to non-zero drops the file-system capabilities
(CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID...)
from the effective set, and switching back to 0 restores them, which is
exactly what "act as this guest user" needs.

Supplementary groups: the supervisor drops all of them once at start,
before it forks a worker (daemon/startup.py), and ``sandbox.confine``
checks again in each worker before its seccomp filter (no policy allows
``setgroups``), so no request is ever checked against the daemon's own
groups (CVE-2022-0358: with the daemon's groups a guest user could create
setgid files for a group it is not in).

The current ids are cached per thread, so a run of requests from one
user costs no syscall at all.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading

from daemon.fuse.request import FUSEError

# x86-64 syscall numbers
SYS_setfsuid = 122
SYS_setfsgid = 123

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

_INVALID = 0xFFFFFFFF  # (uid_t)-1: never a valid id, so "query only"


class _State(threading.local):
    uid = -1  # not known yet: the first switch always makes the syscalls
    gid = -1


_state = _State()


def _setfsgid(gid: int) -> int:
    return _syscall(SYS_setfsgid, ctypes.c_uint(gid)) & 0xFFFFFFFF


def _setfsuid(uid: int) -> int:
    return _syscall(SYS_setfsuid, ctypes.c_uint(uid)) & 0xFFFFFFFF


_PR_SET_DUMPABLE = 4
_prctl = _libc.prctl
_keep_dumpable = False


def keep_dumpable(on: bool) -> None:
    """With several request workers, keep this process dumpable across
    credential switches: the kernel clears the flag at every fsuid/fsgid
    change, and the other workers need it to borrow fds (fuse/peers.py)."""
    global _keep_dumpable
    _keep_dumpable = on
    if on:
        _prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)


def switch(uid: int, gid: int) -> None:
    """Make (uid, gid) this thread's fsuid/fsgid; FUSEError(EPERM) if the
    kernel refused (an invalid id, or no CAP_SETUID/CAP_SETGID)."""
    state = _state
    if state.uid == uid and state.gid == gid:
        return
    # gid first: while fsuid may still be 0 nothing depends on the order, but
    # this is the order that never leaves a process with a raised fsgid and a
    # lowered fsuid it cannot undo.
    if state.gid != gid:
        _setfsgid(gid)
        if _setfsgid(_INVALID) != gid:
            state.gid = -1
            raise FUSEError(errno.EPERM)
        state.gid = gid
    if state.uid != uid:
        _setfsuid(uid)
        if _setfsuid(_INVALID) != uid:
            state.uid = -1
            raise FUSEError(errno.EPERM)
        state.uid = uid
    if _keep_dumpable:
        _prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)


def restore() -> None:
    """Back to the process's own ids (fsuid = euid, fsgid = egid): for work
    the daemon does for itself (INIT opening the share, closing fds)."""
    switch(os.geteuid(), os.getegid())


def current() -> tuple[int, int]:
    """The thread's fsuid and fsgid as the kernel has them (no cache)."""
    return _setfsuid(_INVALID), _setfsgid(_INVALID)


def forget_cache() -> None:
    """Make the next ``switch`` issue the syscalls (after someone else
    changed the ids behind this module's back)."""
    _state.uid = -1
    _state.gid = -1


def drop_supplementary_groups() -> None:
    """setgroups([]) if there are any (process-wide by design): once per
    process, before its seccomp filter. PermissionError without CAP_SETGID."""
    if os.getgroups():
        os.setgroups([])
