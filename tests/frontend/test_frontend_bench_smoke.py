"""Smoke tests for tests/perf/frontend_bench.py: it runs, counts and
checks every reply, with and without EVENT_IDX, spinning or sleeping on
the call eventfd, and leaves the frontend usable (no timing assertions)."""

from __future__ import annotations

import pytest

from tests.frontend.fuse_client import client_without_event_idx
from tests.frontend.guestmem import GuestMemory, GuestMemoryError
from tests.perf import frontend_bench
from tests.perf.frontend_bench import OPS, requests_per_second, run_requests


def _settled(fc) -> None:
    """Nothing of a run is left in flight or unaccounted for in the VRing."""
    vq = fc.rq
    assert vq.last_used == vq.used_idx()
    assert not vq.inflight  # every request of the run drained and freed


@pytest.mark.frontend_opts(queue_size=1024)
@pytest.mark.parametrize("spin", [True, False], ids=["spin", "sleep"])
@pytest.mark.parametrize("depth", [1, 64])
def test_bench_smoke(frontend, depth, spin):
    for op in OPS:
        done, elapsed, served = run_requests(frontend, op, depth, 0.2, spin=spin)
        assert done > 0 and elapsed >= 0.2, op
        assert served >= done  # the drained ones come on top
        _settled(frontend)
    # the frontend is still usable afterwards
    assert frontend.getattr(1).attr.nlink >= 2


def test_bench_without_event_idx(daemon_proc):
    """Without EVENT_IDX the frontend kicks unless VRING_USED_F_NO_NOTIFY
    is set and never writes used_event: every op completes (a kick the
    daemon needed and did not get would time out)."""
    with client_without_event_idx(daemon_proc.socket_path, ram_size=128 << 20, queue_size=1024) as fc:
        for spin in (True, False):
            for op in OPS:
                assert requests_per_second(fc, op, 64, 0.2, spin=spin) > 0, op
                _settled(fc)
        assert fc.getattr(1).attr.nlink >= 2


def test_bench_counts_error_replies(frontend, monkeypatch):
    """A reply carrying an error is counted and fails the run: a daemon
    answering ENOENT fast does not make a rate."""
    real = frontend_bench._request

    def stale(fc, op):
        opcode, _nodeid, args, out = real(fc, op)
        return opcode, 1 << 40, args, out  # a nodeid nobody looked up

    monkeypatch.setattr(frontend_bench, "_request", stale)
    with pytest.raises(RuntimeError, match="were errors or short"):
        run_requests(frontend, "getattr", 8, 0.1)
    _settled(frontend)
    assert frontend.getattr(1).attr.nlink >= 2


def test_guest_memory_accessor_is_aligned():
    mem = GuestMemory(4 << 20)
    try:
        gpa = mem.alloc(64, 16)
        view, i = mem.accessor(gpa + 8, "Q")
        view[i] = 0x1122334455667788
        assert mem.read(gpa + 8, 8) == (0x1122334455667788).to_bytes(8, "little")
        words, j = mem.accessor(gpa + 8, "I")
        assert (words[j], words[j + 1]) == (0x55667788, 0x11223344)
        with pytest.raises(GuestMemoryError, match="not aligned"):
            mem.accessor(gpa + 4, "Q")
        with pytest.raises(GuestMemoryError):
            mem.accessor(mem.regions[-1].end, "I")  # outside every region
        del view, words
    finally:
        mem.close()
