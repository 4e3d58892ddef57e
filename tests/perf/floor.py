"""The least CPU a GETATTR can cost in CPython: a floor, not a daemon.

docs/perf/history.md says no code shape brings our per-request cost down to the C
daemon's. This is the measurement behind that sentence: the ring and the
requests of tests/perf/inproc.py (Linux's layout: one INDIRECT head
descriptor, a 4-entry table: in header, fuse_getattr_in, out header,
fuse_attr_out), served by the shortest Python loop that still does what
every GETATTR must do: read the avail ring, the head descriptor and its
table, decode the header, find the nodeid's fd (a dict), ``fstat`` it, pack
``fuse_attr_out`` and the out header into the guest's buffers, push the
used element, and store ``used.idx`` once per batch.

Everything a daemon may not skip is left out: no bounds checks on guest
addresses, no chain validation, no header or length checks, no credentials
switch, no nanoseconds, no errors. So the figure is below what any safe
Python daemon can reach, and it is compared with the C daemon's whole
request (the daemon-bound rate at depth 64; see profile.py).

    python -m tests.perf.floor [--seconds 3]
"""

from __future__ import annotations

import argparse
import os
import struct
import tempfile
import time

from daemon.fuse import abi
from daemon.fuse.abi import Opcode
from tests.frontend.guestmem import GuestMemory
from tests.frontend.vring import VRing

# vring_desc (16 bytes), and the 4-entry indirect table of a GETATTR
_DESC = struct.Struct("<QIHH")
_TABLE4 = struct.Struct("<" + "QIHH" * 4)
_USED = struct.Struct("<II")
_ATTR_OUT = abi.ATTR_OUT
_OUT = abi.OUT_HEADER
_IN = abi.IN_HEADER
assert _TABLE4.size == 64


def per_request_us(depth: int = 64, seconds: float = 3.0) -> float:
    """CPU µs per GETATTR of the floor loop, ``depth`` requests per batch."""
    mem = GuestMemory(64 << 20)
    vr = VRing(mem, 1, 1024, event_idx=False)
    shared = tempfile.mkdtemp(prefix="floor-")
    fds = {1: os.open(shared, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)}
    args = abi.GETATTR_IN.pack(0, 0, 0)
    hdr = _IN.pack(_IN.size + len(args), Opcode.GETATTR, 2, 1, 0, 0, 1, 0, 0)
    for _ in range(depth):
        vr.submit([hdr, args], [_OUT.size, _ATTR_OUT.size])
    # the memfd is mapped once, at offset = GPA (guestmem.py)
    ram = memoryview(mem.regions[0].mm)
    avail = ram[vr.avail_gpa:vr.avail_gpa + 4 + 2 * vr.num].cast("H")
    used = ram[vr.used_gpa:vr.used_gpa + 4 + 8 * vr.num]
    used_h = used.cast("H")
    desc_gpa, mask = vr.desc_gpa, vr.num - 1
    unpack_desc, unpack_table, unpack_in = _DESC.unpack_from, _TABLE4.unpack_from, _IN.unpack_from
    pack_attr, pack_out, pack_used = _ATTR_OUT.pack_into, _OUT.pack_into, _USED.pack_into
    fstat = os.fstat
    reply_len = _OUT.size + _ATTR_OUT.size
    last = used_idx = 0
    busy = 0.0
    done = 0
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            while avail[1] != last:
                head = avail[2 + (last & mask)]
                last = (last + 1) & 0xFFFF
                table = unpack_desc(ram, desc_gpa + 16 * head)[0]
                (in_addr, _l0, _f0, _n0, _a1, _l1, _f1, _n1,
                 out_addr, _l2, _f2, _n2, attr_addr, _l3, _f3, _n3) = unpack_table(ram, table)
                unique, nodeid = unpack_in(ram, in_addr)[2:4]
                st = fstat(fds[nodeid])
                pack_attr(ram, attr_addr, 1, 0, 0, st.st_ino, st.st_size, st.st_blocks,
                          st[7], st[8], st[9], 0, 0, 0, st.st_mode, st.st_nlink,
                          st.st_uid, st.st_gid, 0, st.st_blksize, 0)
                pack_out(ram, out_addr, reply_len, 0, unique)
                pack_used(used, 4 + 8 * (used_idx & mask), head, reply_len)
                used_idx = (used_idx + 1) & 0xFFFF
            used_h[1] = used_idx
            busy += time.perf_counter() - t0
            finished = vr.harvest()
            if len(finished) != depth:
                raise RuntimeError(f"served {len(finished)} of {depth}")
            if not done:
                reply = vr.read_writable(finished[0])
                if len(reply) != reply_len or _OUT.unpack_from(reply)[1] != 0:
                    raise RuntimeError("the floor loop wrote a wrong reply")
            done += depth
            for head in finished:
                vr.repost(head)
    finally:
        for v in (avail, used_h, used, ram):
            v.release()
        os.close(fds[1])
        os.rmdir(shared)
        mem.close()
    return busy / done * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args(argv)
    us = per_request_us(a.depth, a.seconds)
    print(f"floor, GETATTR depth {a.depth}: {us:.2f} µs per request ({1e6 / us:,.0f}/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
