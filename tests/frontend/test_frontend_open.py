"""OPEN and OPENDIR in C through the confined daemon (docs/compiled.md,
"OPEN and OPENDIR in C"): the request worker runs under its sandbox and
seccomp filter, so a system call C's OPEN makes that the filter refuses
fails here."""

from __future__ import annotations

import errno
import os

import pytest

from tests.frontend.fuse_client import FuseErrorReply
from tests.frontend.test_frontend_worker_loop import fuse_ops, worker_pid
from tests.procfs import fd_count, settled_fd_count

ROOT = 1


def test_opens_in_c_through_the_confined_worker(frontend):
    """Files opened read-only, write-only with O_APPEND and read-write with
    O_TRUNC, read and written through the fhs the replies name; a
    directory opened and listed; a directory as a file EISDIR, a file as
    a directory ENOTDIR; every fh distinct, each one RELEASEd (RELEASEDIR)
    closes the worker's fd of it; the start-up line names OPEN and
    OPENDIR among the ops in C."""
    (frontend.shared_dir / "a").write_bytes(b"alpha")
    (frontend.shared_dir / "b").write_bytes(b"bravo")
    (frontend.shared_dir / "d").mkdir()
    (frontend.shared_dir / "d" / "x").write_bytes(b"")
    a = frontend.lookup(ROOT, "a").nodeid
    b = frontend.lookup(ROOT, "b").nodeid
    d = frontend.lookup(ROOT, "d").nodeid
    worker = worker_pid(frontend, "request-1")
    fds = fd_count(worker)
    ro = frontend.open(a, os.O_RDONLY)
    assert frontend.read(a, ro.fh, 0, 100) == b"alpha"
    wo = frontend.open(a, os.O_WRONLY | os.O_APPEND)
    assert frontend.write(a, wo.fh, 0, b"!", flags=os.O_WRONLY | os.O_APPEND) == 1
    assert (frontend.shared_dir / "a").read_bytes() == b"alpha!"
    rw = frontend.open(b, os.O_RDWR | os.O_TRUNC)
    assert (frontend.shared_dir / "b").read_bytes() == b""
    assert frontend.write(b, rw.fh, 0, b"new") == 3
    assert frontend.read(b, rw.fh, 0, 10) == b"new"
    od = frontend.opendir(d)
    assert {e.name for e in frontend.readdir(d, od.fh)} == {b".", b"..", b"x"}
    assert len({ro.fh, wo.fh, rw.fh, od.fh}) == 4
    assert fd_count(worker) == fds + 4
    with pytest.raises(FuseErrorReply) as e:
        frontend.open(d, os.O_RDONLY)
    assert e.value.errno == errno.EISDIR
    with pytest.raises(FuseErrorReply) as e:
        frontend.opendir(a)
    assert e.value.errno == errno.ENOTDIR
    for nodeid, fh in ((a, ro.fh), (a, wo.fh), (b, rw.fh)):
        frontend.release(nodeid, fh)
    frontend.releasedir(d, od.fh)
    assert settled_fd_count(worker, fds, timeout=2.0) == fds
    for nodeid, fh in ((a, ro.fh), (b, rw.fh)):
        with pytest.raises(FuseErrorReply) as e:
            frontend.read(nodeid, fh, 0, 10)
        assert e.value.errno == errno.EBADF
    ops, compiled = fuse_ops(frontend)
    assert len(ops) == 1 and ("RELEASE, RELEASEDIR, OPEN, OPENDIR" if compiled else "all in Python") in ops[0], ops


@pytest.mark.frontend_opts(extra_args=("--posix-acl",))
def test_opens_in_c_in_a_worker_whose_create_is_python(frontend):
    """--posix-acl keeps CREATE and MKDIR in Python while OPEN and OPENDIR
    stay C's: a worker that never ran enable_create (a fresh process, as
    in a guest) serves OPEN, by root and by another caller, and OPENDIR
    and RELEASEDIR, and stays the same process (its OPEN once read
    attribute names only enable_create had interned: SIGSEGV, found in a
    6.1 guest's ACL test)."""
    (frontend.shared_dir / "secret").write_bytes(b"s")
    (frontend.shared_dir / "d").mkdir()
    f = frontend.lookup(ROOT, "secret").nodeid
    d = frontend.lookup(ROOT, "d").nodeid
    worker = worker_pid(frontend, "request-1")
    mine = frontend.open(f, os.O_RDONLY)
    theirs = frontend.open(f, os.O_RDONLY, uid=1000, gid=1000)
    assert frontend.read(f, theirs.fh, 0, 10) == b"s"
    od = frontend.opendir(d)
    frontend.releasedir(d, od.fh)
    for fh in (mine.fh, theirs.fh):
        frontend.release(f, fh)
    assert worker_pid(frontend, "request-1") == worker
    ops, compiled = fuse_ops(frontend)
    assert len(ops) == 1, ops
    assert not compiled or ("CREATE in Python (--posix-acl" in ops[0] and "OPEN, OPENDIR" in ops[0]), ops
    assert "SIGSEGV" not in frontend.daemon.log()
