"""Reply bytes (daemon/fuse/replies.py) against the C layouts of
<linux/fuse.h>, spelled here field by field (not through abi.py)."""

from __future__ import annotations

import errno
import os

import pytest

from daemon.fuse import abi, replies
from daemon.virtio.iovec import IoVec


def le(*fields: tuple[int, int]) -> bytes:
    """(value, width in bytes) pairs, little-endian; negative values as
    two's complement (int32_t error)."""
    return b"".join((v % (1 << (8 * w))).to_bytes(w, "little") for v, w in fields)


# a regular file: ctime one nanosecond before the epoch, a block device's rdev
ST = os.stat_result((0o100644, 7, 9, 2, 1000, 100, 4097, 1, 2, -1, 1.5, 2.000000001, -1e-9,
                     1_500_000_000, 2_000_000_001, -1, 4096, 16, os.makedev(8, 1)))

# struct fuse_attr { u64 ino, size, blocks, atime, mtime, ctime; u32 atimensec,
#   mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags; }
ATTR = le((7, 8), (4097, 8), (16, 8), (1, 8), (2, 8), ((1 << 64) - 1, 8),
          (500_000_000, 4), (1, 4), (999_999_999, 4), (0o100644, 4), (2, 4), (1000, 4),
          (100, 4), (0x801, 4), (4096, 4), (0, 4))


def test_attr_out_golden():
    # struct fuse_attr_out { u64 attr_valid; u32 attr_valid_nsec; u32 dummy; struct fuse_attr attr; }
    assert replies.Timeouts(1.0).attr_out(ST) == le((1, 8), (0, 4), (0, 4)) + ATTR
    assert replies.Timeouts(0.25).attr_out(ST)[:16] == le((0, 8), (250_000_000, 4), (0, 4))


def test_entry_out_golden():
    # struct fuse_entry_out { u64 nodeid, generation, entry_valid, attr_valid;
    #   u32 entry_valid_nsec, attr_valid_nsec; struct fuse_attr attr; }
    got = replies.Timeouts(86400.5).entry_out(ST, 42, 3)
    assert got == le((42, 8), (3, 8), (86400, 8), (86400, 8), (500_000_000, 4), (500_000_000, 4)) + ATTR
    submount = replies.Timeouts(1).entry_out(ST, 42, 3, abi.FUSE_ATTR_SUBMOUNT)
    assert submount[-4:] == le((1, 4))  # fuse_attr.flags
    assert abi.ENTRY_OUT_NODEID.unpack_from(got) == (42,)
    assert abi.ENTRY_OUT_INO_MODE.unpack_from(got) == (7, 0o100644)


def test_negative_entry_golden():
    got = replies.Timeouts(86400.0).negative_entry()
    assert got == le((0, 8), (0, 8), (86400, 8), (0, 8), (0, 4), (0, 4)) + bytes(88)


def test_attr_clips_nlink_and_encodes_rdev():
    st = os.stat_result((0o20600, 1, 1, 1 << 33, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0, 0, 0, 512, 0,
                         os.makedev(0x123, 0x45678)))
    fields = abi.ATTR_OUT.unpack(replies.Timeouts(1).attr_out(st, 1))[3:]
    assert fields[10] == 0xFFFFFFFF
    # new_encode_dev: minor low 8 bits, major 12 bits, minor's high bits above
    assert fields[13] == 0x78 | 0x123 << 8 | 0x45600 << 12 & 0xFFFFFFFF
    assert fields[15] == 1
    assert replies.rdev32(os.makedev(8, 1)) == 0x801


def writable(*sizes: int) -> tuple[IoVec, bytearray]:
    buf = bytearray(sum(sizes))
    view, parts, at = memoryview(buf), [], 0
    for n in sizes:
        parts.append(view[at:at + n])
        at += n
    return IoVec(parts), buf


def test_error_golden():
    out, buf = writable(16, 100)
    assert replies.error(out, 0x1122334455667788, errno.ENOENT) == 16
    # struct fuse_out_header { u32 len; s32 error; u64 unique; }
    assert bytes(buf[:16]) == le((16, 4), (-errno.ENOENT, 4), (0x1122334455667788, 8))
    assert bytes(buf[16:]) == bytes(100)


@pytest.mark.parametrize("err", [0, -5, 4096, 1 << 31])
def test_an_impossible_errno_becomes_eio(err):
    out, buf = writable(16)
    assert replies.error(out, 1, err) == 16
    assert bytes(buf) == le((16, 4), (-errno.EIO, 4), (1, 8))


def test_no_room_for_a_header_writes_nothing():
    out, buf = writable(15)
    assert replies.error(out, 1, errno.EIO) == 0
    assert replies.payload(out, 1, b"x") == 0
    assert buf == bytes(15)


@pytest.mark.parametrize("sizes", [(16, 64), (80,), (8, 8, 10, 54), (16, 3, 61)])
def test_payload_in_any_buffer_layout(sizes):
    out, buf = writable(*sizes)
    data = bytes(range(1, 41))
    assert replies.payload(out, 9, data) == 56
    assert bytes(buf[:56]) == le((56, 4), (0, 4), (9, 8)) + data
    assert bytes(buf[56:]) == bytes(len(buf) - 56)


def test_payload_already_written_and_none_and_too_big():
    out, buf = writable(16, 32)
    buf[16:20] = b"abcd"
    assert replies.payload(out, 5, 4) == 20
    assert bytes(buf[:20]) == le((20, 4), (0, 4), (5, 8)) + b"abcd"
    out, buf = writable(16, 32)
    assert replies.payload(out, 5, None) == 0 and buf == bytes(48)
    assert replies.payload(out, 5, bytes(33)) == -1 and buf == bytes(48)
    with pytest.raises(RuntimeError):
        replies.payload(out, 5, 33)
    with pytest.raises(RuntimeError):
        replies.payload(out, 5, -1)
