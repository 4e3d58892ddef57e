"""SETATTR in C through the confined daemon (docs/compiled.md, "SETATTR in
C"): the request worker runs under its sandbox and seccomp filter, so a
system call C's SETATTR makes that the filter refuses fails here."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from tests.frontend.fuse_client import FuseErrorReply
from tests.frontend.test_frontend_worker_loop import fuse_ops, worker_pid
from tests.procfs import fd_count, settled_fd_count

ROOT = 1


def test_tar_shaped_setattrs_through_the_confined_worker(frontend):
    """What tar -x sends after extracting: explicit times (utimensat), a
    chmod, a chown (fchownat, as root restores owners), both at once on a
    directory, *_NOW, and the same through an open fh (futimens, fchmod); each reply's attributes are the host's; an
    out-of-range nanosecond is EINVAL; no fd is left behind; the start-up
    line names SETATTR among the ops in C."""
    (frontend.shared_dir / "f").write_bytes(b"data")
    (frontend.shared_dir / "d").mkdir()
    f = frontend.lookup(ROOT, "f").nodeid
    d = frontend.lookup(ROOT, "d").nodeid
    worker = worker_pid(frontend, "request-1")
    fds = fd_count(worker)
    out = frontend.setattr(f, atime=(1_600_000_000, 1), mtime=(1_500_000_000, 2))
    s = os.stat(frontend.shared_dir / "f")
    assert (s.st_atime_ns, s.st_mtime_ns) == (1_600_000_000 * 10**9 + 1, 1_500_000_000 * 10**9 + 2)
    assert (out.attr.mtime, out.attr.mtimensec, out.attr.ino) == (1_500_000_000, 2, s.st_ino)
    out = frontend.setattr(f, mode=0o100640)
    assert os.stat(frontend.shared_dir / "f").st_mode & 0o7777 == 0o640 and out.attr.mode == 0o100640
    out = frontend.setattr(f, uid=1000, gid=1001)
    s = os.stat(frontend.shared_dir / "f")
    assert (s.st_uid, s.st_gid, out.attr.uid, out.attr.gid) == (1000, 1001, 1000, 1001)
    out = frontend.setattr(d, gid=1002)
    s = os.stat(frontend.shared_dir / "d")
    assert (s.st_uid, s.st_gid, out.attr.gid) == (0, 1002, 1002)
    out = frontend.setattr(d, mode=0o40700, atime=(1_000_000_000, 0), mtime=(1_000_000_000, 0))
    s = os.stat(frontend.shared_dir / "d")
    assert (stat.S_IMODE(s.st_mode), s.st_mtime_ns, out.attr.mode) == (0o700, 10**18, 0o40700)
    frontend.setattr(f, atime_now=True, mtime_now=True)
    assert os.stat(frontend.shared_dir / "f").st_mtime_ns > 1_500_000_000 * 10**9 + 2
    fh = frontend.open(f, os.O_RDWR).fh
    out = frontend.setattr(f, fh=fh, mode=0o100604, mtime=(1_234_567_890, 0))
    s = os.stat(frontend.shared_dir / "f")
    assert (stat.S_IMODE(s.st_mode), s.st_mtime_ns) == (0o604, 1_234_567_890 * 10**9)
    with pytest.raises(FuseErrorReply) as e:
        frontend.setattr(f, mtime=(1, 10**9))
    assert e.value.errno == errno.EINVAL
    frontend.release(f, fh)
    assert settled_fd_count(worker, fds, timeout=2.0) == fds
    ops, compiled = fuse_ops(frontend)
    assert len(ops) == 1 and ("OPEN, OPENDIR, SETATTR" if compiled else "all in Python") in ops[0], ops
