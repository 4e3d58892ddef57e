"""The hiprio worker: vring 0, where the guest sends FORGET.

The Linux driver puts single FORGETs (and, per the spec, BATCH_FORGET) on
the high-priority queue and stalls if nobody drains it, whatever the
request queues are doing; a process of its own drains it at once. It only
updates reference counts in the shared inode table: no file system access
at all, so its session has no share root, and its sandbox an empty one.
Closing the host fds of forgotten inodes is left to the request workers.
"""

from __future__ import annotations

from daemon.fuse.session import FuseSession

RING_INDEX = 0

# FORGETs may wait a little: after a batch the guest kicks again only once
# 64 more are queued (EVENT_IDX), and the loop looks by itself 10 ms later;
# a look that finds nothing returns to a kick per FORGET, so a lone one is
# still served at once. A burst (rm -rf, dropped guest caches) then costs
# at most ~100 wake-ups a second instead of one or two per file.
COALESCE = (64, 0.010)


def ring_indices(index: int) -> tuple[int, ...]:
    """The vrings a hiprio worker serves: always vring 0."""
    if index != RING_INDEX:
        raise ValueError(f"the hiprio worker serves vring {RING_INDEX}, not {index}")
    return (RING_INDEX,)


def open_session(config, inodes, sandbox_info) -> FuseSession:
    """FORGET/BATCH_FORGET/INTERRUPT only (FuseSession's hiprio role)."""
    return FuseSession(config, inodes, "hiprio")
