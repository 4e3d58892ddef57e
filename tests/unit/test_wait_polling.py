"""Polling in the wait loop (``FastOps.enable_polling``, daemon/fuse/_poll.h):
after a round that served chains the loop looks at avail.idx for an
adaptive window before it sleeps, the ring quiet meanwhile (no kick asked
for: avail_event left behind with EVENT_IDX, VRING_USED_F_NO_NOTIFY
without).

The guest side here kicks only when a Linux driver would
(``virtqueue_kick_prepare_split``: vring_need_event with EVENT_IDX, else
unless NO_NOTIFY), so a kick the loop suppressed and then failed to look
for would hang the test (bounded by the wait's timeout) instead of being
hidden by an unconditional kick.

Checked: the window rule; a depth-1 stream served by polling with the
guest's kicks suppressed; the ring never left quiet when the wait returns,
and a chain published without a kick while it was quiet makes the kick fd
readable for Python's loop; a window that runs out re-arms the kick; off,
nothing polls; a worker's new queue clears what a polling worker left.
"""

from __future__ import annotations

import os
import threading

import pytest
from hypothesis import given, strategies as st

from daemon.fuse import fastpath
from daemon.virtio import compiled, virtqueue
from daemon.workers import loop as loop_mod
from tests.frontend.vring import vring_need_event
from tests.unit.waitrig import Rig, kick_pending

WAIT_READY, WAIT_SERVE, WAIT_IDLE = loop_mod.WAIT_READY, loop_mod.WAIT_SERVE, loop_mod.WAIT_IDLE
poll_next = fastpath._ext.poll_next if fastpath._ext is not None else None
pytestmark = pytest.mark.skipif(poll_next is None, reason="needs the compiled extension (make builds it)")

LONG = 1_000_000_000     # a 1 s window: the guest thread always makes it in time
_fence = threading.Lock()


class Guest:
    """The guest's side of ``rig``'s ring, kicking as Linux does; counts
    its kicks."""

    def __init__(self, rig: Rig):
        self.rig = rig
        self.kicks = 0

    def send(self) -> int:
        vr = self.rig.vr
        old = vr.avail_idx
        head = self.rig.submit()
        with _fence:    # a locked instruction: the avail.idx store before the loads below
            pass
        if vr.event_idx:
            need = vring_need_event(vr.avail_event(), vr.avail_idx, old)
        else:
            need = not vr.used_flags() & 1
        if need:
            vr.kick()
            self.kicks += 1
        return head


def stream(rig: Rig, guest: Guest, rounds: int) -> tuple[int, int, int]:
    """``rounds`` requests from a guest thread, each sent after the reply
    to the one before (depth 1), then a control message; returns the
    wait's answer once the thread is done."""
    def run():
        for _ in range(rounds):
            head = guest.send()
            rig.vr.wait(head, 5.0)
            rig.vr.free(head)
        os.write(rig.other_w, b"m")

    t = threading.Thread(target=run)
    t.start()
    answer = rig.wait(timeout_ms=10_000)
    t.join(5)
    assert not t.is_alive()
    return answer


def settled(rig: Rig) -> None:
    """The ring as the guest must find it when the wait returned: kicks asked for again."""
    assert rig.ring.queue.core.quiet is False
    if rig.vr.event_idx:
        assert rig.vr.avail_event() == rig.ring.queue.last_avail_idx
    else:
        assert rig.vr.used_flags() == 0


# -- the window's rule ----------------------------------------------------------
@pytest.mark.parametrize("window, block, after", [
    (0, 3_000, 4_000),          # came back within max: start at 4 us
    (4_000, 3_000, 4_000),      # within the window: kept
    (4_000, 6_000, 8_000),      # just missed: doubled
    (16_000, 20_000, 20_000),   # doubled, at most max
    (20_000, 20_001, 0),        # longer than max: polling would not have caught it
    (8_000, 50_000, 0),
])
def test_the_window_grows_while_the_guest_comes_back_within_max_and_drops_to_zero_after(window, block, after):
    assert poll_next(window, 20_000, block) == after


@given(st.integers(0, 10**6), st.integers(1, 10**6), st.integers(0, 10**7))
def test_the_window_stays_within_max_and_only_a_wait_beyond_it_closes_it(window, max_ns, block):
    window = min(window, max_ns)
    after = poll_next(window, max_ns, block)
    assert 0 <= after <= max_ns
    if block <= window:
        assert after == window
    elif block > max_ns:
        assert after == 0
    elif window < max_ns:
        assert after == min(window * 2 if window else 4000, max_ns)
    else:
        assert after == window


def test_enable_polling_refuses_a_window_outside_its_bounds(rig):
    for args in ((-1,), (10**9 + 1,), (1000, 2000), (1000, -1)):
        with pytest.raises(ValueError):
            rig.fast.enable_polling(*args)
    rig.fast.enable_polling(8000)
    assert rig.fast.poll_stats()[:2] == (8000, 0)


# -- the loop ---------------------------------------------------------------------
def test_a_depth_one_stream_is_served_by_polling_without_the_guest_kicking(rig):
    rig.fast.enable_polling(LONG, LONG)
    guest = Guest(rig)
    rounds = 30
    assert stream(rig, guest, rounds)[:2] == (WAIT_READY, rounds)
    _max, _window, found, missed, spun = rig.fast.poll_stats()
    # the first chain woke the loop; every later one polling found, the
    # control message ended the last window (a miss) or came in one
    assert found == rounds - 1 and missed <= 1 and spun > 0
    # kicks: the first chain's, and at most one more (the first chain
    # published after the ring went quiet passes the avail_event left behind)
    assert guest.kicks <= 2
    settled(rig)


def test_a_chain_published_without_a_kick_wakes_python_s_loop(rig):
    """The wait returns (another fd ready) while the ring is quiet and a
    chain is there that the guest did not kick for: C kicks for it."""
    rig.fast.enable_polling(LONG, LONG)
    guest = Guest(rig)
    heads = []

    def run():
        for _ in range(2):
            head = guest.send()
            rig.vr.wait(head, 5.0)
            rig.vr.free(head)
        os.write(rig.other_w, b"m")     # ready before the chain below
        kicks = guest.kicks
        heads.append(guest.send())
        heads.append(guest.kicks - kicks)

    t = threading.Thread(target=run)
    t.start()
    code, served, _ = rig.wait(timeout_ms=10_000)
    t.join(5)
    head, kicked = heads
    assert kicked == 0                  # the ring was quiet: no kick for it
    assert (code, served) == (WAIT_READY, 2)
    settled(rig)
    assert kick_pending(rig.ring.kick_fd) >= 1      # the loop's epoll sees the ring
    rig.loop._serve(rig.ring)
    assert rig.replies() == [(head, 0)]


def test_a_window_that_runs_out_asks_for_kicks_again(rig):
    rig.fast.enable_polling(200_000, 200_000)
    guest = Guest(rig)
    first = guest.send()
    later = []

    def run():
        rig.vr.wait(first, 5.0)
        rig.vr.free(first)
        threading.Event().wait(0.05)    # well after the 200 us window
        later.append(guest.send())
        rig.vr.wait(later[0], 5.0)
        os.write(rig.other_w, b"m")

    t = threading.Thread(target=run)
    t.start()
    code, served, _ = rig.wait(timeout_ms=10_000)
    t.join(5)
    assert (code, served) == (WAIT_READY, 2)
    assert guest.kicks == 2             # the late chain was kicked for
    _max, window, found, missed, _spun = rig.fast.poll_stats()
    assert found == 0 and missed >= 1
    assert window == 0                  # 50 ms is beyond max: no more polling
    settled(rig)


def test_off_nothing_polls_and_every_chain_is_kicked(rig):
    rig.fast.enable_polling(0)
    guest = Guest(rig)
    rounds = 10
    assert stream(rig, guest, rounds)[:2] == (WAIT_READY, rounds)
    assert rig.fast.poll_stats() == (0, 0, 0, 0, 0)
    assert guest.kicks == rounds


def test_a_declined_chain_found_by_polling_is_python_s_without_a_kick_of_ours(rig):
    """WAIT_SERVE while quiet: the loop's _serve pops next, so no kick is
    made for it (it would only wake the loop for nothing)."""
    from daemon.fuse.abi import Opcode
    rig.fast.enable_polling(LONG, LONG)
    guest = Guest(rig)
    got = []

    def run():
        head = guest.send()
        rig.vr.wait(head, 5.0)
        rig.vr.free(head)
        got.append(rig.submit(Opcode.LOOKUP))   # published, not kicked: the ring is quiet or polled

    t = threading.Thread(target=run)
    t.start()
    code, served, carried = rig.wait(timeout_ms=10_000)
    t.join(5)
    assert (code, served, carried) == (WAIT_SERVE, 1, 0)
    settled(rig)
    assert kick_pending(rig.ring.kick_fd) == 0
    rig.loop._serve(rig.ring)
    assert rig.replies() == [(got[0], 0)]


@pytest.mark.parametrize("kind", ["pure", "compiled"])
def test_a_new_queue_clears_what_a_polling_worker_left(rig, kind):
    """A worker that died polling leaves avail_event behind (EVENT_IDX) or
    NO_NOTIFY set: its replacement's queue asks for kicks again."""
    vr, last = rig.vr, rig.ring.queue.last_avail_idx
    if vr.event_idx:
        vr.mem.store_u16(vr.used_gpa + 4 + 8 * vr.num, (last - 5) & 0xFFFF)
    else:
        vr.mem.store_u16(vr.used_gpa, 1)
    cls = virtqueue.VirtQueue if kind == "pure" else compiled.CompiledVirtQueue
    qva = vr.mem.qva
    q = cls(rig.ring.queue.mem, vr.num, qva(vr.desc_gpa), qva(vr.avail_gpa), qva(vr.used_gpa), last, vr.event_idx)
    try:
        if vr.event_idx:
            assert vr.avail_event() == last
        else:
            assert vr.used_flags() == 0
    finally:
        q.release()


def test_the_worker_s_ops_poll_as_the_config_says(rig, monkeypatch):
    session = rig.loop.session
    assert session.config.poll_max_us == 8
    assert rig.fast.poll_stats()[:2] == (8000, 0)       # the first window opens once a guest came back
    monkeypatch.setattr(session, "config", session.config._replace(poll_max_us=0))
    assert fastpath.make(session).poll_stats()[0] == 0


def test_with_a_meter_the_windows_and_their_time_are_counted(tmp_path, monkeypatch):
    from daemon.metrics import counters as c
    monkeypatch.chdir(tmp_path)
    area = c.MetricsArea(1)
    rig = Rig(str(tmp_path), True, c.WorkerMeter(area.slot(0)))
    try:
        rig.fast.enable_polling(LONG, LONG, (c.POLL_FOUND, c.POLL_MISSED, c.POLL_NS))
        assert stream(rig, Guest(rig), 5)[:2] == (WAIT_READY, 5)
        _max, _window, found, missed, spun = rig.fast.poll_stats()
        w = area.slot(0)
        assert (w[c.POLL_FOUND], w[c.POLL_MISSED], w[c.POLL_NS]) == (found, missed, spun)
        assert found == 4 and spun > 0
        with pytest.raises(ValueError, match="outside the slot"):
            rig.fast.enable_polling(8000, 0, (c.POLL_FOUND, c.POLL_MISSED, len(w)))
    finally:
        rig.close()


def test_meter_words_need_a_meter(rig):
    with pytest.raises(ValueError, match="outside the slot"):
        rig.fast.enable_polling(8000, 0, (9, 10, 11))
    with pytest.raises(TypeError):
        rig.fast.enable_polling(8000, 0, (9, 10))
