"""MKDIR in C through the confined daemon (docs/compiled.md, "MKDIR in
C"): the request worker runs under its sandbox and seccomp filter, so a
system call C's MKDIR makes that the filter refuses fails here."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from tests.frontend.fuse_client import FuseErrorReply
from tests.frontend.test_frontend_worker_loop import fuse_ops

ROOT = 1


def test_mkdirs_in_c_through_the_confined_worker(frontend):
    """New directories in the root, in a subdirectory and in a directory
    just made, with their modes (sticky kept) and owner, each entry's
    nodeid usable as a parent; an existing name EEXIST, a name under a
    file ENOTDIR; the worker says at start-up whether MKDIR is compiled."""
    (frontend.shared_dir / "sub").mkdir()
    (frontend.shared_dir / "file").write_bytes(b"f")
    sub = frontend.lookup(ROOT, "sub").nodeid
    made = []
    for parent, where, name, mode in ((ROOT, "", "m1", 0o755), (ROOT, "", "m2", 0o1777),
                                      (sub, "sub", "m3", 0o700)):
        entry = frontend.mkdir(parent, name, mode=mode)
        path = frontend.shared_dir / where / name
        st = os.lstat(path)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == mode
        assert (entry.attr.ino, entry.attr.mode, entry.attr.uid) == (st.st_ino, st.st_mode, st.st_uid)
        made.append(entry.nodeid)
    inner = frontend.mkdir(made[0], "inner", mode=0o750)
    assert os.lstat(frontend.shared_dir / "m1" / "inner").st_ino == inner.attr.ino
    assert len({*made, inner.nodeid}) == 4
    assert frontend.lookup(ROOT, "m2").nodeid == made[1]
    for name, err in (("m1", errno.EEXIST), ("file", errno.EEXIST)):
        with pytest.raises(FuseErrorReply) as e:
            frontend.mkdir(ROOT, name)
        assert e.value.errno == err
    file = frontend.lookup(ROOT, "file").nodeid
    with pytest.raises(FuseErrorReply) as e:
        frontend.mkdir(file, "x")
    assert e.value.errno == errno.ENOTDIR
    ops, compiled = fuse_ops(frontend)
    assert len(ops) == 1 and ("MKDIR compiled too" in ops[0]) == compiled, ops
