"""GETXATTR, UNLINK, RMDIR, FLUSH and RENAME on the confined request worker
(default sandbox and seccomp), served in C unless PYVIRTIOFSD_PURE=1 or
PYVIRTIOFSD_FASTOPS=0 (docs/compiled.md, "GETXATTR in C" and after; the
worker's start-up line names them): the host calls C makes (getxattr on
the /proc/self/fd path, unlinkat, renameat, fcntl(F_DUPFD_CLOEXEC) and close) pass
the filter and give the answers Python gives."""

from __future__ import annotations

import errno
import os

from tests.frontend.fuse_client import reply_errno
from tests.frontend.test_frontend_worker_loop import ours_only, worker_pid  # noqa: F401 - ours_only: autouse
from tests.procfs import fd_count, settled_fd_count

ROOT = 1


def test_metadata_ops_answer_as_python_does_on_the_confined_worker(frontend):
    shared = frontend.shared_dir
    (shared / "f").write_bytes(b"abc")
    os.setxattr(shared / "f", b"user.k", b"value")
    (shared / "d").mkdir()
    (shared / "d" / "inner").write_bytes(b"")
    (shared / "gone").write_bytes(b"")
    (shared / "empty").mkdir()
    f = frontend.lookup(ROOT, "f").nodeid
    for _ in range(3):      # a guest asks before every write
        assert reply_errno(lambda: frontend.getxattr(f, "security.capability", 0)) == errno.ENODATA
    assert frontend.getxattr(f, "user.k", 0) == 5
    assert frontend.getxattr(f, "user.k", 100) == b"value"
    assert reply_errno(lambda: frontend.getxattr(f, "user.k", 2)) == errno.ERANGE
    assert reply_errno(lambda: frontend.getxattr(ROOT, "system.posix_acl_access", 100)) == errno.EOPNOTSUPP
    frontend.unlink(ROOT, "gone")
    assert not (shared / "gone").exists()
    assert reply_errno(lambda: frontend.unlink(ROOT, "gone")) == errno.ENOENT
    assert reply_errno(lambda: frontend.unlink(ROOT, "d")) == errno.EISDIR
    assert reply_errno(lambda: frontend.rmdir(ROOT, "d")) == errno.ENOTEMPTY
    assert reply_errno(lambda: frontend.rmdir(ROOT, "f")) == errno.ENOTDIR
    assert reply_errno(lambda: frontend.rmdir(ROOT, "..")) == errno.EINVAL     # Python's
    frontend.rmdir(ROOT, "empty")
    assert not (shared / "empty").exists()
    d = frontend.lookup(ROOT, "d").nodeid
    (shared / "m").write_bytes(b"moved")
    frontend.rename(ROOT, "m", d, "m2")            # across two directories
    assert (shared / "d" / "m2").read_bytes() == b"moved" and not (shared / "m").exists()
    frontend.rename(d, "m2", d, "inner")           # onto an existing file
    assert (shared / "d" / "inner").read_bytes() == b"moved" and not (shared / "d" / "m2").exists()
    assert reply_errno(lambda: frontend.rename(d, "m2", ROOT, "m")) == errno.ENOENT
    assert reply_errno(lambda: frontend.rename(ROOT, "f", ROOT, "d")) == errno.EISDIR
    assert reply_errno(lambda: frontend.rename(ROOT, "..", ROOT, "x")) == errno.EINVAL     # Python's
    worker = worker_pid(frontend, "request-1")
    o = frontend.open(f, os.O_RDWR)
    fds = fd_count(worker)
    for _ in range(20):
        frontend.flush(f, o.fh, 0x55)
    assert settled_fd_count(worker, fds, timeout=2.0) == fds      # each dup closed again
    frontend.release(f, o.fh)
    assert reply_errno(lambda: frontend.flush(f, o.fh, 0x55)) == errno.EBADF
    pure = os.environ.get("PYVIRTIOFSD_PURE", "") not in ("", "0") or os.environ.get("PYVIRTIOFSD_FASTOPS") == "0"
    ops = [ln for ln in frontend.daemon.log().splitlines() if "FUSE ops: " in ln]
    names = "all in Python" if pure else "metadata ops in C: GETXATTR, UNLINK, RMDIR, FLUSH, RENAME"
    assert len(ops) == 1 and names in ops[0], ops


def test_flush_with_posix_locks_releases_them(frontend):
    """A FLUSH of a lock owner that holds a POSIX lock is Python's (C
    declines while any lock description exists): the lock is released,
    so another owner can take it; then FLUSH is C's again."""
    (frontend.shared_dir / "l").write_bytes(b"x" * 100)
    n = frontend.lookup(ROOT, "l").nodeid
    o = frontend.open(n, os.O_RDWR)
    frontend.setlk(n, o.fh, 0xA, 0, 10, type_=1)
    assert reply_errno(lambda: frontend.setlk(n, o.fh, 0xB, 0, 10, type_=1)) == errno.EAGAIN
    frontend.flush(n, o.fh, 0xA)
    frontend.setlk(n, o.fh, 0xB, 0, 10, type_=1)
    frontend.flush(n, o.fh, 0xB)
    frontend.flush(n, o.fh, 0xB)
    frontend.release(n, o.fh)
