"""Request-rate benchmark through the vhost-user test frontend (no guest).

``requests_per_second(frontend, op, depth, duration)`` keeps ``depth``
requests in flight on the request queue: it pre-fills ``depth`` requests,
kicks once, and re-posts each request as soon as its used entry returns
(per harvested batch, a kick only when the daemon asked for one, as a
Linux guest decides: ``_drive``). Ops: ``getattr``, ``lookup``, ``read4k``,
``read1m``, and the listing of a small directory (DIR_ENTRIES files,
all in one 4 KiB buffer, as ``ls`` of a small directory gets them) as
``readdir`` (plain READDIR) and ``readdirplus`` (READDIRPLUS: each entry
also looked up, +1 lookup on it, never forgotten here), both at offset 0,
so the request can be re-posted as it is; each request in flight has a
directory handle of its own (the C daemon's thread pool would otherwise
read one directory stream from several threads at once). Each request is
built once (indirect table and buffers in guest memory) and only its
``unique`` is rewritten before it is re-posted, so the frontend's own
cost per request stays small; it is still Python, so compare daemons with
the same frontend, not against absolute numbers.

Usage from a later ``make bench``::

    fc = <a FuseClient after init()>           # tests/frontend/fuse_client.py
    for op in OPS:
        for depth in (1, 64):
            print(op, depth, requests_per_second(fc, op, depth, 5.0))

With ``read1m`` the request has 256 page descriptors, which Linux only
sends with queue-size >= 260 (``max_pages_limit = min(256, num - 4)``);
use a frontend with queue_size=1024 for realism.
"""

from __future__ import annotations

import os
import select
import struct
import threading
import time

from daemon.fuse import abi
from daemon.fuse.abi import Opcode
from tests.frontend.vring import VRING_USED_F_NO_NOTIFY, DeviceError, vring_need_event

LISTING_OPS = ("readdir", "readdirplus")   # replies as long as the entries that fit
OPS = ("getattr", "lookup", "read4k", "read1m", *LISTING_OPS)
DATA_NAME = "bench-data"
DATA_SIZE = 1 << 20
DIR_NAME = "bench-dir"
# what one 4 KiB READDIRPLUS buffer holds whole (with "." and "..": 22
# entries of at most 160 bytes), so every daemon reads the same entries
# from the host per request: a larger directory re-read from offset 0
# would measure how far ahead each daemon's getdents64 reads, not a listing
DIR_ENTRIES = 20
DIR_BUFFER = 4096  # Linux's READDIR(PLUS) size (one page)
_UNIQUE = struct.Struct("<Q")
OUT_HEADER_SIZE = abi.OUT_HEADER.size


def _ensure_data(fc) -> tuple[int, int]:
    """Create (once) a 1 MiB file through FUSE; returns (nodeid, fh) opened for reading."""
    cached = getattr(fc, "_bench_data", None)
    if cached:
        return cached
    try:
        e = fc.lookup(1, DATA_NAME)
        if e.nodeid == 0 or e.attr.size != DATA_SIZE:
            raise LookupError
    except Exception:  # noqa: BLE001 - missing or wrong: made afresh
        e, o = fc.create(1, DATA_NAME)
        chunk = bytes(range(256)) * 512  # 128 KiB
        for off in range(0, DATA_SIZE, len(chunk)):
            fc.write(e.nodeid, o.fh, off, chunk)
        fc.release(e.nodeid, o.fh)
    fh = fc.open(e.nodeid).fh
    fc._bench_data = (e.nodeid, fh)
    return fc._bench_data


def _ensure_dir(fc, handles: int) -> tuple[int, list[int]]:
    """Make (once) a directory of DIR_ENTRIES empty files through FUSE;
    returns its nodeid and ``handles`` directory handles of it (OPENDIR,
    kept open for the frontend's life)."""
    cached = getattr(fc, "_bench_dir", None)
    if cached is None:
        try:
            nodeid = fc.lookup(1, DIR_NAME).nodeid
        except Exception:  # noqa: BLE001 - missing: made afresh
            nodeid = fc.mkdir(1, DIR_NAME).nodeid
        have = {d.name for d in fc.readdir_all(nodeid)}
        for i in range(DIR_ENTRIES):
            name = f"entry-{i:04d}".encode()
            if name not in have:
                e, o = fc.create(nodeid, name)
                fc.release(e.nodeid, o.fh)
        cached = fc._bench_dir = (nodeid, [])
    nodeid, fhs = cached
    while len(fhs) < handles:
        fhs.append(fc.opendir(nodeid).fh)
    return nodeid, fhs[:handles]


def _requests(fc, op: str, depth: int) -> tuple[int, int, list[bytes], list[int]]:
    """(opcode, nodeid, the args of each of the ``depth`` requests, writable
    sizes after the out header)."""
    if op in LISTING_OPS:
        nodeid, fhs = _ensure_dir(fc, depth)
        opcode = Opcode.READDIR if op == "readdir" else Opcode.READDIRPLUS
        return opcode, nodeid, [fc.read_args(fh, 0, DIR_BUFFER, flags=0x18800) for fh in fhs], [DIR_BUFFER]
    opcode, nodeid, args, out = _request(fc, op)
    return opcode, nodeid, [args] * depth, out


def _request(fc, op: str) -> tuple[int, int, bytes, list[int]]:
    """(opcode, nodeid, args, writable sizes after the out header)."""
    if op == "getattr":
        return Opcode.GETATTR, 1, abi.GETATTR_IN.pack(0, 0, 0), [abi.ATTR_OUT.size]
    nodeid, fh = _ensure_data(fc)
    if op == "lookup":
        return Opcode.LOOKUP, 1, DATA_NAME.encode() + b"\0", [abi.ENTRY_OUT.size]
    if op == "read4k":
        return Opcode.READ, nodeid, fc.read_args(fh, 0, 4096), [4096]
    if op == "read1m":
        return Opcode.READ, nodeid, fc.read_args(fh, 0, DATA_SIZE), [4096] * 256
    raise ValueError(f"unknown op {op!r}; one of {OPS}")


def _drive(fc, vq, heads: dict[int, int], want_len: int, listing: bool, duration: float,
           timeout: float, spin: bool) -> tuple[int, int, float]:
    """The re-post loop of run_requests: (requests completed in the
    window, how many of them were errors or short, the window's seconds).

    It works on the rings the way Linux's virtio_ring does, through word
    views of guest memory (GuestMemory.accessor) instead of VRing's
    per-request bookkeeping, so that the frontend's cost per request stays
    below the daemons' (with VRing.harvest and repost it was ~3 us, and at
    depth 64 every daemon was held to the frontend's rate): per harvested
    batch one read of used.idx, the used elements, each reply's out header
    checked, each request's ``unique`` rewritten and its head put back in
    the avail ring, avail.idx published once, and a kick only when the
    daemon asked for one (EVENT_IDX: avail_event inside what was just
    published, as virtqueue_kick_prepare decides; otherwise unless
    VRING_USED_F_NO_NOTIFY). used_event is set to the next used index
    after every harvest (virtqueue_enable_cb), so the daemon calls when it
    completes anything more. The VRing's own state (last_used, avail_idx,
    each Inflight's used_len) is brought up to date before it returns."""
    mem = vq.mem
    mask = vq.num - 1
    avail, avail_idx_i = mem.accessor(vq.avail_gpa + 2, "H")
    avail_ring_i = avail_idx_i + 1
    used16, used_idx_i = mem.accessor(vq.used_gpa + 2, "H")
    used32, used_ring_i = mem.accessor(vq.used_gpa + 4, "I")
    used_event_i = mem.accessor(vq.avail_gpa + 4 + 2 * vq.num, "H")[1]
    avail_event_i = mem.accessor(vq.used_gpa + 4 + 8 * vq.num, "H")[1]
    event_idx = vq.event_idx
    # head -> (out header words, index of its len), (in header words, index of its unique)
    where = {}
    for head, in_gpa in heads.items():
        where[head] = (*mem.accessor(vq.inflight[head].writable[0][0], "I"), *mem.accessor(in_gpa + 8, "Q"))
    call_fd, kick_fd = vq.call_fd, vq.kick_fd
    fence = threading.Lock()  # acquire + release: a locked instruction, the store-load barrier virtio_mb() is
    poll = select.poll()
    poll.register(call_fd, select.POLLIN)
    last = vq.last_used
    new = vq.avail_idx
    next_unique = fc.next_unique
    done = errors = 0
    finished: list[tuple[int, int]] = []
    os.eventfd_write(kick_fd, 1)
    start = time.monotonic()
    end = start + duration
    deadline = start + timeout
    try:
        while True:
            used = used16[used_idx_i]
            if used == last:
                now = time.monotonic()
                if now > deadline:
                    raise TimeoutError(f"vring {vq.index}: no reply within {timeout} s "
                                       f"(used.idx {used}, avail.idx {new})")
                if not spin:
                    # used_event is already ``last``: look once more after
                    # the barrier, then sleep (virtqueue_enable_cb + poll)
                    fence.acquire()
                    fence.release()
                    if used16[used_idx_i] != last:
                        continue
                    poll.poll(1000)
                    try:
                        os.eventfd_read(call_fd)
                    except BlockingIOError:
                        pass
                continue
            finished.clear()
            while last != used:
                slot = used_ring_i + 2 * (last & mask)
                head = used32[slot]
                length = used32[slot + 1]
                try:
                    out, out_i, _u, _ui = where[head]
                except KeyError:
                    raise DeviceError(f"vring {vq.index}: used id {head} is not an in-flight head") from None
                olen = out[out_i]
                if out[out_i + 1] or length != olen or (
                        not OUT_HEADER_SIZE < olen <= want_len if listing else olen != want_len):
                    errors += 1
                finished.append((head, length))
                last = (last + 1) & 0xFFFF
            done += len(finished)
            now = time.monotonic()
            deadline = now + timeout
            if now >= end:
                break
            old = new
            for head, _length in finished:
                _o, _oi, uniq, uniq_i = where[head]
                uniq[uniq_i] = next_unique()
                avail[avail_ring_i + (new & mask)] = head
                new = (new + 1) & 0xFFFF
            avail[avail_idx_i] = new
            if event_idx:
                used16[used_event_i] = last  # call when anything more completes
            fence.acquire()
            fence.release()
            if (vring_need_event(used16[avail_event_i], new, old) if event_idx
                    else not used16[used_idx_i - 1] & VRING_USED_F_NO_NOTIFY):
                os.eventfd_write(kick_fd, 1)
        elapsed = time.monotonic() - start
    finally:
        # the VRing's bookkeeping: what completed since its last harvest
        # and was not re-posted carries its used length; the rest is in
        # flight (or was never touched)
        reposted = set(where) - {h for h, _ in finished}
        for head in reposted:
            vq.inflight[head].used_len = None
        for head, length in finished:
            vq.inflight[head].used_len = length
        vq.last_used = last
        vq.completed_total += done
        vq.avail_idx = new
    return done, errors, elapsed


def requests_per_second(frontend, op: str, depth: int, duration: float,
                        timeout: float = 10.0, spin: bool = True) -> float:
    """Completed requests per second over ``duration`` seconds at queue
    depth ``depth``. ``spin`` (the default) polls the used ring instead of
    sleeping on the call eventfd: the frontend stands for a guest whose
    vCPU is busy (a TCG guest's always is) and keeps one core, the daemon
    has the other. Sleeping, the figure carries this VM's latency of
    waking an idle vCPU: at depth 64 every daemon's rate moved by 2x
    between runs of one process (its first seconds slowest), with the
    machine more than half idle."""
    done, elapsed, _served = run_requests(frontend, op, depth, duration, timeout, spin)
    return done / elapsed


def tree_cpu_seconds(root_pid: int) -> float:
    """User + system CPU seconds of ``root_pid`` and every live descendant
    (all their threads), from /proc: the daemon's whole cost, whatever its
    shape (our supervisor and workers, the C daemon's and the Rust daemon's
    threads)."""
    from tests.guest.harness import process_tree
    from tests.procfs import cpu_ticks

    ticks = 0
    for pid, _ppid, _comm in process_tree(root_pid):
        try:
            ticks += sum(cpu_ticks(pid))
        except OSError:
            pass  # ended in between
    return ticks / os.sysconf("SC_CLK_TCK")


def rate_and_cpu(frontend, daemon_pid: int, op: str, depth: int, duration: float) -> tuple[float, float]:
    """(requests/s, daemon CPU microseconds per request) of one run; the
    CPU is the daemon tree's (tree_cpu_seconds) over exactly the requests
    the run completed (clock ticks: run for seconds, not milliseconds)."""
    before = tree_cpu_seconds(daemon_pid)
    done, elapsed, served = run_requests(frontend, op, depth, duration)
    cpu = tree_cpu_seconds(daemon_pid) - before
    return done / elapsed, cpu / served * 1e6


def run_requests(frontend, op: str, depth: int, duration: float,
                 timeout: float = 10.0, spin: bool = True) -> tuple[int, float, int]:
    """(requests completed in the timed window, its seconds, requests the
    daemon served in all) of requests_per_second's run; every request in
    flight is drained before it returns."""
    fc = frontend
    vq = fc.rq
    if depth < 1 or depth > vq.num:
        raise ValueError(f"depth must be 1..{vq.num}")
    opcode, nodeid, all_args, out = _requests(fc, op, depth)
    heads: dict[int, int] = {}  # head -> gpa of its in_header (to patch unique)
    for args in all_args:
        unique = fc.next_unique()
        hdr = fc.header(opcode, nodeid, len(args), unique)
        head = vq.submit([hdr, args], [abi.OUT_HEADER.size] + out)
        heads[head] = vq.inflight[head].readable[0][0]
    want_len = abi.OUT_HEADER.size + sum(out)  # every reply but a listing's is full size
    try:
        done, errors, elapsed = _drive(fc, vq, heads, want_len, op in LISTING_OPS, duration, timeout, spin)
        # drain what is still in flight so the frontend can be reused (the
        # daemon serves those too: counted for the CPU figure, not the rate)
        drained = sum(1 for h in heads if vq.inflight[h].used_len is None)
        while any(vq.inflight[h].used_len is None for h in heads):
            vq.wait_any(timeout)
    finally:
        for head in heads:
            if head in vq.inflight and vq.inflight[head].used_len is not None:
                vq.free(head)
    if errors:
        raise RuntimeError(f"{op}: {errors} of {done} replies were errors or short")
    return done, elapsed, done + drained
