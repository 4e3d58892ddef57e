"""CREATE in C through the confined daemon (docs/compiled.md, "CREATE in
C"): the request worker runs under its sandbox and seccomp filter, so a
system call C's CREATE makes that the filter refuses fails here."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from tests.frontend.fuse_client import FuseErrorReply

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
