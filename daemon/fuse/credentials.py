"""Per-request host credentials (docs/credentials.md has the per-op table).

The guest kernel has checked every permission already (virtiofs mounts with
default_permissions, and it knows the caller's supplementary groups, which
the FUSE header does not carry), so most ops run with the worker's own
credentials (fsuid 0 and its capabilities). What must come from the caller
is the ownership of new inodes: the creating ops run inside ``as_caller``
(the caller's uid/gid as fsuid/fsgid; the one supplementary group the guest
names in FUSE_CREATE_SUPP_GROUP's extension, or CAP_DAC_OVERRIDE when it
names none, for the parent's permission that the guest already checked).
``without_fsetid`` runs an op without CAP_FSETID, so that the host kernel
clears the SUID/SGID bits as it does for an unprivileged writer (the guest's
KILL_SUIDGID flags). A passthrough that creates as root instead (libfuse's
passthrough_ll) fails ~160 pjdfstest assertions.

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

Capabilities and supplementary groups are per thread in the kernel too;
``capset``/``setgroups`` are issued as raw syscalls for the same reason as
setfsuid (glibc's setgroups is broadcast to every thread). Each change is
undone before the request's reply; a change that cannot be undone ends the
worker (``_fatal``) rather than let a group or a capability leak into the
next request (CVE-2022-0358).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import threading

from daemon.fuse.request import FUSEError
from daemon.log import get_logger

log = get_logger("fuse.credentials")

# x86-64 syscall numbers
SYS_setgroups = 116
SYS_setfsuid = 122
SYS_setfsgid = 123
SYS_capget = 125
SYS_capset = 126

_CAP_V3 = 0x20080522  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set
CAP_DAC_OVERRIDE = 1
CAP_FSETID = 4
MAX_SUPP_GROUPS = 32  # most groups a request may name (the kernel sends one)

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


# -- capabilities and supplementary groups of this thread -------------------------------
class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


_CapData = ctypes.c_uint32 * 6  # {effective, permitted, inheritable} x 2 words


def _capget() -> tuple[_CapHeader, ctypes.Array]:
    hdr = _CapHeader(_CAP_V3, 0)  # pid 0: the calling thread
    data = _CapData()
    if _syscall(SYS_capget, ctypes.byref(hdr), ctypes.byref(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return hdr, data


def _capset(hdr, data) -> bool:
    return _syscall(SYS_capset, ctypes.byref(hdr), ctypes.byref(data)) == 0


def effective_caps() -> int:
    """This thread's effective capability mask (capget(2))."""
    _hdr, data = _capget()
    return data[0] | data[3] << 32


def _set_effective(cap: int, on: bool) -> bool:
    """Raise (from permitted) or drop one capability in this thread's
    effective set; True if it changed something."""
    hdr, data = _capget()
    bit = 1 << cap  # caps < 32 only: the first word of each set
    has = bool(data[0] & bit)
    if has == on or (on and not data[1] & bit):
        return False
    data[0] = data[0] | bit if on else data[0] & ~bit
    if not _capset(hdr, data):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return True


def _setgroups(groups) -> None:
    arr = (ctypes.c_uint32 * max(1, len(groups)))(*groups)
    if _syscall(SYS_setgroups, ctypes.c_size_t(len(groups)), arr) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def thread_groups() -> list[int]:
    """This thread's supplementary groups (the getgroups(2) syscall answers
    for the calling thread)."""
    return os.getgroups()


def _fatal(what: str, err: BaseException) -> None:
    """A credential change could not be undone: the next request would run
    with it. Die; the supervisor starts a fresh worker."""
    log.critical("cannot %s (%s): exiting so that it cannot leak into another request", what, err)
    os._exit(1)


@contextlib.contextmanager
def without_fsetid(wanted: bool = True):
    """Run the body without CAP_FSETID in this thread's effective set, so
    that the host kernel clears SUID/SGID on a write or truncate as it does
    for an unprivileged caller (when ``wanted``; otherwise a no-op)."""
    if not wanted:
        yield
        return
    try:
        dropped = _set_effective(CAP_FSETID, False)
    except OSError as e:
        raise FUSEError(e.errno or errno.EPERM) from None
    try:
        yield
    finally:
        if dropped:
            try:
                _set_effective(CAP_FSETID, True)
            except OSError as e:
                _fatal("raise CAP_FSETID again", e)


@contextlib.contextmanager
def as_caller(uid: int, gid: int, groups=()):
    """Run the body (an op that creates an inode) as the guest caller:
    fsuid/fsgid = uid/gid, the supplementary ``groups`` the guest named
    (FUSE_CREATE_SUPP_GROUP; at most MAX_SUPP_GROUPS) and no others. When
    it named none and the caller is not root, CAP_DAC_OVERRIDE stays
    effective (the fsuid switch drops it): the guest checked the parent's
    permission with groups we do not know. Everything is undone after."""
    if len(groups) > MAX_SUPP_GROUPS:
        raise FUSEError(errno.EINVAL)
    if groups:
        try:
            _setgroups(groups)
        except OSError as e:
            raise FUSEError(e.errno or errno.EPERM) from None
    raised = False
    try:
        switch(uid, gid)
        if not groups and uid != 0:
            try:
                raised = _set_effective(CAP_DAC_OVERRIDE, True)
            except OSError as e:
                raise FUSEError(e.errno or errno.EPERM) from None
        yield
    finally:
        try:
            if raised:
                _set_effective(CAP_DAC_OVERRIDE, False)
            restore()
            if groups:
                _setgroups(())
        except (OSError, FUSEError) as e:
            _fatal("return to the worker's own credentials", e)
