"""A READ served in C maps its destination by fault-around before preadv
when several request workers serve (daemon/fuse/_fastops.c, touch_pages).

Each request worker maps guest RAM in its own page tables; a guest page
that another worker (or nobody in this process) wrote before is unmapped
here, and preadv's copy into it would take one write fault per 4 KiB page
(about 1.2 µs each on these hosts: 256 per MiB). With peers (another
request worker) C reads one byte of each page first, and a read fault maps
the page's whole fault-around window; a lone worker does not touch.
The buffers here are a fresh shared mapping of a memfd whose pages exist
(as a guest's RAM after the guest used it); the faults are this thread's
(getrusage RUSAGE_THREAD: the GIL is released around the touch and preadv,
but they run on the calling thread).
"""

from __future__ import annotations

import mmap
import os
import resource

import pytest

from daemon.fuse import abi, fastpath
from daemon.fuse.abi import Opcode
from daemon.virtio.iovec import IoVec
from daemon.virtio.virtqueue import Chain
from tests.unit.fusereq import entry_nodeid, in_header, start_session

MIB = 1 << 20
PAGE = 4096
DATA = bytes(range(251)) * (MIB // 251) + bytes(MIB % 251)


def fault_around_bytes() -> int:
    """The kernel's fault-around window (debugfs when mounted; 64 KiB is
    its default since Linux 3.15)."""
    try:
        with open("/sys/kernel/debug/fault_around_bytes") as f:
            return int(f.read())
    except OSError:
        return 65536


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


@pytest.fixture(params=[True], ids=["peers"])
def served(tmp_path, request):
    """(FastOps, fh of a 1 MiB file "big"); the session has another
    request worker (peers.shared) unless the param says not."""
    (tmp_path / "big").write_bytes(DATA)
    cwd = os.getcwd()
    os.chdir("/proc/self/fd")
    session, client = start_session(tmp_path)
    if request.param:
        session.peers.set_self(5)
        session.peers._pidfds[6] = os.pidfd_open(os.getpid())
        session.peers._recount()
    try:
        nodeid = entry_nodeid(client.call(Opcode.LOOKUP, 1, b"big\0", abi.ENTRY_OUT.size).ok())
        out = client.call(Opcode.OPEN, nodeid, abi.OPEN_IN.pack(os.O_RDONLY, 0), abi.OPEN_OUT.size).ok()
        yield fastpath.make(session), abi.OPEN_OUT.unpack_from(out)[0]
    finally:
        session.close()
        session.inodes.close()
        os.chdir(cwd)


@pytest.fixture
def guest_ram():
    """A shared mapping of 4 MiB of memfd whose pages all exist, mapped
    fresh: none of them is in this process's page tables yet."""
    fd = os.memfd_create("guest-ram")
    try:
        os.ftruncate(fd, 4 * MIB)
        os.pwrite(fd, b"\xa5" * (4 * MIB), 0)
        mm = mmap.mmap(fd, 4 * MIB, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
    view = memoryview(mm)
    yield view
    view.release()
    mm.close()


def read_chain(fh: int, size: int, header: memoryview, data: list[memoryview]) -> Chain:
    args = abi.READ_IN.pack(fh, 0, size, 0, 0, 0)
    request = in_header(Opcode.READ, 2, len(args), 5) + args
    return Chain(0, IoVec([memoryview(bytearray(request))]), IoVec([header, *data]))


def test_plain_preadv_into_unmapped_guest_pages_faults_per_page(guest_ram):
    """The measurement's control: what C's touch saves."""
    fd = os.memfd_create("file")
    try:
        os.pwrite(fd, DATA, 0)
        before = minor_faults()
        assert os.preadv(fd, [guest_ram[2 * MIB:3 * MIB]], 0) == MIB
        assert minor_faults() - before >= MIB // PAGE * 3 // 4
    finally:
        os.close(fd)


@pytest.mark.parametrize("buffers", [[MIB], [PAGE] * 256, [100, MIB - 100]])
def test_a_1_mib_read_faults_once_per_window(served, guest_ram, buffers):
    fast, fh = served
    data, at = [], PAGE
    for n in buffers:
        data.append(guest_ram[at:at + n])
        at += n
    chain = read_chain(fh, MIB, guest_ram[:16], data)
    before = minor_faults()
    assert fast.serve(chain) == 16 + MIB
    faults = minor_faults() - before
    assert b"".join(bytes(d) for d in data) == DATA
    assert abi.OUT_HEADER.unpack_from(guest_ram)[:2] == (16 + MIB, 0)
    windows = (MIB + PAGE) // fault_around_bytes() + 2
    assert faults <= 2 * windows, f"{faults} minor faults for 1 MiB into unmapped pages"


@pytest.mark.parametrize("served", [False], ids=["alone"], indirect=True)
def test_a_lone_worker_does_not_touch(served, guest_ram):
    """One request worker keeps every page it met mapped: no touch, and
    preadv's copy faults per page into pages it never met."""
    fast, fh = served
    chain = read_chain(fh, MIB, guest_ram[:16], [guest_ram[PAGE:PAGE + MIB]])
    before = minor_faults()
    assert fast.serve(chain) == 16 + MIB
    assert minor_faults() - before >= MIB // PAGE * 3 // 4
    assert bytes(guest_ram[PAGE:PAGE + MIB]) == DATA


def test_a_short_read_at_end_of_file_is_served_whole(served, guest_ram):
    """Pages touched past what preadv fills change nothing the guest sees."""
    fast, fh = served
    args = abi.READ_IN.pack(fh, MIB - 10, MIB, 0, 0, 0)
    request = in_header(Opcode.READ, 2, len(args), 6) + args
    chain = Chain(0, IoVec([memoryview(bytearray(request))]), IoVec([guest_ram[:16], guest_ram[PAGE:PAGE + MIB]]))
    assert fast.serve(chain) == 16 + 10
    assert bytes(guest_ram[PAGE:PAGE + 10]) == DATA[-10:]
    assert bytes(guest_ram[PAGE + 10:PAGE + MIB]) == b"\xa5" * (MIB - 10)
