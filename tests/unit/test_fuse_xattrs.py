"""Extended-attribute ops (daemon/fuse/xattrs.py) driven through FuseSession.handle."""

import errno
import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from daemon.fuse import abi, xattrs
from daemon.fuse.abi import Opcode
from daemon.fuse.request import FUSEError, Request
from daemon.virtio.iovec import IoVec
from tests.unit.fusereq import NUL, chain, in_header, module_handlers, parse_reply

XATTR_OPS = module_handlers(xattrs)  # opcode -> handler (daemon/fuse/ops.py)


def setxattr(fuse, nodeid, name: bytes, value: bytes, flags=0, size=None):
    args = abi.SETXATTR_IN.pack(len(value) if size is None else size, flags) + name + NUL + value
    return fuse.call(Opcode.SETXATTR, nodeid, args, 0)


def getxattr(fuse, nodeid, name: bytes, size, out_size=None):
    args = abi.GETXATTR_IN.pack(size) + name + NUL
    return fuse.call(Opcode.GETXATTR, nodeid, args, max(size, 8) if out_size is None else out_size)


def listxattr(fuse, nodeid, size, out_size=None):
    return fuse.call(Opcode.LISTXATTR, nodeid, abi.GETXATTR_IN.pack(size),
                     max(size, 8) if out_size is None else out_size)


def test_set_get_list_remove_round_trip(fuse, share):
    (share / "f").touch()
    nodeid = fuse.lookup(1, "f")
    value = bytes(range(256)) * 4
    setxattr(fuse, nodeid, b"user.blob", value).ok()
    setxattr(fuse, nodeid, b"user.a/b", b"slash in a name is fine").ok()
    assert os.getxattr(share / "f", "user.blob") == value
    # size 0: how big the value is
    assert abi.GETXATTR_OUT.unpack(getxattr(fuse, nodeid, b"user.blob", 0).ok()) == (1024,)
    assert getxattr(fuse, nodeid, b"user.blob", 1024).ok() == value
    assert getxattr(fuse, nodeid, b"user.blob", 4096).ok() == value
    names = b"user.blob\0user.a/b\0"
    assert abi.GETXATTR_OUT.unpack(listxattr(fuse, nodeid, 0).ok()) == (len(names),)
    assert sorted(listxattr(fuse, nodeid, 100).ok().split(b"\0")) == sorted(names.split(b"\0"))
    fuse.call(Opcode.REMOVEXATTR, nodeid, b"user.blob\0", 0).ok()
    assert getxattr(fuse, nodeid, b"user.blob", 0).error == errno.ENODATA
    assert fuse.call(Opcode.REMOVEXATTR, nodeid, b"user.blob\0", 0).error == errno.ENODATA


def test_too_small_buffers_are_erange_and_nothing_is_written_past_them(fuse, share):
    (share / "f").touch()
    nodeid = fuse.lookup(1, "f")
    setxattr(fuse, nodeid, b"user.v", b"0123456789").ok()
    assert getxattr(fuse, nodeid, b"user.v", 9).error == errno.ERANGE
    assert listxattr(fuse, nodeid, 5).error == errno.ERANGE
    # the guest asks for 4096 but its buffer holds 4 bytes: ERANGE, not an overflow
    args = abi.GETXATTR_IN.pack(4096) + b"user.v\0"
    request = in_header(Opcode.GETXATTR, nodeid, len(args), 77) + args
    readable, _, _ = chain(request, 0)
    out = bytearray(20) + b"\xee" * 64  # guard bytes after the 20-byte writable part
    view = memoryview(out)
    fuse.session.handle(readable, IoVec([view[:16], view[16:20]]))
    assert parse_reply(bytes(out[:20]), 77).error == errno.ERANGE
    assert out[20:] == b"\xee" * 64


def test_set_flags_and_malformed_requests(fuse, share):
    (share / "f").touch()
    nodeid = fuse.lookup(1, "f")
    setxattr(fuse, nodeid, b"user.x", b"1", flags=xattrs.XATTR_CREATE).ok()
    assert setxattr(fuse, nodeid, b"user.x", b"2", flags=xattrs.XATTR_CREATE).error == errno.EEXIST
    assert setxattr(fuse, nodeid, b"user.y", b"2", flags=xattrs.XATTR_REPLACE).error == errno.ENODATA
    assert setxattr(fuse, nodeid, b"user.x", b"2", flags=4).error == errno.EINVAL
    # the size field must match the value present
    assert setxattr(fuse, nodeid, b"user.x", b"22", size=1).error == errno.EINVAL
    assert setxattr(fuse, nodeid, b"user.x", b"22", size=3).error == errno.EINVAL
    assert setxattr(fuse, nodeid, b"user.x", b"", size=(1 << 16) + 1).error == errno.E2BIG
    # names: empty, too long, unterminated
    assert setxattr(fuse, nodeid, b"", b"v").error == errno.ERANGE
    assert getxattr(fuse, nodeid, b"user." + b"n" * 251, 0).error == errno.ERANGE
    assert fuse.call(Opcode.GETXATTR, nodeid, abi.GETXATTR_IN.pack(0) + b"user.x", 8).error == errno.EINVAL
    assert fuse.call(Opcode.REMOVEXATTR, nodeid, b"user.x", 0).error == errno.EINVAL
    assert fuse.call(Opcode.REMOVEXATTR, nodeid, b"user.x\0junk", 0).error == errno.EINVAL
    assert os.getxattr(share / "f", "user.x") == b"1"
    # a 64 KiB value is the most there is, and it works
    big = os.urandom(1 << 16)
    if setxattr(fuse, nodeid, b"user.big", big).error != errno.ENOSPC:  # ext4 without ea_inode
        assert getxattr(fuse, nodeid, b"user.big", 1 << 16).ok() == big


def test_xattrs_on_a_symlink_act_on_the_link_not_its_target(fuse, share):
    target = share / "target"
    target.touch()
    os.symlink("target", share / "link")
    link = fuse.lookup(1, "link")
    setxattr(fuse, link, b"trusted.mark", b"on-the-link").ok()
    assert os.getxattr(share / "link", "trusted.mark", follow_symlinks=False) == b"on-the-link"
    assert "trusted.mark" not in os.listxattr(target)
    assert getxattr(fuse, link, b"trusted.mark", 100).ok() == b"on-the-link"
    # user.* is not allowed on symlinks by the host (as on any Linux fs)
    assert setxattr(fuse, link, b"user.x", b"1").error == errno.EPERM
    # a symlink pointing out of the share changes nothing out there
    os.symlink("/etc/hostname", share / "escape")
    escape = fuse.lookup(1, "escape")
    setxattr(fuse, escape, b"trusted.evil", b"1").ok()
    assert "trusted.evil" not in os.listxattr("/etc/hostname")


def test_xattrs_on_special_files_never_open_them(fuse, share):
    os.mkfifo(share / "fifo")
    os.mknod(share / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    for name in ("fifo", "null"):
        nodeid = fuse.lookup(1, name)
        setxattr(fuse, nodeid, b"trusted.t", b"v").ok()
        assert getxattr(fuse, nodeid, b"trusted.t", 10).ok() == b"v"
        assert b"trusted.t\0" in listxattr(fuse, nodeid, 1000).ok()


def test_xattr_disabled_is_enosys_for_all_four(connect, share):
    (share / "f").touch()
    fuse = connect(xattr=False)
    nodeid = fuse.lookup(1, "f")
    assert setxattr(fuse, nodeid, b"user.x", b"1").error == errno.ENOSYS
    assert getxattr(fuse, nodeid, b"user.x", 0).error == errno.ENOSYS
    assert listxattr(fuse, nodeid, 0).error == errno.ENOSYS
    assert fuse.call(Opcode.REMOVEXATTR, nodeid, b"user.x\0", 0).error == errno.ENOSYS
    assert fuse.call(Opcode.GETXATTR, nodeid, b"", 8).error == errno.ENOSYS


def test_unknown_nodeid_is_estale(fuse):
    assert getxattr(fuse, 999, b"user.x", 0).error == errno.ESTALE


# -- hostile arguments ----------------------------------------------------------------------

@pytest.fixture
def direct(fuse, share):
    (share / "f").touch()
    return fuse.session, fuse.lookup(1, "f")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=st.sampled_from(sorted(XATTR_OPS)),
       args=st.one_of(st.binary(max_size=80),
                      st.tuples(st.binary(min_size=8, max_size=8), st.binary(max_size=20),
                                st.binary(max_size=20)).map(lambda t: t[0] + b"user." + t[1] + NUL + t[2])),
       out_size=st.integers(0, 64))
def test_decoders_raise_only_fuse_errors(direct, op, args, out_size):
    session, nodeid = direct
    out = IoVec([memoryview(bytearray(16 + out_size))])
    req = Request(op, 1, nodeid, 0, 0, 0, args, None, out)
    try:
        result = XATTR_OPS[op](session, req)
    except (FUSEError, OSError):
        return
    if op in (Opcode.GETXATTR, Opcode.LISTXATTR):
        assert len(result) <= out_size or len(result) == abi.GETXATTR_OUT.size
