"""What a request or hiprio worker does besides answering, seen from the
vhost-user test frontend against the real, confined daemon: --readdirplus,
FSYNC on a helper thread, forgotten inodes' closes off the serving thread, FORGET kick coalescing on the hiprio ring
(daemon/fuse/blocking.py, daemon/workers/loop.py), the lookup counts LOOKUP
takes in C (daemon/fuse/_lookup.h). pyvirtiofsd only."""

from __future__ import annotations

import errno
import os
import time

import pytest

from daemon.fuse import abi
from tests.frontend.fuse_client import FuseErrorReply
from tests.procfs import children, fd_count, settled_fd_count, steady_fd_count

ROOT = 1


@pytest.fixture(autouse=True)
def ours_only(daemon_kind):
    if daemon_kind != "ours":
        pytest.skip("pyvirtiofsd's options and workers")


def worker_pid(frontend, name: str) -> int:
    for pid in children(frontend.daemon.pid):
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() == f"vfsd-{name}":
                return pid
    raise AssertionError(f"no vfsd-{name} under {frontend.daemon.pid}")


def fuse_ops(frontend) -> tuple[list[str], bool]:
    """The daemon log's "FUSE ops:" start-up lines, and whether the
    compiled FUSE ops run (neither PYVIRTIOFSD_PURE=1 nor
    PYVIRTIOFSD_FASTOPS=0)."""
    pure = os.environ.get("PYVIRTIOFSD_PURE", "") not in ("", "0") or os.environ.get("PYVIRTIOFSD_FASTOPS") == "0"
    return [ln for ln in frontend.daemon.log().splitlines() if "FUSE ops: " in ln], not pure


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.mark.frontend_opts(cache="never", extra_args=("--readdirplus",))
def test_readdirplus_option_offers_it_even_with_cache_never(frontend):
    assert frontend.init_out.flags & abi.InitFlag.DO_READDIRPLUS


def test_fsync_runs_on_a_helper_thread_of_the_confined_worker(frontend):
    """The request worker starts its first helper thread for the first
    FSYNC (seccomp allows thread creation, nothing else changes) and
    answers it; the same thread serves later ones."""
    request = worker_pid(frontend, "request-1")
    assert threads(request) == 1
    e, o = frontend.create(ROOT, "synced")
    frontend.write(e.nodeid, o.fh, 0, b"data")
    frontend.fsync(e.nodeid, o.fh)
    assert threads(request) == 2
    frontend.fsync(e.nodeid, o.fh, datasync=True)
    d = frontend.opendir(ROOT)
    frontend.fsyncdir(ROOT, d.fh)
    assert threads(request) == 2
    frontend.release(e.nodeid, o.fh)


def test_forgets_coalesce_but_a_lone_one_is_served_at_once(frontend):
    """After a FORGET batch the hiprio worker asks for a kick only once 64
    more wait (EVENT_IDX avail_event, queue size 128), serves an unkicked
    FORGET on its own within 10 ms, and then asks for a kick per FORGET
    again."""
    hq = frontend.hq
    assert hq.event_idx
    (frontend.shared_dir / "f").write_bytes(b"")
    nodeid = frontend.lookup(ROOT, "f").nodeid
    for _ in range(3):
        frontend.lookup(ROOT, "f")
    frontend.forget(nodeid, 1)                      # kicked: served at once
    served = hq.last_used
    assert hq.avail_event() == (served + 63) & 0xFFFF
    p = frontend.send(abi.Opcode.FORGET, nodeid, abi.FORGET_IN.pack(1), vring=hq, single=True, kick=False)
    frontend.complete(p, timeout=5.0)                # no kick: the worker looked by itself
    deadline = time.monotonic() + 5.0
    while hq.avail_event() != hq.last_used:        # a look found nothing: a kick per FORGET
        assert time.monotonic() < deadline, (hq.avail_event(), hq.last_used)
        time.sleep(0.005)
    frontend.forget(nodeid, 1)                      # and a kicked one is served at once
    assert frontend.getattr(nodeid).attr.ino        # 4 lookups - 3 forgets: still known


def blocks_sigterm(pid: int, tid: int) -> bool:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        mask = int(next(ln for ln in f if ln.startswith("SigBlk:")).split()[1], 16)
    return bool(mask & (1 << (15 - 1)))


def test_a_forgotten_inode_fd_is_closed_by_the_request_worker(frontend):
    """FORGET to zero on the hiprio ring; the request worker closes that
    inode's O_PATH fd after its next batch, off its serving thread: with
    the compiled ops on the C closer thread (_closer.h: every signal
    blocked, no GIL), else a Python helper thread (blocking.py)."""
    request = worker_pid(frontend, "request-1")
    assert threads(request) == 1
    (frontend.shared_dir / "gone").write_bytes(b"x")
    before = fd_count(request)
    nodeid = frontend.lookup(ROOT, "gone").nodeid
    assert fd_count(request) == before + 1
    os.unlink(frontend.shared_dir / "gone")
    frontend.forget(nodeid, 1)
    frontend.getattr(ROOT)                           # a batch: the worker reaps after it
    assert settled_fd_count(request, before) == before
    tids = sorted(int(t) for t in os.listdir(f"/proc/{request}/task"))
    assert len(tids) == 2 and tids[0] == request
    _, compiled = fuse_ops(frontend)
    assert blocks_sigterm(request, tids[1]) == compiled
    assert not blocks_sigterm(request, request)


def test_an_idle_request_worker_closes_a_forgotten_inode_fd(frontend):
    """FORGET to zero on the hiprio ring and nothing more on the request
    queue: the hiprio worker rings the request worker's reap bell
    (daemon/workers/bells.py), which closes the fd while it has no request
    to serve, not at the next one."""
    request = worker_pid(frontend, "request-1")
    (frontend.shared_dir / "idle").write_bytes(b"x")
    before = fd_count(request)
    nodeid = frontend.lookup(ROOT, "idle").nodeid
    assert fd_count(request) == before + 1
    frontend.forget(nodeid, 1)
    assert settled_fd_count(request, before) == before


@pytest.mark.frontend_opts(extra_args=("--inode-file-handles", "prefer", "--inode-fd-cache", "32"))
def test_inode_fd_cache_bounds_the_fds_and_reopens_by_handle(frontend):
    """The guest knows 200 inodes; the confined request worker keeps at most
    32 O_PATH fds for them (trimmed after each batch) and answers for every
    one of them, reopening the evicted ones by file handle."""
    request = worker_pid(frontend, "request-1")
    for i in range(200):
        (frontend.shared_dir / f"f{i:03d}").write_bytes(b"x" * i)
    before = fd_count(request)
    nodeids = [frontend.lookup(ROOT, f"f{i:03d}").nodeid for i in range(200)]
    frontend.getattr(ROOT)                            # a batch after the last lookup: trimmed
    held = settled_fd_count(request, before + 28) - before
    assert held <= 32, held
    for i, nodeid in enumerate(nodeids):              # evicted ones come back by handle
        attr = frontend.getattr(nodeid).attr
        assert (attr.ino, attr.size) == (os.stat(frontend.shared_dir / f"f{i:03d}").st_ino, i)
    frontend.getattr(ROOT)
    assert settled_fd_count(request, before + 28) - before <= 32


def test_without_file_handles_every_inode_keeps_its_fd(frontend):
    """The default: no handles, so nothing could be reopened, and every
    inode the guest knows keeps its O_PATH fd."""
    request = worker_pid(frontend, "request-1")
    for i in range(100):
        (frontend.shared_dir / f"f{i:03d}").write_bytes(b"")
    frontend.getattr(ROOT)
    before = steady_fd_count(request)   # not while a descriptor is in passing (a loaded run saw 99)
    for i in range(100):
        frontend.lookup(ROOT, f"f{i:03d}")
    frontend.getattr(ROOT)
    assert settled_fd_count(request, before + 100) - before == 100


def test_each_worker_says_once_which_request_path_it_runs(frontend):
    """docs/compiled.md: the compiled virtqueue core unless
    PYVIRTIOFSD_PURE=1 (make test-pure) or it is not built; one info line
    per worker (hiprio and request), none from the supervisor."""
    frontend.getattr(ROOT)
    pure = os.environ.get("PYVIRTIOFSD_PURE", "") not in ("", "0")
    want = "pure-Python request path" if pure else "compiled request path"
    deadline = time.monotonic() + 5
    while True:
        lines = [ln for ln in frontend.daemon.log().splitlines() if "virtqueue: " in ln]
        if len(lines) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(lines) == 2, lines
    assert all(want in ln for ln in lines), lines
    # and the request worker which compiled ops it runs (fuse/fastpath.py)
    ops = [ln for ln in frontend.daemon.log().splitlines() if "FUSE ops: " in ln]
    stage = os.environ.get("PYVIRTIOFSD_FASTOPS", "")
    want = ("all in Python" if pure or stage == "0" else
            "chains popped in Python, PYVIRTIOFSD_FASTOPS=2" if stage == "2" else
            "batch loop in C, wait in Python, PYVIRTIOFSD_FASTOPS=3" if stage == "3" else
            "batch loop in C, wait loop in C")
    assert len(ops) == 1 and want in ops[0], ops


def test_a_long_batch_is_published_every_publish_every_chains(daemon_proc):
    """Without --coalesce the request worker publishes (and, without
    EVENT_IDX, calls the guest) every loop.PUBLISH_EVERY chains of one
    batch, so the guest reads the first replies while the rest are served:
    64 GETATTRs made available together and kicked once get at least
    64 / 16 calls; one publish per batch would give one."""
    from daemon.workers.loop import PUBLISH_EVERY
    from tests.frontend.fuse_client import client_without_event_idx

    with client_without_event_idx(daemon_proc.socket_path, ram_size=64 << 20) as fc:
        rq = fc.rq
        depth = 4 * PUBLISH_EVERY
        args = abi.GETATTR_IN.pack(0, 0, 0)
        pending = [fc.send(abi.Opcode.GETATTR, ROOT, args, [abi.ATTR_OUT.size], kick=False)
                   for _ in range(depth)]
        calls_before = rq.calls_seen
        rq.kick()
        deadline = time.monotonic() + 10.0
        while rq.used_idx() != (rq.last_used + depth) & 0xFFFF:
            assert time.monotonic() < deadline, "the batch was not served"
            time.sleep(0.001)
        calls = os.eventfd_read(rq.call_fd)    # every call since the kick, summed
        assert rq.calls_seen == calls_before
        assert calls >= depth // PUBLISH_EVERY, calls
        for p in pending:
            assert fc.complete(p).error == 0


def test_writes_land_in_the_file_on_the_compiled_path(frontend):
    """WRITE on the confined request worker, in C unless PYVIRTIOFSD_PURE=1
    or PYVIRTIOFSD_FASTOPS=0 (its start-up line names the compiled ops;
    pwritev2 under the seccomp filter): one page, 1 MiB in pages at an
    offset, O_APPEND, a write of nothing; the bytes are in the host file,
    and a read-only fh gets EBADF (pwritev's errno) with nothing written."""
    from tests.frontend.fuse_client import FuseErrorReply
    e, o = frontend.create(ROOT, "written")
    page, big = bytes(range(256)) * 16, os.urandom(1 << 20)
    assert frontend.write(e.nodeid, o.fh, 0, page) == 4096
    assert frontend.write(e.nodeid, o.fh, 8192, big) == 1 << 20
    assert frontend.write(e.nodeid, o.fh, 100, b"") == 0
    path = frontend.shared_dir / "written"
    assert path.read_bytes() == page + bytes(4096) + big
    appending = frontend.open(e.nodeid, os.O_WRONLY | os.O_APPEND)
    assert frontend.write(e.nodeid, appending.fh, 0, b"tail") == 4
    assert path.read_bytes()[-4:] == b"tail"
    reading = frontend.open(e.nodeid, os.O_RDONLY)
    with pytest.raises(FuseErrorReply) as ei:
        frontend.write(e.nodeid, reading.fh, 0, b"no")
    assert ei.value.errno == errno.EBADF
    assert path.read_bytes()[:2] == page[:2]
    for fh in (o.fh, appending.fh, reading.fh):
        frontend.release(e.nodeid, fh)
    ops, compiled = fuse_ops(frontend)
    assert len(ops) == 1 and ("GETATTR, READ and WRITE compiled" if compiled else "all in Python") in ops[0], ops
@pytest.mark.parametrize("cache", [pytest.param(c, marks=pytest.mark.frontend_opts(cache=c))
                                   for c in ("auto", "always")])
def test_lookups_in_c_take_one_count_each(frontend, cache):
    """The confined request worker (default sandbox and seccomp): the first
    LOOKUP of a name is Python's, the three after it C's (docs/compiled.md,
    "LOOKUP in C"; the worker says so at start-up), each with one count in
    the shared table: three FORGETs leave the inode known, the fourth frees
    it (GETATTR: ESTALE), and a LOOKUP after that is a new nodeid or
    generation. Missing names: ENOENT, or with --cache=always a negative
    entry (nodeid 0)."""
    (frontend.shared_dir / "f").write_bytes(b"abc")
    (frontend.shared_dir / "sub").mkdir()
    (frontend.shared_dir / "sub" / "g").write_bytes(b"")
    entries = [frontend.lookup(ROOT, "f") for _ in range(4)]
    nodeid, generation = entries[0].nodeid, entries[0].generation
    assert {(e.nodeid, e.generation, e.attr.ino, e.attr.size) for e in entries} == \
        {(nodeid, generation, os.stat(frontend.shared_dir / "f").st_ino, 3)}
    sub = frontend.lookup(ROOT, "sub").nodeid
    assert frontend.lookup(sub, "g").nodeid == frontend.lookup(sub, "g").nodeid
    for _ in range(3):
        frontend.forget(nodeid, 1)
    assert frontend.getattr(nodeid).attr.size == 3
    frontend.forget(nodeid, 1)
    with pytest.raises(FuseErrorReply) as e:
        frontend.getattr(nodeid)
    assert e.value.errno == errno.ESTALE
    again = frontend.lookup(ROOT, "f")
    assert (again.nodeid, again.generation) != (nodeid, generation)
    if cache == "always":
        assert frontend.lookup(ROOT, "missing").nodeid == 0
    else:
        with pytest.raises(FuseErrorReply) as e:
            frontend.lookup(ROOT, "missing")
        assert e.value.errno == errno.ENOENT
    ops, compiled = fuse_ops(frontend)
    assert len(ops) == 1 and ("LOOKUP compiled too" in ops[0]) == compiled, ops
