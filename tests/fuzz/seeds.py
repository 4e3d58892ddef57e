"""The seed corpus of the chain + FUSE fuzz target (``tests/fuzz/corpus/``).

Well-formed requests shaped as Linux 6.1 sends them (docs/protocol.md, "What the Linux driver sends": one
INDIRECT head per multi-buffer request, ``R40 Rargs W16 Wout``), plus the
malformed rings and requests of the hostile-guest list. Regenerate with::

    python -m tests.fuzz.seeds        # rewrites tests/fuzz/corpus/*.bin

Nodeids: the fuzz target looks up hello.txt, d, link and fifo after every
INIT, so 2..5 usually name them. Open files: every input starts with none
and the file table's generations restarted, so the n-th OPEN/OPENDIR/CREATE
of an input (none released before it) is ``fh(n)``; a seed that reads or
writes opens its file first. Only ``fuse_fh_never_opened`` names an fh it
did not open (test_fuzz_smoke counts the EBADF replies).
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

from tests.fuzz.image import (FAR_GPA, HOLE_GPA, INDIRECT, NEXT, WRITE, SeedBuilder)

HERE = Path(__file__).resolve().parent
IN_HEADER = struct.Struct("<IIQQIIIHH")
LINUX_INIT = struct.pack("<5I44x", 7, 38, 131072, 0x7BFFFFFB, 0xB)

LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE_OP, STATFS = 8, 9, 10, 11, 12, 13, 14, 15, 16, 17
RELEASE, FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = 18, 20, 21, 22, 23, 24, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, GETLK, SETLK, SETLKW = 27, 28, 29, 30, 31, 32, 33
CREATE, INTERRUPT, DESTROY, BATCH_FORGET, FALLOCATE, READDIRPLUS = 35, 36, 38, 42, 43, 44
RENAME2, LSEEK, COPY_FILE_RANGE, SYNCFS = 45, 46, 47, 50

_unique = [100]


def hdr(opcode: int, nodeid: int, args_len: int, uid: int = 0, gid: int = 0, length=None) -> bytes:
    _unique[0] += 2
    total = 40 + args_len if length is None else length
    return IN_HEADER.pack(total, opcode, _unique[0], nodeid, uid, gid, 1234, 0, 0)


def req(b: SeedBuilder, opcode: int, nodeid: int, args: bytes = b"", out=(), data: bytes = b"",
        indirect: bool = True, uid: int = 0) -> int:
    readable = [hdr(opcode, nodeid, len(args) + len(data), uid, uid)]
    if args:
        readable.append(args)
    if data:
        readable += [data[i:i + 4096] for i in range(0, len(data), 4096)]
    writable = [16, *[n for n in out if n]] if out is not None else []
    return b.request(readable, writable, indirect)


def name(s: bytes) -> bytes:
    return s + b"\0"


def fh(n: int) -> int:
    """The n-th file an input opens (daemon/fuse/filetable.py: generation << 24 | slot)."""
    return n << 24 | n


def read_in(fh: int, off: int, size: int, flags: int = 0x8000) -> bytes:
    return struct.pack("<QQIIQI4x", fh, off, size, 0, 0, flags)


def write_in(fh: int, off: int, size: int, write_flags: int = 0, flags: int = 0x8002) -> bytes:
    return struct.pack("<QQIIQI4x", fh, off, size, write_flags, 0, flags)


def one(opcode, nodeid, args=b"", out=(), data=b"", **kw) -> bytes:
    b = SeedBuilder(kw.pop("num", 8))
    req(b, opcode, nodeid, args, out, data, **kw)
    return b.build()


def opened(opcode, nodeid, args=b"", out=(), data=b"", flags: int = 0x8000, dir: bool = False,
           **kw) -> bytes:
    """One request on a file (directory) the same input opens first: its fh is fh(1)."""
    b = SeedBuilder(kw.pop("num", 8))
    req(b, OPENDIR if dir else OPEN, nodeid, struct.pack("<II", flags, 0), [16])
    req(b, opcode, nodeid, args, out, data, **kw)
    return b.build()


def well_formed() -> dict[str, bytes]:
    s: dict[str, bytes] = {}
    s["init"] = one(INIT, 0, LINUX_INIT, [64])
    s["lookup_hello"] = one(LOOKUP, 1, name(b"hello.txt"), [128])
    s["lookup_dotdot"] = one(LOOKUP, 1, name(b".."), [128])
    s["getattr_root"] = one(GETATTR, 1, struct.pack("<IIQ", 0, 0, 0), [104])
    s["getattr_direct"] = one(GETATTR, 2, struct.pack("<IIQ", 0, 0, 0), [104], indirect=False)
    s["statfs"] = one(STATFS, 1, b"", [80])
    s["readlink"] = one(READLINK, 4, b"", [4095])
    s["syncfs"] = one(SYNCFS, 1, bytes(8))
    s["destroy"] = one(DESTROY, 0)
    s["mkdir"] = one(MKDIR, 1, struct.pack("<II", 0o755, 0o022) + name(b"newdir"), [128], uid=1000)
    s["mknod"] = one(MKNOD, 1, struct.pack("<III4x", 0o100644, 0, 0) + name(b"node"), [128])
    s["symlink"] = one(SYMLINK, 1, name(b"sl") + name(b"../../etc/passwd"), [128])
    s["setattr_size"] = one(SETATTR, 2, struct.pack("<I4xQQQQQQIIII4xII4x", 8, 0, 10, 0, 0, 0, 0,
                                                    0, 0, 0, 0, 0, 0), [104])
    s["unlink"] = one(UNLINK, 3, name(b"f1"))
    s["rename"] = one(RENAME, 1, struct.pack("<Q", 3) + name(b"hello.txt") + name(b"moved"))
    s["rename2"] = one(RENAME2, 1, struct.pack("<QII", 1, 2, 0) + name(b"hello.txt") + name(b"d"))
    s["link"] = one(LINK, 3, struct.pack("<Q", 2) + name(b"hard"), [128])
    s["setxattr"] = one(SETXATTR, 2, struct.pack("<II", 5, 0) + name(b"user.fuzz") + b"value")
    s["getxattr_probe"] = one(GETXATTR, 2, struct.pack("<I4x", 0) + name(b"user.k"), [8])
    s["getxattr"] = one(GETXATTR, 2, struct.pack("<I4x", 4096) + name(b"user.k"), [4096])
    s["listxattr"] = one(LISTXATTR, 2, struct.pack("<I4x", 4096), [4096])
    s["removexattr"] = one(REMOVEXATTR, 2, name(b"user.k"))
    # hiprio shapes: one direct 48-byte descriptor, no writable part
    s["forget"] = one(FORGET, 2, struct.pack("<Q", 1), None, indirect=False)
    s["batch_forget"] = one(BATCH_FORGET, 0, struct.pack("<I4x", 2) + struct.pack("<QQQQ", 2, 1, 3, 1),
                            None, indirect=False)
    # sequences in one ring: open + read + release, opendir + readdirplus, create + write
    b = SeedBuilder(8)
    req(b, OPEN, 2, struct.pack("<II", 0x8000, 0), [16])
    req(b, READ, 2, read_in(fh(1), 0, 4096), [4096])
    req(b, FLUSH, 2, struct.pack("<Q4x4xQ", fh(1), 0))
    req(b, RELEASE, 2, struct.pack("<QIIQ", fh(1), 0x8000, 0, 0))
    s["open_read_release"] = b.build()
    b = SeedBuilder(8)
    req(b, OPENDIR, 3, struct.pack("<II", 0x18800, 0), [16])
    req(b, READDIRPLUS, 3, read_in(fh(1), 0, 4096, 0x18800), [4096])
    req(b, READDIR, 3, read_in(fh(1), 0, 4096, 0x18800), [4096])
    req(b, RELEASEDIR, 3, struct.pack("<QIIQ", fh(1), 0x18800, 0, 0))
    s["opendir_readdirplus"] = b.build()
    b = SeedBuilder(8)
    req(b, CREATE, 1, struct.pack("<IIII", 0o102 | 0x8000, 0o100644, 0o022, 0) + name(b"new"), [128, 16])
    req(b, WRITE_OP, 6, struct.pack("<QQIIQI4x", fh(1), 0, 5000, 0, 0, 0x8002), [8], data=b"w" * 5000)
    req(b, FSYNC, 6, struct.pack("<QI4x", fh(1), 1))
    req(b, FALLOCATE, 6, struct.pack("<QQQI4x", fh(1), 0, 8192, 1))
    req(b, LSEEK, 6, struct.pack("<QQI4x", fh(1), 0, 3), [8])
    s["create_write_fsync"] = b.build()
    b = SeedBuilder(8)
    req(b, OPEN, 2, struct.pack("<II", 0x8002, 0), [16])
    req(b, GETLK, 2, struct.pack("<QQQQIII4x", fh(1), 7, 0, 100, 1, 0, 0), [24])
    req(b, SETLK, 2, struct.pack("<QQQQIII4x", fh(1), 7, 0, 100, 1, 0, 0))
    req(b, SETLKW, 2, struct.pack("<QQQQIII4x", fh(1), 8, 0, 100, 1, 0, 0))
    req(b, INTERRUPT, 0, struct.pack("<Q", 0))
    s["locks"] = b.build()
    b = SeedBuilder(8)
    req(b, OPEN, 2, struct.pack("<II", 0x8002, 0), [16])
    req(b, COPY_FILE_RANGE, 2, struct.pack("<7Q", fh(1), 0, 2, fh(1), 100, 50, 0), [8])
    s["copy_file_range"] = b.build()
    # Linux 6.1 READ of 8 KiB: the data buffer in pages (W16 W4096 W4096)
    s["read_pages"] = opened(READ, 2, read_in(fh(1), 0, 8192), [4096, 4096])
    # the same request in a ring of 256 with the avail index wrapped around u16
    b = SeedBuilder(256, last_avail=0xFFFF, used_idx=0xFFFF)
    req(b, GETATTR, 1, struct.pack("<IIQ", 0, 0, 0), [104])
    req(b, GETATTR, 1, struct.pack("<IIQ", 0, 0, 0), [104])
    s["index_wraps"] = b.build()
    b = SeedBuilder(8, event_idx=True)
    req(b, GETATTR, 1, struct.pack("<IIQ", 0, 0, 0), [104])
    s["event_idx"] = b.build()
    return s


def with_flags(seed: bytes, flags: int) -> bytes:
    """The seed with the input's flags byte set (image.py: bit 0 EVENT_IDX;
    fuzz_chain_fuse.py: bit 1 the batch loop, bit 2 checked per chain, bit 3 the
    hiprio session)."""
    return seed[:1] + bytes([flags]) + seed[2:]


def malformed() -> dict[str, bytes]:
    s: dict[str, bytes] = {}
    getattr_args = struct.pack("<IIQ", 0, 0, 0)

    def ring(build) -> bytes:
        b = SeedBuilder(8)
        build(b)
        return b.build()

    # -- descriptor chains --
    def loop(b):
        h = b.put(hdr(GETATTR, 1, 16) + getattr_args)
        b.write_desc(0, h, 40, NEXT, 1)
        b.write_desc(1, h + 40, 16, NEXT, 0)   # back to 0
        b.offer(0)
    s["bad_desc_loop"] = ring(loop)

    def next_out_of_range(b):
        b.write_desc(0, b.put(hdr(GETATTR, 1, 16) + getattr_args), 56, NEXT, 200)
        b.offer(0)
    s["bad_next_out_of_range"] = ring(next_out_of_range)

    def longer_than_queue(b):
        h = b.put(hdr(GETATTR, 1, 16) + getattr_args)
        for i in range(8):
            b.write_desc(i, h, 0, NEXT, (i + 1) % 8)
        b.offer(0)
    s["bad_chain_longer_than_queue"] = ring(longer_than_queue)

    def nested_indirect(b):
        inner = b.put(struct.pack("<QIHH", b.put(hdr(GETATTR, 1, 16) + getattr_args), 56, 0, 0), 16)
        outer = b.put(struct.pack("<QIHH", inner, 16, INDIRECT, 0), 16)
        b.write_desc(0, outer, 16, INDIRECT, 0)
        b.offer(0)
    s["bad_nested_indirect"] = ring(nested_indirect)

    def indirect_next(b):
        t = b.put(struct.pack("<QIHH", b.put(hdr(GETATTR, 1, 16) + getattr_args), 56, 0, 0), 16)
        b.write_desc(0, t, 16, INDIRECT | NEXT, 1)
        b.offer(0)
    s["bad_indirect_with_next"] = ring(indirect_next)

    for length in (0, 15, 24):
        def indirect_len(b, length=length):
            t = b.put(struct.pack("<QIHH", b.put(hdr(GETATTR, 1, 16) + getattr_args), 56, 0, 0) * 2, 16)
            b.write_desc(0, t, length, INDIRECT, 0)
            b.offer(0)
        s[f"bad_indirect_len_{length}"] = ring(indirect_len)

    def outside(b):
        b.write_desc(0, HOLE_GPA + 0x100, 56, 0, 0)
        b.offer(0)
    s["bad_addr_in_hole"] = ring(outside)

    def straddle_hole(b):
        b.write_desc(0, HOLE_GPA - 16, 56, 0, 0)
        b.offer(0)
    s["bad_addr_spans_hole"] = ring(straddle_hole)

    def overflow(b):
        b.write_desc(0, (1 << 64) - 16, 56, 0, 0)
        b.offer(0)
    s["bad_addr_overflows_64_bits"] = ring(overflow)

    def straddle_adjacent(b):
        # legal: region 0 ends at 0x10000 where region 1 starts; the reply
        # buffer straddles them
        h = b.put(hdr(GETATTR, 1, 16) + getattr_args)
        b.write_desc(0, h, 56, NEXT, 1)
        b.write_desc(1, 0x10000 - 60, 120, WRITE, 0)
        b.offer(0)
    s["ok_buffer_spans_two_regions"] = ring(straddle_adjacent)

    def far_region(b):
        h = b.put(hdr(GETATTR, 1, 16) + getattr_args)
        b.write_desc(0, h, 56, NEXT, 1)
        b.write_desc(1, FAR_GPA + 0x100, 120, WRITE, 0)
        b.offer(0)
    s["ok_reply_in_far_region"] = ring(far_region)

    def zero_len(b):
        h = b.put(hdr(GETATTR, 1, 16) + getattr_args)
        b.write_desc(0, h, 0, NEXT, 1)
        b.write_desc(1, h, 56, NEXT, 2)
        b.write_desc(2, HOLE_GPA, 0, NEXT, 3)   # zero length: address never used
        b.write_desc(3, b.reserve(120), 120, WRITE, 0)
        b.offer(0)
    s["ok_zero_length_descriptors"] = ring(zero_len)

    def write_before_read(b):
        b.write_desc(0, b.reserve(120), 120, WRITE | NEXT, 1)
        b.write_desc(1, b.put(hdr(GETATTR, 1, 16) + getattr_args), 56, 0, 0)
        b.offer(0)
    s["bad_writable_before_readable"] = ring(write_before_read)

    def aliased(b):
        h = b.put(hdr(GETATTR, 1, 16) + getattr_args)
        b.write_desc(0, h, 56, NEXT, 1)
        b.write_desc(1, h, 120, WRITE, 0)      # reply over the request itself
        b.offer(0)
    s["ok_reply_overwrites_request"] = ring(aliased)

    b = SeedBuilder(8)
    req(b, GETATTR, 1, getattr_args, [104])
    b.avail_idx = 100                          # avail.idx 100 ahead of 0, queue of 8
    s["bad_avail_idx_jump"] = b.build()
    b = SeedBuilder(8)
    b.offer(9)                                 # head out of range
    s["bad_head_out_of_range"] = b.build()

    # -- FUSE requests --
    s["fuse_len_smaller"] = one_raw(hdr(GETATTR, 1, 16, length=50) + getattr_args, [104])
    s["fuse_len_larger"] = one_raw(hdr(GETATTR, 1, 16, length=60) + getattr_args, [104])
    s["fuse_short_header"] = one_raw(hdr(GETATTR, 1, 0)[:30], [104])
    s["fuse_unknown_opcode"] = one_raw(IN_HEADER.pack(40, 9999, 8, 1, 0, 0, 0, 0, 0), [16])
    s["fuse_nodeid_0"] = one(GETATTR, 0, getattr_args, [104])
    s["fuse_nodeid_never_looked_up"] = one(GETATTR, 400, getattr_args, [104])
    s["fuse_forget_too_many"] = one(FORGET, 2, struct.pack("<Q", 1 << 63), None, indirect=False)
    s["fuse_batch_forget_count_lies"] = one(BATCH_FORGET, 0, struct.pack("<I4x", 1000)
                                            + struct.pack("<QQ", 2, 5), None, indirect=False)
    s["fuse_name_without_nul"] = one(LOOKUP, 1, b"hello.txt", [128])
    s["fuse_name_too_long"] = one(LOOKUP, 1, name(b"x" * 300), [128])
    s["fuse_read_huge"] = opened(READ, 2, read_in(fh(1), 0, 0xFFFFFFFF), [100])
    s["fuse_write_size_lies"] = opened(WRITE_OP, 2, struct.pack("<QQIIQI4x", fh(1), 0, 1 << 30, 0, 0, 0),
                                       [8], data=b"x" * 100, flags=0x8002)
    s["fuse_fh_never_opened"] = opened(READ, 2, read_in(fh(2), 0, 4096), [4096])
    s["fuse_getxattr_huge"] = one(GETXATTR, 2, struct.pack("<I4x", 0xFFFFFFFF) + name(b"user.k"), [10])
    s["fuse_getxattr_buffer_small"] = one(GETXATTR, 2, struct.pack("<I4x", 4096) + name(b"user.k"), [10])
    s["fuse_listxattr_small"] = one(LISTXATTR, 2, struct.pack("<I4x", 3), [3])
    s["fuse_readdir_offset_nowhere"] = opened(READDIR, 3, read_in(fh(1), 0x7FFFFFFFDEADBEEF, 4096), [4096],
                                              flags=0x18800, dir=True)
    s["fuse_lookup_reply_too_small"] = one(LOOKUP, 1, name(b"hello.txt"), [50])
    s["fuse_no_writable_part"] = one(GETATTR, 1, getattr_args, None)
    s["fuse_init_old_minor"] = one(INIT, 0, struct.pack("<5I44x", 7, 20, 0, 0, 0), [64])
    return s


def one_raw(request: bytes, out) -> bytes:
    b = SeedBuilder(8)
    b.request([request[:40], request[40:]] if len(request) > 40 else [request], [16, *out])
    return b.build()


def batch_loop() -> dict[str, bytes]:
    s: dict[str, bytes] = {}
    # stage 3, the batch loop in C (flags bit 1; bit 2 too: one chain per
    # call, each checked against the session): served in C, declined to
    # Python (OPEN, LOOKUP), served in C on the fh Python opened
    b = SeedBuilder(16, event_idx=True, last_avail=0xFFFE, used_idx=3)
    req(b, OPEN, 2, struct.pack("<II", 0x8000, 0), [16])
    req(b, GETATTR, 1, struct.pack("<IIQ", 0, 0, 0), [104])
    req(b, READ, 2, read_in(fh(1), 0, 4096), [4096])
    req(b, GETATTR, 2, struct.pack("<IIQ", 1, 0, fh(1)), [104])
    req(b, LOOKUP, 1, name(b"hello.txt"), [128])
    req(b, GETATTR, 2, struct.pack("<IIQ", 0, 0, 0), [104])
    req(b, READ, 2, read_in(fh(1), 100, 8192), [4096, 4096])
    mixed = b.build()
    s["batch_mixed"] = with_flags(mixed, 3)
    s["batch_checked"] = with_flags(mixed, 7)
    # a ring broken after two requests C serves: Python pops the third and
    # reports it
    b = SeedBuilder(8)
    req(b, GETATTR, 1, struct.pack("<IIQ", 0, 0, 0), [104])
    req(b, GETATTR, 2, struct.pack("<IIQ", 0, 0, 0), [104])
    head = b.desc_index()
    b.write_desc(head, b.put(hdr(GETATTR, 1, 16) + bytes(16)), 56, 1, 99)
    b.offer(head)
    s["batch_broken_ring"] = with_flags(b.build(), 2)
    # WRITEs on an fh Python opened read-write, served in C (the data one
    # buffer, then split over pages), read back in C; one with
    # FUSE_WRITE_KILL_SUIDGID (4), written in C without CAP_FSETID
    b = SeedBuilder(16)
    req(b, OPEN, 2, struct.pack("<II", 0x8002, 0), [16])
    req(b, WRITE_OP, 2, write_in(fh(1), 0, 100), [8], data=b"c" * 100)
    req(b, WRITE_OP, 2, write_in(fh(1), 300, 5000), [8], data=bytes(range(256)) * 19 + b"t" * 136)
    req(b, WRITE_OP, 2, write_in(fh(1), 50, 10, write_flags=4), [8], data=b"k" * 10)
    req(b, READ, 2, read_in(fh(1), 0, 4096), [4096])
    req(b, GETATTR, 2, struct.pack("<IIQ", 1, 0, fh(1)), [104])
    writes = b.build()
    s["write_in_c"] = writes
    s["batch_write"] = with_flags(writes, 2)
    s["batch_write_checked"] = with_flags(writes, 6)
    # LOOKUP in C: names whose inodes the session holds (the harness looks
    # them up at INIT), in the root and in d/ (nodeid 3), a missing name
    # (ENOENT), then ".." and a name with '/' (Python's), and again
    b = SeedBuilder(16)
    for _ in range(2):
        req(b, LOOKUP, 1, name(b"hello.txt"), [128])
        req(b, LOOKUP, 1, name(b"link"), [128])
        req(b, LOOKUP, 1, name(b"no-such-name"), [128])
        req(b, LOOKUP, 3, name(b"f1"), [128])
        req(b, LOOKUP, 1, name(b".."), [128])
        req(b, LOOKUP, 1, name(b"d/f1"), [128])
    lookups = b.build()
    s["batch_lookups"] = with_flags(lookups, 3)
    s["batch_lookups_checked"] = with_flags(lookups, 7)
    # a worker's first LOOKUPs of inodes (d/f0..f4: not looked up at INIT),
    # inserted by C; then again (found, held); then FORGETs that free two
    # and the lookups again (the freed slots reused while the session
    # still caches their old fds)
    b = SeedBuilder(32)
    for _ in range(2):
        for i in range(5):
            req(b, LOOKUP, 3, name(b"f%d" % i), [128])
    for nodeid in (6, 7):
        req(b, FORGET, nodeid, struct.pack("<Q", 2), None)
    for i in range(5):
        req(b, LOOKUP, 3, name(b"f%d" % i), [128])
    first = b.build()
    s["batch_first_lookups"] = with_flags(first, 3)
    s["batch_first_lookups_checked"] = with_flags(first, 7)
    # CREATE in C: new names in the root and in d/ (nodeid 3), read-write,
    # write-only with O_TRUNC, O_EXCL; a name that exists (Python's); the
    # fhs released (their slots are 1..3 of the shared table)
    b = SeedBuilder(16)
    for i, (parent, flags) in enumerate(((1, 0x2), (3, 0x1 | 0x200), (1, 0x2 | 0x80))):
        req(b, CREATE, parent, struct.pack("<IIII", flags, 0o100644, 0o022, 0) + name(b"new%d" % i), [128, 16])
    req(b, CREATE, 1, struct.pack("<IIII", 0x2, 0o100644, 0o022, 0) + name(b"hello.txt"), [128, 16])
    for i in range(1, 4):
        req(b, RELEASE, 1, struct.pack("<QIIQ", fh(i), 0, 0, 0), [])
    creates = b.build()
    s["batch_creates"] = with_flags(creates, 3)
    s["batch_creates_checked"] = with_flags(creates, 7)
    # RELEASE in C: three new files created (C), released plainly, with
    # RELEASE_FLOCK_UNLOCK, plainly (C's; EBADF cases are in the unit
    # tests: the smoke wants fuse_fh_never_opened the one EBADF input)
    b = SeedBuilder(16)
    for i in range(3):
        req(b, CREATE, 1, struct.pack("<IIII", 0x2, 0o100644, 0o022, 0) + name(b"rel%d" % i), [128, 16])
    for n, flags in ((1, 0), (2, 2), (3, 0)):
        req(b, RELEASE, 1, struct.pack("<QIIQ", fh(n), 0, flags, 0), [])
    releases = b.build()
    s["batch_releases"] = with_flags(releases, 3)
    s["batch_releases_checked"] = with_flags(releases, 7)
    return s


def meta_ops() -> dict[str, bytes]:
    """_meta.h's ops, served in C: GETXATTR of hello.txt's user.k (the size,
    the value, too small: ERANGE) and of security.capability (ENODATA, a
    guest's question before every write), on the root too; FLUSH of a
    file the input opened; UNLINK and RMDIR of entries the input made in
    d/ (then again: ENOENT), of d itself (ENOTEMPTY, EISDIR); "." and a
    name with '/' (Python's); RENAME of a file the input made in d/ to the
    root and back (then again: ENOENT), onto d (EISDIR), of "." (Python's). Stage 2, whole batches, and one chain at a
    time (each checked against the session)."""
    s: dict[str, bytes] = {}
    b = SeedBuilder(32)
    for nodeid in (2, 1):
        req(b, GETXATTR, nodeid, struct.pack("<I4x", 0) + name(b"user.k"), [8])
        req(b, GETXATTR, nodeid, struct.pack("<I4x", 200) + name(b"user.k"), [200])
        req(b, GETXATTR, nodeid, struct.pack("<I4x", 50) + name(b"user.k"), [200])
        req(b, GETXATTR, nodeid, struct.pack("<I4x", 0) + name(b"security.capability"), [8])
    req(b, OPEN, 2, struct.pack("<II", 0x8000, 0), [16])
    req(b, FLUSH, 2, struct.pack("<Q4x4xQ", fh(1), 0x1234))
    req(b, MKNOD, 3, struct.pack("<III4x", 0o100644, 0, 0) + name(b"gone"), [128])
    req(b, MKDIR, 3, struct.pack("<II", 0o755, 0) + name(b"sub"), [128])
    for _ in range(2):
        req(b, UNLINK, 3, name(b"gone"))
        req(b, RMDIR, 3, name(b"sub"))
    req(b, RMDIR, 1, name(b"d"))
    req(b, UNLINK, 1, name(b"d"))
    req(b, UNLINK, 1, name(b"."))
    req(b, RMDIR, 1, name(b"d/sub"))
    req(b, MKNOD, 3, struct.pack("<III4x", 0o100644, 0, 0) + name(b"mv"), [128])
    req(b, RENAME, 3, struct.pack("<Q", 1) + name(b"mv") + name(b"mv2"))
    req(b, RENAME, 1, struct.pack("<Q", 3) + name(b"mv2") + name(b"mv"))
    req(b, RENAME, 1, struct.pack("<Q", 3) + name(b"mv2") + name(b"mv"))
    req(b, RENAME, 3, struct.pack("<Q", 1) + name(b"mv") + name(b"d"))
    req(b, RENAME, 3, struct.pack("<Q", 1) + name(b".") + name(b"x"))
    meta = b.build()
    s["meta_in_c"] = meta
    s["batch_meta"] = with_flags(meta, 3)
    s["batch_meta_checked"] = with_flags(meta, 7)
    return s


def forgets() -> dict[str, bytes]:
    """The hiprio ring (flags bit 3: the target's hiprio session and its
    FastOps, _forget.h): FORGETs and BATCH_FORGETs in the driver's shape
    (one direct descriptor, no writable part) of the nodeids the harness
    looked up (2..5: one count each) and of the root, 0, unknown and
    out-of-range ones, nlookup 0 and 2^63; a BATCH_FORGET whose count is
    more than its body (Python's: logged, ignored), one with a trailing
    byte, a short FORGET, an INTERRUPT (Python's), a GETATTR (dropped).
    C serves 9 of the 13. Stage 2, whole batches, and one chain at a time
    (each checked against the hiprio session on the same table)."""
    s: dict[str, bytes] = {}
    b = SeedBuilder(32)
    req(b, FORGET, 2, struct.pack("<Q", 0), None, indirect=False)
    req(b, FORGET, 1, struct.pack("<Q", 1), None, indirect=False)
    req(b, FORGET, 0, struct.pack("<Q", 1), None, indirect=False)
    req(b, FORGET, 9999, struct.pack("<Q", 1), None, indirect=False)
    req(b, FORGET, 2, struct.pack("<Q", 1), None, indirect=False)
    req(b, FORGET, 2, struct.pack("<Q", 1), None, indirect=False)      # freed already
    req(b, BATCH_FORGET, 0, struct.pack("<I4x", 5) + struct.pack("<10Q", 3, 1, 1, 1, 0, 1, 4, 1 << 63, 1 << 40, 1),
        None, indirect=False)
    req(b, BATCH_FORGET, 0, struct.pack("<I4x", 3) + struct.pack("<QQ", 5, 1), None, indirect=False)
    req(b, BATCH_FORGET, 0, struct.pack("<I4x", 1) + struct.pack("<QQ", 5, 1) + b"\0", None, indirect=False)
    req(b, FORGET, 5, struct.pack("<I", 1), None, indirect=False)      # short: ignored
    req(b, INTERRUPT, 0, struct.pack("<Q", 7), None, indirect=False)
    req(b, GETATTR, 1, struct.pack("<IIQ", 0, 0, 0), [104])
    req(b, BATCH_FORGET, 0, struct.pack("<I4x", 1) + struct.pack("<QQ", 5, 1), None, indirect=False)
    ring = b.build()
    s["hiprio_forgets"] = with_flags(ring, 8)
    s["hiprio_batch_forgets"] = with_flags(ring, 8 | 3)
    s["hiprio_batch_forgets_checked"] = with_flags(ring, 8 | 7)
    return s


def readdirplus_ops() -> dict[str, bytes]:
    """_readdir.h's READDIRPLUS, served in C: OPENDIR of the root and of d/
    (fh 1 and 2, Python's), READDIRPLUS of the root at cookie 0 in 4 KiB,
    then in 300 bytes (two records at most), 100 (none fits), from cookie 2
    (a seek), of d/ in 600 bytes three times from 0 (the stream moves on
    by cookie: the harness answers each again from the same cookie), with
    a size past 1 MiB, a writable part smaller than the size; a cookie
    past OFFSET_MAX (Python's: EINVAL); RELEASEDIR. Stage 2, whole
    batches, and one chain at a time (each checked against the session).
    (No fh that was never opened: only fuse_fh_never_opened names one.)"""
    s: dict[str, bytes] = {}
    b = SeedBuilder(32)
    req(b, OPENDIR, 1, struct.pack("<II", 0x18800, 0), [16])
    req(b, OPENDIR, 3, struct.pack("<II", 0x18800, 0), [16])
    req(b, READDIRPLUS, 1, read_in(fh(1), 0, 4096, 0x18800), [4096])
    req(b, READDIRPLUS, 1, read_in(fh(1), 0, 300, 0x18800), [300])
    req(b, READDIRPLUS, 1, read_in(fh(1), 0, 100, 0x18800), [100])
    req(b, READDIRPLUS, 1, read_in(fh(1), 2, 4096, 0x18800), [2048, 2048])
    for _ in range(3):
        req(b, READDIRPLUS, 3, read_in(fh(2), 0, 600, 0x18800), [600])
    req(b, READDIRPLUS, 3, read_in(fh(2), 0, 0xFFFFFFFF, 0x18800), [4096])
    req(b, READDIRPLUS, 3, read_in(fh(2), 0, 4096, 0x18800), [200])
    req(b, READDIRPLUS, 3, read_in(fh(2), 1 << 63, 4096, 0x18800), [4096])
    req(b, RELEASEDIR, 3, struct.pack("<QIIQ", fh(2), 0x18800, 0, 0))
    req(b, RELEASEDIR, 1, struct.pack("<QIIQ", fh(1), 0x18800, 0, 0))
    plus = b.build()
    s["readdirplus_in_c"] = plus
    s["batch_readdirplus"] = with_flags(plus, 3)
    s["batch_readdirplus_checked"] = with_flags(plus, 7)
    return s


def readdir_ops() -> dict[str, bytes]:
    """_readdir.h's plain READDIR, served in C: readdirplus_ops's requests
    as READDIR (fuse_dirent records, no lookups), and one READDIRPLUS of
    the root first as a Linux guest's names-only listing under
    READDIRPLUS_AUTO sends it (C's READDIRPLUS; only READDIRs are counted
    in c_readdir): ten READDIR, of which C serves nine (the cookie past
    OFFSET_MAX is Python's EINVAL); 100 bytes fit two short records here,
    40 one, 20 none. Stage 2, whole batches, and one chain at a time."""
    s: dict[str, bytes] = {}
    b = SeedBuilder(32)
    req(b, OPENDIR, 1, struct.pack("<II", 0x18800, 0), [16])
    req(b, OPENDIR, 3, struct.pack("<II", 0x18800, 0), [16])
    req(b, READDIRPLUS, 1, read_in(fh(1), 0, 4096, 0x18800), [4096])
    req(b, READDIR, 1, read_in(fh(1), 0, 4096, 0x18800), [4096])
    req(b, READDIR, 1, read_in(fh(1), 0, 40, 0x18800), [40])
    req(b, READDIR, 1, read_in(fh(1), 0, 20, 0x18800), [20])
    req(b, READDIR, 1, read_in(fh(1), 2, 4096, 0x18800), [2048, 2048])
    for _ in range(3):
        req(b, READDIR, 3, read_in(fh(2), 0, 100, 0x18800), [100])
    req(b, READDIR, 3, read_in(fh(2), 0, 0xFFFFFFFF, 0x18800), [4096])
    req(b, READDIR, 3, read_in(fh(2), 0, 4096, 0x18800), [50])
    req(b, READDIR, 3, read_in(fh(2), 1 << 63, 4096, 0x18800), [4096])
    req(b, RELEASEDIR, 3, struct.pack("<QIIQ", fh(2), 0x18800, 0, 0))
    req(b, RELEASEDIR, 1, struct.pack("<QIIQ", fh(1), 0x18800, 0, 0))
    names = b.build()
    s["readdir_in_c"] = names
    s["batch_readdir"] = with_flags(names, 3)
    s["batch_readdir_checked"] = with_flags(names, 7)
    return s


def setattr_in(valid: int, mode: int = 0, atime=(0, 0), mtime=(0, 0), fh: int = 0, size: int = 0,
               uid: int = 0, gid: int = 0) -> bytes:
    return struct.pack("<I4xQQQQQQIIII4xII4x", valid, fh, size, 0, atime[0], mtime[0], 0, atime[1], mtime[1], 0,
                       mode, uid, gid)


def setattr_ops() -> dict[str, bytes]:
    """_setattr.h's SETATTR, served in C: what tar -x sends (utimensat with
    explicit times and with *_NOW, chmod, chown, together), on hello.txt, d, fifo and
    the root, through the fh of an OPEN (C's too) and an out-of-range
    nanosecond (C's EINVAL): ten SETATTRs, of which C serves nine (the
    symlink's is Python's). Stage 2, whole batches, one chain at a time."""
    s: dict[str, bytes] = {}
    b = SeedBuilder(32)
    t = (1_600_000_000, 5)
    req(b, SETATTR, 2, setattr_in(0x30, atime=t, mtime=t), [104])
    req(b, SETATTR, 2, setattr_in(0x07, 0o600, uid=1000, gid=1000), [104])
    req(b, SETATTR, 3, setattr_in(0x31, 0o777, t, t), [104])
    req(b, SETATTR, 2, setattr_in(0x180), [104])
    req(b, SETATTR, 5, setattr_in(0x20, mtime=t), [104])
    req(b, SETATTR, 1, setattr_in(0x36, atime=t, mtime=t), [104])     # chown to 0:0 too
    req(b, OPEN, 2, struct.pack("<II", 0x8002, 0), [16])
    req(b, SETATTR, 2, setattr_in(0x41, 0o644, fh=fh(1)), [104])
    req(b, SETATTR, 3, setattr_in(0x20, mtime=(5, 10**9)), [104])
    req(b, SETATTR, 2, setattr_in(0), [104])
    req(b, SETATTR, 4, setattr_in(0x30, atime=t, mtime=t), [104])
    ops = b.build()
    s["setattr_in_c"] = ops
    s["batch_setattr"] = with_flags(ops, 3)
    s["batch_setattr_checked"] = with_flags(ops, 7)
    return s


ACCESS, BMAP, IOCTL, POLL, TMPFILE = 34, 37, 39, 40, 51


def attrs_ops() -> dict[str, bytes]:
    """_attrs.h's READLINK, STATFS and ENOSYS, served in C: READLINK of
    link (room for its target, and 3 bytes: C's EIO after Python's
    warning), of hello.txt (EINVAL) and of the root (EINVAL); STATFS of the
    root, hello.txt and d; IOCTL, ACCESS and TMPFILE (ENOSYS, with their
    args), and POLL with a request extension (C's too: ENOSYS comes
    first); Python's: a READLINK of an unknown nodeid (ESTALE), a STATFS
    without room for fuse_kstatfs (EIO) and an opcode without a name
    (9999). C serves 4 READLINKs, 3 STATFS and 4 ENOSYS answers (11 of
    14). Stage
    2, whole batches, one chain at a time (each checked against the
    session)."""
    s: dict[str, bytes] = {}
    b = SeedBuilder(32)
    req(b, READLINK, 4, b"", [4095])
    req(b, READLINK, 4, b"", [3])
    req(b, READLINK, 2, b"", [64])      # (small reply parts: the input stays under libFuzzer's max_len)
    req(b, READLINK, 1, b"", [64])
    req(b, READLINK, 9999, b"", [64])
    req(b, STATFS, 1, b"", [80])
    req(b, STATFS, 2, b"", [80])
    req(b, STATFS, 3, b"", [80])
    req(b, STATFS, 1, b"", [79])
    req(b, IOCTL, 2, struct.pack("<QIIQII", fh(1), 0, 0x5401, 0, 0, 8), [8])
    req(b, ACCESS, 3, struct.pack("<I4x", 4))
    req(b, TMPFILE, 1, struct.pack("<IIII", 0o100600, 0x8002, 0o022, 0) + name(b"t"), [128, 32])
    readable = [hdr(POLL, 2, 24 + 8)[:-4] + struct.pack("<HH", 1, 0), struct.pack("<QQII", fh(1), 0, 0, 1) + bytes(8)]
    b.request(readable, [16, 8], True)
    req(b, 9999, 1, b"", [])
    ops = b.build()
    s["attrs_in_c"] = ops
    s["batch_attrs"] = with_flags(ops, 3)
    s["batch_attrs_checked"] = with_flags(ops, 7)
    return s


def all_seeds() -> dict[str, bytes]:
    return {**well_formed(), **malformed(), **batch_loop(), **meta_ops(), **forgets(), **readdirplus_ops(),
            **readdir_ops(), **setattr_ops(), **attrs_ops()}


def main() -> int:
    out = HERE / "corpus"
    out.mkdir(exist_ok=True)
    for old in out.glob("*.bin"):
        old.unlink()
    seeds = all_seeds()
    for key, data in seeds.items():
        (out / f"{key}.bin").write_bytes(data)
    print(f"wrote {len(seeds)} seeds to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
