"""The wait loop in C (``FastOps.wait``, docs/compiled.md): the worker
loop's wait and its round trips served in C while only its ring's kicks
come, on a real request session (tests/perf/inproc.py's set-up) and a
guest ring of the test frontend (tests/frontend/vring.py), with and
without EVENT_IDX.

What is checked: kicked requests are answered, published with the
progress record's stores and the guest called as the publish rules say
(the same calls, used ring and record as the Python loop); any other fd
ready returns to Python without consuming it or the kick; a chain C
declines returns with the kick consumed and the loop's ``_serve`` answers
it without waiting for another kick; a signal returns promptly (and a
handler's exception propagates); a watched word that moved (reaping due)
returns; the limit returns after publishing; and the loop does not enter
the wait while it owes anything else.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from daemon.fuse import abi, fastpath, handles as handles_mod
from daemon.metrics import counters
from daemon.fuse.abi import Opcode
from daemon.workers import loop as loop_mod
from daemon.workers import progress as prog
from tests.perf import inproc
from tests.unit.waitrig import Rig, kick_pending

WAIT_READY, WAIT_SERVE, WAIT_IDLE, WAIT_WATCH = (loop_mod.WAIT_READY, loop_mod.WAIT_SERVE, loop_mod.WAIT_IDLE,
                                                 loop_mod.WAIT_WATCH)


def test_kicked_requests_are_answered_published_recorded_and_called(rig):
    heads = [rig.submit() for _ in range(3)]
    rig.vr.kick()
    assert rig.wait(timeout_ms=0) == (WAIT_IDLE, 3, 0)
    assert rig.replies() == [(h, 0) for h in heads]
    assert rig.calls() == 1
    last = rig.ring.queue.last_avail_idx
    assert rig.record() == (last, last, rig.ring.queue.published_idx)
    assert [rig.ring.popped[(last - 3 + k) & prog.POPPED_MASK] for k in range(3)] == heads
    assert kick_pending(rig.ring.kick_fd) == 0
    assert rig.fast.served == 3


def test_round_trips_are_served_until_the_control_channel_speaks(rig):
    """A guest thread sends one request at a time (depth 1), each after
    the previous reply; then a control message arrives: C returns to
    Python without reading it, having answered every request."""
    rounds = 20
    result, answered = _round_trips(rig, [rig.submit] * rounds)
    assert result == (WAIT_READY, rounds, 0)
    assert len(answered) == rounds
    assert rig.record()[:2] == (rig.ring.queue.last_avail_idx,) * 2


def test_another_ready_fd_returns_without_consuming_the_kick(rig):
    head = rig.submit()
    rig.vr.kick()
    os.write(rig.other_w, b"m")
    last = rig.ring.queue.last_avail_idx
    assert rig.wait(timeout_ms=1000) == (WAIT_READY, 0, 0)
    assert rig.ring.queue.last_avail_idx == last
    assert kick_pending(rig.ring.kick_fd) == 1   # the loop's poll sees it again
    rig.loop._serve(rig.ring)
    assert rig.replies() == [(head, 0)]


def test_a_declined_chain_is_python_s_and_its_kick_is_not_needed_again(rig):
    getattr_head = rig.submit()
    lookup_head = rig.submit(Opcode.LOOKUP)
    rig.vr.kick()
    last = rig.ring.queue.last_avail_idx
    assert rig.wait(timeout_ms=1000) == (WAIT_SERVE, 1, 1)
    assert kick_pending(rig.ring.kick_fd) == 0    # consumed by C ...
    assert rig.ring.queue.last_avail_idx == last + 1  # ... the LOOKUP not taken
    assert rig.replies() == []                  # the GETATTR not yet published
    rig.loop._serve(rig.ring)                   # ... so the loop serves at once
    assert rig.replies() == [(getattr_head, 0), (lookup_head, 0)]


def test_the_loop_serves_a_declined_chain_without_another_kick(rig):
    heads = [rig.submit(), rig.submit(Opcode.LOOKUP), rig.submit()]
    rig.vr.kick()
    assert rig.loop._wait_in_c(-1) == []
    assert rig.replies() == [(h, 0) for h in heads]
    assert rig.calls() == 1
    last = rig.ring.queue.last_avail_idx
    assert rig.record() == (last, last, rig.ring.queue.published_idx)


def test_the_limit_returns_after_publishing(rig):
    heads = [rig.submit() for _ in range(20)]
    rig.vr.kick()
    assert rig.wait(timeout_ms=1000, limit=16) == (WAIT_SERVE, 16, 16)
    assert rig.replies() == [(h, 0) for h in heads[:16]]
    rig.loop._serve(rig.ring)
    assert rig.replies() == [(h, 0) for h in heads[16:]]


def test_a_signal_returns_to_python_promptly(rig):
    seen = []
    old = signal.signal(signal.SIGALRM, lambda *a: seen.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        start = time.monotonic()
        assert rig.wait(timeout_ms=-1) == (WAIT_READY, 0, 0)
        assert time.monotonic() - start < 2.0
        assert seen == [1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_signal_handler_s_exception_propagates(rig):
    def boom(*a):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, boom)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            rig.wait(timeout_ms=-1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_moved_watch_word_returns_before_waiting(rig):
    session = rig.loop.session
    watch = fastpath.reap_watch(session)
    assert [(view[i], v) for view, i, v in watch] == [(session.cache.table.cursor, session.cache._cursor),
                                                      (session.handles.files.released,
                                                       session.handles._released)]
    assert all(view[i] == v for view, i, v in watch)
    rig.submit()
    rig.vr.kick()
    view, index, value = watch[0]
    moved = [watch[1], (view, index, value + 1)]
    assert rig.wait(timeout_ms=-1, watch=moved) == (WAIT_WATCH, 0, 0)
    assert kick_pending(rig.ring.kick_fd) == 1   # (read here: the guest kicks again)
    rig.vr.kick()
    assert rig.wait(timeout_ms=0, watch=watch) == (WAIT_IDLE, 1, 0)


def test_bad_arguments_are_refused(rig):
    ring, loop = rig.ring, rig.loop
    core, fd = ring.queue.core, loop._epoll.fileno()
    with pytest.raises(TypeError):
        rig.fast.wait(core, ring.words, ring.popped, fd, ring.kick_fd, ring.call_fd, 16, 0)
    with pytest.raises(TypeError):
        rig.fast.wait(object(), ring.words, ring.popped, fd, ring.kick_fd, ring.call_fd, 16, 0, [])
    with pytest.raises(ValueError):
        rig.fast.wait(core, ring.words, ring.popped, fd, ring.kick_fd, ring.call_fd, 16, 0,
                      [(memoryview(bytearray(8)).cast("Q"), 1, 0)])
    with pytest.raises(ValueError):
        rig.fast.wait(core, ring.words, ring.popped, fd, ring.kick_fd, ring.call_fd, 16, 0, [()] * 5)
    with pytest.raises(ValueError):
        rig.fast.wait(core, ring.words, ring.popped, fd, ring.kick_fd, -2, 16, 0, [])
    with pytest.raises(OSError):
        rig.fast.wait(core, ring.words, ring.popped, -1, ring.kick_fd, ring.call_fd, 16, 0, [])


def test_a_failing_call_eventfd_is_logged_and_the_loop_goes_on(rig, caplog):
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(rig.ring.call_fd)
    rig.ring.call_fd = r          # a read end: write() fails with EBADF
    head = rig.submit()
    rig.vr.kick()
    try:
        assert rig.loop._wait_in_c(0) is None
        assert "wait loop" in caplog.text
        assert rig.replies() == [(head, 0)]     # published before the call
    finally:
        os.close(w)


def test_the_loop_waits_in_python_while_it_owes_anything_else(rig, monkeypatch):
    loop, session = rig.loop, rig.loop.session
    rig.submit()
    rig.vr.kick()
    monkeypatch.setattr(session, "meter", object())
    assert loop._wait_in_c(0) is None            # a meter C does not count for: Python's
    monkeypatch.setattr(session, "meter", None)
    monkeypatch.setattr(session, "has_pending", lambda: True)
    assert loop._wait_in_c(0) is None            # deferred requests: the retry timer
    monkeypatch.undo()
    monkeypatch.setattr(loop, "_coalesce", (8, 0.01))
    assert loop._wait_in_c(0) is None            # --coalesce: _serve asks for fewer kicks
    monkeypatch.undo()
    assert kick_pending(rig.ring.kick_fd) == 1   # none of those consumed the kick
    rig.vr.kick()
    assert loop._wait_in_c(0) == []              # times out after serving
    assert len(rig.replies()) == 1


@pytest.mark.parametrize("used_events", [[0, 0, 0, 0], [0, 5, 1, 9], [3, 3, 2, 7]])
def test_calls_and_ring_state_are_the_python_loop_s(tmp_path, monkeypatch, used_events):
    """The same rounds (a few requests, the guest's used_event, a kick)
    through the Python loop's drain + _serve and through the C wait, with
    and without EVENT_IDX: the same calls after every round, the same used
    ring, avail_event and progress record."""
    monkeypatch.chdir(tmp_path)
    for event_idx in (False, True):
        seen = []
        for path in ("python", "c"):
            r = Rig(str(tmp_path), event_idx)
            try:
                trace = []
                for k, used_event in enumerate(used_events):
                    heads = [r.submit() for _ in range(1 + k % 3)]
                    if event_idx:
                        r.vr.mem.store_u16(r.vr._used_event_gpa, (r.vr.last_used + used_event) & 0xFFFF)
                    r.vr.kick()
                    if path == "python":
                        loop_mod._drain(r.ring.kick_fd)
                        r.loop._serve(r.ring)
                    else:
                        assert r.wait(timeout_ms=0) == (WAIT_IDLE, len(heads), 0)
                    used = r.vr.mem.read(r.vr.used_gpa, 4 + 8 * 16)
                    trace.append((r.calls(), used, r.vr.avail_event(), r.record()))
                    r.vr.harvest() if not event_idx else None
                    for h in heads:
                        r.vr.inflight.pop(h, None)
                seen.append(trace)
            finally:
                r.close()
        assert seen[0] == seen[1]


# -- with --metrics-socket: C counts the wake-ups it serves --------------------
BATCH_WORDS = (counters.BATCHES, counters.CHAINS, counters.MAX_BATCH, counters.OPEN_FILES, counters.INODE_FDS)


def _meter() -> counters.WorkerMeter:
    return counters.WorkerMeter(counters.MetricsArea(1).slot(0))


def _batch_words(meter: counters.WorkerMeter) -> tuple:
    words = meter.words
    hist = tuple(words[counters.BATCH_HIST:counters.BATCH_HIST + len(counters.BATCH_BUCKETS) + 1])
    getattr_requests = words[fastpath.op_words(Opcode.GETATTR)[0]]
    return tuple(words[i] for i in BATCH_WORDS) + hist + (getattr_requests,)


def test_with_a_meter_c_counts_each_wake_up_as_worker_meter_batch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    meter = _meter()
    r = Rig(str(tmp_path), False, meter)
    try:
        assert r.fast.counts_batches
        heads = [r.submit() for _ in range(3)]
        r.vr.kick()
        assert r.wait(timeout_ms=0) == (WAIT_IDLE, 3, 0)
        assert r.replies() == [(h, 0) for h in heads]
        words = meter.words
        assert (words[counters.BATCHES], words[counters.CHAINS], words[counters.MAX_BATCH]) == (1, 3, 3)
        hist = list(words[counters.BATCH_HIST:counters.BATCH_HIST + 10])
        assert hist == [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]      # 3 chains: the "<= 4" bucket
        session = r.loop.session
        assert words[counters.OPEN_FILES] == words[counters.INODE_FDS] == 0
        # a LOOKUP (an inode fd cached) and then an OPEN (a file held), one
        # wake-up each, both served in C: the gauges follow the session
        nodeid = _lookup_data(r)
        assert (words[counters.OPEN_FILES], words[counters.INODE_FDS]) == (0, len(session.cache)) == (0, 1)
        _open_file(r, nodeid)
        assert (words[counters.OPEN_FILES], words[counters.INODE_FDS]) == (len(session.handles), 1) == (1, 1)
        assert (words[counters.BATCHES], words[counters.CHAINS], words[counters.MAX_BATCH]) == (3, 5, 3)
        assert words[counters.BATCH_HIST] == 2
        assert r.fast.served == 5
    finally:
        r.close()


def test_a_meter_c_counts_for_lets_the_loop_wait_in_c_one_it_does_not_keeps_it_in_python(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = Rig(str(tmp_path), False, _meter())
    try:
        r.submit()
        r.vr.kick()
        assert r.loop._wait_in_c(0) == []           # served in C
        assert r.fast.served == 1
    finally:
        r.close()
    # another clock: C cannot count its latencies, so it counts nothing
    r = Rig(str(tmp_path), False, counters.WorkerMeter(counters.MetricsArea(1).slot(0), clock=time.monotonic_ns))
    try:
        assert not r.fast.counts_batches
        r.submit()
        r.vr.kick()
        assert r.loop._wait_in_c(0) is None
        assert kick_pending(r.ring.kick_fd) == 1
    finally:
        r.close()


def test_enable_batches_refuses_a_layout_outside_the_slot(rig):
    good = (5, 6, 7, 16, 2, 3)
    with pytest.raises(ValueError):     # the rig's FastOps has no meter
        rig.fast.enable_batches(good, counters.BATCH_BUCKETS)
    assert not rig.fast.counts_batches
    rig.loop.session.meter = _meter()
    fast = fastpath.make(rig.loop.session)
    assert fast.counts_batches
    end = counters.SLOT_WORDS
    for layout in ((5, 6, 7, end - 5, 2, 3), (-1, 6, 7, 16, 2, 3), (5, 6, end, 16, 2, 3), (5, 6, 7, 16, 2)):
        with pytest.raises((ValueError, TypeError)):
            fast.enable_batches(layout, counters.BATCH_BUCKETS)
    for bounds in ((), tuple(range(1, 20)), [1, 2]):
        with pytest.raises((ValueError, TypeError)):
            fast.enable_batches(good, bounds)
    rig.loop.session.meter = None


def test_metered_wake_ups_count_the_same_through_c_and_python(tmp_path, monkeypatch):
    """The same wake-ups (3 GETATTRs; GETATTR, a LOOKUP C declines,
    GETATTR: C hands over midway; 20 GETATTRs, past C's limit of 16)
    served by the Python loop (drain + _serve) and by the wait loop in C:
    the same batch counters, histogram, gauges and request count."""
    monkeypatch.chdir(tmp_path)
    rounds = ([Opcode.GETATTR] * 3, [Opcode.GETATTR, Opcode.LOOKUP, Opcode.GETATTR], [Opcode.GETATTR] * 20)
    seen = []
    for path in ("python", "c"):
        meter = _meter()
        r = Rig(str(tmp_path), False, meter)
        try:
            trace = []
            for ops in rounds:
                heads = [r.submit(op) for op in ops]
                r.vr.kick()
                if path == "python":
                    loop_mod._drain(r.ring.kick_fd)
                    r.loop._serve(r.ring)
                else:
                    assert r.loop._wait_in_c(0) == []
                assert sorted(h for h, _ in r.replies()) == sorted(heads)
                trace.append(_batch_words(meter))
            seen.append(trace)
        finally:
            r.close()
    assert seen[0] == seen[1]
    assert seen[1][-1][:3] == (3, 26, 20)


def _round_trips(r: Rig, submits) -> tuple[tuple[int, int, int], list[int]]:
    """One wait call while a guest thread sends each of ``submits`` (each
    a call that puts a request on the ring: its head) after the previous
    one was answered (depth 1), then writes to the other fd: the wait's
    (code, served, carried) and the heads answered. The other fd's byte
    is read back after the wait returned (still there for the loop's
    poll: asserted)."""
    answered: list[int] = []

    def guest():
        for submit in submits:
            head = submit()
            r.vr.kick()
            r.vr.wait(head, 5.0)
            answered.append(head)
            r.vr.free(head)
        os.write(r.other_w, b"m")

    t = threading.Thread(target=guest)
    t.start()
    result = r.wait(timeout_ms=10_000)
    t.join(5)
    assert os.read(r.other_r, 8) == b"m"
    return result, answered


def _lookup_data(r: Rig) -> int:
    """LOOKUP of the rig's data file, a wake-up served in C: its nodeid."""
    name = inproc.DATA.encode() + b"\0"
    head = r.vr.submit([abi.IN_HEADER.pack(40 + len(name), Opcode.LOOKUP, 8001, 1, 0, 0, 1, 0, 0), name],
                       [16, abi.ENTRY_OUT.size])
    r.vr.kick()
    assert r.wait(timeout_ms=0) == (WAIT_IDLE, 1, 0)
    nodeid = abi.ENTRY_OUT.unpack(r.vr.read_writable(head)[16:])[0]
    r.replies()
    return nodeid


def _open_file(r: Rig, nodeid: int) -> int:
    """OPEN of ``nodeid``, a wake-up served in C: the fh."""
    head = r.vr.submit([abi.IN_HEADER.pack(48, Opcode.OPEN, 8003, nodeid, 0, 0, 1, 0, 0), abi.OPEN_IN.pack(0, 0)],
                       [16, abi.OPEN_OUT.size])
    r.vr.kick()
    assert r.wait(timeout_ms=0) == (WAIT_IDLE, 1, 0)
    fh = abi.OPEN_OUT.unpack(r.vr.read_writable(head)[16:])[0]
    assert r.replies()[0][1] == 0
    return fh


def _open_data(r: Rig) -> tuple[int, int]:
    """LOOKUP and OPEN of the rig's data file: (nodeid, fh)."""
    nodeid = _lookup_data(r)
    return nodeid, _open_file(r, nodeid)


def _kick_release(r: Rig, nodeid: int, fh: int) -> None:
    r.vr.submit([abi.IN_HEADER.pack(64, Opcode.RELEASE, 8005, nodeid, 0, 0, 1, 0, 0),
                 abi.RELEASE_IN.pack(fh, 0, 0, 0)], [16])
    r.vr.kick()


def test_the_worker_s_own_release_does_not_make_the_wait_return_to_reap(rig):
    """RELEASE in C moves the table's released count, a word the wait
    watches; it was this worker's own free, so its count of what it has
    seen moves with it (HandleTable._freed) and the wait goes on."""
    handles = rig.loop.session.handles
    nodeid, fh = _open_data(rig)
    before = handles.files.released
    _kick_release(rig, nodeid, fh)
    assert rig.wait(timeout_ms=0) == (WAIT_IDLE, 1, 0)     # not WAIT_WATCH
    assert rig.replies()[0][1] == 0
    assert handles.files.released == handles._released == before + 1
    assert rig.fast.served == 3


def test_a_release_elsewhere_still_makes_the_wait_return_to_reap(rig):
    """A free by another process first (another queue's RELEASE): the
    worker's own RELEASE does not hide it; the wait returns to reap."""
    handles = rig.loop.session.handles
    nodeid, fh = _open_data(rig)
    other = handles.files.alloc(nodeid, handles_mod.KIND_FILE, 0, 99)
    handles.files.free(other)                   # released on "another queue"
    seen = handles._released
    assert handles.files.released == seen + 1
    _kick_release(rig, nodeid, fh)
    assert rig.wait(timeout_ms=0, watch=fastpath.reap_watch(rig.loop.session)) == (WAIT_WATCH, 0, 0)
    assert rig.loop._wait_in_c(0) is None       # returns to the loop's poll: it reaps first
    rig.loop.session.reap()
    assert handles._released == seen + 1
    assert rig.wait(timeout_ms=0) == (WAIT_IDLE, 1, 0)
    assert handles._released == handles.files.released == seen + 2


def test_a_wait_call_reads_the_session_s_objects_once_for_all_its_rounds(rig):
    """struct snapshot (_fastops.c): twenty round trips of one wait call
    read the session's objects once, where each batch called from Python
    reads them afresh."""
    rounds = 20
    before = rig.fast.snapshots
    assert _round_trips(rig, [rig.submit] * rounds)[0] == (WAIT_READY, rounds, 0)
    assert rig.fast.snapshots == before + 1
    for _ in range(3):
        rig.submit()
        rig.vr.kick()
        os.eventfd_read(rig.ring.kick_fd)
        rig.loop._serve(rig.ring)
    assert rig.fast.snapshots == before + 4
    assert len(rig.replies()) == 3              # the three just served


def test_a_new_wait_call_sees_what_python_rebound_in_between(rig):
    """The snapshot lives for one call: a session changed between two calls
    (here its INIT serial, as a new INIT changes it) is read again, so C
    declines what no longer matches and Python answers."""
    rig.submit()
    rig.vr.kick()
    assert rig.wait(timeout_ms=0) == (WAIT_IDLE, 1, 0)
    session = rig.loop.session
    serial = session._session
    session._session = serial + 7           # no longer the table's session word
    head = rig.submit()
    rig.vr.kick()
    assert rig.wait(timeout_ms=1000) == (WAIT_SERVE, 0, 0)
    session._session = serial
    rig.loop._serve(rig.ring)
    assert [h for h, _ in rig.replies()][-1] == head


def test_a_wait_call_reads_what_cold_lookups_need_once_for_all_its_rounds(rig, tmp_path):
    """struct adopt_once (_lookup.h) kept for the wait (kept_once): cold
    LOOKUPs in twenty rounds of one wait call read the inode cache's
    settings once; a LOOKUP served from a batch Python called reads them
    for itself."""
    names = [f"cold-{i}" for i in range(23)]
    for name in names:
        (tmp_path / name).write_bytes(b"")     # the rig's shared directory

    def lookup(name: str) -> int:
        arg = name.encode() + b"\0"
        return rig.vr.submit([abi.IN_HEADER.pack(40 + len(arg), Opcode.LOOKUP, 9001, 1, 0, 0, 1, 0, 0), arg],
                             [16, abi.ENTRY_OUT.size])

    before = rig.fast.lookup_reads
    assert _round_trips(rig, [lambda n=n: lookup(n) for n in names[:20]])[0] == (WAIT_READY, 20, 0)
    assert rig.fast.lookup_reads == before + 1
    for name in names[20:]:
        lookup(name)
        rig.vr.kick()
        os.eventfd_read(rig.ring.kick_fd)
        rig.loop._serve(rig.ring)
    assert rig.fast.lookup_reads == before + 4
    replies = rig.replies()
    assert len(replies) == 3 and all(err == 0 for _, err in replies)
