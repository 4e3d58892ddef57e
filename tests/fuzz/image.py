"""The fuzz input format: bytes → a guest memory image with one split ring.

Shared by the fuzz target (``fuzz_chain_fuse.py``) and the seed corpus
builder (``seeds.py``). Written from docs/protocol.md, "The split virtqueue", not from
``daemon.virtio``: it is part of the test oracle.

Guest memory (one memfd, three regions; docs/protocol.md, "Memory table and address translation")::

    region 0  GPA 0x00000..0x10000  rings: desc @0x0, avail @0x1000, used @0x2000
    region 1  GPA 0x10000..0x30000  adjacent to region 0: the input's data area
    (hole)    GPA 0x30000..0x100000
    region 2  GPA 0x100000..0x110000  after the hole

An input is::

    u8  log2 of the queue size (mod 9: 1..256)
    u8  flags: bit 0 EVENT_IDX
    u16 last_avail_idx   (where the device starts)
    u16 avail.idx        (what the driver published)
    u16 used.idx         (what the used ring says at start)
    16 * num bytes       descriptor table
    2 * num bytes        avail ring entries
    the rest             copied to GPA 0x10000 (at most 128 KiB): buffers,
                         indirect tables, requests

Missing bytes read as zero, so every byte string is a valid input.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("<BBHHH")
DESC = struct.Struct("<QIHH")
NEXT, WRITE, INDIRECT = 1, 2, 4

MEM_SIZE = 0x40000                # the memfd
# (gpa, size, qva, mmap_offset) as SET_MEM_TABLE carries them
REGIONS = [
    (0x0, 0x10000, 0x7F00_0000_0000, 0x0),
    (0x10000, 0x20000, 0x7F00_0001_0000, 0x10000),
    (0x100000, 0x10000, 0x7F00_1000_0000, 0x30000),
]
DESC_GPA, AVAIL_GPA, USED_GPA = 0x0, 0x1000, 0x2000
DATA_GPA = 0x10000
DATA_MAX = 0x20000
HOLE_GPA = 0x30000                # in no region
FAR_GPA = 0x100000                # region 2
MAX_LOG2 = 8


def qva(gpa: int) -> int:
    for g, size, q, _ in REGIONS:
        if g <= gpa < g + size:
            return q + gpa - g
    raise ValueError(f"gpa {gpa:#x} in no region")


def file_offset(gpa: int) -> int:
    for g, size, _, off in REGIONS:
        if g <= gpa < g + size:
            return off + gpa - g
    raise ValueError(f"gpa {gpa:#x} in no region")


class Layout:
    """A decoded input: the values the harness writes into guest memory."""

    __slots__ = ("num", "event_idx", "last_avail", "avail_idx", "used_idx",
                 "desc", "avail_ring", "data")

    def __init__(self, data: bytes):
        head = data[:HEADER.size].ljust(HEADER.size, b"\0")
        log2, flags, self.last_avail, self.avail_idx, self.used_idx = HEADER.unpack(head)
        self.num = 1 << (log2 % (MAX_LOG2 + 1))
        self.event_idx = bool(flags & 1)
        pos = HEADER.size
        n = 16 * self.num
        self.desc = data[pos:pos + n]
        pos += n
        self.avail_ring = data[pos:pos + 2 * self.num]
        pos += 2 * self.num
        self.data = data[pos:pos + DATA_MAX]

    @property
    def used_ring_bytes(self) -> int:
        return 4 + 8 * self.num + 2


def write(ram, lay: Layout) -> None:
    """Lay an input into guest RAM (the memfd's bytes, zeroed where it
    matters): descriptor table, avail.idx and ring, used.idx, data area."""
    ram[DESC_GPA:DESC_GPA + len(lay.desc)] = lay.desc
    struct.pack_into("<HH", ram, AVAIL_GPA, 0, lay.avail_idx)
    ram[AVAIL_GPA + 4:AVAIL_GPA + 4 + len(lay.avail_ring)] = lay.avail_ring
    struct.pack_into("<H", ram, USED_GPA + 2, lay.used_idx)
    off = file_offset(DATA_GPA)
    ram[off:off + len(lay.data)] = lay.data


class SeedBuilder:
    """Builds inputs the way a Linux 6.1 driver lays requests out: buffers
    and indirect tables in the data area, heads in the ring's table."""

    def __init__(self, num: int = 8, event_idx: bool = False, last_avail: int = 0,
                 used_idx: int = 0):
        assert num & (num - 1) == 0 and 1 <= num <= 1 << MAX_LOG2
        self.num = num
        self.event_idx = event_idx
        self.last_avail = last_avail
        self.used_idx = used_idx
        self.avail_idx: int | None = None   # default: last_avail + number of heads
        self.desc = bytearray(16 * num)
        self.heads: list[int] = []
        self.data = bytearray()
        self._next_desc = 0

    # -- memory ----------------------------------------------------------------
    def put(self, data: bytes, align: int = 8) -> int:
        """Place bytes in the data area; their GPA."""
        pad = -len(self.data) % align
        self.data += bytes(pad)
        gpa = DATA_GPA + len(self.data)
        self.data += data
        assert len(self.data) <= DATA_MAX
        return gpa

    def reserve(self, n: int, align: int = 8) -> int:
        return self.put(bytes(n), align)

    # -- descriptors -------------------------------------------------------------
    def desc_index(self) -> int:
        i = self._next_desc
        self._next_desc += 1
        assert i < self.num, "seed ran out of descriptors"
        return i

    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        DESC.pack_into(self.desc, 16 * i, addr, length, flags, nxt)

    def request(self, readable: list[bytes], writable: list[int], indirect: bool = True) -> int:
        """One request: readable buffers, writable buffer sizes; its head."""
        parts = [(self.put(r), len(r), 0) for r in readable]
        parts += [(self.reserve(w), w, WRITE) for w in writable]
        if indirect and len(parts) > 1:
            table = bytearray()
            for k, (addr, length, flags) in enumerate(parts):
                last = k == len(parts) - 1
                table += DESC.pack(addr, length, flags | (0 if last else NEXT), 0 if last else k + 1)
            head = self.desc_index()
            self.write_desc(head, self.put(bytes(table), 16), len(table), INDIRECT)
        else:
            indices = [self.desc_index() for _ in parts]
            for k, (addr, length, flags) in enumerate(parts):
                last = k == len(parts) - 1
                self.write_desc(indices[k], addr, length, flags | (0 if last else NEXT),
                                0 if last else indices[k + 1])
            head = indices[0]
        self.heads.append(head)
        return head

    def offer(self, head: int) -> None:
        self.heads.append(head)

    def build(self) -> bytes:
        ring = bytearray(2 * self.num)
        for k, head in enumerate(self.heads):
            struct.pack_into("<H", ring, 2 * ((self.last_avail + k) % self.num), head)
        avail_idx = self.avail_idx
        if avail_idx is None:
            avail_idx = (self.last_avail + len(self.heads)) & 0xFFFF
        log2 = self.num.bit_length() - 1
        return (HEADER.pack(log2, int(self.event_idx), self.last_avail, avail_idx, self.used_idx)
                + bytes(self.desc) + bytes(ring) + bytes(self.data))
