"""Confining the daemon's processes.

Supervisor, once at startup::

    sandbox.validate(config)   # policy files parsed + compiled (in a child): StartupError material
    pid = sandbox.fork_confined(config.sandbox)  # instead of os.fork() (or spawn_confined(child_fn, mode))
    sandbox.supervisor_after_setup(config)       # own caps cut + supervisor seccomp filter

Worker (``child_fn`` → worker entry), before READY::

    info = sandbox.confine(role, config, config.shared_dir)
    # info.root_fd: O_PATH fd of the shared dir (its new "/"): FuseSession(root_fd=...)
    # cwd is /proc/self/fd (request role)

Order inside ``confine`` (namespaces were entered by ``spawn_confined``):
policies and limits that need /proc are read first → root change (pivot_root
/ chroot; a request worker joins the mount namespace ``share_request_mounts``
built, sharedns.py) → chdir /proc/self/fd → RLIMIT_NOFILE → no supplementary groups →
capabilities (bounding, inheritable, effective, permitted; ambient cleared)
→ no_new_privs → seccomp, last, so every earlier step may use any syscall
it needs.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import NamedTuple

from daemon.config import DEFAULTS, Config
from daemon.fuse import credentials
from daemon.sandbox import capabilities, mounts, programs, rlimits, sharedns, userns
from daemon.sandbox.namespaces import MODES, SandboxError, fork_confined, spawn_confined  # noqa: F401 (re-export)

__all__ = ["SandboxError", "SandboxInfo", "confine", "fork_confined", "spawn_confined", "supervisor_after_setup",
           "validate", "MODES", "share_request_mounts", "release_request_mounts"]

_programs: dict[str, programs.Programs] = {}  # --seccomp action -> every role's program
# fd of the mount namespace every request worker joins (sharedns.py), made
# by share_request_mounts in the process that forks them; -1: none (each
# request worker then mounts the share in a namespace of its own)
_request_mount_ns = -1


class SandboxInfo(NamedTuple):
    role: str
    mode: str                 # namespace | chroot | none
    seccomp: str              # kill | log | trap | none
    root_fd: int              # O_PATH fd of the shared dir (request), -1 (hiprio)
    proc_self_fd: int         # O_PATH fd of /proc/self/fd, the cwd (request), -1 (hiprio)
    caps: int                 # effective capability mask after confinement
    nofile: tuple[int, int]   # RLIMIT_NOFILE (soft, hard)
    seccomp_rules: int        # rules loaded (0 with --seccomp none)


def validate(config: Config | None = None, policy_dir=None) -> programs.Programs:
    """Check --modcaps and --sandbox, parse every policy file and compile
    each role's seccomp program for --seccomp (default kill), now: the
    supervisor calls this at startup, so a bad file is a startup error and
    not a dead worker, and the workers forked later inherit the programs
    (the files are outside their new root)."""
    preload()              # workers forked later inherit the imported modules
    action = DEFAULTS["seccomp"] if config is None else config.seccomp
    if config is not None:
        capabilities.role_caps("supervisor", config.modcaps)
        mode = config.sandbox
        if mode not in MODES:
            raise SandboxError(f"--sandbox {mode}: expected one of {', '.join(MODES)}")
    progs = _programs[action] = programs.build(action, policy_dir)
    return progs


def _programs_for(action: str) -> programs.Programs:
    """The programs ``validate`` compiled for ``action``; compiled now if it
    has not (a test confining with another action)."""
    progs = _programs.get(action)
    if progs is None:
        progs = _programs[action] = programs.build(action)
    return progs


def file_handles_used(config: Config) -> bool:
    """Whether request workers re-open inodes with open_by_handle_at (needs
    CAP_DAC_READ_SEARCH): ``--inode-file-handles``, Config.file_handles."""
    return bool(config.file_handles)


def preload() -> None:
    """Import now what a worker would otherwise import lazily: after the
    pivot the daemon's source tree (and the stdlib) is out of reach, so a
    late ``import`` fails."""
    import importlib
    for name in ("daemon.fuse.session", "daemon.workers.channel", "daemon.virtio.virtqueue",
                 "daemon.virtio.compiled", "daemon.fuse.fastpath", "daemon.virtio.memory", "daemon.virtio.iovec",
                 "traceback", "linecache",
                 "encodings.ascii", "encodings.latin_1"):
        importlib.import_module(name)


def confine(role: str, config: Config, shared_dir: str | None = None) -> SandboxInfo:
    """Confine this (freshly spawned, single-threaded) worker. Raises
    SandboxError with a one-line message naming the step that failed."""
    preload()
    if role not in ("request", "hiprio", "keeper"):
        raise ValueError(f"unknown worker role {role!r}")
    mode = config.sandbox
    action = config.seccomp
    shared_dir = shared_dir or config.shared_dir
    progs = _programs_for(action)   # before the root change: may read the policy files
    nofile_target = rlimits.default_target()

    shared_ns = _take_request_mount_ns()
    try:
        root = _change_root(role, mode, shared_dir, config.readonly, shared_ns)
    finally:
        if shared_ns >= 0:
            os.close(shared_ns)
    if root.proc_self_fd >= 0:
        try:
            os.fchdir(root.proc_self_fd)
        except OSError as e:
            raise SandboxError(f"chdir to /proc/self/fd: {e.strerror}") from None

    if role == "hiprio":
        rlimits.apply_hiprio()      # the keeper: as many fds as a request worker
    else:
        rlimits.apply_nofile(config.rlimit_nofile, nofile_target)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    _drop_supplementary_groups(mode)
    _cut_capabilities(role, config, mode)
    capeff = capabilities.capget()[0]
    rules = programs.install(role, progs)     # last: nothing after it but returning
    return SandboxInfo(role, mode, action, root.root_fd, root.proc_self_fd, capeff, (soft, hard), rules)


def _change_root(role: str, mode: str, shared_dir: str, readonly: bool, shared_ns: int) -> mounts.RootInfo:
    if mode == "namespace":
        if role == "request":
            return mounts.setup_request_root(shared_dir, readonly, shared_ns)
        return mounts.setup_empty_root()
    if mode == "chroot":
        return mounts.chroot_request_root(shared_dir) if role == "request" else mounts.chroot_empty_root()
    if mode == "none":
        return mounts.no_root_change(shared_dir, role)
    raise SandboxError(f"unknown sandbox mode {mode!r}")


def share_request_mounts(config: Config) -> int:
    """With --sandbox namespace: build the mount namespace every request
    worker forked from now on joins (sharedns.py), once; its fd (returned;
    -1 in the other modes) stays in this process until
    release_request_mounts. SandboxError if it cannot be built."""
    global _request_mount_ns
    if config.sandbox == "namespace" and _request_mount_ns < 0:
        _request_mount_ns = sharedns.make(config.shared_dir, config.readonly)
    return _request_mount_ns


def release_request_mounts() -> None:
    """Close the shared namespace's fd (the pool's shutdown)."""
    fd = _take_request_mount_ns()
    if fd >= 0:
        os.close(fd)


def _take_request_mount_ns() -> int:
    """In a worker being confined: the inherited fd of the shared
    namespace (-1 if none), forgotten here; the caller closes it."""
    global _request_mount_ns
    fd, _request_mount_ns = _request_mount_ns, -1
    return fd


def supervisor_after_setup(config: Config) -> int:
    """The supervisor's own confinement, once its socket, inode table and
    first workers exist: capabilities cut to what later worker spawns need
    (see capabilities.py), no_new_privs, and the supervisor seccomp filter
    (the union of all roles' lists: children inherit it). Returns the number
    of seccomp rules loaded."""
    action = config.seccomp
    _cut_capabilities("supervisor", config, config.sandbox)
    return programs.install("supervisor", _programs_for(action))


def _drop_supplementary_groups(mode: str) -> None:
    """No supplementary groups in a worker (CVE-2022-0358). The supervisor
    dropped them before forking (daemon/startup.py), so this is a check
    that costs one getgroups; it must come before the capability cut (the
    hiprio worker keeps no CAP_SETGID) and the filter (no policy allows
    setgroups). With --sandbox none, a process that may not (not root)
    keeps them, as it keeps its capabilities; so does one in a user
    namespace that denies setgroups (daemon/sandbox/userns.py)."""
    try:
        credentials.drop_supplementary_groups()
    except PermissionError:
        if mode != "none" and userns.setgroups_allowed():
            raise SandboxError("cannot drop the supplementary groups (setgroups: permission denied)") from None


def _cut_capabilities(role: str, config: Config, mode: str) -> None:
    """The role's capability sets (with --modcaps), then no_new_privs. With
    --sandbox none a process that may not change its capabilities (not
    root) goes on with the ones it has."""
    caps = capabilities.role_caps(role, config.modcaps, file_handles_used(config))
    try:
        capabilities.apply(caps)
    except SandboxError:
        if mode != "none":
            raise
    capabilities.set_no_new_privs()


def warn_if_unconfined(config: Config, stream=None) -> None:
    """The loud warning for --sandbox none / --seccomp none."""
    stream = stream or sys.stderr
    if config.sandbox == "none":
        print("pyvirtiofsd: WARNING: --sandbox none: workers run in the host's namespaces and root; "
              "a compromised worker sees the whole host file system. Use only for debugging.",
              file=stream)
    if config.seccomp == "none":
        print("pyvirtiofsd: WARNING: --seccomp none: no system call filter.", file=stream)
