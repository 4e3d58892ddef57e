"""A request worker: vring i >= 1, every FUSE operation on the share.

Per-process facts the FUSE ops rely on (INTERNALS.md): the working
directory is ``/proc/self/fd`` (so ``str(fd)`` names an O_PATH fd's file),
and the session's share root is an O_PATH fd opened before any guest
input. The sandbox provides both when it confines the worker; without a
sandbox module this module sets them up itself.
"""

from __future__ import annotations

import os

from daemon.fuse.session import FuseSession

PROC_SELF_FD = "/proc/self/fd"
COALESCE = None  # every request kicks: the guest waits for each reply


def ring_indices(index: int) -> tuple[int, ...]:
    """The vrings request worker ``index`` serves: vring ``index``."""
    if index < 1:
        raise ValueError(f"request workers serve vrings >= 1, not {index}")
    return (index,)


def open_session(config, inodes, sandbox_info) -> FuseSession:
    """The request session, rooted at the sandbox's share root fd."""
    if sandbox_info is None:
        os.chdir(PROC_SELF_FD)
        return FuseSession(config, inodes, "request")  # opens config.shared_dir itself
    return FuseSession(config, inodes, "request", root_fd=sandbox_info.root_fd)
