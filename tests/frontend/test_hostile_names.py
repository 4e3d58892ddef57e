"""Crafted names from a hostile guest: every name in a request is one path
component. Names with '/', '.' or '..' (outside LOOKUP), absolute paths or
no NUL are refused, and nothing is created, renamed or linked outside the
shared directory. The share sits in a parent directory with a canary next
to it: if a name escaped, the canary's directory would change."""

from __future__ import annotations

import errno
import os

import pytest

from daemon.fuse import abi
from daemon.fuse.abi import Opcode
from tests.frontend.fuse_client import FuseErrorReply

ESCAPES = [b"/etc/passwd", b"../canary", b"..", b".", b"a/b", b"../../../../tmp/x", b"/"]
ENTRY_REPLY = [abi.ENTRY_OUT.size]


@pytest.fixture
def fc(frontend):
    """The frontend, plus a canary file beside (not in) the shared dir."""
    parent = os.path.dirname(frontend.shared_dir)
    with open(os.path.join(parent, "canary"), "w") as f:
        f.write("host secret\n")
    (frontend.shared_dir / "f").write_text("inside\n")
    (frontend.shared_dir / "d").mkdir()
    frontend.outside_before = sorted(os.listdir(parent))
    yield frontend
    assert sorted(os.listdir(parent)) == frontend.outside_before, "something appeared outside the share"
    with open(os.path.join(parent, "canary")) as f:
        assert f.read() == "host secret\n"


def refused(fc, opcode, nodeid, args, out=(), expect=(errno.EINVAL, errno.EPERM, errno.ENOENT)):
    with pytest.raises(FuseErrorReply) as e:
        fc.call(opcode, nodeid, args, list(out))
    assert e.value.errno in expect, (Opcode(opcode).name, args, e.value.errno)
    return e.value.errno


@pytest.mark.parametrize("name", ESCAPES)
def test_lookup_never_leaves_the_share(fc, name):
    """LOOKUP: '.' is the directory itself, '..' at the root is the root,
    anything with '/' is refused."""
    if name in (b".", b".."):
        entry = fc.lookup(1, name.decode())
        root = fc.getattr(1).attr
        assert (entry.attr.ino, entry.attr.mode) == (root.ino, root.mode)
        assert entry.nodeid == 1
        return
    refused(fc, Opcode.LOOKUP, 1, name + b"\0", ENTRY_REPLY)


def test_lookup_dotdot_of_a_subdirectory_stays_inside(fc):
    d = fc.lookup(1, "d")
    up = fc.lookup(d.nodeid, "..")
    assert up.attr.ino == fc.getattr(1).attr.ino


@pytest.mark.parametrize("name", [n for n in ESCAPES if n != b"."])
def test_creating_ops_refuse_crafted_names(fc, name):
    before = sorted(os.listdir(fc.shared_dir))
    refused(fc, Opcode.MKDIR, 1, abi.MKDIR_IN.pack(0o755, 0) + name + b"\0", ENTRY_REPLY)
    refused(fc, Opcode.MKNOD, 1, abi.MKNOD_IN.pack(0o100644, 0, 0) + name + b"\0", ENTRY_REPLY)
    refused(fc, Opcode.CREATE, 1, abi.CREATE_IN.pack(os.O_RDWR, 0o100644, 0, 0) + name + b"\0",
            [abi.ENTRY_OUT.size + abi.OPEN_OUT.size])
    refused(fc, Opcode.SYMLINK, 1, name + b"\0target\0", ENTRY_REPLY)
    f = fc.lookup(1, "f")
    refused(fc, Opcode.LINK, 1, abi.LINK_IN.pack(f.nodeid) + name + b"\0", ENTRY_REPLY)
    assert sorted(os.listdir(fc.shared_dir)) == before


@pytest.mark.parametrize("name", [n for n in ESCAPES if n != b"."])
def test_rename_refuses_crafted_names_on_either_side(fc, name):
    refused(fc, Opcode.RENAME, 1, abi.RENAME_IN.pack(1) + b"f\0" + name + b"\0")
    refused(fc, Opcode.RENAME, 1, abi.RENAME_IN.pack(1) + name + b"\0f2\0")
    refused(fc, Opcode.RENAME2, 1, abi.RENAME2_IN.pack(1, abi.RENAME_NOREPLACE) + b"f\0" + name + b"\0")
    assert (fc.shared_dir / "f").read_text() == "inside\n"


@pytest.mark.parametrize("name", [n for n in ESCAPES if n != b"."])
def test_removing_ops_refuse_crafted_names(fc, name):
    refused(fc, Opcode.UNLINK, 1, name + b"\0")
    refused(fc, Opcode.RMDIR, 1, name + b"\0", expect=(errno.EINVAL, errno.EPERM, errno.ENOENT, errno.EBUSY))
    assert (fc.shared_dir / "f").exists() and (fc.shared_dir / "d").is_dir()


def test_symlink_target_is_stored_not_followed(fc):
    """A symlink to an absolute host path is only text: the daemon never
    resolves it, and opening the link's nodeid is refused (ELOOP), not the
    host file behind it."""
    canary = os.path.join(os.path.dirname(fc.shared_dir), "canary")
    entry = fc.symlink(1, "evil", canary)
    assert os.readlink(fc.shared_dir / "evil") == canary
    assert fc.readlink(entry.nodeid) == canary.encode()
    with pytest.raises(FuseErrorReply) as e:
        fc.open(entry.nodeid, os.O_RDONLY)
    assert e.value.errno in (errno.ELOOP, errno.EACCES, errno.EINVAL)


def test_names_without_nul_or_with_embedded_nul(fc):
    for args in (b"f", b"f\0g\0", b"\0"):
        refused(fc, Opcode.LOOKUP, 1, args, ENTRY_REPLY)
    refused(fc, Opcode.SYMLINK, 1, b"link\0target", ENTRY_REPLY)       # target without NUL
    refused(fc, Opcode.RENAME, 1, abi.RENAME_IN.pack(1) + b"f\0g")     # new name without NUL
