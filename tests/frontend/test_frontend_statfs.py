"""STATFS on the confined request worker (default sandbox and seccomp),
served in C unless PYVIRTIOFSD_PURE=1 or PYVIRTIOFSD_FASTOPS=0
(docs/compiled.md, "READLINK, STATFS and ENOSYS in C"): fuse_kstatfs of
the share's file system (the root, a file, a directory, a symlink) as the
host's statvfs gives it, through the vhost-user frontend, the fstatfs
passing the filter; EIO (Python's) for a reply part too small, ESTALE
for an unknown nodeid; the metrics socket counting each under STATFS;
and the same in a fresh worker whose LOOKUP, CREATE, OPEN, WRITE,
GETXATTR and SETATTR are Python's. (tests/security's
test_worker_killed_by_seccomp_answers_eio_and_is_replaced: a filter
without fstatfs kills the worker in C's fstatfs too, and the successor
answers EIO: C took the chain first.)"""

from __future__ import annotations

import errno
import os

import pytest

from daemon.fuse import abi
from daemon.fuse.abi import Opcode
from tests.frontend.fuse_client import reply_errno
from tests.frontend.test_frontend_worker_loop import fuse_ops, ours_only, worker_pid  # noqa: F401 - ours_only: autouse
from tests.metrics_client import scrape
from tests.procfs import fd_count

ROOT = 1
METRICS = f"/tmp/pyvirtiofsd-test-statfs-{os.getpid()}.sock"


def _like_the_host(got, path) -> None:
    """``got`` (a Statfs) is the host's statvfs of ``path``: the sizes and
    totals exactly, the free counts within what other processes writing
    to the same disk meanwhile can move them (0.5 % of the blocks)."""
    s = os.statvfs(path)
    assert (got.blocks, got.files, got.bsize, got.namelen, got.frsize) == (s.f_blocks, s.f_files, s.f_bsize,
                                                                            s.f_namemax, s.f_frsize)
    slack = s.f_blocks // 200 + 16
    assert abs(got.bfree - s.f_bfree) <= slack and abs(got.bavail - s.f_bavail) <= slack
    assert abs(got.ffree - s.f_ffree) <= s.f_files // 200 + 16
    assert got.bfree >= got.bavail


def _nodes(frontend) -> list[int]:
    shared = frontend.shared_dir
    (shared / "f").write_bytes(b"x")
    (shared / "d").mkdir()
    os.symlink("f", shared / "l")
    return [ROOT, *(frontend.lookup(ROOT, n).nodeid for n in ("f", "d", "l"))]


@pytest.mark.frontend_opts(extra_args=("--metrics-socket", METRICS))
def test_statfs_through_the_confined_worker(frontend):
    nodes = _nodes(frontend)
    worker = worker_pid(frontend, "request-1")
    fds = fd_count(worker)
    for _ in range(5):
        for node in nodes:
            _like_the_host(frontend.statfs(node), frontend.shared_dir)
    assert reply_errno(lambda: frontend.call(Opcode.STATFS, ROOT, b"", [abi.STATFS_OUT.size - 1])) == errno.EIO
    assert reply_errno(lambda: frontend.statfs(3999)) == errno.ESTALE
    assert fd_count(worker) == fds and worker_pid(frontend, "request-1") == worker
    s = scrape(METRICS)
    w = {"worker": "request-1"}
    assert s.get(("pyvirtiofsd_requests_total", frozenset({"op": "STATFS", **w}.items())), 0) == 22
    assert s.get(("pyvirtiofsd_errors_total", frozenset({"op": "STATFS", "errno": "EIO", **w}.items())), 0) == 1
    ops, compiled = fuse_ops(frontend)
    assert len(ops) == 1 and ("READLINK, STATFS;" if compiled else "all in Python") in ops[0], ops


@pytest.mark.frontend_opts(extra_args=("--readonly", "--announce-submounts", "--no-xattr"))
def test_statfs_in_c_in_a_worker_whose_siblings_are_python(frontend):
    """STATFS the worker's first C request, its LOOKUP, CREATE, MKDIR,
    READDIRPLUS, WRITE, OPEN, SETATTR and GETXATTR Python's: answered
    right, the worker the same process."""
    nodes = _nodes(frontend)
    worker = worker_pid(frontend, "request-1")
    for node in nodes:
        _like_the_host(frontend.statfs(node), frontend.shared_dir)
    assert worker_pid(frontend, "request-1") == worker
    ops, compiled = fuse_ops(frontend)
    assert len(ops) == 1, ops
    assert not compiled or ("LOOKUP in Python (--announce-submounts)" in ops[0]
                            and "metadata ops in C: FLUSH, RELEASE, RELEASEDIR, READLINK, STATFS;" in ops[0]), ops
    assert "SIGSEGV" not in frontend.daemon.log()
