"""Ring progress: how far each worker got in its vrings, kept where its
replacement can find it.

When a worker dies (killed by seccomp, a bug, SIGKILL) the guest may be
waiting for chains it had taken from the avail ring but not yet answered,
and the supervisor must know the ring's next avail index to start a
replacement. The supervisor never maps guest memory, so the worker tells it:
each worker publishes, per vring, its progress in a small shared-memory
block the supervisor creates before it forks any worker: an anonymous
``MAP_SHARED`` mapping, inherited across fork (no fd to hand on or leak, no
name in any file system, gone with the last process). Nothing is sent.

One 4 KiB record per vring, native-endian, one writer (the ring's worker).
Nobody reads a record while its writer lives: the supervisor and the
successor look at it only once the writer has been reaped, so plain aligned
stores suffice (no torn reads are possible, and a single-threaded writer
killed between two bytecodes leaves every earlier store visible).

====================  =====================================================
u32 AVAIL             the ring's next avail index, stored after every pop
u32 DONE              avail index below which every chain taken has been
                      published to the used ring, or is in DEFERRED
u32 PUB_FROM          used.idx before the publish in progress; equal to
                      used.idx between publishes
u32 DEFERRED[64]      heads of deferred chains (SETLKW waiting), EMPTY = free
u16 POPPED[1024]      head of the chain taken at avail index i, at i % 1024
====================  =====================================================

The publish protocol (``WorkerLoop._publish``): store PUB_FROM = used.idx,
publish (one used.idx store), DONE = AVAIL, clear the DEFERRED slots of the
chains this publish answered, PUB_FROM = the new used.idx. Whatever
instruction the worker dies at, its successor (``in_flight``) recovers
exactly the chains the guest still waits for: those taken at avail indexes
[DONE, AVAIL) and those in DEFERRED, minus the heads of the used elements
[PUB_FROM, used.idx) when the last publish landed but its bookkeeping did
not. It answers them EIO (``fail_chain``). The session never defers more than
64 at once (request.MAX_DEFERRED: a SETLKW that would wait beyond that gets
ENOLCK, an FSYNC runs at once). Chains taken beyond 1024 in one batch
(queues larger than QEMU's VIRTQUEUE_MAX_SIZE) are not recorded: those
stay unanswered after a restart.

A record written by a compromised worker is just numbers: the supervisor
reads only AVAIL (a u16), the successor bounds-checks every head and walks
each chain with the ring's usual checks.
"""

from __future__ import annotations

import errno
import mmap

from daemon.fuse import ops, replies, request
from daemon.fuse.abi import IN_HEADER_START, OUT_HEADER

RECORD = 4096
AVAIL, DONE, PUB_FROM = 0, 1, 2
DEFERRED = 8                         # first word of DEFERRED
MAX_DEFERRED = request.MAX_DEFERRED
EMPTY = 0xFFFFFFFF
POPPED_OFFSET = (DEFERRED + MAX_DEFERRED) * 4
POPPED = 1024                        # QEMU's VIRTQUEUE_MAX_SIZE
POPPED_MASK = POPPED - 1
assert POPPED_OFFSET + 2 * POPPED <= RECORD

_NO_REPLY = ops.NO_REPLY            # FORGET, BATCH_FORGET, INTERRUPT: never answered


class RingProgress:
    """Progress records of ``rings`` vrings (index 0 .. rings-1).

    ``shared=True``: an anonymous shared mapping, to be created before the
    workers are forked. ``shared=False``: private memory (a worker run
    without a supervisor, tests)."""

    def __init__(self, rings: int, shared: bool = True):
        if rings < 1:
            raise ValueError("ring progress for no ring")
        self.rings = rings
        size = rings * RECORD
        self._mem: mmap.mmap | bytearray
        if shared:
            self._mem = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
        else:
            self._mem = bytearray(size)
        self._view = memoryview(self._mem)
        for i in range(rings):
            words, _ = self.record(i)
            words[DEFERRED:DEFERRED + MAX_DEFERRED] = _EMPTY_SLOTS

    def record(self, index: int) -> tuple[memoryview, memoryview]:
        """(u32 words, u16 POPPED) of vring ``index``."""
        if not 0 <= index < self.rings:
            raise IndexError(f"no progress record for vring {index}")
        rec = self._view[index * RECORD:(index + 1) * RECORD]
        return rec.cast("I"), rec[POPPED_OFFSET:POPPED_OFFSET + 2 * POPPED].cast("H")

    def avail(self, index: int) -> int:
        """The next avail index the (dead) worker of vring ``index`` published."""
        words, _ = self.record(index)
        return words[AVAIL] & 0xFFFF


_EMPTY_SLOTS = memoryview(b"\xff" * 4 * MAX_DEFERRED).cast("I")


def reset(words: memoryview, queue) -> None:
    """A ring (re)starts at ``queue.last_avail_idx`` with nothing in flight."""
    words[PUB_FROM] = queue.published_idx
    words[DONE] = words[AVAIL] = queue.last_avail_idx
    words[DEFERRED:DEFERRED + MAX_DEFERRED] = _EMPTY_SLOTS


def add_deferred(words: memoryview, head: int) -> int:
    """Record a deferred chain's head; its slot, or -1 if all are taken."""
    for slot in range(DEFERRED, DEFERRED + MAX_DEFERRED):
        if words[slot] == EMPTY:
            words[slot] = head
            return slot
    return -1


def in_flight(words: memoryview, popped: memoryview, queue) -> list[int]:
    """The heads a dead predecessor took from ``queue``'s ring and the guest
    has not seen answered (see the module doc), oldest first, each once.
    ``queue`` was started at the record's AVAIL; this first completes the
    record's bookkeeping if the predecessor died inside a publish."""
    num = queue.num
    used = queue.published_idx
    window = (used - words[PUB_FROM]) & 0xFFFF
    answered: set[int] = set()
    if window and window <= num:
        # the last publish landed: its chains are answered, the rest of
        # [DONE, AVAIL) is in DEFERRED (a batch publishes everything it took)
        answered = set(queue.used_heads(words[PUB_FROM] & 0xFFFF, window))
        words[DONE] = words[AVAIL]
        for slot in range(DEFERRED, DEFERRED + MAX_DEFERRED):
            if words[slot] in answered:
                words[slot] = EMPTY
        words[PUB_FROM] = used
    avail = words[AVAIL] & 0xFFFF
    taken = min((avail - words[DONE]) & 0xFFFF, POPPED, num)
    heads = [popped[(avail - taken + i) & POPPED_MASK] for i in range(taken)]
    heads += [h for h in words[DEFERRED:DEFERRED + MAX_DEFERRED] if h != EMPTY]
    seen: set[int] = set()
    out = []
    for head in heads:
        if head < num and head not in seen and head not in answered:
            seen.add(head)
            out.append(head)
    return out


def fail_chain(chain) -> int:
    """Answer a chain EIO as its own worker would have: ``fuse_out_header
    {len 16, error -EIO, unique}``, unique re-read from the request (bounds
    checked by IoVec). Returns the bytes written: 0 for the ops that get no
    reply (ops.NO_REPLY) or a chain without room for a header."""
    readable, writable = chain.readable, chain.writable
    if writable.size < OUT_HEADER.size or readable.size < IN_HEADER_START.size:
        return 0
    _len, opcode, unique = IN_HEADER_START.unpack(readable.read(0, IN_HEADER_START.size))
    if opcode in _NO_REPLY:
        return 0
    return replies.error(writable, unique, errno.EIO)
