"""FORGET and BATCH_FORGET served in C (daemon/fuse/_forget.h) against the
Python hiprio session, byte for byte.

Each step runs one request twice from the same shared inode table: once
through ``FuseSession.handle`` of a hiprio session (the reference: entries.
do_forget / do_batch_forget, InodeTable.unref / unref_many), once through
the hiprio session's ``FastOps`` (``serve``, then ``handle`` if C declines),
the table's whole shared memory restored in between. Both must return the
same byte count (0: no reply), leave the same writable bytes and the same
table: every word of it (generations, lookup counts, dev/ino, the free
list, the live count, the index after backward-shift deletions, the freed
ring and its cursor, DIRTY), and count the same in their metrics slots.
The table is small (capacity 15, a 32-entry index) and inode numbers
agree modulo 32, so entries probe past each other and a removal shifts
others back.

Then the rings: ``WorkerLoop._serve`` on a guest RAM image (tests/fuzz/
image.py) of FORGET/BATCH_FORGET/INTERRUPT/malformed chains, pure-Python
``VirtQueue`` against the compiled core with the batch loop in C: the same
used ring, progress record and table. And across C and Python: a request
session's LOOKUPs (C's and Python's), forgotten on the hiprio side by C,
reaped by the request session (its fds closed).
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import Config
from daemon.fuse import abi, fastpath, inodes
from daemon.fuse.abi import Opcode
from daemon.fuse.inodes import InodeTable
from daemon.fuse.session import FuseSession
from daemon.virtio import compiled, virtqueue
from daemon.workers import progress as prog
from daemon.workers.loop import Ring, WorkerLoop
from tests.fuzz import image
from tests.fuzz.differential import Image
from tests.unit.fusereq import entry_nodeid, in_header, start_session
from tests.unit.test_batch_equivalence import Builder
from tests.unit.test_fastops_equivalence import _comparable, _cut, metered_ops

pytestmark = pytest.mark.skipif(not fastpath.EXTENSION_BUILT, reason="extension not built")

CAP = 15
DEV = 0x801
ROOT_INO = 2


class Hiprio:
    """A shared inode table, a hiprio session on it with two meters (one
    per path) and the session's FastOps."""

    def __init__(self, tmp_path, capacity: int = CAP):
        self.table = InodeTable(capacity)
        self.table.begin_session(DEV, ROOT_INO)
        self.session = FuseSession(Config(shared_dir=str(tmp_path)), self.table, "hiprio")
        self.fast, self.meters = metered_ops(self.session)

    def close(self):
        self.session.close()
        self.table.close()

    def state(self) -> bytes:
        return bytes(self.table._mm)

    def restore(self, state: bytes) -> None:
        self.table._mm[:] = state

    def run(self, request: bytes, rcuts: list[int], wsizes: list[int], compiled: bool):
        from daemon.virtio.iovec import IoVec
        from daemon.virtio.virtqueue import Chain
        readable = IoVec(_cut(request, rcuts))
        outs = [bytearray(bytes([0xA5 ^ i]) * n) for i, n in enumerate(wsizes)]
        writable = IoVec([memoryview(b) for b in outs])
        self.session.meter = self.meters[1 if compiled else 0]
        try:
            n = self.fast.serve(Chain(0, readable, writable)) if compiled else -1
            if n < 0:
                n = self.session.handle(readable, writable, None)
        finally:
            self.session.meter = None
        return n, b"".join(outs)

    def compare(self, request: bytes, rcuts=(), wsizes=()) -> bool:
        """Both paths from the same table; returns whether C served it."""
        rcuts, wsizes = list(rcuts), list(wsizes)
        before = self.state()
        cursor = self.table.cursor
        pure = self.run(request, rcuts, wsizes, False)
        after = self.state()
        freed = self.table.freed_since(cursor)
        self.restore(before)
        served = self.fast.served
        both = self.run(request, rcuts, wsizes, True)
        assert both == pure
        assert self.table.freed_since(cursor) == freed
        assert self.state() == after
        assert not self.table._tlock.locked()
        assert _comparable(self.meters[1].words) == _comparable(self.meters[0].words)
        return self.fast.served > served


@pytest.fixture
def hp(tmp_path):
    h = Hiprio(tmp_path)
    yield h
    h.close()


def forget(nodeid: int, nlookup: int, unique: int = 5, extra: bytes = b"") -> bytes:
    args = struct.pack("<Q", nlookup & (1 << 64) - 1) + extra
    return in_header(Opcode.FORGET, nodeid, len(args), unique) + args


def batch(pairs, count: int | None = None, unique: int = 6, extra: bytes = b"") -> bytes:
    count = len(pairs) if count is None else count
    args = abi.BATCH_FORGET_IN.pack(count & 0xFFFFFFFF) + b"".join(
        abi.FORGET_ONE.pack(n & (1 << 64) - 1, k & (1 << 64) - 1) for n, k in pairs) + extra
    return in_header(Opcode.BATCH_FORGET, 0, len(args), unique) + args


# inode numbers whose index homes (ino % 32 in a 32-entry index) collide
# and interleave: 4, 4, 5, 4, 5, 6, and 30, 31, 30, 31, 30, 0 around the
# index's end, so a removal shifts entries back across homes and the wrap
INOS = (100, 132, 101, 164, 133, 102, 126, 127, 158, 159, 190, 96)


def ino(k: int) -> int:
    return INOS[k % len(INOS)]


HANDLE = b"\x08\0\0\0\1\0\0\0handle"    # a struct file_handle's bytes: freeing clears its length


def populate(table, refs) -> list[int]:
    """ref() (what a LOOKUP does to the table) each ino(k) refs[k] times;
    the nodeids."""
    out = []
    for k, n in enumerate(refs):
        nodeid = 0
        for _ in range(n):
            nodeid, _gen, _new = table.ref(DEV, ino(k), HANDLE + bytes([k]), owner=(k + 1) << 32 | 9)
        out.append(nodeid)
    return out


def test_the_hiprio_session_gets_forget_in_c(hp, caplog, monkeypatch):
    """Unless the compiled path is off (PYVIRTIOFSD_PURE=1: then all in
    Python), with the reference handlers and the stock table."""
    assert fastpath.forget_unsupported(hp.session) == ""
    compiled_path = fastpath.why_not(hp.session) == ""
    with caplog.at_level("INFO", logger="pyvirtiofsd"):
        assert (fastpath.fast_ops(hp.session) is not None) == compiled_path
    assert ("hiprio ops: FORGET and BATCH_FORGET compiled" if compiled_path else "hiprio ops: all in Python") \
        in caplog.text
    monkeypatch.setitem(hp.session._ops, int(Opcode.BATCH_FORGET), lambda fs, req: None)
    assert fastpath.forget_unsupported(hp.session) == "BATCH_FORGET is not the reference handler"
    assert fastpath.unsupported(hp.session) == "BATCH_FORGET is not the reference handler"


def test_forget_frees_and_logs_the_nodeid(hp):
    a, b = populate(hp.table, [2, 1])
    assert hp.compare(forget(a, 1), wsizes=[]) and hp.table.get(a)[3] == 1
    cursor = hp.table.cursor
    assert hp.compare(forget(a, 1)) and hp.table.get(a) is None
    assert hp.table.freed_since(cursor) == ([a], cursor + 1, False)
    assert hp.table.get(b) is not None and len(hp.table) == 1
    # the freed slot is the free list's head: the next insertion reuses it
    assert hp.table.ref(DEV, ino(5))[0] == a


@pytest.mark.parametrize("case", ["root", "zero", "unknown", "freed", "past-capacity", "huge", "nlookup-0",
                                  "nlookup-huge", "nlookup-more", "short", "long", "writable"])
def test_forget_cases(hp, case):
    a, b, c = populate(hp.table, [3, 1, 2])
    hp.table.unref(c, 2)        # freed
    nodeid, nlookup, extra, wsizes = {
        "root": (1, 1, b"", []), "zero": (0, 1, b"", []), "unknown": (9, 1, b"", []),
        "freed": (c, 1, b"", []), "past-capacity": (CAP + 1, 1, b"", []), "huge": ((1 << 64) - 1, 1, b"", []),
        "nlookup-0": (a, 0, b"", []), "nlookup-huge": (a, (1 << 64) - 1, b"", []),
        "nlookup-more": (a, 4, b"", []), "short": (a, 1, b"", []), "long": (a, 1, b"\1" * 9, []),
        "writable": (b, 1, b"", [16, 128]),
    }[case]
    request = forget(nodeid, nlookup, extra=extra)
    if case == "short":
        request = in_header(Opcode.FORGET, a, 7, 5) + b"\1" * 7
    assert hp.compare(request, wsizes=wsizes)
    if case in ("nlookup-huge", "nlookup-more"):
        assert hp.table.get(a) is None
    elif case == "writable":
        assert hp.table.get(b) is None
    elif case == "long":        # the first 8 bytes are nlookup, the rest ignored
        assert hp.table.get(a)[3] == 2
    else:
        assert hp.table.get(a)[3] == 3
    assert hp.table.get(1) is not None


def test_batch_forget_in_one_go(hp):
    nodeids = populate(hp.table, [1, 2, 3, 1, 1, 2])
    cursor = hp.table.cursor
    pairs = [(nodeids[0], 1), (nodeids[1], 1), (nodeids[2], 5), (1, 1), (0, 3), (CAP + 1, 1),
             (nodeids[3], 0), (nodeids[0], 1), (nodeids[5], 2), (nodeids[4], 1)]
    assert hp.compare(batch(pairs))
    assert [hp.table.get(n) is None for n in nodeids] == [True, False, True, False, True, True]
    freed, _, overflow = hp.table.freed_since(cursor)
    assert freed == [nodeids[0], nodeids[2], nodeids[5], nodeids[4]] and not overflow


@pytest.mark.parametrize("case", ["count-high", "count-low", "count-huge", "trailing", "short", "empty",
                                  "zero", "extension", "len-wrong", "split-header"])
def test_batch_forget_cases(hp, case):
    nodeids = populate(hp.table, [1, 1])
    pairs = [(nodeids[0], 1), (nodeids[1], 1)]
    served = case in ("short", "empty", "zero")
    request = {
        "count-high": batch(pairs, 3), "count-low": batch(pairs, 1), "count-huge": batch(pairs, 0xFFFFFFFF),
        "trailing": batch(pairs, extra=b"\0" * 8), "zero": batch([]),
        "short": in_header(Opcode.BATCH_FORGET, 0, 4, 6) + b"\2\0\0\0",
        "empty": in_header(Opcode.BATCH_FORGET, 0, 0, 6),
        "extension": in_header(Opcode.BATCH_FORGET, 0, 48, 6, extlen=1) + batch(pairs)[40:] + b"\0" * 8,
        "len-wrong": batch(pairs)[:-1],
        "split-header": batch(pairs),
    }[case]
    rcuts = [20] if case == "split-header" else []
    assert hp.compare(request, rcuts) == served
    # Python forgets both of a well-formed batch it serves (an extension cut
    # off, the header split); nothing of the malformed ones
    assert len(hp.table) == (0 if case in ("extension", "split-header") else 2)


def test_the_largest_batch_forget(hp):
    """As many pairs as MAX_ARGS holds, across buffers cut anywhere, every
    live nodeid freed in one lock; then one pair more is Python's (EINVAL)."""
    nodeids = populate(hp.table, [1] * (CAP - 1))
    n = (131072 - 8) // 16
    pairs = [(nodeids[i % len(nodeids)], 1) for i in range(n)]
    assert hp.compare(batch(pairs), rcuts=[40, 41, 1000, 70000])
    assert len(hp.table) == 0
    populate(hp.table, [1])
    assert not hp.compare(batch(pairs + [(2, 1)]))


def test_interrupt_and_other_ops_stay_in_python(hp):
    assert not hp.compare(in_header(Opcode.INTERRUPT, 0, 8, 9) + struct.pack("<Q", 3))
    assert not hp.compare(in_header(Opcode.GETATTR, 1, 16, 9) + bytes(16), wsizes=[16, 104])


@pytest.mark.parametrize("case", ["busy", "dirty"])
def test_a_busy_or_dirty_table_is_left_to_python(hp, case):
    a, = populate(hp.table, [2])
    request = forget(a, 1)
    from daemon.virtio.iovec import IoVec
    from daemon.virtio.virtqueue import Chain
    chain = Chain(0, IoVec(_cut(request, [])), IoVec([]))
    if case == "busy":
        with hp.table._tlock:
            assert hp.fast.serve(chain) == -1
    else:
        hp.table._hdr[inodes._H_DIRTY] = 1
        assert hp.fast.serve(chain) == -1
        assert hp.table._hdr[inodes._H_DIRTY] == 1
    assert hp.table.get(a)[3] == 2
    assert hp.session.handle(chain.readable, chain.writable, chain) == 0   # Python's _lock repairs
    assert hp.table.get(a)[3] == 1 and hp.table._hdr[inodes._H_DIRTY] == 0
    assert hp.fast.serve(chain) == 0 and hp.table.get(a) is None


STEP = st.one_of(
    st.tuples(st.just("ref"), st.integers(0, len(INOS) - 1)),
    st.tuples(st.just("forget"), st.integers(0, 17), st.sampled_from([0, 1, 2, 3, (1 << 64) - 1]),
              st.lists(st.integers(0, 60), max_size=2), st.sampled_from([0, 1, 4, 8])),
    st.tuples(st.just("batch"), st.lists(st.tuples(st.integers(0, 17), st.sampled_from([0, 1, 2, (1 << 63)])),
                                         max_size=12),
              st.sampled_from([0, 0, 0, 1, -1]), st.lists(st.integers(0, 250), max_size=3)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEP, min_size=1, max_size=24))
def test_sequences_are_equivalent(tmp_path, steps):
    """Lookups (ref: what LOOKUP takes) and FORGETs/BATCH_FORGETs of live,
    freed, reused, unknown and out-of-range nodeids in any order, requests
    cut anywhere: C and Python leave the same table after every step, and
    C serves every well-formed one."""
    h = Hiprio(tmp_path)
    try:
        for step in steps:
            if step[0] == "ref":
                try:
                    h.table.ref(DEV, ino(step[1]), HANDLE, owner=step[1] + 1)
                except Exception:       # noqa: BLE001 - the table full: ENFILE
                    pass
                continue
            if step[0] == "forget":
                _, nodeid, nlookup, rcuts, nargs = step
                request = forget(nodeid, nlookup)[:40 + nargs]
                request = struct.pack("<I", len(request)) + request[4:]
                well = not any(0 < c % (len(request) + 1) < 40 for c in rcuts)
            else:
                _, pairs, delta, rcuts = step
                request = batch(pairs, len(pairs) + delta)
                well = delta == 0 and not any(0 < c % (len(request) + 1) < 40 for c in rcuts)
            assert h.compare(request, rcuts) == well
    finally:
        h.close()


# -- rings: the used ring, the progress record ------------------------------------------
class _NoChannel:
    def fileno(self):
        return -1


def _ring_run(h: Hiprio, img: Image, data: bytes, stage3: bool) -> dict:
    lay = image.Layout(data)
    img.lay(lay)
    loop = WorkerLoop(_NoChannel(), h.session, (0,), coalesce=(64, 0.010))
    try:
        with pytest.MonkeyPatch.context() as env:      # stage 3 even under PYVIRTIOFSD_FASTOPS=2
            env.delenv(fastpath.FASTOPS_ENV, raising=False)
            loop.use_fast_ops(h.fast if stage3 else None)
        ring = Ring(0, prog.RingProgress(1, shared=False).record(0))
        loop.rings[0] = ring
        ring.num, ring.event_idx = lay.num, lay.event_idx
        queue_class = compiled.CompiledVirtQueue if stage3 else virtqueue.VirtQueue
        ring.queue = queue_class(img.mem, lay.num, image.qva(image.DESC_GPA), image.qva(image.AVAIL_GPA),
                                 image.qva(image.USED_GPA), lay.last_avail, lay.event_idx)
        prog.reset(ring.words, ring.queue)
        h.session.meter = h.meters[1 if stage3 else 0]
        before = h.fast.served
        served = [loop._serve(ring)]
        while ring in loop._again and len(served) < 4:
            loop._again.remove(ring)
            served.append(loop._serve(ring))
        return {"served": served, "ram": bytes(img.ram), "words": list(ring.words[:3]),
                "popped": list(ring.popped), "last_avail": ring.queue.last_avail_idx,
                "published": ring.queue.published_idx, "table": h.state(), "in_c": h.fast.served - before}
    finally:
        h.session.meter = None
        if ring.queue is not None:
            ring.queue.release()
        loop._epoll.close()


KINDS = ["forget", "forget-free", "forget-root", "batch", "batch-lies", "interrupt", "short", "getattr"]


def _ring_request(kind: str, nodeids: list[int], arg: int) -> tuple[bytes, bool]:
    n = nodeids[arg % len(nodeids)]
    return {
        "forget": (forget(n, 1, arg), True),
        "forget-free": (forget(n, 1 << 40, arg), True),
        "forget-root": (forget(1, 1, arg), True),
        "batch": (batch([(n, 1), (nodeids[(arg + 1) % len(nodeids)], 2)], unique=arg), True),
        "batch-lies": (batch([(n, 1)], 5, arg), False),
        "interrupt": (in_header(Opcode.INTERRUPT, 0, 8, arg) + struct.pack("<Q", 1), False),
        "short": (abi.IN_HEADER.pack(49, Opcode.FORGET, arg, n, 0, 0, 0, 0, 0) + bytes(8), False),
        "getattr": (in_header(Opcode.GETATTR, 1, 16, arg) + bytes(16), False),
    }[kind]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(num=st.sampled_from([8, 64]), last_avail=st.integers(0, 0xFFFF), used_idx=st.integers(0, 0xFFFF),
       event_idx=st.booleans(),
       requests=st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 1000), st.booleans(),
                                   st.sampled_from([[], [16], [0]])), min_size=1, max_size=12))
def test_rings_are_equivalent(tmp_path, num, last_avail, used_idx, event_idx, requests):
    h = Hiprio(tmp_path)
    img = Image()
    try:
        nodeids = populate(h.table, [3, 1, 2, 5, 1, 2])
        b = Builder(num, last_avail, used_idx, event_idx)
        expect = 0
        for i, (kind, arg, indirect, wsizes) in enumerate(requests[:num]):
            request, served = _ring_request(kind, nodeids, arg)
            b.request(request, [], False, wsizes, indirect, "none", len(requests[:num]) - i - 1)
            expect += served
        data = b.build()
        start = h.state()
        pure = _ring_run(h, img, data, False)
        h.restore(start)
        c = _ring_run(h, img, data, True)
        assert pure.pop("in_c") == 0
        assert c.pop("in_c") == expect
        for key in pure:
            assert c[key] == pure[key], key
        assert _comparable(h.meters[1].words) == _comparable(h.meters[0].words)
        assert not h.table._tlock.locked()
    finally:
        img.close()
        h.close()


# -- across C and Python: a request worker's fds of forgotten inodes ------------------------
def test_a_request_worker_closes_the_fds_of_inodes_c_forgot(tmp_path, monkeypatch):
    """LOOKUPs in a request session (C's, then Python's), FORGETs of them
    served by the hiprio session's C: the request session's reap closes
    the fds it cached of exactly the freed nodeids."""
    share = tmp_path / "share"
    share.mkdir()
    for name in "abcd":
        (share / name).write_bytes(name.encode())
    cwd = os.getcwd()
    os.chdir("/proc/self/fd")
    session, client = start_session(share, capacity=64)
    try:
        req_fast = fastpath.make(session)
        hiprio = FuseSession(Config(shared_dir=str(share)), session.inodes, "hiprio")
        fast = fastpath.make(hiprio)
        from daemon.virtio.iovec import IoVec
        from daemon.virtio.virtqueue import Chain

        def lookup(name: bytes, in_c: bool) -> int:
            request = in_header(Opcode.LOOKUP, 1, len(name) + 1, 3) + name + b"\0"
            out = bytearray(144)
            readable, writable = IoVec(_cut(request, [40])), IoVec([memoryview(out)[:16], memoryview(out)[16:]])
            n = req_fast.serve(Chain(0, readable, writable)) if in_c else -1
            assert (n >= 0) == in_c
            if n < 0:
                n = session.handle(readable, writable, None)
            assert n == 144
            return entry_nodeid(bytes(out[16:]))

        a = lookup(b"a", True)
        assert lookup(b"a", True) == a
        b = lookup(b"b", False)
        c = lookup(b"c", True)
        fds = {n: session.cache._fds[n][1] for n in (a, b, c)}

        def send(request):
            chain = Chain(0, IoVec(_cut(request, [40])), IoVec([]))
            assert fast.serve(chain) == 0
        send(forget(a, 1))
        send(batch([(b, 1), (a, 1)]))
        assert session.inodes.get(a) is None and session.inodes.get(b) is None
        assert session.inodes.get(c)[3] == 1
        closed: list[int] = []
        session.cache._close_fds = lambda doomed: closed.extend(doomed) or [os.close(fd) for fd in doomed]
        assert session.cache.reap() == 2
        assert sorted(closed) == sorted([fds[a], fds[b]]) and list(session.cache._fds) == [c]
        for n in (a, b):
            with pytest.raises(OSError):
                os.fstat(fds[n])
        os.fstat(fds[c])
        assert lookup(b"a", True) != 0      # C's first LOOKUP again, into the freed slot
        hiprio.close()
    finally:
        session.close()
        session.inodes.close()
        os.chdir(cwd)
