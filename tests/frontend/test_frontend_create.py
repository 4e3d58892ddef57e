"""CREATE in C through the confined daemon (docs/compiled.md, "CREATE in
C"): the request worker runs under its sandbox and seccomp filter, so a
system call C's CREATE makes that the filter refuses fails here."""

from __future__ import annotations

import errno
import fcntl
import os
import stat

import pytest

from daemon.fuse import abi
from tests.frontend.fuse_client import FuseErrorReply
from tests.frontend.test_frontend_worker_loop import worker_pid
from tests.procfs import settled_fd_count, steady_fd_count

ROOT = 1


def test_creates_in_c_through_the_confined_worker(frontend):
    """New files in the root and in a subdirectory, with their modes (SUID
    kept), written and read through the fh the reply names, released; an
    existing name without O_EXCL is opened (Python's), with O_EXCL
    EEXIST; the worker says at start-up that CREATE is compiled."""
    (frontend.shared_dir / "sub").mkdir()
    (frontend.shared_dir / "old").write_bytes(b"old")
    sub = frontend.lookup(ROOT, "sub").nodeid
    made = []
    for parent, where, name, mode in ((ROOT, "", "c1", 0o100644), (ROOT, "", "c2", 0o100600),
                                      (sub, "sub", "c3", 0o104755), (sub, "sub", "c4", 0o100640)):
        entry, opened = frontend.create(parent, name, flags=os.O_CREAT | os.O_RDWR | os.O_EXCL, mode=mode)
        path = frontend.shared_dir / where / name
        st = os.lstat(path)
        assert (entry.attr.ino, entry.attr.mode, entry.attr.size) == (st.st_ino, st.st_mode, 0)
        assert stat.S_IMODE(st.st_mode) == mode & 0o7777
        assert frontend.write(entry.nodeid, opened.fh, 0, name.encode() * 3) == 6
        assert frontend.read(entry.nodeid, opened.fh, 0, 100) == name.encode() * 3
        made.append((entry.nodeid, opened.fh, path))
    assert len({nodeid for nodeid, _fh, _p in made}) == 4 and len({fh for _n, fh, _p in made}) == 4
    for nodeid, fh, path in made:
        frontend.release(nodeid, fh)
        assert path.read_bytes() == path.name.encode() * 3
    entry, opened = frontend.create(ROOT, "old", flags=os.O_CREAT | os.O_RDWR | os.O_TRUNC)
    assert entry.attr.ino == os.lstat(frontend.shared_dir / "old").st_ino and entry.attr.size == 0
    frontend.release(entry.nodeid, opened.fh)
    with pytest.raises(FuseErrorReply) as e:
        frontend.create(ROOT, "old", flags=os.O_CREAT | os.O_RDWR | os.O_EXCL)
    assert e.value.errno == errno.EEXIST
    pure = os.environ.get("PYVIRTIOFSD_PURE", "") not in ("", "0")
    compiled = not pure and os.environ.get("PYVIRTIOFSD_FASTOPS", "") != "0"
    ops = [ln for ln in frontend.daemon.log().splitlines() if "FUSE ops: " in ln]
    assert len(ops) == 1 and ("CREATE compiled too" in ops[0]) == compiled, ops


def test_releases_in_c_through_the_confined_worker(frontend):
    """RELEASE in C (docs/compiled.md, "RELEASE in C") under the worker's
    sandbox and seccomp filter: created files released, the worker's fds
    of them closed (its count back where it was), a released fh EBADF; a
    guest flock on an fh comes off at its RELEASE with
    RELEASE_FLOCK_UNLOCK although the keeper still holds a copy of the
    open file; the start-up line names RELEASE among the ops in C."""
    worker = worker_pid(frontend, "request-1")
    fds = steady_fd_count(worker)      # not while an earlier test's forgotten fds are being closed
    made = []
    for name in ("r1", "r2", "r3"):
        entry, opened = frontend.create(ROOT, name, flags=os.O_CREAT | os.O_RDWR | os.O_EXCL, mode=0o100644)
        assert frontend.write(entry.nodeid, opened.fh, 0, b"data") == 4
        made.append((entry.nodeid, opened.fh))
    nodeid, fh = made[0]
    frontend.setlk(nodeid, fh, 0x77, type_=fcntl.F_WRLCK, flock=True)
    probe = os.open(frontend.shared_dir / "r1", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        frontend.release(nodeid, fh, release_flags=abi.FUSE_RELEASE_FLOCK_UNLOCK, lock_owner=0x77)
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)      # off, though the keeper has a copy
    finally:
        os.close(probe)
    for nodeid, fh in made[1:]:
        frontend.release(nodeid, fh)
    for nodeid, fh in made:
        with pytest.raises(FuseErrorReply) as e:
            frontend.read(nodeid, fh, 0, 10)
        assert e.value.errno == errno.EBADF
    # the three open files closed; each new inode's O_PATH fd is held until its FORGET
    assert settled_fd_count(worker, fds + 3, timeout=2.0) == fds + 3
    for nodeid, _fh in made:
        frontend.forget(nodeid, 1)
    frontend.getattr(ROOT)          # a wake-up of the request worker (it reaps freed nodeids then)
    assert settled_fd_count(worker, fds, timeout=2.0) == fds       # every fd of them closed
    pure = os.environ.get("PYVIRTIOFSD_PURE", "") not in ("", "0") or os.environ.get("PYVIRTIOFSD_FASTOPS") == "0"
    ops = [ln for ln in frontend.daemon.log().splitlines() if "FUSE ops: " in ln]
    assert len(ops) == 1 and ("all in Python" if pure else "FLUSH, RENAME, RELEASE") in ops[0], ops
