"""The wait loop's test rig (tests/unit/test_wait_loop.py,
test_wait_polling.py; the ``rig`` fixture is conftest.py's): a WorkerLoop
on a real request session with one ring watched, and the guest's side of
that ring."""

from __future__ import annotations

import os
import select

from daemon.fuse import abi, fastpath
from daemon.fuse.abi import Opcode
from daemon.metrics import counters
from daemon.virtio import compiled
from daemon.workers import progress as prog
from tests.perf import inproc

ROOM = abi.ATTR_OUT.size
_unique = [1000]


class Rig:
    """A WorkerLoop on a real request session whose one ring is watched
    (its kick fd in the loop's epoll, as ``_watch`` does), on the compiled
    queue with the compiled ops (even under PYVIRTIOFSD_PURE=1), and the
    guest's side of that ring; ``other`` is a pipe in the same epoll that
    stands for the control channel."""

    def __init__(self, shared: str, event_idx: bool, meter: counters.WorkerMeter | None = None, prepare=None):
        """``prepare(session)``: called before the compiled ops are made."""
        self.loop, self.ring, self.vr, _ = inproc._build("getattr", 0, shared, event_idx=event_idx)
        loop, ring, vr = self.loop, self.ring, self.vr
        loop.session.meter = meter     # before fastpath.make, as a worker's start-up sets it
        if prepare is not None:
            prepare(loop.session)
        pure = ring.queue
        if not isinstance(pure, compiled.CompiledVirtQueue):     # PYVIRTIOFSD_PURE=1 (make test-pure)
            qva = vr.mem.qva
            ring.queue = compiled.CompiledVirtQueue(pure.mem, vr.num, qva(vr.desc_gpa), qva(vr.avail_gpa),
                                                    qva(vr.used_gpa), pure.last_avail_idx, event_idx)
            pure.release()
        prog.reset(ring.words, ring.queue)
        self.fast = fastpath.make(loop.session)
        loop.use_fast_ops(self.fast)
        loop._fast_wait = self.fast.wait          # whatever PYVIRTIOFSD_FASTOPS says
        loop._reap_watch = fastpath.reap_watch
        os.close(ring.call_fd)
        ring.call_fd = os.dup(vr.call_fd)
        ring.kick_fd = os.dup(vr.kick_fd)
        loop._watch(ring)
        self.other_r, self.other_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        loop._epoll.register(self.other_r, select.EPOLLIN)

    def close(self) -> None:
        self.loop._unwatch(self.ring)
        os.close(self.ring.kick_fd)
        os.close(self.other_r)
        os.close(self.other_w)
        inproc.close(self.loop, self.ring, self.vr)

    def submit(self, opcode: Opcode = Opcode.GETATTR) -> int:
        _unique[0] += 2
        if opcode == Opcode.GETATTR:
            args, out = abi.GETATTR_IN.pack(0, 0, 0), ROOM
        else:   # LOOKUP of "..": C declines it, Python answers
            args, out = b"..\0", abi.ENTRY_OUT.size
        header = abi.IN_HEADER.pack(40 + len(args), opcode, _unique[0], 1, 0, 0, 1, 0, 0)
        return self.vr.submit([header, args], [16, out])

    def wait(self, timeout_ms: int = 0, limit: int = 16, watch=None) -> tuple[int, int, int]:
        ring, loop = self.ring, self.loop
        if watch is None:
            watch = fastpath.reap_watch(loop.session)
        return self.fast.wait(ring.queue.core, ring.words, ring.popped, loop._epoll.fileno(), ring.kick_fd,
                              ring.call_fd, limit, timeout_ms, watch)

    def calls(self) -> int:
        """Call eventfd writes since the last look (an eventfd sums them)."""
        try:
            return os.eventfd_read(self.vr.call_fd)
        except BlockingIOError:
            return 0

    def replies(self) -> list[tuple[int, int]]:
        """(head, error) of every reply the guest has not yet seen."""
        out = []
        for head in self.vr.harvest():
            _len, error, _unique = abi.OUT_HEADER.unpack(self.vr.read_writable(head, 16))
            out.append((head, error))
            self.vr.free(head)
        return out

    def record(self) -> tuple[int, int, int]:
        """The progress record's AVAIL, DONE, PUB_FROM."""
        return tuple(self.ring.words[:3])



def kick_pending(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
