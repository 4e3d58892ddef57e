"""What the tests read of a process in /proc: the daemon's, from the host."""

from __future__ import annotations

import os
import time

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The children of every thread of ``pid`` ([] once it is gone)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out = []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return out


def children_by_comm(pid: int) -> dict[str, int]:
    """comm name → pid of the children of ``pid`` (the daemon's workers:
    ``vfsd-request-1``, ``vfsd-keeper``...)."""
    out = {}
    for child in children(pid):
        try:
            with open(f"/proc/{child}/comm") as f:
                out[f.read().strip()] = child
        except OSError:
            pass
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> dict[int, str]:
    """fd → what it refers to (``anon_inode:[eventfd]``, ``socket:[N]``...),
    for a failure message that says which descriptor came or went."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass   # closed while listed
    return out


def fd_difference(before: dict[int, str], after: dict[int, str]) -> str:
    """The fds only in ``before`` and only in ``after``, for an assertion."""
    gone = {fd: t for fd, t in before.items() if after.get(fd) != t}
    new = {fd: t for fd, t in after.items() if before.get(fd) != t}
    return f"closed {gone}, opened {new}"


def settled_fd_count(pid: int, expect: int, timeout: float = 5.0) -> int:
    """``pid``'s fd count once it is ``expect`` (fds another thread or
    process closes a moment later), or whatever it is after ``timeout``."""
    deadline = time.monotonic() + timeout
    while fd_count(pid) != expect and time.monotonic() < deadline:
        time.sleep(0.005)
    return fd_count(pid)


def steady_fd_count(pid: int, timeout: float = 3.0) -> int:
    """``pid``'s fd count once it read the same three times 50 ms apart (a
    baseline not taken while a descriptor is in passing, such as one a
    supervisor holds between receiving it and handing it on), or whatever
    it is after ``timeout``."""
    deadline = time.monotonic() + timeout
    seen = [fd_count(pid)]
    while time.monotonic() < deadline and (len(seen) < 3 or len(set(seen[-3:])) > 1):
        time.sleep(0.05)
        seen.append(fd_count(pid))
    return seen[-1]


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of ``pid`` in clock ticks (/proc/PID/stat fields 14, 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def voluntary_switches(pid: int) -> int:
    """Voluntary context switches of every thread of ``pid``
    (/proc/PID/task/TID/status): each is one sleep, so one wake-up."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def ns_inodes(pid: int | str = "self") -> dict[str, int]:
    """{'mnt': inode, 'pid': ..., ...} of a process's namespaces."""
    return {n: os.stat(f"/proc/{pid}/ns/{n}").st_ino for n in ("mnt", "pid", "net", "ipc", "uts")}
