"""READLINK on the confined request worker (default sandbox and seccomp),
served in C unless PYVIRTIOFSD_PURE=1 or PYVIRTIOFSD_FASTOPS=0
(docs/compiled.md, "READLINK, STATFS and ENOSYS in C"; the worker's
start-up line names it among the ops in C): the targets of symlinks
(relative, 4095 bytes), EINVAL for a file and the root, EIO for a reply
part too small, ESTALE (Python's) for an unknown nodeid, through the
vhost-user frontend; the worker's fd count flat, the metrics socket
counting each under READLINK; and the same in a fresh worker whose
LOOKUP, CREATE, WRITE, OPEN, GETXATTR and SETATTR are Python's (a C op must not
depend on another op's set-up: PyInit__fastops interns every name)."""

from __future__ import annotations

import errno
import os

import pytest

from daemon.fuse.abi import Opcode
from tests.frontend.fuse_client import reply_errno
from tests.frontend.test_frontend_worker_loop import fuse_ops, ours_only, worker_pid  # noqa: F401 - ours_only: autouse
from tests.metrics_client import sample, scrape
from tests.procfs import fd_count

ROOT = 1
METRICS = f"/tmp/pyvirtiofsd-test-readlink-{os.getpid()}.sock"


def _links(frontend) -> tuple[int, int, int]:
    shared = frontend.shared_dir
    os.symlink("target/of/l", shared / "l")
    os.symlink("t" * 4095, shared / "long")
    (shared / "f").write_bytes(b"")
    return tuple(frontend.lookup(ROOT, n).nodeid for n in ("l", "long", "f"))


@pytest.mark.frontend_opts(extra_args=("--metrics-socket", METRICS))
def test_readlinks_through_the_confined_worker(frontend):
    link, long, f = _links(frontend)
    worker = worker_pid(frontend, "request-1")
    fds = fd_count(worker)
    for _ in range(20):
        assert frontend.readlink(link) == b"target/of/l"
    assert frontend.readlink(long) == b"t" * 4095
    assert reply_errno(lambda: frontend.readlink(f)) == errno.EINVAL
    assert reply_errno(lambda: frontend.readlink(ROOT)) == errno.EINVAL
    assert reply_errno(lambda: frontend.call(Opcode.READLINK, link, b"", [5])) == errno.EIO
    assert reply_errno(lambda: frontend.readlink(3999)) == errno.ESTALE
    assert fd_count(worker) == fds and worker_pid(frontend, "request-1") == worker
    s = scrape(METRICS)
    w = {"worker": "request-1"}
    assert sample(s, "pyvirtiofsd_requests_total", op="READLINK", **w) == 25
    assert sample(s, "pyvirtiofsd_errors_total", op="READLINK", errno="EINVAL", **w) == 2
    assert sample(s, "pyvirtiofsd_errors_total", op="READLINK", errno="EIO", **w) == 1
    assert sample(s, "pyvirtiofsd_errors_total", op="READLINK", errno="ESTALE", **w) == 1
    ops, compiled = fuse_ops(frontend)
    assert len(ops) == 1 and ("SETATTR, READLINK, STATFS" if compiled else "all in Python") in ops[0], ops
    assert "FUSE READLINK: 11-byte reply, 5-byte buffer" in frontend.daemon.log()


@pytest.mark.frontend_opts(extra_args=("--readonly", "--announce-submounts", "--no-xattr"))
def test_readlink_in_c_in_a_worker_whose_siblings_are_python(frontend):
    """--announce-submounts keeps LOOKUP (and READDIRPLUS, CREATE, MKDIR)
    in Python, --readonly WRITE, UNLINK, RMDIR, SETATTR, OPEN and OPENDIR, --no-xattr
    GETXATTR: READLINK, the worker's first C request, is C's all the same,
    answered right, and the worker stays the same process."""
    link, long, f = _links(frontend)
    worker = worker_pid(frontend, "request-1")
    assert frontend.readlink(link) == b"target/of/l"
    assert frontend.readlink(long) == b"t" * 4095
    assert reply_errno(lambda: frontend.readlink(f)) == errno.EINVAL
    assert worker_pid(frontend, "request-1") == worker
    ops, compiled = fuse_ops(frontend)
    assert len(ops) == 1, ops
    assert not compiled or ("LOOKUP in Python (--announce-submounts)" in ops[0]
                            and "metadata ops in C: FLUSH, RELEASE, RELEASEDIR, READLINK, STATFS;"
                            in ops[0]), ops
    assert "SIGSEGV" not in frontend.daemon.log()
