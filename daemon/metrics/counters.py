"""Per-worker counters in shared memory: workers write, the supervisor reads.

``--metrics-socket`` makes the supervisor create one ``MetricsArea`` before
it forks any worker: an anonymous ``MAP_SHARED`` mapping (as the ring
progress records, workers/progress.py), inherited across fork, with no fd
and no name. Each vring's worker owns one slot and is its only writer; the
supervisor only reads. A counting request costs the worker a few aligned
64-bit stores into that memory: no system call, no lock, no message (the
clock is read through the vDSO). A replacement worker goes on counting in
the slot of the worker it replaces, so counters survive a restart.

A slot (u64 words, native-endian, lazily touched pages):

===============  ============================================================
0  BYTES_READ     file data bytes replied to READ
1  BYTES_WRITTEN  file data bytes WRITE reported written
2  OPEN_FILES     gauge: host files the guest holds open through this worker
3  INODE_FDS      gauge: O_PATH inode fds this worker holds
4  FD_LIMIT       gauge: this worker's RLIMIT_NOFILE
5  BATCHES        wake-ups that found work
6  CHAINS         chains served in them (so CHAINS / BATCHES is the mean depth)
7  MAX_BATCH      the most chains one wake-up found
8  STARTS         workers started for this vring (1 + its restarts)
9  POLL_FOUND     polling windows that found the guest's next request
10 POLL_MISSED    polling windows that ran out (the worker then slept)
11 POLL_NS        nanoseconds spent polling (fuse/_poll.h)
16 BATCH_HIST     chains per wake-up, a count per bucket of BATCH_BUCKETS
32 OPS            per opcode slot (OPCODE_SLOTS of them): requests, latency
                  sum in ns, a count per bucket of LATENCY_BUCKETS_NS (the
                  last one: above them all); exposition.py sums them up
ERRORS            per opcode slot, per errno (ERRNO_SLOTS): error replies
===============  ============================================================

Opcodes at or above ``OPCODE_SLOTS`` count in slot 0 ("other"), errnos at
or above ``ERRNO_SLOTS`` in errno slot 0. A slot written by a compromised
worker is only numbers: the supervisor prints them with labels from its own
tables (exposition.py), never anything the worker wrote as text.
"""

from __future__ import annotations

import bisect
import mmap
import time

from daemon.fuse import abi

BYTES_READ, BYTES_WRITTEN, OPEN_FILES, INODE_FDS, FD_LIMIT = 0, 1, 2, 3, 4
BATCHES, CHAINS, MAX_BATCH, STARTS = 5, 6, 7, 8
POLL_FOUND, POLL_MISSED, POLL_NS = 9, 10, 11
BATCH_HIST = 16
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)      # + Inf
OPS = 32
OPCODE_SLOTS = 64          # FUSE opcodes are 1..52 today
# request latency, from popping the chain to its reply written (ns)
LATENCY_BUCKETS_NS = (10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
                      2_500_000, 5_000_000, 10_000_000, 25_000_000, 100_000_000, 1_000_000_000)
OP_REQUESTS, OP_LATENCY_SUM, OP_BUCKETS = 0, 1, 2
OP_WORDS = 16
ERRNO_SLOTS = 134          # Linux errnos are 1..133
ERRORS = OPS + OPCODE_SLOTS * OP_WORDS
SLOT_WORDS = ERRORS + OPCODE_SLOTS * ERRNO_SLOTS
SLOT_BYTES = -(-SLOT_WORDS * 8 // mmap.PAGESIZE) * mmap.PAGESIZE

assert BATCH_HIST + len(BATCH_BUCKETS) + 1 <= OPS
assert OP_BUCKETS + len(LATENCY_BUCKETS_NS) + 1 <= OP_WORDS

# the fields counting needs, at their offsets in fuse_in_header (opcode),
# fuse_out_header (error) and fuse_write_out after it (size): abi.py's structs
_IN = abi.IN_HEADER.size
_OUT = abi.OUT_HEADER.size
_OPCODE_END = 8            # fuse_in_header.len, .opcode
_WRITE_END = _OUT + abi.WRITE_OUT.size
_READ, _WRITE = int(abi.Opcode.READ), int(abi.Opcode.WRITE)


def _opcode(head) -> int:
    return abi.IN_HEADER.unpack_from(head)[1]


def _reply_errno(writable) -> int | None:
    """The errno slot of the reply header at the start of ``writable``:
    None for success, 0 for an errno out of range."""
    out = writable.views[0]
    err = -abi.OUT_HEADER.unpack_from(out if len(out) >= _OUT else writable.read(0, _OUT))[1]
    if not err:
        return None
    return err if 0 < err < ERRNO_SLOTS else 0


class MetricsArea:
    """``slots`` worker slots (vring index 0 .. slots-1)."""

    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError("metrics for no worker")
        self.slots = slots
        self._map = mmap.mmap(-1, slots * SLOT_BYTES, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self._words = memoryview(self._map).cast("Q")

    def slot(self, index: int) -> memoryview:
        """The words of vring ``index``'s slot (the worker writes, the
        supervisor reads)."""
        if not 0 <= index < self.slots:
            raise IndexError(f"no metrics slot {index}")
        start = index * SLOT_BYTES // 8
        return self._words[start:start + SLOT_WORDS]


class WorkerMeter:
    """What a worker counts into its slot: one call per request and one per
    wake-up. Only the worker's own thread calls it."""

    __slots__ = ("words", "clock")

    def __init__(self, words: memoryview, fd_limit: int = 0, clock=time.perf_counter_ns):
        self.words = words
        self.clock = clock
        words[STARTS] += 1
        words[FD_LIMIT] = fd_limit

    def request(self, readable, writable, written: int | None, elapsed_ns: int) -> None:
        """Count one request: its opcode from the request header, its errno
        and data size from the reply the session wrote (``written`` bytes;
        None: deferred, counted when it is answered)."""
        words = self.words
        if readable.size < _IN:
            opcode = 0
        else:
            first = readable.views[0]
            opcode = _opcode(first if len(first) >= _IN else readable.read(0, _IN))
        op = opcode if opcode < OPCODE_SLOTS else 0
        base = OPS + op * OP_WORDS
        words[base + OP_REQUESTS] += 1
        if written is None:
            return
        words[base + OP_LATENCY_SUM] += elapsed_ns
        i = bisect.bisect_left(LATENCY_BUCKETS_NS, elapsed_ns)
        words[base + OP_BUCKETS + i] += 1
        if written < _OUT:
            return
        err = _reply_errno(writable)
        if err is not None:
            words[ERRORS + op * ERRNO_SLOTS + err] += 1
        elif opcode == _READ:
            words[BYTES_READ] += written - _OUT
        elif opcode == _WRITE and written >= _WRITE_END:
            out = writable.views[0]
            body = out if len(out) >= _WRITE_END else writable.read(0, _WRITE_END)
            words[BYTES_WRITTEN] += abi.WRITE_OUT.unpack_from(body, _OUT)[0]

    def completed(self, writable, written: int) -> None:
        """A deferred request answered (its request was counted already):
        count an error reply."""
        if written < _OUT:
            return
        err = _reply_errno(writable)
        if err is not None:
            # deferred requests are FSYNC/FSYNCDIR/SETLKW; their opcode is
            # not in the reply, so they count under "other"
            self.words[ERRORS + err] += 1

    def batch(self, chains: int, session) -> None:
        """After a wake-up that served ``chains`` requests: count it, and
        update the gauges from ``session`` (its open files and inode fds)."""
        words = self.words
        words[BATCHES] += 1
        words[CHAINS] += chains
        if chains > words[MAX_BATCH]:
            words[MAX_BATCH] = chains
        words[BATCH_HIST + bisect.bisect_left(BATCH_BUCKETS, chains)] += 1
        handles, cache = session.handles, session.cache
        words[OPEN_FILES] = len(handles) if handles is not None else 0
        words[INODE_FDS] = len(cache) if cache is not None else 0
