"""Run a command with system calls refused as a systemd unit's filter does.

``python tests/refuse_syscalls.py NAME[,NAME...] -- COMMAND...`` loads a
seccomp filter that lets every call through but answers EPERM to the
named ones (``SystemCallFilter=`` with ``SystemCallErrorNumber=EPERM``),
then execs COMMAND in place (the pid stays), which inherits the filter.
tests/start_conditions.py uses it for the packaged unit's filter, which
has no pidfd_getfd (docs/service.md).
"""

from __future__ import annotations

import errno
import os
import sys

try:
    import pyseccomp
except ImportError:
    import seccomp as pyseccomp  # type: ignore[import-not-found,no-redef]


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: refuse_syscalls.py NAME[,NAME...] -- COMMAND...")
    f = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    for name in argv[0].split(","):
        f.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
    f.load()
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
