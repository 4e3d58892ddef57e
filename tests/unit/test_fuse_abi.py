"""Golden bytes for every wire struct in daemon/fuse/abi.py.

Each struct is checked against its C declaration from <linux/fuse.h> 7.38,
written out here independently as a list of (C type, value) members — with
a distinct value in every member, so a swapped, missing or misplaced field
changes the bytes — and a few against literal bytes seen on the wire
(docs/protocol.md, "What the Linux driver sends").
"""

from __future__ import annotations

import struct

import pytest

from daemon.fuse import abi

_SIZES = {"u8": 1, "u16": 2, "u32": 4, "i32": 4, "u64": 8}


def c_layout(*members: tuple[str, int]) -> bytes:
    """The little-endian bytes of a C struct with these (type, value)
    members; 'padN' members are N zero bytes. Natural alignment holds for
    every FUSE struct, so no implicit padding is added (checked by size)."""
    out = b""
    for ctype, value in members:
        if ctype.startswith("pad"):
            out += bytes(int(ctype[3:]))
            continue
        size = _SIZES[ctype]
        assert len(out) % size == 0, "member would be misaligned"
        out += value.to_bytes(size, "little", signed=ctype.startswith("i"))
    return out


def seq(ctype: str, start: int, n: int) -> list[tuple[str, int]]:
    """n members of one type with values start, start+1, ..."""
    return [(ctype, start + i) for i in range(n)]


ATTR_MEMBERS = (seq("u64", 0x0101010101010101, 6) + seq("u32", 0x0A0A0A0A, 10))
ATTR_VALUES = tuple(v for _, v in ATTR_MEMBERS)

# (struct, values to pack, C members) for every struct in abi.py
CASES = {
    "IN_HEADER": (abi.IN_HEADER, (0x30, 2, 0x1A, 0x42, 1000, 1001, 77, 3, 0),
                  [("u32", 0x30), ("u32", 2), ("u64", 0x1A), ("u64", 0x42), ("u32", 1000),
                   ("u32", 1001), ("u32", 77), ("u16", 3), ("u16", 0)]),
    "OUT_HEADER": (abi.OUT_HEADER, (16, -2, 0x1A), [("u32", 16), ("i32", -2), ("u64", 0x1A)]),
    "INIT_IN": (abi.INIT_IN, (7, 38, 131072, 0x7BFFFFFB, 0xB),
                [("u32", 7), ("u32", 38), ("u32", 131072),
                                         ("u32", 0x7BFFFFFB), ("u32", 0xB), ("pad44", 0)]),
    "INIT_IN_COMPAT": (abi.INIT_IN_COMPAT, (7, 26, 4096, 1),
                       [("u32", 7), ("u32", 26), ("u32", 4096), ("u32", 1)]),
    "INIT_OUT": (abi.INIT_OUT, (7, 38, 131072, 0x40000001, 64, 48, 1 << 20, 1, 256, 5, 9),
                 [("u32", 7), ("u32", 38), ("u32", 131072), ("u32", 0x40000001), ("u16", 64),
                  ("u16", 48), ("u32", 1 << 20), ("u32", 1), ("u16", 256), ("u16", 5),
                  ("u32", 9), ("pad28", 0)]),
    "ATTR": (abi.ATTR, ATTR_VALUES, list(ATTR_MEMBERS)),
    "ENTRY_OUT": (abi.ENTRY_OUT, (5, 6, 7, 8, 9, 10) + ATTR_VALUES,
                  [("u64", 5), ("u64", 6), ("u64", 7), ("u64", 8), ("u32", 9), ("u32", 10)]
                  + list(ATTR_MEMBERS)),
    "ATTR_OUT": (abi.ATTR_OUT, (11, 12, 13) + ATTR_VALUES,
                 [("u64", 11), ("u32", 12), ("u32", 13)] + list(ATTR_MEMBERS)),
    "GETATTR_IN": (abi.GETATTR_IN, (1, 2, 3), [("u32", 1), ("u32", 2), ("u64", 3)]),
    "SETATTR_IN": (abi.SETATTR_IN, tuple(range(1, 14)),
                   [("u32", 1), ("pad4", 0), ("u64", 2), ("u64", 3), ("u64", 4), ("u64", 5),
                    ("u64", 6), ("u64", 7), ("u32", 8), ("u32", 9), ("u32", 10), ("u32", 11),
                    ("pad4", 0), ("u32", 12), ("u32", 13), ("pad4", 0)]),
    "FORGET_IN": (abi.FORGET_IN, (9,), [("u64", 9)]),
    "BATCH_FORGET_IN": (abi.BATCH_FORGET_IN, (3,), [("u32", 3), ("pad4", 0)]),
    "FORGET_ONE": (abi.FORGET_ONE, (4, 5), [("u64", 4), ("u64", 5)]),
    "MKNOD_IN": (abi.MKNOD_IN, (0o20644, 0x10203, 0o22),
                 [("u32", 0o20644), ("u32", 0x10203), ("u32", 0o22), ("pad4", 0)]),
    "MKDIR_IN": (abi.MKDIR_IN, (0o755, 0o22), [("u32", 0o755), ("u32", 0o22)]),
    "RENAME_IN": (abi.RENAME_IN, (7,), [("u64", 7)]),
    "RENAME2_IN": (abi.RENAME2_IN, (7, 2), [("u64", 7), ("u32", 2), ("pad4", 0)]),
    "LINK_IN": (abi.LINK_IN, (8,), [("u64", 8)]),
    "OPEN_IN": (abi.OPEN_IN, (0x8002, 1), [("u32", 0x8002), ("u32", 1)]),
    "CREATE_IN": (abi.CREATE_IN, (0x8042, 0o100644, 0o22, 1),
                  [("u32", 0x8042), ("u32", 0o100644), ("u32", 0o22), ("u32", 1)]),
    "OPEN_OUT": (abi.OPEN_OUT, (0x1234, 3), [("u64", 0x1234), ("u32", 3), ("pad4", 0)]),
    "RELEASE_IN": (abi.RELEASE_IN, (1, 2, 3, 4), [("u64", 1), ("u32", 2), ("u32", 3), ("u64", 4)]),
    "FLUSH_IN": (abi.FLUSH_IN, (1, 4), [("u64", 1), ("pad4", 0), ("pad4", 0), ("u64", 4)]),
    "READ_IN": (abi.READ_IN, (1, 2, 3, 4, 5, 6),
                [("u64", 1), ("u64", 2), ("u32", 3), ("u32", 4), ("u64", 5), ("u32", 6),
                 ("pad4", 0)]),
    "WRITE_IN": (abi.WRITE_IN, (1, 2, 3, 4, 5, 6),
                 [("u64", 1), ("u64", 2), ("u32", 3), ("u32", 4), ("u64", 5), ("u32", 6),
                  ("pad4", 0)]),
    "WRITE_OUT": (abi.WRITE_OUT, (4096,), [("u32", 4096), ("pad4", 0)]),
    "FSYNC_IN": (abi.FSYNC_IN, (1, 1), [("u64", 1), ("u32", 1), ("pad4", 0)]),
    "FALLOCATE_IN": (abi.FALLOCATE_IN, (1, 2, 3, 4),
                     [("u64", 1), ("u64", 2), ("u64", 3), ("u32", 4), ("pad4", 0)]),
    "LSEEK_IN": (abi.LSEEK_IN, (1, 2, 3), [("u64", 1), ("u64", 2), ("u32", 3), ("pad4", 0)]),
    "LSEEK_OUT": (abi.LSEEK_OUT, (99,), [("u64", 99)]),
    "COPY_FILE_RANGE_IN": (abi.COPY_FILE_RANGE_IN, tuple(range(1, 8)), seq("u64", 1, 7)),
    "STATFS_OUT": (abi.STATFS_OUT, (1, 2, 3, 4, 5, 6, 7, 8),
                   seq("u64", 1, 5) + [("u32", 6), ("u32", 7), ("u32", 8), ("pad4", 0),
                                        ("pad24", 0)]),
    "SETXATTR_IN": (abi.SETXATTR_IN, (5, 1), [("u32", 5), ("u32", 1)]),
    "EXT_HEADER": (abi.EXT_HEADER, (16, 32), [("u32", 16), ("u32", 32)]),
    "SUPP_GROUPS": (abi.SUPP_GROUPS, (1,), [("u32", 1)]),
    "SECCTX_HEADER": (abi.SECCTX_HEADER, (48, 1), [("u32", 48), ("u32", 1)]),
    "SECCTX": (abi.SECCTX, (11,), [("u32", 11), ("pad4", 0)]),
    "SUPP_GROUP": (abi.SUPP_GROUP, (1000,), [("u32", 1000)]),
    "IDS": (abi.IDS, (1000, 100), [("u32", 1000), ("u32", 100)]),
    "IN_HEADER_START": (abi.IN_HEADER_START, (40, 3, 0x1122), [("u32", 40), ("u32", 3), ("u64", 0x1122)]),
    "ENTRY_OUT_NODEID": (abi.ENTRY_OUT_NODEID, (42,), [("u64", 42)]),
    "ENTRY_OUT_HEAD": (abi.ENTRY_OUT_HEAD, (1, 2, 3, 4, 5, 6),
                       seq("u64", 1, 4) + [("u32", 5), ("u32", 6)]),
    "ENTRY_OUT_INO_MODE": (abi.ENTRY_OUT_INO_MODE, (7, 0o100644),
                           [("pad40", 0), ("u64", 7), ("pad52", 0), ("u32", 0o100644)]),
    "GETXATTR_IN": (abi.GETXATTR_IN, (5,), [("u32", 5), ("pad4", 0)]),
    "GETXATTR_OUT": (abi.GETXATTR_OUT, (6,), [("u32", 6), ("pad4", 0)]),
    "LK_IN": (abi.LK_IN, (1, 2, 3, 4, 5, 6, 7),
              [("u64", 1), ("u64", 2), ("u64", 3), ("u64", 4), ("u32", 5), ("u32", 6),
               ("u32", 7), ("pad4", 0)]),
    "LK_OUT": (abi.LK_OUT, (1, 2, 3, 4), [("u64", 1), ("u64", 2), ("u32", 3), ("u32", 4)]),
    "INTERRUPT_IN": (abi.INTERRUPT_IN, (0x1C,), [("u64", 0x1C)]),
    "SYNCFS_IN": (abi.SYNCFS_IN, (), [("pad8", 0)]),
    "ACCESS_IN": (abi.ACCESS_IN, (4,), [("u32", 4), ("pad4", 0)]),
    "DIRENT": (abi.DIRENT, (1, 2, 3, 4), [("u64", 1), ("u64", 2), ("u32", 3), ("u32", 4)]),
    "DIRENTPLUS": (abi.DIRENTPLUS, (5, 6, 7, 8, 9, 10) + ATTR_VALUES + (1, 2, 3, 4),
                   [("u64", 5), ("u64", 6), ("u64", 7), ("u64", 8), ("u32", 9), ("u32", 10)]
                   + list(ATTR_MEMBERS) + [("u64", 1), ("u64", 2), ("u32", 3), ("u32", 4)]),
}

SIZES = {
    "IN_HEADER": 40, "OUT_HEADER": 16, "INIT_IN": 64, "INIT_IN_COMPAT": 16, "INIT_OUT": 64,
    "ATTR": 88, "ENTRY_OUT": 128, "ATTR_OUT": 104, "GETATTR_IN": 16, "SETATTR_IN": 88,
    "FORGET_IN": 8, "BATCH_FORGET_IN": 8, "FORGET_ONE": 16, "MKNOD_IN": 16, "MKDIR_IN": 8,
    "RENAME_IN": 8, "RENAME2_IN": 16, "LINK_IN": 8, "OPEN_IN": 8, "CREATE_IN": 16,
    "OPEN_OUT": 16, "RELEASE_IN": 24, "FLUSH_IN": 24, "READ_IN": 40, "WRITE_IN": 40,
    "WRITE_OUT": 8, "FSYNC_IN": 16, "FALLOCATE_IN": 32, "LSEEK_IN": 24, "LSEEK_OUT": 8,
    "COPY_FILE_RANGE_IN": 56, "STATFS_OUT": 80, "SETXATTR_IN": 8, "GETXATTR_IN": 8,
    "EXT_HEADER": 8, "SUPP_GROUPS": 4, "SECCTX_HEADER": 8, "SECCTX": 8, "SUPP_GROUP": 4,
    "IN_HEADER_START": 16, "ENTRY_OUT_NODEID": 8, "ENTRY_OUT_INO_MODE": 104, "ENTRY_OUT_HEAD": 40,
    "IDS": 8,
    "GETXATTR_OUT": 8, "LK_IN": 48, "LK_OUT": 24, "INTERRUPT_IN": 8, "SYNCFS_IN": 8,
    "ACCESS_IN": 8, "DIRENT": 24, "DIRENTPLUS": 152,
}


def test_every_struct_is_covered():
    structs = {name for name, value in vars(abi).items() if isinstance(value, struct.Struct)}
    assert structs == set(CASES) == set(SIZES)


def test_partial_views_read_the_fields_of_the_whole_struct():
    """The structs that read a few fields out of a bigger one read those."""
    header = abi.IN_HEADER.pack(56, 26, 0xABCDEF, 1, 2, 3, 4, 5, 0)
    assert abi.IN_HEADER_START.unpack_from(header) == (56, 26, 0xABCDEF)
    entry = abi.ENTRY_OUT.pack(9, 8, 7, 6, 5, 4, *range(100, 116))
    ino, mode = abi.ATTR.unpack_from(entry, abi.ENTRY_OUT.size - abi.ATTR.size)[0::9][:2]
    assert abi.ENTRY_OUT_NODEID.unpack_from(entry) == (9,)
    assert abi.ENTRY_OUT_HEAD.unpack_from(entry) == (9, 8, 7, 6, 5, 4)
    assert abi.ENTRY_OUT_HEAD.size + abi.ATTR.size == abi.ENTRY_OUT.size
    assert abi.ENTRY_OUT_INO_MODE.unpack_from(entry) == (ino, mode) == (100, 109)


@pytest.mark.parametrize("name", sorted(CASES))
def test_pack_matches_c_layout(name):
    layout, values, members = CASES[name]
    expected = c_layout(*members)
    assert len(expected) == SIZES[name] == layout.size
    assert layout.pack(*values) == expected
    assert layout.unpack(expected) == values


# -- literal bytes from the wire ------------------------------------------------------------
def test_init_in_as_linux_6_1_sends_it():
    # FUSE_INIT seen from Debian 6.1.192 (docs/protocol.md, "What the Linux driver sends"): header + init_in
    wire = bytes.fromhex(
        "68000000" "1a000000" "0200000000000000" "0000000000000000"
        "00000000" "00000000" "00000000" "0000" "0000"
        "07000000" "26000000" "00000200" "fbffff7b" "0b000000") + bytes(44)
    assert abi.IN_HEADER.unpack_from(wire) == (104, 26, 2, 0, 0, 0, 0, 0, 0)
    assert abi.INIT_IN.unpack_from(wire, 40) == (7, 38, 131072, 0x7BFFFFFB, 0xB)
    assert abi.INIT_IN_COMPAT.unpack_from(wire, 40) == (7, 38, 131072, 0x7BFFFFFB)


def test_hiprio_forget_literal():
    wire = bytes.fromhex("30000000" "02000000" "1a00000000000000" "0200000000000000"
                         + "00" * 16 + "0100000000000000")
    assert len(wire) == 48
    assert abi.IN_HEADER.unpack_from(wire)[:4] == (48, abi.Opcode.FORGET, 26, 2)
    assert abi.FORGET_IN.unpack_from(wire, 40) == (1,)


def test_error_reply_literal():
    assert abi.OUT_HEADER.pack(16, -2, 0x1A) == bytes.fromhex("10000000" "feffffff" "1a00000000000000")


def test_entry_out_field_offsets():
    blob = abi.ENTRY_OUT.pack(2, 3, 1, 1, 0, 0, *range(100, 116))
    # nodeid@0, generation@8, entry_valid@16, attr_valid@24, attr@40 (ino first, mode@60)
    assert blob[0:8] == (2).to_bytes(8, "little")
    assert blob[8:16] == (3).to_bytes(8, "little")
    assert blob[40:48] == (100).to_bytes(8, "little")
    assert blob[40 + 60:40 + 64] == (109).to_bytes(4, "little")  # mode is member 10


def test_flag_bits():
    assert abi.InitFlag.INIT_EXT == 1 << 30
    assert abi.InitFlag.MAX_PAGES == 1 << 22
    assert abi.InitFlag.SECURITY_CTX == 1 << 32
    assert abi.InitFlag.HAS_INODE_DAX == 1 << 33
    assert abi.SetattrValid.MTIME_NOW == 256
    assert abi.SetattrValid.KILL_SUIDGID == 2048


@pytest.mark.parametrize("namelen,size,plus", [(1, 32, 160), (8, 32, 160), (9, 40, 168),
                                               (255, 280, 408)])
def test_dirent_sizes(namelen, size, plus):
    assert abi.dirent_size(namelen) == size
    assert abi.direntplus_size(namelen) == plus


def test_supp_group_extension_as_linux_6_6_sends_it():
    # MKDIR "d" by a caller whose supplementary group 65531 owns the parent:
    # fuse_mkdir_in, name, then the extension (total_extlen 2 = 16 bytes):
    # fuse_ext_header {16, FUSE_EXT_GROUPS} + fuse_supp_groups {1, [65531]}
    ext = bytes.fromhex("10000000" "20000000" "01000000" "fbff0000")
    assert abi.EXT_HEADER.unpack_from(ext) == (16, abi.FUSE_EXT_GROUPS)
    assert abi.SUPP_GROUPS.unpack_from(ext, 8) == (1,)
    assert int(abi.InitFlag.CREATE_SUPP_GROUP) == 1 << 34  # flags2 bit 2


def test_id_offsets_name_uid_and_gid_in_each_struct():
    """--translate-uid/-gid rewrite ids in place at these offsets."""
    attr = (1, 2, 3, 4, 5, 6, 7, 8, 9, 0o100644, 1, 1234, 5678, 0, 4096, 0)
    packed = abi.ATTR.pack(*attr)
    assert abi.IDS.unpack_from(packed, abi.ATTR_IDS_AT) == (1234, 5678)
    packed = abi.ATTR_OUT.pack(1, 2, 0, *attr)
    assert abi.IDS.unpack_from(packed, abi.ATTR_OUT_IDS_AT) == (1234, 5678)
    packed = abi.ENTRY_OUT.pack(9, 1, 2, 3, 4, 5, *attr)
    assert abi.IDS.unpack_from(packed, abi.ENTRY_OUT_IDS_AT) == (1234, 5678)
    packed = abi.SETATTR_IN.pack(6, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0o644, 1234, 5678)
    assert abi.IDS.unpack_from(packed, abi.SETATTR_IN_IDS_AT) == (1234, 5678)
