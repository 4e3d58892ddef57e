"""The worker's batch loop in C (stage 3, ``FastOps.batch``) against the
pure-Python path, ring by ring.

Each example lays one ring into guest RAM (tests/fuzz/image.py's regions:
the rings in region 0, requests in region 1, the largest, some buffers in
region 2): a mix of requests C serves (GETATTR on held nodeids and fhs,
READ on held fhs, WRITE on held fhs: read-write, O_APPEND, read-only,
LOOKUP of names whose inodes it holds and of a missing one, READLINK of a
symlink and of a file, IOCTL: ENOSYS), requests it
declines (LOOKUP of "..", of a name with '/', unknown nodeids, released
fhs, WRITEs with FUSE_WRITE_KILL_SUIDGID or a size that is not their data,
other opcodes, headers split over buffers, writable parts too small,
buffers outside the largest region) and malformed chains (a ``next`` out
of range, a loop, readable after writable, a buffer outside memory, a bad
indirect table, a head out of range, an avail index jump) anywhere in the
ring. ``WorkerLoop._serve`` runs it once on the reference (the pure-Python
``VirtQueue``, no compiled ops) and once on the compiled core with the
batch loop, each with its own metrics meter, on the same image; both must
leave the same guest RAM (used ring, avail_event, every reply byte), the
same progress record (AVAIL, DONE, PUB_FROM, POPPED), indexes, served
counts, the same contents of the file the WRITEs write, the same error
message for a broken ring, the same counters, and the same lookup counts
taken in the shared inode table.
C must also have served exactly the requests it can.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.fuse import abi, fastpath
from daemon.fuse.abi import Opcode
from daemon.virtio import compiled, virtqueue
from daemon.workers import progress as prog
from daemon.workers.loop import Ring, WorkerLoop
from tests.fuzz import image
from tests.fuzz.differential import Image
from tests.unit.fusereq import in_header
from tests.unit.test_fastops_equivalence import (_comparable, _data, getattr_request,  # noqa: F401 - fixtures
                                                 metered, read_request, w_contents, w_mode, w_reset, world,
                                                 write_request)

DESC = image.DESC
NEXT, WRITE, INDIRECT = image.NEXT, image.WRITE, image.INDIRECT


class _NoChannel:
    def fileno(self):
        return -1


@pytest.fixture(scope="module")
def rig(metered):  # noqa: F811 - the imported fixture
    """(the session's world, a WorkerLoop on it, the guest RAM image)."""
    session, fast, nodeids, meters = metered
    # read each file once: relatime then leaves atimes alone, so GETATTR
    # replies of the two runs compare equal
    with open(os.path.join("/proc/self/fd", str(session.cache.root_fd), "a"), "rb") as f:
        f.read()
    loop = WorkerLoop(_NoChannel(), session, (1,))
    img = Image()
    yield session, fast, nodeids, meters, loop, img
    img.close()
    loop._epoll.close()


class Builder:
    """One ring: requests laid the way a driver lays them (direct chains or
    indirect tables), with buffers cut where the example says."""

    def __init__(self, num: int, last_avail: int, used_idx: int, event_idx: bool):
        self.num, self.last_avail, self.used_idx, self.event_idx = num, last_avail, used_idx, event_idx
        self.desc = bytearray(16 * num)
        self.next_desc = 0
        self.heads: list[int] = []
        self.data = bytearray()
        self.avail_idx: int | None = None

    def put(self, data: bytes, gap: int = 0, align: int = 1) -> int:
        self.data += bytes(gap + (-len(self.data) - gap) % align)
        gpa = image.DATA_GPA + len(self.data)
        self.data += data
        return gpa

    def request(self, request: bytes, rcuts: list[int], gaps: bool, wsizes: list[int], indirect: bool,
                breakage: str, after: int) -> None:
        """``after``: requests still to come (each needs a descriptor)."""
        points = sorted({c % (len(request) + 1) for c in rcuts} | {0, len(request)})
        gap = 8 if gaps else 0
        parts = [[self.put(request[a:b], gap), b - a, 0] for a, b in zip(points, points[1:]) if b > a]
        parts += [[self.put(bytes([0xA5]) * n, gap), n, WRITE] for n in wsizes]
        if breakage == "far" and parts:           # valid, outside the largest region
            parts[-1][0] = image.FAR_GPA + 64 * len(self.heads)
        elif breakage == "hole" and parts:
            parts[0][0] = image.HOLE_GPA
        elif breakage == "rw-order":
            parts.append([self.put(b"x"), 1, 0])
        elif breakage == "zero-len":              # valid: contributes nothing
            parts.insert(0, [self.put(b""), 0, 0])
        if not parts:
            parts = [[self.put(b""), 0, 0]]
        if indirect or self.next_desc + len(parts) + after > self.num:
            table = bytearray()
            for k, (addr, length, flags) in enumerate(parts):
                last = k == len(parts) - 1
                table += DESC.pack(addr, length, flags | (0 if last else NEXT), 0 if last else k + 1)
            if breakage == "next-range":
                DESC.pack_into(table, 0, parts[0][0], parts[0][1], parts[0][2] | NEXT, len(parts) + 3)
            elif breakage == "loop":
                DESC.pack_into(table, 16 * (len(parts) - 1), *parts[-1][:2], parts[-1][2] | NEXT, len(parts) - 1)
            elif breakage == "nested":
                table += DESC.pack(self.put(bytes(16), 0, 16), 16, INDIRECT, 0)
                DESC.pack_into(table, 16 * (len(parts) - 1), *parts[-1][:2], parts[-1][2] | NEXT, len(parts))
            length = len(table) + (8 if breakage == "table-len" else 0)
            head = self.take_desc()
            DESC.pack_into(self.desc, 16 * head, self.put(bytes(table), 0, 16), length, INDIRECT, 0)
        else:
            idx = [self.take_desc() for _ in parts]
            for k, (addr, length, flags) in enumerate(parts):
                last = k == len(parts) - 1
                DESC.pack_into(self.desc, 16 * idx[k], addr, length, flags | (0 if last else NEXT),
                               0 if last else idx[k + 1])
            if breakage == "next-range":
                DESC.pack_into(self.desc, 16 * idx[0], parts[0][0], parts[0][1], parts[0][2] | NEXT, self.num + 3)
            elif breakage == "loop":
                DESC.pack_into(self.desc, 16 * idx[-1], *parts[-1][:2], parts[-1][2] | NEXT, idx[-1])
            head = idx[0]
        self.heads.append(self.num + 3 if breakage == "head-range" else head)

    def take_desc(self) -> int:
        self.next_desc += 1
        return self.next_desc - 1

    def build(self) -> bytes:
        ring = bytearray(2 * self.num)
        for k, head in enumerate(self.heads):
            struct.pack_into("<H", ring, 2 * ((self.last_avail + k) % self.num), head)
        avail = self.avail_idx if self.avail_idx is not None else (self.last_avail + len(self.heads)) & 0xFFFF
        return (image.HEADER.pack(self.num.bit_length() - 1, int(self.event_idx), self.last_avail, avail,
                                  self.used_idx) + bytes(self.desc) + bytes(ring) + bytes(self.data))


def run(rig, data: bytes, stage3: bool) -> dict:
    """WorkerLoop._serve (and again while it hit its cap) over the ring of
    ``data``, on the reference or on the compiled batch loop."""
    session, fast, _nodeids, (pure_meter, c_meter), loop, img = rig
    lay = image.Layout(data)
    img.lay(lay)
    broke: list[str] = []
    loop._break = lambda ring, e: (broke.append(str(e)), WorkerLoop._break(loop, ring, e))  # type: ignore
    with pytest.MonkeyPatch.context() as env:      # stage 3 even under PYVIRTIOFSD_FASTOPS=2
        env.delenv(fastpath.FASTOPS_ENV, raising=False)
        loop.use_fast_ops(fast if stage3 else None)
    session.meter = c_meter if stage3 else pure_meter
    ring = Ring(1, prog.RingProgress(2, shared=False).record(1))
    loop.rings[1] = ring
    ring.num, ring.event_idx = lay.num, lay.event_idx
    queue_class = compiled.CompiledVirtQueue if stage3 else virtqueue.VirtQueue
    ring.queue = queue_class(img.mem, lay.num, image.qva(image.DESC_GPA), image.qva(image.AVAIL_GPA),
                             image.qva(image.USED_GPA), lay.last_avail, lay.event_idx)
    prog.reset(ring.words, ring.queue)
    served_in_c = fast.served
    w_reset(session)
    looked_up = {n: session.inodes.get(n)[3] for n in (_nodeids["a"], _nodeids["fifo"])}
    try:
        served = [loop._serve(ring)]
        while ring in loop._again and len(served) < 4:
            loop._again.remove(ring)
            served.append(loop._serve(ring))
        loop._again.clear()
        return {"served": served, "broke": broke, "ram": bytes(img.ram), "words": list(ring.words[:3]),
                "popped": list(ring.popped), "last_avail": ring.queue.last_avail_idx,
                "published": ring.queue.published_idx, "w": w_contents(session),
                "mode": w_mode(session), "in_c": fast.served - served_in_c,
                "counts": {n: session.inodes.get(n)[3] - c for n, c in looked_up.items()},
                "table locked": session.inodes._tlock.locked()}    # C's LOOKUP let go of it
    finally:
        session.meter = None
        ring.queue.release()
        loop._break = WorkerLoop._break.__get__(loop)  # type: ignore


def check(rig, data: bytes) -> tuple[int, dict]:
    """Both runs agree; returns how many requests C served, and what the
    runs saw."""
    pure = run(rig, data, False)
    c = run(rig, data, True)
    assert pure.pop("in_c") == 0
    in_c = c.pop("in_c")
    for key in pure:
        assert c[key] == pure[key], key
    _, _, _, (pure_meter, c_meter), _, _ = rig
    assert _comparable(c_meter.words) == _comparable(pure_meter.words)
    return in_c, c


# -- requests ------------------------------------------------------------------------
def make_request(kind: str, nodeids: dict, unique: int, arg: int) -> tuple[bytes, int, list[int], bool]:
    """(request bytes, reply room C needs, the driver's writable sizes,
    whether C serves it given that room)."""
    if kind == "getattr-root":
        return getattr_request(1, unique), 120, [16, 104], True
    if kind == "getattr-a":
        return getattr_request(nodeids["a"], unique), 120, [16, 104], True
    if kind == "getattr-fh":
        return getattr_request(nodeids["a"], unique, abi.FUSE_GETATTR_FH, nodeids["fh"]), 120, [16, 104], True
    if kind == "getattr-gone":
        return getattr_request(nodeids["gone"], unique), 120, [16, 104], False
    if kind == "getattr-unknown":
        return getattr_request(3999, unique), 120, [16, 104], False
    if kind == "read":
        return read_request(nodeids["fh"], arg % 6000, 4096, unique), 16, [16, 4096], True
    if kind == "read-wronly":
        return read_request(nodeids["fh-wronly"], 0, 100, unique), 16, [16, 100], True
    if kind == "read-released":
        return read_request(nodeids["fh-released"], 0, 100, unique), 16, [16, 100], False
    if kind.startswith("write"):
        fh = {"write": "fh-rw", "write-append": "fh-append", "write-rdonly": "fh-w-rdonly"}.get(kind, "fh-rw")
        data = _data(100 + arg % 400, unique & 0xFF)
        flags = abi.FUSE_WRITE_KILL_SUIDGID if kind == "write-kill" else 0
        size = len(data) + (kind == "write-size")
        request = write_request(nodeids[fh], arg % 7000, data, unique, size=size, write_flags=flags)
        return request, 24, [16, 8], kind in ("write", "write-append", "write-rdonly", "write-kill")
    if kind == "lookup":        # a name this worker holds the inode of: C takes the count
        return in_header(Opcode.LOOKUP, 1, 2, unique) + b"a\0", 144, [16, 128], True
    if kind == "lookup-d":
        return in_header(Opcode.LOOKUP, nodeids["d"], 5, unique) + b"fifo\0", 144, [16, 128], True
    if kind == "lookup-missing":  # ENOENT, in C
        return in_header(Opcode.LOOKUP, 1, 5, unique) + b"nope\0", 144, [16, 128], True
    if kind == "lookup-dots":   # Python's
        return in_header(Opcode.LOOKUP, 1, 3, unique) + b"..\0", 16, [16, 128], False
    if kind == "lookup-bad":    # '/' in the name: Python answers EINVAL
        return in_header(Opcode.LOOKUP, 1, 4, unique) + b"a/b\0", 16, [16, 128], False
    if kind == "enosys":
        return in_header(9999, 1, 0, unique), 16, [16], False
    if kind == "readlink":      # b -> a; C's (_attrs.h), EIO after the warning when the room is short
        return in_header(Opcode.READLINK, nodeids["b"], 0, unique), 16, [16, 4095], True
    if kind == "readlink-file":  # EINVAL, C's
        return in_header(Opcode.READLINK, nodeids["a"], 0, unique), 16, [16, 4095], True
    if kind == "ioctl":         # ENOSYS, C's
        return in_header(Opcode.IOCTL, nodeids["a"], 32, unique) + bytes(32), 16, [16], True
    # "short": a GETATTR whose len says one byte more than it has
    return abi.IN_HEADER.pack(57, Opcode.GETATTR, unique, 1, 0, 0, 0, 0, 0) + bytes(16), 16, [16], False


KINDS = ["getattr-root", "getattr-a", "getattr-fh", "read", "read-wronly", "write", "write-append",
         "write-rdonly", "getattr-gone", "getattr-unknown", "read-released", "write-kill", "write-size", "lookup",
         "lookup-d", "lookup-missing", "lookup-dots", "lookup-bad", "enosys", "short", "readlink", "readlink-file",
         "ioctl"]
SERVED_KINDS = 8       # KINDS[:8] C serves (and the LOOKUPs of lookup, lookup-d, lookup-missing)
BREAKS = ["none"] * 12 + ["far", "zero-len", "hole", "rw-order", "next-range", "loop", "nested", "table-len",
                          "head-range"]
BREAKING = {"hole", "rw-order", "next-range", "loop", "nested", "table-len", "head-range"}
REQUEST = st.tuples(st.sampled_from(KINDS), st.integers(0, (1 << 64) - 1), st.integers(0, 1 << 16),
                    st.lists(st.integers(0, 120), max_size=3), st.booleans(),
                    st.one_of(st.just(None), st.lists(st.integers(0, 200), max_size=3)),
                    st.booleans(), st.sampled_from(BREAKS))
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def build(nodeids, num, last_avail, used_idx, event_idx, requests, jump=False) -> tuple[bytes, int]:
    """(the ring's input bytes, how many requests C must serve)."""
    b = Builder(num, last_avail, used_idx, event_idx)
    expect, broken = 0, jump
    requests = requests[:num]
    for i, (kind, unique, arg, rcuts, gaps, wsizes, indirect, breakage) in enumerate(requests):
        if breakage in ("nested", "table-len") and not indirect:
            breakage = "none"
        request, room, default, served = make_request(kind, nodeids, unique, arg)
        wsizes = default if wsizes is None else wsizes
        if gaps and not (sorted(c % (len(request) + 1) for c in rcuts if c % (len(request) + 1))
                                                or [len(request)])[0] >= 40:
            served = False      # the header split over two buffers
        if sum(wsizes) < room:
            served = False
        b.request(request, rcuts, gaps, wsizes, indirect, breakage, len(requests) - i - 1)
        # a readable buffer after no writable one is no fault
        broken = broken or (breakage in BREAKING and (breakage != "rw-order" or bool(wsizes)))
        # a zero-length buffer elsewhere is no buffer: C walks past it
        far = breakage == "far" and (not wsizes or wsizes[-1] > 0)
        if not broken and not far and served:
            expect += 1
    if jump:
        b.avail_idx = (last_avail + num + 1) & 0xFFFF
    return b.build(), expect


@SETTINGS
@given(num=st.sampled_from([8, 64]), last_avail=st.integers(0, 0xFFFF), used_idx=st.integers(0, 0xFFFF),
       event_idx=st.booleans(), requests=st.lists(REQUEST, min_size=1, max_size=10))
def test_rings_are_equivalent(rig, num, last_avail, used_idx, event_idx, requests):
    data, expect = build(rig[2], num, last_avail, used_idx, event_idx, requests)
    assert check(rig, data)[0] == expect


@SETTINGS
@given(num=st.sampled_from([4, 8]), last_avail=st.integers(0, 0xFFFF), event_idx=st.booleans(),
       kinds=st.lists(st.sampled_from(KINDS[:SERVED_KINDS] * 3 + KINDS[SERVED_KINDS:]), min_size=1, max_size=8))
def test_full_rings_hit_the_batch_limit_alike(rig, num, last_avail, event_idx, kinds):
    """As many requests as the ring holds: one batch serves num (the cap),
    the next finds none; C's and Python's alike."""
    requests = [(k, 7, 0, [], False, None, True, "none") for k in kinds]
    requests = (requests * num)[:num]
    data, expect = build(rig[2], num, last_avail, 0, event_idx, requests)
    in_c, seen = check(rig, data)
    assert in_c == expect and seen["served"] == [num, 0]


def test_an_avail_index_jump_is_reported_as_python_reports_it(rig):
    requests = [("getattr-root", 1, 0, [], False, None, False, "none")] * 3
    data, expect = build(rig[2], 8, 5, 0, False, requests, jump=True)
    in_c, seen = check(rig, data)
    assert seen["broke"] == ["avail index jumped from 5 to 14 (queue size 8)"]
    assert in_c == expect == 0


@pytest.mark.parametrize("breakage,message", [
    ("next-range", "chain {head}: next index 19 out of range (16)"),
    ("loop", "chain {head} is longer than its table (16): a descriptor loop"),
    ("rw-order", "chain {head}: device-readable descriptor after a writable one"),
    ("head-range", "head index 19 out of range (queue size 16)"),
    ("hole", "chain {head}: "),
])
def test_a_ring_broken_mid_batch(rig, breakage, message):
    """Two GETATTRs C serves, a malformed chain, one more GETATTR: C serves
    the two, Python pops the third and reports it as it always has, the
    fourth is never taken."""
    ok = ("getattr-root", 1, 0, [], False, None, False, "none")
    requests = [ok, ok, ("getattr-a", 2, 0, [], False, None, False, breakage), ok]
    data, expect = build(rig[2], 16, 0, 0, False, requests)
    assert expect == 2
    in_c, c = check(rig, data)
    assert in_c == 2
    assert c["broke"][0].startswith(message.format(head=6)), c["broke"]
    # the third was taken (pop moved past it) but never recorded as popped
    assert c["served"] == [2] and c["words"][0] == 2 and c["last_avail"] == 3


def test_a_mixed_batch(rig):
    """C serves, Python serves what C declines, C again: in ring order,
    one batch, one publish."""
    kinds = ["getattr-root", "lookup-dots", "read", "getattr-unknown", "getattr-fh", "read-released", "getattr-a"]
    requests = [(k, 100 + i, 0, [], False, None, False, "none") for i, k in enumerate(kinds)]
    data, expect = build(rig[2], 64, 0xFFFE, 0xFFFF, True, requests)
    assert expect == 4
    in_c, c = check(rig, data)
    assert in_c == 4
    assert c["served"] == [7] and c["words"] == [5, 5, 6] and c["last_avail"] == 5
    assert c["popped"][0xFFFE & 1023] == 0 and c["popped"][4] == 18


def test_batch_stops_at_its_limit(rig):
    """FastOps.batch itself: limit 3 of 5 available serves 3 and says so
    (n >= 0); the rest next time; a declined chain is left untaken (n < 0)."""
    session, fast, nodeids, _meters, _loop, img = rig
    kinds = ["getattr-root"] * 5 + ["lookup-dots"]
    requests = [(k, i, 0, [], False, None, True, "none") for i, k in enumerate(kinds)]  # heads 0..5
    data, _ = build(nodeids, 8, 0, 0, False, requests)
    lay = image.Layout(data)
    img.lay(lay)
    q = compiled.CompiledVirtQueue(img.mem, 8, image.qva(image.DESC_GPA), image.qva(image.AVAIL_GPA),
                                   image.qva(image.USED_GPA), 0, False)
    words, popped = prog.RingProgress(1, shared=False).record(0)
    try:
        assert fast.batch(q.core, words, popped, 3) == 3
        assert (q.last_avail_idx, q.pending, words[0], list(popped[:3])) == (3, 3, 3, [0, 1, 2])
        assert fast.batch(q.core, words, popped, 8) == -1 - 2     # two served, then the LOOKUP
        assert (q.last_avail_idx, q.pending, words[0]) == (5, 5, 5)
        chain = q.pop()
        assert chain is not None and chain.head == 5
        chain.release()
        assert fast.batch(q.core, words, popped, 8) == 0
        with pytest.raises(TypeError):
            fast.batch(object(), words, popped, 8)
        with pytest.raises(ValueError):
            fast.batch(q.core, words, popped[:10], 8)
    finally:
        q.release()
    assert fast.batch(q.core, words, popped, 8) == -1       # released: Python's pop raises


@pytest.mark.parametrize("stage", ["", "2"])
def test_the_loop_runs_the_batch_unless_told_stage_2(tmp_path, monkeypatch, stage):
    """WorkerLoop on tests/perf/inproc.py's ring of 8 GETATTRs: the batch
    loop by default (nothing popped in Python), FastOps.serve per chain
    popped in Python with PYVIRTIOFSD_FASTOPS=2; C serves all 8 either way."""
    from tests.perf import inproc
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYVIRTIOFSD_FASTOPS", stage)
    loop, ring, vr, heads = inproc._build("getattr", 8, str(tmp_path))
    try:
        if not isinstance(ring.queue, compiled.CompiledVirtQueue):     # PYVIRTIOFSD_PURE=1 (make test-pure)
            pure = ring.queue
            qva = vr.mem.qva
            ring.queue = compiled.CompiledVirtQueue(pure.mem, vr.num, qva(vr.desc_gpa), qva(vr.avail_gpa),
                                                    qva(vr.used_gpa), pure.last_avail_idx, False)
            pure.release()
        fast = fastpath.make(loop.session)
        loop.use_fast_ops(fast)
        assert (loop._fast_batch is None, loop._fast_serve is None) == ((True, False) if stage else (False, True))
        pops = []
        pop = type(ring.queue).pop
        monkeypatch.setattr(type(ring.queue), "pop", lambda q: pops.append(1) or pop(q))
        assert loop._serve(ring) == 8
        assert sorted(vr.harvest()) == sorted(heads)
        assert fast.served == 8
        assert len(pops) == (9 if stage else 0)
    finally:
        inproc.close(loop, ring, vr)


def test_long_batches_publish_every_publish_every_chains(rig):
    """Without --coalesce the loop publishes after every PUBLISH_EVERY
    chains served, so the guest reads those replies while the rest are
    served: the Python reference loop and the C batch alike; the final
    state is the reference's (check)."""
    from daemon.workers import loop as loop_mod

    every = loop_mod.PUBLISH_EVERY
    count = 2 * every + 8
    requests = [("getattr-root", 100 + i, 0, [], False, None, False, "none") for i in range(count)]
    data, expect = build(rig[2], 128, 0, 0, False, requests)
    assert expect == count
    loop = rig[4]
    seen: list[int] = []

    def publish(ring, queue, answered=()):
        WorkerLoop._publish(loop, ring, queue, answered)
        seen.append(queue.published_idx)
    loop._publish = publish  # type: ignore[method-assign]
    try:
        in_c, c = check(rig, data)
    finally:
        del loop._publish
    assert in_c == count and c["served"] == [count]
    # the reference run (Python pops) and the batch run, three times each
    assert seen == [every, 2 * every, count] * 2


def test_writes_in_a_batch(rig):
    """WRITEs C serves (taken before their pwritev), one with
    FUSE_WRITE_KILL_SUIDGID (without CAP_FSETID: the file loses SUID and
    SGID), appends, in ring order, one batch: the file as the reference
    leaves it, with every write in it."""
    kinds = ["write", "write-append", "getattr-root", "write-kill", "write", "write-rdonly", "write-append"]
    requests = [(k, 200 + i, 1000 * i, [], False, None, i % 2 == 0, "none") for i, k in enumerate(kinds)]
    data, expect = build(rig[2], 16, 0xFFFD, 7, True, requests)
    assert expect == 7
    in_c, c = check(rig, data)
    assert in_c == 7 and c["served"] == [7]
    assert c["mode"] == 0o775       # W_MODE 06775 without SUID and SGID
    contents = c["w"]
    for i in (0, 3, 4):
        size = 100 + 1000 * i % 400
        assert contents[1000 * i:1000 * i + size] == _data(size, 200 + i)
    # the two appends, in ring order, after the 6144 bytes of "w"
    assert contents[6144:] == _data(100 + 1000 % 400, 201) + _data(100 + 6000 % 400, 206)


def test_a_write_of_scattered_pages_in_a_batch(rig):
    """A WRITE laid as a page-cache write is: its data in 300 readable
    buffers, none adjacent to the next (an indirect table). C serves it
    (a raw chain holds 1040 readable buffers; it held 16), and the file
    and the guest RAM come out as the reference leaves them. (Past 1040:
    test_fastops_equivalence's many-buffers; this image's ring holds 256
    descriptors and an indirect table 1024, so no chain here gets there.)"""
    _session, _fast, nodeids, _meters, _loop, _img = rig
    data = _data(16 * 300, 77)
    request = write_request(nodeids["fh-rw"], 100, data, 77)
    b = Builder(8, 0, 0, True)
    b.request(request, [40, 80] + [80 + 16 * k for k in range(1, 300)], True, [16, 8], True, "none", 0)
    served, c = check(rig, b.build())
    assert served == 1 and c["served"] == [1]
    assert c["w"][100:100 + len(data)] == data
