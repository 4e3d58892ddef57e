"""The daemon's own cost per request, measured in one process (no IPC).

The test frontend's vring (tests/frontend/vring.py) lays ``depth``
requests out in a memfd "guest RAM"; the daemon's ``VirtQueue`` maps the
same memory and the real ``WorkerLoop._serve`` (pop, session.handle, push,
publish once, call eventfd) serves them, batch after batch, with the
frontend's re-posting done outside the timed part. What remains is the
worker's CPU time per request: the figure to compare with the 2.4 µs bare
GETATTR budget (DESIGN.md) and to profile without a second process
competing for the cores.

    python -m tests.perf.inproc [--op getattr|lookup|lookup-cold|read4k|read1m|write4k|write4k-kill|
                                      getxattr-absent|unlink|rmdir|rename|flush|create|
                                      forget|forget-keep|batch-forget|
                                      readdirplus-cold|readdirplus-warm|readdir|readdir-cold|open|opendir|listing|
                                      setattr-times|setattr-chmod|readlink|statfs|ioctl]
                                [--depth 64] [--python-meta] [--python-readdir] [--python-release]
                                [--python-releasedir] [--python-open] [--python-setattr] [--python-attrs]
                                [--seconds 3] [--profile cprofile|none] [--clock wall|cpu]

``lookup`` looks one name up again and again (the worker holds its fd);
``lookup-cold`` looks ``depth`` names up once each per batch, each the
first LOOKUP of its inode: between batches, outside the timed part, every
nodeid is forgotten and its fd closed (``InodeTable.unref_many``,
``InodeCache.reap``), so each LOOKUP opens the name and inserts the inode.

``getxattr-absent`` asks for ``security.capability`` of a file that has
none (ENODATA: what a cache=auto guest sends before every write);
``unlink`` and ``rmdir`` remove ``depth`` entries per batch, made again
between batches outside the timed part; ``rename`` renames ``depth``
files of the root to new names, renamed back on the host between
batches; ``flush`` flushes one open file again and again.
``--python-meta`` leaves those five to Python (the
compiled ops without _meta.h's: ``FastOps.enable_meta(0, ...)``), for a
before/after in one build.

``create`` creates ``depth`` new files per batch (CREATE, O_RDWR, mode
0644) and releases them in a second batch (RELEASE): the figure is the
worker's CPU per CREATE + RELEASE pair, and that of the RELEASE batches
alone per RELEASE (``--python-release``: RELEASE left to Python, for a
before/after in one build). Between rounds, outside the timed
part, the files are unlinked on the host and every nodeid forgotten, so
each CREATE makes a new file and inserts a new inode, as a guest's
create-then-unlink workload does. The session has a shared open-file
table and a real keeper (workers/keeper.py's ``Keeper.run``) in a forked
process, which gets every new fd (``Peers.keep``); its CPU per CREATE
(user + system, from ``wait4``) is printed too.

``mkdir`` makes ``depth`` new directories in the root per batch (MKDIR,
mode 0755); between rounds, outside the timed part, they are removed and
every nodeid forgotten, so each MKDIR makes a new directory and inserts
a new inode. ``--python-mkdir`` leaves MKDIR to Python (before/after in
one build).

``open`` opens one file ``depth`` times per batch (OPEN, O_RDONLY),
``opendir`` one directory (OPENDIR), with a shared open-file table and a
real keeper as ``create``; the fhs are released outside the timed part
(``HandleTable.close``). The figure is the worker's CPU per OPEN, the
keeper's is printed too. ``--python-open`` leaves both to Python
(``fastpath.open_unsupported`` answered for them), for a before/after.

``setattr-times`` sets one file's atime and mtime to explicit times
again and again (SETATTR with FATTR_ATIME|FATTR_MTIME: the utimensat tar
-x sends for every file it extracts), ``setattr-chmod`` its mode
(FATTR_MODE); ``--python-setattr`` leaves SETATTR to Python
(``fastpath.setattr_unsupported`` answered for it), for a before/after.

``readlink`` reads one symlink's target (19 bytes) again and again
(READLINK, the Linux driver's 4095-byte reply part), ``statfs`` asks for
the share's fuse_kstatfs (STATFS of the root), ``ioctl`` sends an IOCTL
(answered ENOSYS, as ops.ENOSYS's other opcodes); ``--python-attrs``
leaves the three to Python (``fastpath.readlink_unsupported``,
``statfs_unsupported`` and ``enosys_unsupported`` answered for them), for
a before/after in one build.

``forget``, ``forget-keep`` and ``batch-forget`` are the hiprio worker's
(vring 0, its session role "hiprio", its loop with the hiprio COALESCE
setting): ``depth`` FORGETs per batch, in the driver's shape (one
readable buffer pair, no writable part), each of a different nodeid
holding one lookup, which it frees (``forget``: what a cold-metadata
guest's dropped dentries send) or of one holding two, which it only
decrements (``forget-keep``); ``batch-forget``: ``depth`` BATCH_FORGETs
of 8 pairs each, every pair freeing its nodeid (the figure is per
request, 8 forgets). Between batches, outside the timed part, the
nodeids are looked up again (``InodeTable.ref``, in the order that gives
each inode its old nodeid back).

``readdirplus-cold`` lists a directory of ``--entries`` files (default
1,000) with READDIRPLUS of 4 KiB (the Linux guest's size), one request
per serve, each from the cookie the last reply ended at, on one handle:
every entry's lookup is its first (between passes, outside the timed part,
every nodeid is forgotten and its fd closed, as ``lookup-cold``);
``readdirplus-warm`` the same without the forgetting (every inode held:
+1 each). The figure is the worker's CPU per entry listed ("." and ".."
included), the request's own cost spread over its records.

``readdir`` lists the same directory with plain READDIR of 4 KiB (no
lookups: a names-only listing); ``readdir-cold`` lists it as a Linux
guest with READDIRPLUS_AUTO does after its caches were dropped: the
first 4 KiB of each pass READDIRPLUS, every later buffer READDIR, every
nodeid forgotten between passes (the figure: per entry of the whole
listing). ``--python-readdir`` leaves plain READDIR to Python in the
same build (``fastpath.readdir_unsupported`` answered for it), for a
before/after.

``listing`` is a guest's ``ls`` of a small directory (``--entries``
files, default 8), ``depth`` times per round: a batch of ``depth``
OPENDIRs of it, one of a READDIRPLUS of 4 KiB from cookie 0 on each fh
(every entry listed, every inode held: +1 each), one of their
RELEASEDIRs; the figure is the worker's CPU per OPENDIR + READDIRPLUS +
RELEASEDIR, and that of the RELEASEDIR batches alone per RELEASEDIR
(``--python-releasedir``: RELEASEDIR left to Python, for a before/after in
one build). A real keeper gets every directory fd, as in the daemon.

``--clock cpu`` times the serving thread's CPU time instead of the wall
clock: steadier on a loaded machine. The last line names the request path
(compiled or pure-Python, ``PYVIRTIOFSD_PURE=1``; docs/compiled.md).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
import time

from daemon.config import CacheMode, Config
from daemon.fds import close_fds
from daemon.fuse import abi, fastpath, filetable
from daemon.fuse.abi import Opcode
from daemon.fuse.inodes import InodeTable
from daemon.fuse.session import FuseSession
from daemon.virtio.memory import GuestMemory as DaemonMemory
from daemon.workers.loop import WorkerLoop
from daemon.virtio.compiled import PATH, VirtQueue
from tests.frontend.guestmem import GuestMemory as FrontMemory
from tests.frontend.vring import VRing

DATA = "bench-data"


class _NoChannel:
    def fileno(self):
        return -1


def _build(op: str, depth: int, shared: str, cache: str = "auto", event_idx: bool = False,
           open_files: int = 0):
    fmem = FrontMemory(256 << 20)
    vr = VRing(fmem, 1, 1024, event_idx=event_idx)
    regions = [(r.gpa, r.size, r.qva, r.mmap_offset) for r in fmem.regions]
    dmem = DaemonMemory.from_regions(regions, [os.dup(r.fd) for r in fmem.regions])
    config = Config(shared_dir=shared, cache=CacheMode(cache), sandbox="none", seccomp="none")
    os.chdir("/proc/self/fd")  # what a request worker does (INTERNALS: per-process facts)
    table = InodeTable(1 << 16, open_files)
    session = FuseSession(config, table, "request")
    loop = WorkerLoop(_NoChannel(), session, (1,))
    ring = loop.rings[1]
    ring.num = vr.num
    ring.queue = VirtQueue(dmem, vr.num, fmem.qva(vr.desc_gpa), fmem.qva(vr.avail_gpa),
                           fmem.qva(vr.used_gpa), 0, event_idx)
    ring.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    unique = [0]

    def hdr(opcode, nodeid, arglen):
        unique[0] += 2
        return abi.IN_HEADER.pack(40 + arglen, opcode, unique[0], nodeid, 0, 0, 1, 0, 0)

    def call(opcode, nodeid, args, out):
        vr.submit([hdr(opcode, nodeid, len(args)), args], [16] + out)
        loop._serve(ring)
        head = vr.harvest()[0]
        data = vr.read_writable(head)
        vr.free(head)
        return data

    call(Opcode.INIT, 0, abi.INIT_IN.pack(7, 38, 1 << 20, 0x7FFFFFFF, 0), [abi.INIT_OUT.size])
    with open(os.path.join(shared, DATA), "wb") as f:
        f.write(os.urandom(1 << 20))
    data = b""
    if op in ("unlink", "rmdir"):
        names = remake(shared, op, depth)
        heads = [vr.submit([hdr(Opcode.UNLINK if op == "unlink" else Opcode.RMDIR, 1, len(n) + 1), n + b"\0"], [16])
                 for n in names]
        return loop, ring, vr, heads
    if op == "rename":
        names = remake(shared, op, depth)
        args = [abi.RENAME_IN.pack(1) + n + b"\0" + RENAMED + n + b"\0" for n in names]
        heads = [vr.submit([hdr(Opcode.RENAME, 1, len(a)), a], [16]) for a in args]
        return loop, ring, vr, heads
    if op == "lookup-cold":
        names = [f"cold-{i:05d}".encode() for i in range(depth)]
        for n in names:
            open(os.path.join(shared, os.fsdecode(n)), "wb").close()
        heads = [vr.submit([hdr(Opcode.LOOKUP, 1, len(n) + 1), n + b"\0"], [16, abi.ENTRY_OUT.size]) for n in names]
        return loop, ring, vr, heads
    if op == "create":
        return loop, ring, vr, []
    if op == "getattr":
        req = (Opcode.GETATTR, 1, abi.GETATTR_IN.pack(0, 0, 0), [abi.ATTR_OUT.size])
    elif op == "getxattr-absent":
        entry = call(Opcode.LOOKUP, 1, DATA.encode() + b"\0", [abi.ENTRY_OUT.size])
        nodeid = int.from_bytes(entry[16:24], "little")
        req = (Opcode.GETXATTR, nodeid, abi.GETXATTR_IN.pack(0) + b"security.capability\0", [abi.GETXATTR_OUT.size])
    elif op == "flush":
        entry = call(Opcode.LOOKUP, 1, DATA.encode() + b"\0", [abi.ENTRY_OUT.size])
        nodeid = int.from_bytes(entry[16:24], "little")
        o = call(Opcode.OPEN, nodeid, abi.OPEN_IN.pack(os.O_RDWR, 0), [abi.OPEN_OUT.size])
        req = (Opcode.FLUSH, nodeid, abi.FLUSH_IN.pack(int.from_bytes(o[16:24], "little"), 0x1234), [])
    else:
        entry = call(Opcode.LOOKUP, 1, DATA.encode() + b"\0", [abi.ENTRY_OUT.size])
        nodeid = int.from_bytes(entry[16:24], "little")
        if op == "lookup":
            req = (Opcode.LOOKUP, 1, DATA.encode() + b"\0", [abi.ENTRY_OUT.size])
        elif op == "readlink":
            os.symlink("bench/a/symlink/tgt", os.path.join(shared, "bench-link"))
            link = call(Opcode.LOOKUP, 1, b"bench-link\0", [abi.ENTRY_OUT.size])
            req = (Opcode.READLINK, int.from_bytes(link[16:24], "little"), b"", [4095])
        elif op == "statfs":
            req = (Opcode.STATFS, 1, b"", [abi.STATFS_OUT.size])
        elif op == "ioctl":         # fuse_ioctl_in: fh, flags, cmd, arg, in_size, out_size
            req = (Opcode.IOCTL, nodeid, bytes(32), [])
        elif op.startswith("setattr"):
            v = abi.SetattrValid
            valid = v.ATIME | v.MTIME if op == "setattr-times" else v.MODE
            args = abi.SETATTR_IN.pack(int(valid), 0, 0, 0, 1_600_000_000, 1_600_000_000, 0, 5, 7, 0, 0o100644, 0, 0)
            req = (Opcode.SETATTR, nodeid, args, [abi.ATTR_OUT.size])
        else:
            flags = os.O_RDWR if op.startswith("write4k") else os.O_RDONLY
            o = call(Opcode.OPEN, nodeid, abi.OPEN_IN.pack(flags, 0), [abi.OPEN_OUT.size])
            fh = int.from_bytes(o[16:24], "little")
            if op.startswith("write4k"):     # the same page of the file, rewritten (page cache)
                data = os.urandom(4096)     # write4k-kill: a non-root guest writer's, under KILLPRIV_V2
                flags = abi.FUSE_WRITE_KILL_SUIDGID if op == "write4k-kill" else 0
                req = (Opcode.WRITE, nodeid, abi.WRITE_IN.pack(fh, 0, 4096, flags, 0, 0), [abi.WRITE_OUT.size])
            else:
                size = 4096 if op == "read4k" else 1 << 20
                args = abi.READ_IN.pack(fh, 0, size, 0, 0, 0)
                req = (Opcode.READ, nodeid, args, [4096] * (size // 4096))
    opcode, nodeid, args, out = req
    readable = [args, data] if data else [args] if args else []
    heads = [vr.submit([hdr(opcode, nodeid, len(args) + len(data))] + readable, [16] + out) for _ in range(depth)]
    return loop, ring, vr, heads


FORGET_OPS = ("forget", "forget-keep", "batch-forget")
BATCH_PAIRS = 8     # batch-forget: pairs per BATCH_FORGET


def _build_hiprio(op: str, depth: int, shared: str):
    """The hiprio worker's loop, session and vring 0 over a shared table
    whose nodeids the ``depth`` requests forget; (loop, ring, vr, heads,
    inos: the (nodeid, ino) pairs to look up again, in that order)."""
    from daemon.workers import hiprio
    fmem = FrontMemory(64 << 20)
    vr = VRing(fmem, 0, 1024)
    regions = [(r.gpa, r.size, r.qva, r.mmap_offset) for r in fmem.regions]
    dmem = DaemonMemory.from_regions(regions, [os.dup(r.fd) for r in fmem.regions])
    config = Config(shared_dir=shared, sandbox="none", seccomp="none")
    table = InodeTable(1 << 16)
    st = os.stat(shared)
    table.begin_session(st.st_dev, st.st_ino)
    session = FuseSession(config, table, "hiprio")
    loop = WorkerLoop(_NoChannel(), session, (0,), coalesce=hiprio.COALESCE)
    ring = loop.rings[0]
    ring.num = vr.num
    ring.queue = VirtQueue(dmem, vr.num, fmem.qva(vr.desc_gpa), fmem.qva(vr.avail_gpa),
                           fmem.qva(vr.used_gpa), 0, False)
    ring.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    count = depth * (BATCH_PAIRS if op == "batch-forget" else 1)
    refs = 2 if op == "forget-keep" else 1
    nodeids = []
    for i in range(count):
        for _ in range(refs):
            nodeid = table.ref(st.st_dev, 1_000_000 + i)[0]
        nodeids.append(nodeid)
    heads = []
    for k in range(depth):
        if op == "batch-forget":
            pairs = nodeids[k * BATCH_PAIRS:(k + 1) * BATCH_PAIRS]
            args = abi.BATCH_FORGET_IN.pack(len(pairs)) + b"".join(abi.FORGET_ONE.pack(n, 1) for n in pairs)
            opcode, nodeid = Opcode.BATCH_FORGET, 0
        else:
            args, opcode, nodeid = abi.FORGET_IN.pack(1), Opcode.FORGET, nodeids[k]
        heads.append(vr.submit([abi.IN_HEADER.pack(40 + len(args), opcode, 2 * k + 2, nodeid, 0, 0, 1, 0, 0),
                                args], [], indirect=False))
    # freed in request order, each pushed on the free list: looked up again
    # in the reverse order, each inode gets its nodeid back
    inos = [(n, 1_000_000 + i) for i, n in enumerate(nodeids)][::-1]
    return loop, ring, vr, heads, (st.st_dev, inos)


def ref_again(table, dev_inos) -> None:
    """One lookup back on each nodeid the batch forgot (outside the timed
    part): a freed inode inserted again under its old nodeid, a kept one
    (forget-keep) counted up again."""
    dev, inos = dev_inos
    for nodeid, ino in inos:
        got = table.ref(dev, ino)[0]
        if got != nodeid:
            raise RuntimeError(f"inode {ino} came back as nodeid {got}, not {nodeid}")


RENAMED = b"to-"     # what ``rename`` renames name to: RENAMED + name


def remake(shared: str, op: str, depth: int) -> list[bytes]:
    """The ``depth`` entries an ``unlink`` (files), ``rmdir`` (empty
    directories) or ``rename`` (files, renamed back) batch removes or
    moves, made (again) in the share root."""
    names = [f"{op}-{i:05d}".encode() for i in range(depth)]
    for n in names:
        path = os.path.join(shared, os.fsdecode(n))
        if op == "rmdir":
            os.makedirs(path, exist_ok=True)
        elif op == "rename" and os.path.exists(os.path.join(shared, os.fsdecode(RENAMED + n))):
            os.rename(os.path.join(shared, os.fsdecode(RENAMED + n)), path)
        else:
            open(path, "wb").close()
    return names


# the errno each op's requests answer (0: success)
EXPECTED = {"getxattr-absent": errno.ENODATA, "ioctl": errno.ENOSYS}


def close(loop, ring, vr) -> None:
    """Everything ``_build`` opened: the session and its table, the queue's
    views, both sides' guest memory, the rings' eventfds and the loop's
    epoll (tests build several in one process)."""
    loop.session.close()
    loop.session.inodes.close()
    mem = ring.queue.mem
    ring.queue.release()
    mem.close()
    vr.close()
    vr.mem.close()
    os.close(ring.call_fd)
    loop._epoll.close()


def forget_all(session) -> None:
    """Every nodeid the worker caches forgotten (all its lookups) and its
    fd closed, here and now: the next LOOKUP of each is a first one."""
    table, cache = session.inodes, session.cache
    table.unref_many([(n, table.get(n)[3]) for n in list(cache._fds) if table.get(n) is not None])
    cache._close_fds = close_fds
    cache.reap()


KEEPER_SERIAL = 9


class _ShutdownChannel:
    """What ``Keeper.run`` reads from its control channel: SHUTDOWN once
    the pipe is written to."""

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def recv(self):
        from daemon.workers.channel import Msg
        os.read(self.fd, 1)
        return Msg.SHUTDOWN, b"", []


def start_keeper(session) -> tuple[int, int]:
    """A real keeper in a forked process, introduced to ``session``'s
    peers as PEER_KEEPER does: (its pid, the pipe end that stops it)."""
    import socket
    from daemon.workers.keeper import Keeper
    keep_r, keep_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:            # the keeper
        status = 1
        try:
            keep_w.close()
            os.close(stop_w)
            keep_r.setblocking(False)
            status = Keeper(keep_r, KEEPER_SERIAL, session.inodes.files).run(_ShutdownChannel(stop_r))
        finally:
            os._exit(status)
    keep_r.close()
    os.close(stop_r)
    answers, answer_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    session.peers.set_self(1)
    session.peers.set_keeper(KEEPER_SERIAL, keep_w.detach(), answers.detach(), answer_end.detach())
    return pid, stop_w


def stop_keeper(pid: int, stop_w: int) -> float:
    """Stop the keeper; its CPU time (user + system) in seconds."""
    os.write(stop_w, b"x")
    os.close(stop_w)
    _pid, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the keeper exited with {status:#x}")
    return usage.ru_utime + usage.ru_stime


def _build_leaving(in_python: dict[str, bool], *args, **kw):
    """_build(*args, **kw) with each op ``in_python`` marks True left to
    Python: fastpath's ``<op>_unsupported`` answers a reason while the
    fast ops are made (their ``FastOps.enable_*`` then not called)."""
    saved = {op: getattr(fastpath, f"{op}_unsupported") for op in in_python}
    for op, python in in_python.items():
        if python:
            setattr(fastpath, f"{op}_unsupported", lambda session, op=op: f"measuring {op.upper()} in Python")
    try:
        return _build(*args, **kw)
    finally:
        for op, check in saved.items():
            setattr(fastpath, f"{op}_unsupported", check)


def _submitter(vr, unique: int = 0):
    """``submit(opcode, nodeid, args, out)``: one request (a root caller's,
    uniques ``unique`` + 2, + 4, …) on the ring, with a 16-byte and the
    ``out`` writable buffers; its head."""
    last = [unique]

    def submit(opcode, nodeid, args, out):
        last[0] += 2
        return vr.submit([abi.IN_HEADER.pack(40 + len(args), opcode, last[0], nodeid, 0, 0, 1, 0, 0), args],
                         [16] + out)
    return submit


def _timer(clock: str):
    return time.thread_time if clock == "cpu" else time.perf_counter


def _serve_batch(loop, ring, vr, timer, heads: list, what: str) -> tuple[float, list[bytes]]:
    """One timed ``loop._serve`` of the requests ``heads`` (on the ring):
    (the seconds it took, their replies in the order of ``heads``, the
    heads freed); one not served or answered with an error raises."""
    t0 = timer()
    loop._serve(ring)
    took = timer() - t0
    finished = vr.harvest()
    if sorted(finished) != sorted(heads):
        raise RuntimeError(f"served {len(finished)} of {len(heads)}")
    replies = []
    for head in heads:
        reply = vr.read_writable(head)
        vr.free(head)
        err = int.from_bytes(reply[4:8], "little", signed=True)
        if err:
            raise RuntimeError(f"{what}: the daemon answered {err}")
        replies.append(reply)
    return took, replies


def create_us(depth: int = 64, seconds: float = 3.0, clock: str = "wall",
              keeper: bool = True, where: str | None = None,
              python_release: bool = False, python_open: bool = False) -> tuple[float, float, int, float]:
    """(worker µs per CREATE + RELEASE, keeper µs per CREATE, CREATEs,
    worker µs per RELEASE: its batches alone); see the module docstring.
    ``where``: the directory to share a new temporary directory of
    (default: the system's temporary directory); ``python_release``:
    RELEASE left to Python (``FastOps.enable_release`` not called);
    ``python_open``: OPEN left to Python (``FastOps.enable_open`` not
    called: C's CREATE then allocates its fh through Python's
    ``HandleTable.add``)."""
    shared = tempfile.mkdtemp(prefix="inproc-", dir=where)
    loop, ring, vr, _ = _build_leaving({"release": python_release, "open": python_open}, "create", depth, shared,
                                       open_files=4 * depth)
    session = loop.session
    pid, stop_w = start_keeper(session) if keeper else (0, -1)
    names = [f"new-{i:05d}".encode() + b"\0" for i in range(depth)]
    create_args = [abi.CREATE_IN.pack(os.O_RDWR, 0o100644, 0o022, 0) + n for n in names]
    submit = _submitter(vr)
    timer = _timer(clock)
    busy = releasing = 0.0
    done = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        heads = [submit(Opcode.CREATE, 1, a, [abi.ENTRY_OUT.size, abi.OPEN_OUT.size]) for a in create_args]
        took, replies = _serve_batch(loop, ring, vr, timer, heads, "create")
        busy += took
        fhs = [(int.from_bytes(r[16:24], "little"), int.from_bytes(r[144:152], "little")) for r in replies]
        heads = [submit(Opcode.RELEASE, nodeid, abi.RELEASE_IN.pack(fh, os.O_RDWR, 0, 0), []) for nodeid, fh in fhs]
        took, replies = _serve_batch(loop, ring, vr, timer, heads, "release")
        busy += took
        releasing += took
        if any(r[:16] != abi.OUT_HEADER.pack(16, 0, int.from_bytes(r[8:16], "little")) for r in replies):
            raise RuntimeError("release: the daemon did not answer the empty reply")
        done += depth
        for n in names:
            os.unlink(os.path.join(shared, os.fsdecode(n[:-1])))
        forget_all(session)
    keeper_s = stop_keeper(pid, stop_w) if keeper else 0.0
    close(loop, ring, vr)
    return busy / done * 1e6, keeper_s / done * 1e6, done, releasing / done * 1e6


def mkdir_us(depth: int = 64, seconds: float = 3.0, clock: str = "wall", where: str | None = None,
             python_mkdir: bool = False) -> tuple[float, int]:
    """(worker µs per MKDIR, MKDIRs): ``depth`` MKDIRs of new names in the
    root per batch (mode 0755, root caller); between batches, untimed, the
    directories removed and every nodeid forgotten, so each MKDIR makes a
    new directory and inserts a new inode. ``python_mkdir``: MKDIR left to
    Python (``FastOps.enable_mkdir`` not called)."""
    shared = tempfile.mkdtemp(prefix="inproc-", dir=where)
    loop, ring, vr, _ = _build_leaving({"mkdir": python_mkdir}, "create", depth, shared, open_files=4 * depth)
    session = loop.session
    names = [f"dir-{i:05d}".encode() + b"\0" for i in range(depth)]
    args = [abi.MKDIR_IN.pack(0o755, 0o022) + n for n in names]
    submit = _submitter(vr)
    timer = _timer(clock)
    busy = 0.0
    done = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        heads = [submit(Opcode.MKDIR, 1, a, [abi.ENTRY_OUT.size]) for a in args]
        busy += _serve_batch(loop, ring, vr, timer, heads, "mkdir")[0]
        done += depth
        for n in names:
            os.rmdir(os.path.join(shared, os.fsdecode(n[:-1])))
        forget_all(session)
    close(loop, ring, vr)
    return busy / done * 1e6, done


def opendir_us(depth: int = 64, seconds: float = 3.0, clock: str = "wall", entries: int = 8,
               python_releasedir: bool = False) -> tuple[float, float, int]:
    """(worker µs per OPENDIR + READDIRPLUS + RELEASEDIR, worker µs per
    RELEASEDIR: its batches alone, cycles); see the module docstring."""
    shared = tempfile.mkdtemp(prefix="inproc-")
    loop, ring, vr, _ = _build_leaving({"releasedir": python_releasedir}, "create", depth, shared,
                                       open_files=4 * depth)
    os.mkdir(os.path.join(shared, "ls"))
    for i in range(entries):
        open(os.path.join(shared, "ls", f"entry-{i:03d}"), "wb").close()
    pid, stop_w = start_keeper(loop.session)
    submit = _submitter(vr, 1 << 40)
    timer = _timer(clock)

    def batch(opcode, nodeid, args_list, out) -> tuple[float, list[bytes]]:
        heads = [submit(opcode, nodeid, a, out) for a in args_list]
        return _serve_batch(loop, ring, vr, timer, heads, f"opendir ({opcode!r})")

    entry = batch(Opcode.LOOKUP, 1, [b"ls\0"], [abi.ENTRY_OUT.size])[1][0]
    nodeid = int.from_bytes(entry[16:24], "little")
    busy = releasing = 0.0
    done = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        took, replies = batch(Opcode.OPENDIR, nodeid, [abi.OPEN_IN.pack(os.O_RDONLY | os.O_DIRECTORY, 0)] * depth,
                              [abi.OPEN_OUT.size])
        busy += took
        fhs = [int.from_bytes(r[16:24], "little") for r in replies]
        took, replies = batch(Opcode.READDIRPLUS, nodeid, [abi.READ_IN.pack(fh, 0, 4096, 0, 0, 0) for fh in fhs],
                              [4096])
        busy += took
        if any(int.from_bytes(r[0:4], "little") < 16 + (entries + 2) * abi.DIRENTPLUS.size for r in replies):
            raise RuntimeError("opendir: a listing came back short")
        took, replies = batch(Opcode.RELEASEDIR, nodeid, [abi.RELEASE_IN.pack(fh, 0, 0, 0) for fh in fhs], [])
        busy += took
        releasing += took
        done += depth
    stop_keeper(pid, stop_w)
    close(loop, ring, vr)
    return busy / done * 1e6, releasing / done * 1e6, done


def open_us(depth: int = 64, seconds: float = 3.0, clock: str = "wall", keeper: bool = True,
            python_open: bool = False, opendir: bool = False) -> tuple[float, float, int]:
    """(worker µs per OPEN (OPENDIR with ``opendir``), keeper µs per OPEN,
    OPENs): ``depth`` OPENs of one file (O_RDONLY; OPENDIR: of a
    directory) per batch, timed, then their RELEASEs (RELEASEDIR: through
    HandleTable.close) outside the timed part; ``python_open``: OPEN and
    OPENDIR left to Python (``FastOps.enable_open`` not called)."""
    shared = tempfile.mkdtemp(prefix="inproc-")
    loop, ring, vr, _ = _build_leaving({"open": python_open}, "create", depth, shared, open_files=4 * depth)
    session = loop.session
    pid, stop_w = start_keeper(session) if keeper else (0, -1)
    os.mkdir(os.path.join(shared, "d"))
    submit = _submitter(vr)
    submit(Opcode.LOOKUP, 1, b"d\0" if opendir else DATA.encode() + b"\0", [abi.ENTRY_OUT.size])
    loop._serve(ring)
    head = vr.harvest()[0]
    nodeid = int.from_bytes(vr.read_writable(head)[16:24], "little")
    vr.free(head)
    opcode = Opcode.OPENDIR if opendir else Opcode.OPEN
    timer = _timer(clock)
    busy, done = 0.0, 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        heads = [submit(opcode, nodeid, abi.OPEN_IN.pack(os.O_RDONLY, 0), [abi.OPEN_OUT.size]) for _ in range(depth)]
        took, replies = _serve_batch(loop, ring, vr, timer, heads, "open")
        busy += took
        for reply in replies:
            fh = int.from_bytes(reply[16:24], "little")
            session.handles.close(fh, session.handles._handles[fh].kind)
        done += depth
    keeper_s = stop_keeper(pid, stop_w) if keeper else 0.0
    close(loop, ring, vr)
    return busy / done * 1e6, keeper_s / done * 1e6, done


def readdirplus_us(cold: bool, seconds: float = 3.0, clock: str = "wall", entries: int = 1000,
                   size: int = 4096, names: str = "", python_readdir: bool = False) -> tuple[float, int]:
    """(µs per entry listed, entries listed): see the module docstring.
    ``names``: "" (READDIRPLUS only), "all" (READDIR only) or "auto"
    (READDIRPLUS for the first buffer of a pass, READDIR after)."""
    shared = tempfile.mkdtemp(prefix="inproc-")
    loop, ring, vr, _ = _build("getattr", 0, shared)
    if python_readdir and loop._fast is not None:
        from daemon.fuse import fastpath
        real = fastpath.readdir_unsupported
        fastpath.readdir_unsupported = lambda session: "--python-readdir"
        try:
            loop.use_fast_ops(fastpath.make(loop.session))
        finally:
            fastpath.readdir_unsupported = real
    os.mkdir(os.path.join(shared, "rdp"))
    for i in range(entries):
        open(os.path.join(shared, "rdp", f"entry-{i:06d}"), "wb").close()
    submit = _submitter(vr, 1 << 40)

    def call(opcode, nodeid, args, out):
        submit(opcode, nodeid, args, out)
        loop._serve(ring)
        head = vr.harvest()[0]
        data = vr.read_writable(head)
        vr.free(head)
        return data

    entry = call(Opcode.LOOKUP, 1, b"rdp\0", [abi.ENTRY_OUT.size])
    nodeid = int.from_bytes(entry[16:24], "little")
    o = call(Opcode.OPENDIR, nodeid, abi.OPEN_IN.pack(os.O_RDONLY, 0), [abi.OPEN_OUT.size])
    fh = int.from_bytes(o[16:24], "little")
    timer = _timer(clock)
    busy, listed, cookie = 0.0, 0, 0
    serve = loop._serve
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        plus = not names or (names == "auto" and cookie == 0)
        submit(Opcode.READDIRPLUS if plus else Opcode.READDIR, nodeid,
               abi.READ_IN.pack(fh, cookie, size, 0, 0, 0), [size])
        t0 = timer()
        serve(ring)
        busy += timer() - t0
        head = vr.harvest()[0]
        reply = vr.read_writable(head)
        vr.free(head)
        length, err = int.from_bytes(reply[0:4], "little"), int.from_bytes(reply[4:8], "little", signed=True)
        if err:
            raise RuntimeError(f"readdirplus: the daemon answered {err}")
        at, n = 16, 0
        while at < length:
            _ino, off, namelen, _type = abi.DIRENT.unpack_from(reply, at + (abi.ENTRY_OUT.size if plus else 0))
            cookie = off
            at += abi.direntplus_size(namelen) if plus else abi.dirent_size(namelen)
            n += 1
        listed += n
        if not n:               # the end: again from the start
            cookie = 0
            if cold:
                forget_all(loop.session)
    close(loop, ring, vr)
    return busy / max(listed, 1) * 1e6, listed


def per_request_us(op: str = "getattr", depth: int = 64, seconds: float = 3.0,
                   profile: str = "none", clock: str = "wall", python_meta: bool = False,
                   python_setattr: bool = False, python_attrs: bool = False) -> float:
    shared = tempfile.mkdtemp(prefix="inproc-")
    if op in FORGET_OPS:
        loop, ring, vr, heads, forgotten = _build_hiprio(op, depth, shared)
    else:
        loop, ring, vr, heads = _build_leaving({"setattr": python_setattr, "readlink": python_attrs,
                                                "statfs": python_attrs, "enosys": python_attrs}, op, depth, shared)
    if python_meta and loop._fast is not None:
        loop._fast.enable_meta(0, filetable._H_LOCKS, None)
    serve = loop._serve
    prof = None
    if profile == "cprofile":
        import cProfile
        prof = cProfile.Profile()
    timer = _timer(clock)
    busy = 0.0
    done = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if prof:
            prof.enable()
        t0 = timer()
        serve(ring)
        busy += timer() - t0
        if prof:
            prof.disable()
        finished = vr.harvest()
        if len(finished) != depth:
            raise RuntimeError(f"served {len(finished)} of {depth}")
        if op in FORGET_OPS:
            if any(vr.inflight[h].used_len for h in finished):
                raise RuntimeError(f"{op}: a reply was written")
            ref_again(loop.session.inodes, forgotten)
        elif not done:
            err = int.from_bytes(vr.read_writable(finished[0], 8)[4:8], "little", signed=True)
            if err != -EXPECTED.get(op, 0):
                raise RuntimeError(f"{op}: the daemon answered {err}")
        done += depth
        if op == "lookup-cold":
            forget_all(loop.session)
        if op in ("unlink", "rmdir", "rename"):
            remake(shared, op, depth)
        for head in finished:
            vr.repost(head)
    if prof:
        import pstats
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    close(loop, ring, vr)
    return busy / done * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", default="getattr",
                    choices=("getattr", "lookup", "lookup-cold", "read4k", "read1m", "write4k", "write4k-kill",
                             "getxattr-absent", "unlink", "rmdir", "rename", "flush", "create", "mkdir", *FORGET_OPS,
                             "readdirplus-cold", "readdirplus-warm", "readdir", "readdir-cold", "open", "opendir",
                             "listing", "setattr-times", "setattr-chmod", "readlink", "statfs", "ioctl"))
    ap.add_argument("--entries", type=int, default=None,
                    help="readdir*, listing: files in the directory listed (1000, 8)")
    ap.add_argument("--python-readdir", action="store_true", help="readdir*: plain READDIR in Python")
    ap.add_argument("--python-meta", action="store_true",
                    help="GETXATTR, UNLINK, RMDIR, FLUSH and RENAME in Python (the rest as the build serves it)")
    ap.add_argument("--depth", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--profile", default="none", choices=("none", "cprofile"))
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"))
    ap.add_argument("--no-keeper", action="store_true", help="create: no keeper process")
    ap.add_argument("--python-release", action="store_true", help="create: RELEASE in Python (before/after)")
    ap.add_argument("--python-releasedir", action="store_true", help="listing: RELEASEDIR in Python")
    ap.add_argument("--python-open", action="store_true",
                    help="open, opendir: in Python; create: its fh through Python (before/after)")
    ap.add_argument("--python-setattr", action="store_true", help="setattr-*: SETATTR in Python (before/after)")
    ap.add_argument("--python-attrs", action="store_true",
                    help="readlink, statfs, ioctl: READLINK, STATFS and ENOSYS in Python (before/after)")
    ap.add_argument("--dir", default=None, help="create, mkdir: make the shared directory in DIR (e.g. a tmpfs)")
    ap.add_argument("--python-mkdir", action="store_true", help="mkdir: MKDIR in Python (before/after)")
    a = ap.parse_args(argv)
    if a.op == "mkdir":
        us, n = mkdir_us(a.depth, a.seconds, a.clock, a.dir, a.python_mkdir)
        where = "Python" if a.python_mkdir else "as built"
        print(f"mkdir depth {a.depth}: {us:.2f} µs per MKDIR in the worker ({where}; {n} MKDIRs); {PATH}")
        return 0
    if a.op == "create":
        us, keeper_us, n, release_us = create_us(a.depth, a.seconds, a.clock, not a.no_keeper, a.dir,
                                                 a.python_release, a.python_open)
        where = "Python" if a.python_release else "as built"
        where += "; the fh through Python's HandleTable.add" if a.python_open else ""
        print(f"create depth {a.depth}: {us:.2f} µs per CREATE + RELEASE in the worker "
              f"(RELEASE alone {release_us:.2f}, {where}), keeper {keeper_us:.2f} µs per CREATE "
              f"({n} CREATEs); {PATH}")
        return 0
    if a.op == "listing":
        us, release_us, n = opendir_us(a.depth, a.seconds, a.clock, a.entries or 8, a.python_releasedir)
        where = "Python" if a.python_releasedir else "as built"
        print(f"listing depth {a.depth} ({a.entries or 8} entries): {us:.2f} µs per OPENDIR + READDIRPLUS + "
              f"RELEASEDIR in the worker (RELEASEDIR alone {release_us:.2f}, {where}; {n} cycles); {PATH}")
        return 0
    if a.op in ("open", "opendir"):
        us, keeper_us, n = open_us(a.depth, a.seconds, a.clock, not a.no_keeper, a.python_open, a.op == "opendir")
        where = "Python" if a.python_open else "as built"
        print(f"{a.op} depth {a.depth}: {us:.2f} µs per {a.op.upper()} in the worker ({where}), keeper "
              f"{keeper_us:.2f} µs each ({n} {a.op.upper()}s); {PATH}")
        return 0
    a.entries = a.entries or 1000
    if a.op.startswith("readdir"):
        names = "" if a.op.startswith("readdirplus") else "auto" if a.op == "readdir-cold" else "all"
        us, n = readdirplus_us(a.op.endswith("-cold"), a.seconds, a.clock, a.entries, names=names,
                               python_readdir=a.python_readdir)
        where = "; READDIR in Python" if a.python_readdir else ""
        print(f"{a.op} ({a.entries} entries, 4 KiB replies): {us:.2f} µs per entry in the worker "
              f"({n} entries listed); {PATH}{where}")
        return 0
    us = per_request_us(a.op, a.depth, a.seconds, a.profile, a.clock, a.python_meta, a.python_setattr,
                        a.python_attrs)
    meta = "; metadata ops in Python" if a.python_meta else ""
    meta += "; SETATTR in Python" if a.python_setattr else ""
    meta += "; READLINK, STATFS, ENOSYS in Python" if a.python_attrs else ""
    print(f"{a.op} depth {a.depth}: {us:.2f} µs per request in the worker ({1e6 / us:,.0f}/s); {PATH}{meta}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
