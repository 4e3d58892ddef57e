"""RLIMIT_NOFILE for the daemon's processes (``--rlimit-nofile``).

Default, as the Rust virtiofsd: aim for min(1,000,000, fs.nr_open) file
descriptors, because a request worker holds one O_PATH fd per inode the
guest knows plus every open file. Raising the hard limit needs
CAP_SYS_RESOURCE; without it the soft limit is raised to the hard one.
An explicit ``--rlimit-nofile N`` sets soft = hard = N and is an error if
it cannot be applied. ``0`` leaves the limit alone.

The hiprio worker never opens files: it gets a small fixed limit.
"""

from __future__ import annotations

import resource

from daemon.sandbox.namespaces import SandboxError

DEFAULT_CAP = 1_000_000
HIPRIO_NOFILE = 256      # channel, kick/call eventfds, memory region fds in flight, stdio


def nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def default_target() -> int:
    return min(DEFAULT_CAP, nr_open())


def apply_nofile(limit: int | None, target: int | None = None) -> tuple[int, int]:
    """Set RLIMIT_NOFILE. ``limit``: the --rlimit-nofile value (None = default
    policy, 0 = leave alone). ``target``: the default goal, computed
    beforehand (``default_target()`` reads /proc, gone after a pivot).
    Returns the resulting (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if limit == 0:
        return soft, hard
    if limit is not None:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        except (OSError, ValueError) as e:
            raise SandboxError(f"--rlimit-nofile {limit}: cannot set it ({e}); "
                               f"the hard limit is {hard} and raising it needs CAP_SYS_RESOURCE") from None
        return limit, limit
    goal = target if target is not None else default_target()
    if soft >= goal:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (goal, max(goal, hard)))
        return goal, max(goal, hard)
    except (OSError, ValueError):
        pass
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def apply_hiprio() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = min(HIPRIO_NOFILE, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
