"""Whole requests in C, the op table as the seam (docs/compiled.md, stages 2 and 3).

``fast_ops(session)`` returns the extension's ``FastOps`` for the worker
loop (workers/loop.py), or None. Stage 3 (the default, ``batch_loop()``):
the loop calls ``FastOps.batch(core, words, popped, limit)``, which pops
the ring's chains in C (``_vqcore``'s C interface, no Python object per
chain), serves those it can, pushes them and updates the ring's progress
record, and returns when the ring is empty, the limit is reached, or the
next chain is one it declines: Python then pops that one as before.
Stage 2 (``PYVIRTIOFSD_FASTOPS=2``): the loop pops every chain in Python
and calls ``FastOps.serve(chain)`` first. ``serve`` answers the requests the
extension ``daemon.fuse._fastops`` covers (GETATTR on a nodeid whose fd
this worker holds, or with GETATTR_FH on an fh it holds, READ on an fh it
holds, WRITE of the plain case on an fh it holds; ``_fastops.c`` lists
every condition) and returns the
bytes written into ``chain.writable``; for any other request it writes
nothing and returns -1, and the loop hands the chain to
``FuseSession.handle`` as before. The reply bytes are the ones the Python
session writes (tests/unit/test_fastops_equivalence.py compares them).

None, so that Python serves everything, when:

- ``PYVIRTIOFSD_PURE=1`` or the extension is not built (compiled.py's
  choice, the same switch as the compiled virtqueue), or
  ``PYVIRTIOFSD_FASTOPS=0`` (the compiled virtqueue alone: for measuring);
- the session is not a request session on a shared ``InodeTable`` (the
  hiprio session: FORGET and BATCH_FORGET only, as ``forget_unsupported``
  says);
- the op table's GETATTR row is not ``attrs.do_getattr`` (a session whose
  table was changed: none today, ``--readonly`` keeps GETATTR), or the
  session's ``attr_reply`` is not ``replies.Timeouts.attr_out``
  (``--translate-uid``/``--translate-gid`` rewrite the ids in it).

READ is compiled too when the op table's READ row is ``files.do_read``,
WRITE when its row is ``files.do_write`` (``--readonly`` makes it EROFS's:
then WRITE stays in Python): exactly ``size`` data bytes, an fh this
worker holds, ``pwritev2`` from the guest's buffers (with
FUSE_WRITE_KILL_SUIDGID without CAP_FSETID in the thread's effective set,
as ``credentials.without_fsetid``); in the batch loop its chain is taken before the
write, so that a worker dying during it never has it written twice. A
4 KiB WRITE costs the worker 3.1 µs of CPU in stage 3 and 4.8 in stage 2,
against 8.8 and 8.3 in Python (tests/perf/inproc.py ``--op write4k``,
docs/compiled.md, "WRITE in C").

LOOKUP is compiled when ``lookup_unsupported`` says nothing against it (``make`` then
calls ``FastOps.enable_lookup`` with the shared ``InodeTable``'s index,
memfd, thread lock and word indices: C takes the lookup count itself,
under the table's own locks, for inodes this worker holds an fd of, and
opens, inserts and caches those it does not as ``InodeCache.adopt`` does;
docs/compiled.md, "LOOKUP in C" and "A worker's first LOOKUP in C").

GETXATTR, UNLINK, RMDIR and FLUSH are compiled as ``fastmeta.py`` says
(``make`` calls ``FastOps.enable_meta``; docs/compiled.md, "Metadata ops
in C"): the plain case of each, with the reference handler in the op
table and nothing configured that changes its answer.

CREATE is compiled when ``create_unsupported`` says nothing against it
(LOOKUP compiled, the reference CREATE row, no --posix-acl or
--security-label): ``make`` calls ``FastOps.enable_create`` with
``create_rest`` and ``add_created`` below (C calls them for the fh, and
for what its own lookup declines once the file exists), the thread's
credentials cache and the flag rules; C serves a root caller's CREATE of
a new name (docs/compiled.md, "CREATE in C").
MKDIR likewise with ``mkdir_unsupported`` and ``FastOps.enable_mkdir``
(``mkdir_rest`` for what C's lookup declines once the directory exists;
docs/compiled.md, "MKDIR in C").

RELEASE is compiled when ``release_unsupported`` says nothing against it
(the reference RELEASE row, the stock HandleTable and FileTable): ``make``
calls ``FastOps.enable_release`` with the FileTable and its word indices;
C frees an open file this worker holds under the table's own locks while
no lock description exists (docs/compiled.md, "RELEASE in C"). RELEASEDIR
too when ``releasedir_unsupported`` says nothing against it (RELEASE
compiled, the reference RELEASEDIR row): ``FastOps.enable_releasedir``,
the same free of a directory handle this worker holds (docs/compiled.md,
"RELEASEDIR in C").

OPEN and OPENDIR are compiled when ``open_unsupported`` says nothing
against it (RELEASE compiled, the reference OPEN and OPENDIR rows):
``make`` calls ``FastOps.enable_open`` with ``add_handle`` below (for
what C's own allocation declines), ``handles.OpenHandle`` and the rest of
the FileTable's layout; C reopens the inode and allocates the fh in the
shared table itself (docs/compiled.md, "OPEN and OPENDIR in C").

SETATTR is compiled when ``setattr_unsupported`` says nothing against it
(the reference SETATTR row, GETATTR's stock attr reply): ``make`` calls
``FastOps.enable_setattr``; C serves chmod, chown and utimensat on an
inode this worker caches, or an open file it holds (docs/compiled.md,
"SETATTR in C").

READLINK and STATFS are compiled when ``readlink_unsupported`` and
``statfs_unsupported`` say nothing against them (their reference rows):
``make`` calls ``FastOps.enable_readlink`` with ``reply_too_big`` (the
warning of a target longer than the reply part) and
``FastOps.enable_statfs`` with ``statfs_rest`` (Python's answer for the
counts struct.pack refuses); the opcodes the op table has no row for
(``enosys_opcodes``: ops.ENOSYS's IOCTL, POLL, ACCESS, ...) are answered
ENOSYS in C (``FastOps.enable_enosys``), as ``FuseSession._handle`` does
before it looks at the session (docs/compiled.md, "READLINK, STATFS and
ENOSYS in C").

FORGET and BATCH_FORGET, the hiprio session's (vring 0): ``fast_ops``
makes that session a ``FastOps`` that serves those two and nothing else
(``make_hiprio``: ``enable_lookup`` for the table's layout and locks, then
``enable_forget`` with its freed ring), when ``forget_unsupported`` says
nothing against it; INTERRUPT and everything malformed stay Python's
(docs/compiled.md, "FORGET in C").

READDIRPLUS is compiled when ``readdirplus_unsupported`` says nothing
against it (LOOKUP compiled, the reference READDIRPLUS row, the stock
open-file table): ``make`` calls ``FastOps.enable_readdirplus`` with
``dirs.plus_entry`` (Python's lookup of one entry, for what C declines
mid-reply) and ``dirs.DirStream`` (the handle's getdents state, which C
reads and writes back, so that C and Python requests on one handle
interleave; docs/compiled.md, "READDIRPLUS in C").

Plain READDIR is compiled when ``readdir_unsupported`` says nothing
against it (the reference READDIR row, the stock open-file table; no
lookups, so LOOKUP need not be): ``make`` calls ``FastOps.enable_readdir``
with ``dirs.DirStream``, the same stream state on the same handles
(docs/compiled.md, "READDIR in C").

With ``--metrics-socket`` the session has a meter (metrics/counters.py's
``WorkerMeter``) before the loop asks for ``serve``, and the requests C
answers are counted by C into the same shared-memory slot, as
``WorkerMeter.request`` counts them: the opcode's requests, the latency
from before the request is read to after its reply is written (with the
meter's own clock, ``time.perf_counter_ns``: ``clock_gettime(CLOCK_MONOTONIC)``,
a vDSO call) into its sum and bucket, an error reply under its opcode and
errno, READ's and WRITE's data bytes. ``make`` hands C the slot's buffer and the word
indices, computed here from counters.py once; C checks them against the
slot's length once. A meter C cannot count for (another clock: tests) is
not passed, and ``serve`` then leaves that session's requests to Python.

Per request ``serve`` also leaves to Python a session whose meter is not
the one it was made with (or None), one that has to adopt a new FUSE
session, and every malformed request (Python logs and answers it).

Imported only by worker processes, like compiled.py (``sandbox.preload``
imports it before the pivot).
"""

from __future__ import annotations

import errno
import os
import time

from daemon.config import CacheMode
from daemon.fuse import (abi, attrs, credentials, dirs, entries, fastmeta, files, filetable, handles, inodecache,
                         inodes, ops, replies)
from daemon.fuse.abi import Opcode
from daemon.fuse.request import FUSEError, Request
from daemon.log import get_logger
from daemon.metrics import counters as c
from daemon.virtio import compiled

log = get_logger("fuse.session")

try:
    from daemon.fuse import _fastops as _ext  # type: ignore[attr-defined]  # C, no stubs
except ImportError:  # not built: no compiler or headers at install time
    _ext = None

EXTENSION_BUILT = _ext is not None
# PYVIRTIOFSD_FASTOPS=0: the compiled virtqueue without the compiled ops
# (stage 1 alone), =2: the compiled ops on chains popped in Python (stage
# 2); anything else: the batch loop in C (stage 3). For measuring a stage
# against another.
FASTOPS_ENV = "PYVIRTIOFSD_FASTOPS"


def batch_loop() -> bool:
    """Whether the worker loop runs the compiled ops' batch loop (stage 3)
    rather than ``serve`` per chain popped in Python (stage 2)."""
    return os.environ.get(FASTOPS_ENV, "") != "2"


def wait_loop() -> bool:
    """Whether the worker loop also waits in C (``FastOps.wait``, the wait
    loop) when only its ring's kicks can come; ``PYVIRTIOFSD_FASTOPS=3``:
    the batch loop with the wait in Python (for measuring one against the
    other)."""
    return batch_loop() and os.environ.get(FASTOPS_ENV, "") != "3"


def why_not(session) -> str:
    """Why ``session`` gets no compiled ops ("" if it does)."""
    if compiled.VirtQueue is not compiled.CompiledVirtQueue:
        return compiled.PATH
    if _ext is None:
        return "extension daemon.fuse._fastops not built"
    if os.environ.get(FASTOPS_ENV, "") == "0":
        return f"{FASTOPS_ENV}=0"
    return unsupported(session)


def unsupported(session) -> str:
    """Why ``session`` itself cannot use the compiled ops ("" if it can)."""
    table = session.inodes
    if session.role == "hiprio":
        return forget_unsupported(session)
    if session.role != "request" or not isinstance(table, inodes.InodeTable):
        return "not a request session on a shared inode table"
    if why := fastmeta.not_reference(session, (Opcode.GETATTR, attrs.do_getattr)):
        return why
    if getattr(session.attr_reply, "__func__", None) is not replies.Timeouts.attr_out:
        return "GETATTR replies are rewritten (--translate-uid/--translate-gid)"
    return ""


def lookup_unsupported(session) -> str:
    """Why LOOKUP stays in Python for ``session`` ("" if C may serve it)."""
    if why := fastmeta.not_reference(session, (Opcode.LOOKUP, entries.do_lookup)):
        return why
    # the stock Timeouts (TranslatedTimeouts keeps entry_out but rewrites
    # the attr_out it calls)
    if any(type(getattr(reply, "__self__", None)) is not replies.Timeouts
           for reply in (session.entry_reply, session.negative_entry, session.attr_reply)):
        return "entry replies are rewritten (--translate-uid/--translate-gid)"
    if session._submounts:
        return "--announce-submounts"
    if type(session.inodes) is not inodes.InodeTable or type(session.cache) is not inodecache.InodeCache:
        return "not the stock inode table and cache"
    return ""


def forget_unsupported(session) -> str:
    """Why FORGET and BATCH_FORGET stay in Python for the hiprio ``session``
    ("" if C may serve them)."""
    if session.role != "hiprio":
        return "not the hiprio session"
    if type(session.inodes) is not inodes.InodeTable:
        return "not the stock inode table"
    return fastmeta.not_reference(session, (Opcode.FORGET, entries.do_forget),
                                  (Opcode.BATCH_FORGET, entries.do_batch_forget))


def _lookup_layout(table) -> tuple:
    """enable_lookup's table arguments: index, lock handle, thread lock, capacity
    and the word indices (header's and slot's) _lookup.h uses."""
    return (table._hash, table.lock_handle(), table._tlock, table.capacity,
            (inodes._H_DIRTY, inodes._S_GEN, inodes._S_REF, inodes._S_DEV, inodes._S_INO,
             inodes._H_FREE, inodes._H_HIGH, inodes._H_GEN, inodes._H_LIVE, inodes._S_NEXT,
             inodes._S_HLEN, inodes._S_OWNER, inodes._S_HANDLE, inodes.HANDLE_MAX))


def make_hiprio(session):
    """The hiprio session's ``FastOps``: FORGET and BATCH_FORGET only
    (_forget.h), whatever ``forget_unsupported`` says (tests), counting
    into ``session.meter`` when it can."""
    assert _ext is not None
    table = session.inodes
    layout = meter_layout(session.meter)
    fast = _ext.FastOps(session, table._hdr, table._q, inodes._H_SESSION, inodes._SLOT_WORDS, 0, 0,
                        False, writes=False, **layout)
    fast.enable_lookup(*_lookup_layout(table), False)
    fast.enable_forget(table._ring, inodes._H_RING_W, inodes.RING,
                       (op_words(Opcode.FORGET), op_words(Opcode.BATCH_FORGET)) if layout else None)
    return fast


def make(session):
    """The extension's ``FastOps`` for ``session``, whatever ``why_not``
    says (the equivalence tests use it under PYVIRTIOFSD_PURE=1 too),
    counting into ``session.meter`` when it can (``meter_layout``)."""
    assert _ext is not None
    if session.role == "hiprio":
        return make_hiprio(session)
    sec, nsec = session.attr_reply.__self__.attr_valid()
    table = session.inodes
    reads, writes = _io_rows(session)
    layout = meter_layout(session.meter)
    fast = _ext.FastOps(session, table._hdr, table._q, inodes._H_SESSION, inodes._SLOT_WORDS, sec, nsec,
                        reads, writes=writes, **layout)
    if layout:
        # the wait loop's wake-ups, counted as WorkerMeter.batch does
        fast.enable_batches((c.BATCHES, c.CHAINS, c.MAX_BATCH, c.BATCH_HIST, c.OPEN_FILES, c.INODE_FDS),
                            c.BATCH_BUCKETS)
    # the wait loop's polling (_poll.h)
    fast.enable_polling(session.config.poll_max_us * 1000, 0,
                        (c.POLL_FOUND, c.POLL_MISSED, c.POLL_NS) if layout else None)
    fastmeta.enable(fast, session, op_words if layout else None)
    if not readdir_unsupported(session):
        fast.enable_readdir(dirs.DirStream, op_words(Opcode.READDIR) if layout else None)
    if not release_unsupported(session):
        enable_release(fast, session, bool(layout))
        if not releasedir_unsupported(session):
            fast.enable_releasedir(op_words(Opcode.RELEASEDIR) if layout else None)
        if not open_unsupported(session):
            enable_open(fast, session, bool(layout))
    if not setattr_unsupported(session):
        fast.enable_setattr(op_words(Opcode.SETATTR) if layout else None)
    if not readlink_unsupported(session):
        fast.enable_readlink(reply_too_big, op_words(Opcode.READLINK) if layout else None)
    if not statfs_unsupported(session):
        fast.enable_statfs(statfs_rest, op_words(Opcode.STATFS) if layout else None)
    if not enosys_unsupported(session):
        enosys = enosys_opcodes(session)
        fast.enable_enosys(tuple(int(op) for op in enosys), tuple(op_words(op) for op in enosys) if layout else None)
    if not lookup_unsupported(session):
        fast.enable_lookup(*_lookup_layout(table), session.config.cache is CacheMode.ALWAYS)
        if not readdirplus_unsupported(session):
            fast.enable_readdirplus(dirs.plus_entry, dirs.DirStream,
                                    op_words(Opcode.READDIRPLUS) if layout else None)
        if not create_unsupported(session):
            config = session.config
            layout = meter_layout(session.meter)
            fast.enable_create(create_rest, add_created, credentials._state,
                               files.host_open_flags(0xFFFFFFFF & ~os.O_ACCMODE, config.allow_direct_io,
                                                     config.preserve_noatime) | os.O_ACCMODE,
                               config.writeback, files.fopen_flags(config.cache),
                               op_words(Opcode.CREATE) if layout else None)
        if not mkdir_unsupported(session):
            fast.enable_mkdir(mkdir_rest, credentials._state,
                              op_words(Opcode.MKDIR) if meter_layout(session.meter) else None)
    return fast


def readdirplus_unsupported(session) -> str:
    """Why READDIRPLUS stays in Python for ``session`` ("" if C may serve
    it: docs/compiled.md, "READDIRPLUS in C"). C looks each entry up as its
    LOOKUP does, so it needs that first (the stock entry replies, no
    --announce-submounts, the stock inode table and cache)."""
    why = lookup_unsupported(session)
    if why:
        return why
    if why := fastmeta.not_reference(session, (Opcode.READDIRPLUS, dirs.do_readdirplus)):
        return why
    if type(session.handles) is not handles.HandleTable:
        return "not the stock open-file table"
    return ""


def readdir_unsupported(session) -> str:
    """Why plain READDIR stays in Python for ``session`` ("" if C may serve
    it: docs/compiled.md, "READDIR in C"): the reference READDIR row and
    the stock open-file table (C reads its handles and their DirStreams)."""
    if why := fastmeta.not_reference(session, (Opcode.READDIR, dirs.do_readdir)):
        return why
    if type(session.handles) is not handles.HandleTable:
        return "not the stock open-file table"
    return ""


def release_unsupported(session) -> str:
    """Why RELEASE stays in Python for ``session`` ("" if C may serve it:
    docs/compiled.md, "RELEASE in C"): C frees the fh in the stock
    HandleTable's shared FileTable as ``FileTable.free`` does."""
    if why := fastmeta.not_reference(session, (Opcode.RELEASE, files.do_release)):
        return why
    if type(session.handles) is not handles.HandleTable or type(session.handles.files) is not filetable.FileTable:
        return "not the stock open-file table"
    return ""


def releasedir_unsupported(session) -> str:
    """Why RELEASEDIR stays in Python for ``session`` ("" if C may serve
    it: docs/compiled.md, "RELEASEDIR in C"): RELEASE is C's (the same
    free on the same table) and the RELEASEDIR row is the reference."""
    if why := release_unsupported(session):
        return why
    return fastmeta.not_reference(session, (Opcode.RELEASEDIR, dirs.do_releasedir))


def setattr_unsupported(session) -> str:
    """Why SETATTR stays in Python for ``session`` ("" if C may serve its
    chmod, chown and utimensat: docs/compiled.md, "SETATTR in C"): the
    reference SETATTR row (--readonly replaces it) and GETATTR's stock attr
    reply, which C's reuses (--translate-uid/-gid rewrites it, and maps
    the ids a chown asks for, which C passes on as they are)."""
    if why := fastmeta.not_reference(session, (Opcode.SETATTR, attrs.do_setattr)):
        return why
    if getattr(session.attr_reply, "__func__", None) is not replies.Timeouts.attr_out:
        return "attr replies are rewritten (--translate-uid/--translate-gid)"
    return ""


def readlink_unsupported(session) -> str:
    """Why READLINK stays in Python for ``session`` ("" if C may serve it:
    docs/compiled.md, "READLINK, STATFS and ENOSYS in C"): the reference
    READLINK row (no option changes it; a test may replace it)."""
    return fastmeta.not_reference(session, (Opcode.READLINK, attrs.do_readlink))


def statfs_unsupported(session) -> str:
    """Why STATFS stays in Python for ``session`` ("" if C may serve it):
    the reference STATFS row."""
    return fastmeta.not_reference(session, (Opcode.STATFS, attrs.do_statfs))


def enosys_opcodes(session) -> list[Opcode]:
    """The opcodes of ``ops.ENOSYS`` that ``session``'s op table has no
    row for (all of them, unless a test added one): ``FuseSession._handle``
    answers them ENOSYS, and so may C."""
    return [op for op in ops.ENOSYS if int(op) not in session._ops and int(op) < c.OPCODE_SLOTS]


def enosys_unsupported(session) -> str:
    """Why the ENOSYS answers stay in Python for ``session`` ("" if C may
    give them)."""
    return "" if enosys_opcodes(session) else "every opcode of ops.ENOSYS has a row"


def reply_too_big(session, opcode: int, size: int, room: int) -> None:
    """The compiled READLINK's Python tail for a target longer than the
    reply part (C then answers EIO): ``FuseSession._too_big``'s warning,
    on the session's own rate-limited logger."""
    session.warn("FUSE %s: %d-byte reply, %d-byte buffer", ops.name(opcode), size, room)


def statfs_rest(session, nodeid: int) -> bytes | int:
    """The compiled STATFS's Python tail, for the counts C found that
    ``struct.pack`` refuses (C's chain is taken then: this answers):
    ``attrs.do_statfs`` as ``FuseSession._handle`` runs it, the 80 reply
    bytes or the errno it would answer (an unexpected error logged as
    there)."""
    try:
        return attrs.do_statfs(session, Request(int(Opcode.STATFS), 0, nodeid, 0, 0, 0, b"", None, None, b""))
    except FUSEError as e:
        return e.errno
    except OSError as e:
        return e.errno or errno.EIO
    except Exception:  # noqa: BLE001 - as FuseSession._handle: EIO, keep serving
        log.exception("FUSE %s (nodeid %d) failed", ops.name(Opcode.STATFS), nodeid)
        return errno.EIO


def enable_release(fast, session, metered: bool) -> None:
    """``FastOps.enable_release`` on ``session``'s FileTable (_release.h)."""
    ft = filetable
    fast.enable_release(session.handles.files,
                        (ft._H_DIRTY, ft._H_FREE, ft._H_LIVE, ft._H_RELEASED, ft._H_LOCKS, ft._H_HIGH, ft._F_GEN,
                         ft._F_KIND, ft._F_OWNER, ft._F_NEXT, ft._F_KEPT, ft._F_NODE, ft._F_LOCK_OWNER, ft._WORDS,
                         ft.KIND_LOCK),
                        op_words(Opcode.RELEASE) if metered else None)


def open_unsupported(session) -> str:
    """Why OPEN and OPENDIR stay in Python for ``session`` ("" if C may
    serve them: docs/compiled.md, "OPEN and OPENDIR in C"): C allocates the
    fh in the FileTable RELEASE in C frees, so it needs that first, and the
    reference OPEN and OPENDIR rows."""
    if why := release_unsupported(session):
        return why
    return fastmeta.not_reference(session, (Opcode.OPEN, files.do_open), (Opcode.OPENDIR, dirs.do_opendir))


def enable_open(fast, session, metered: bool) -> None:
    """``FastOps.enable_open`` (_open.h), after ``enable_release``."""
    ft, config = filetable, session.config
    dir_flags = abi.FOPEN_CACHE_DIR | abi.FOPEN_KEEP_CACHE \
        if config.cache is CacheMode.ALWAYS or config.cache is CacheMode.METADATA else 0
    fast.enable_open(add_handle, handles.OpenHandle,
                     (ft._H_GEN, ft._H_HIGH, ft._F_NODE, ft._F_FLAGS, ft._F_LOCK_OWNER),
                     files.host_open_flags(0xFFFFFFFF & ~os.O_ACCMODE, config.allow_direct_io,
                                           config.preserve_noatime) | os.O_ACCMODE,
                     config.writeback, files.fopen_flags(config.cache), dir_flags,
                     op_words(Opcode.OPEN) if metered else None, op_words(Opcode.OPENDIR) if metered else None)


def add_handle(session, fd: int, nodeid: int, kind: int, opened: int) -> int:
    """The compiled OPEN's, OPENDIR's and CREATE's ``HandleTable.add``
    when C's own allocation declines (the table's thread lock busy,
    DIRTY, full): the fh, or -errno (ENFILE when full; the fd is closed
    then)."""
    try:
        return session.handles.add(fd, nodeid, kind, opened).fh
    except FUSEError as e:
        return -e.errno
    except OSError as e:
        return -(e.errno or errno.EIO)
    except Exception:  # noqa: BLE001 - as FuseSession._handle: EIO, keep serving
        log.exception("FUSE OPEN, OPENDIR or CREATE (compiled, the fh) failed")
        return -errno.EIO


def create_unsupported(session) -> str:
    """Why CREATE stays in Python for ``session`` ("" if C may serve it:
    docs/compiled.md, "CREATE in C"). C's CREATE inserts the new inode as
    its LOOKUP does, so it needs that first."""
    if why := _new_entry_unsupported(session, (Opcode.CREATE, files.do_create)):
        return why
    if type(session.handles) is not handles.HandleTable:
        return "not the stock open-file table"
    return ""


def create_rest(session, parent_fd: int, name: bytes, fd: int, flags: int, open_flags: int,
                host_flags: int, opened: int) -> bytes | int:
    """The compiled CREATE's Python tail, for what its C declines once the
    file exists (C's chain is taken then: this answers): with ``fd`` (the
    new file, open with ``opened``), ``files.created`` (the lookup and the
    fh); with fd -1 (the name appeared between C's check and its O_EXCL
    create, and the guest did not ask for O_EXCL), ``files.open_existing``
    first, as ``_create_file`` does. The 144 reply bytes, or the errno
    ``FuseSession._handle`` would answer (C serves uid 0 only: the caller
    is root for ``files.kills``)."""
    try:
        path = os.fsdecode(name)
        if fd < 0:
            fd, opened = files.open_existing(parent_fd, path, host_flags, session.config.writeback,
                                             files.kills(0, flags, open_flags))
        return files.created(session, parent_fd, path, fd, opened)
    except FUSEError as e:
        return e.errno
    except OSError as e:
        return e.errno or errno.EIO
    except Exception:  # noqa: BLE001 - as FuseSession._handle: EIO, keep serving
        log.exception("FUSE CREATE (compiled, Python's tail) failed")
        return errno.EIO


def mkdir_unsupported(session) -> str:
    """Why MKDIR stays in Python for ``session`` ("" if C may serve it:
    docs/compiled.md, "MKDIR in C"). C's MKDIR inserts the new inode as its
    LOOKUP does, so it needs that first."""
    return _new_entry_unsupported(session, (Opcode.MKDIR, entries.do_mkdir))


def _new_entry_unsupported(session, row) -> str:
    """What keeps a compiled op that makes a new name (CREATE, MKDIR) in
    Python: its LOOKUP in Python (C inserts the new inode as its LOOKUP
    does), its op-table ``row`` not the reference, an option that changes
    how the entry is made."""
    if why := lookup_unsupported(session):
        return why
    if why := fastmeta.not_reference(session, row):
        return why
    config = session.config
    if config.posix_acl:
        return "--posix-acl (the guest's umask, default ACLs)"
    if config.security_label:
        return "--security-label"
    return ""


def mkdir_rest(session, parent_fd: int, name: bytes) -> bytes | int:
    """The compiled MKDIR's Python tail, for what its C lookup declines
    once the directory exists (C's chain is taken then: this answers):
    ``FuseSession.entry`` as ``do_mkdir`` ends. The 128 entry bytes, or
    the errno ``FuseSession._handle`` would answer."""
    try:
        return session.entry(parent_fd, os.fsdecode(name))
    except FUSEError as e:
        return e.errno
    except OSError as e:
        return e.errno or errno.EIO
    except Exception:  # noqa: BLE001 - as FuseSession._handle: EIO, keep serving
        log.exception("FUSE MKDIR (compiled, Python's tail) failed")
        return errno.EIO


def add_created(session, fd: int, nodeid: int, opened: int) -> int:
    """The compiled CREATE's ``HandleTable.add`` (which owns ``fd`` from
    here: the shared FileTable's slot, the keeper's copy) when C's own
    allocation declines: ``add_handle`` of a file."""
    return add_handle(session, fd, nodeid, handles.KIND_FILE, opened)


_MONOTONIC = "clock_gettime(CLOCK_MONOTONIC)"


def meter_layout(meter) -> dict:
    """FastOps's metrics arguments for ``meter``: its slot's words, the
    word indices of BYTES_READ, of GETATTR's and READ's counters and errno
    slot 0, of BYTES_WRITTEN and WRITE's, of LOOKUP's, and the latency bounds; {} if there is no meter or C cannot
    count as it does (its clock is not ``time.perf_counter_ns`` on
    CLOCK_MONOTONIC, or its words are not a slot of u64)."""
    if meter is None or not isinstance(meter, c.WorkerMeter) or meter.clock is not time.perf_counter_ns:
        return {}
    if time.get_clock_info("perf_counter").implementation != _MONOTONIC:
        return {}
    words = meter.words
    if not isinstance(words, memoryview) or words.format != "Q" or len(words) < c.SLOT_WORDS:
        return {}

    assert max(Opcode.GETATTR, Opcode.READ, Opcode.WRITE, Opcode.LOOKUP, Opcode.CREATE, Opcode.MKDIR, Opcode.FORGET,
               Opcode.BATCH_FORGET, Opcode.READDIRPLUS, Opcode.READDIR, Opcode.RELEASE, Opcode.OPEN, Opcode.OPENDIR,
               Opcode.READLINK, Opcode.STATFS, *fastmeta.OPS) < c.OPCODE_SLOTS
    layout = (c.BYTES_READ, c.ERRNO_SLOTS, *op_words(Opcode.GETATTR), *op_words(Opcode.READ),
              c.BYTES_WRITTEN, *op_words(Opcode.WRITE), *op_words(Opcode.LOOKUP))
    return {"meter": meter, "words": words, "layout": layout, "bounds": c.LATENCY_BUCKETS_NS}


def op_words(opcode: Opcode) -> tuple[int, int, int, int]:
    """Where ``opcode`` counts in a metrics slot: the word indices of its
    requests, latency sum, first latency bucket and errno slot 0."""
    base = c.OPS + int(opcode) * c.OP_WORDS
    return (base + c.OP_REQUESTS, base + c.OP_LATENCY_SUM, base + c.OP_BUCKETS,
            c.ERRORS + int(opcode) * c.ERRNO_SLOTS)


def _io_rows(session) -> tuple[bool, bool]:
    """Whether C serves READ and WRITE for ``session``: the op table's rows
    are the reference handlers (``--readonly`` replaces WRITE's)."""
    return (not fastmeta.not_reference(session, (Opcode.READ, files.do_read)),
            not fastmeta.not_reference(session, (Opcode.WRITE, files.do_write)))


def compiled_ops(session) -> str:
    """The ops ``make(session)`` serves in C, for the start-up line."""
    reads, writes = _io_rows(session)
    names = ["GETATTR"]
    if reads:
        names.append("READ")
    if writes:
        names.append("WRITE")
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def fast_ops(session):
    """The ``FastOps`` for ``session`` (see the module docstring), or None."""
    hiprio = session.role == "hiprio"
    # the hiprio worker's line says "hiprio ops:", the request workers' "FUSE ops:"
    said = "hiprio ops" if hiprio else "FUSE ops"
    why = why_not(session)
    if why:
        log.info("%s: all in Python (%s)", said, why)
        return None
    fast = make(session)
    counted = " (counted by C)" if session.meter is not None and meter_layout(session.meter) else ""
    if hiprio:
        loop = "batch loop in C" if batch_loop() else f"chains popped in Python, {FASTOPS_ENV}=2"
        log.info("hiprio ops: FORGET and BATCH_FORGET compiled (extension daemon.fuse._fastops; %s)%s; "
                 "INTERRUPT in Python", loop, counted)
        if session.meter is not None and not counted:
            log.info("hiprio ops: this meter is not C's to count for: its requests stay in Python")
        return fast
    loop = "batch loop in C" if batch_loop() else f"chains popped in Python, {FASTOPS_ENV}=2"
    if batch_loop():
        loop += ", wait loop in C" if wait_loop() else f", wait in Python, {FASTOPS_ENV}=3"
    why_lookup = lookup_unsupported(session)
    lookup = "LOOKUP compiled too" if not why_lookup else f"LOOKUP in Python ({why_lookup})"
    why_create = create_unsupported(session)
    create = "CREATE compiled too" if not why_create else f"CREATE in Python ({why_create})"
    why_mkdir = mkdir_unsupported(session)
    create += ", MKDIR compiled too" if not why_mkdir else f", MKDIR in Python ({why_mkdir})"
    why_plus = readdirplus_unsupported(session)
    plus = "READDIRPLUS compiled too" if not why_plus else f"READDIRPLUS in Python ({why_plus})"
    why_names = readdir_unsupported(session)
    names = "READDIR compiled too" if not why_names else f"READDIR in Python ({why_names})"
    meta = ", ".join([op.name for op in fastmeta.served(session)]
                     + ([] if release_unsupported(session) else ["RELEASE"])
                     + ([] if releasedir_unsupported(session) else ["RELEASEDIR"])
                     + ([] if open_unsupported(session) else ["OPEN", "OPENDIR"])
                     + ([] if setattr_unsupported(session) else ["SETATTR"])
                     + ([] if readlink_unsupported(session) else ["READLINK"])
                     + ([] if statfs_unsupported(session) else ["STATFS"])) or "none"
    enosys = ", ".join(op.name for op in enosys_opcodes(session)) if not enosys_unsupported(session) else "none"
    log.info("FUSE ops: %s compiled (extension daemon.fuse._fastops; %s)%s; %s; %s; %s; %s; metadata ops in C: %s; "
             "ENOSYS answered in C: %s", compiled_ops(session), loop, counted, lookup, create, plus, names, meta,
             enosys)
    if session.meter is not None and not counted:
        log.info("FUSE ops: this meter is not C's to count for: its requests stay in Python")
    # forgotten inodes' fds: closed on the C closer thread, not on the
    # Python helpers, whose GIL hand-offs cost wake-ups (_closer.h)
    session.close_with(_ext.close_later)
    return fast


def reap_watch(session) -> list[tuple[memoryview, int, int]]:
    """What ``FastOps.wait`` watches so that the worker loop's
    ``session.reap()`` is never owed while C waits (workers/loop.py):
    (shared u64 view, word index, the value this worker last saw) of the
    inode table's freed-ring cursor (``InodeCache.reap``) and of the file
    table's released count (``HandleTable.reap``). A word that moves makes
    the wait return, and the loop reaps."""
    watch = []
    cache, handles = session.cache, session.handles
    if cache is not None:
        watch.append((cache.table._hdr, inodes._H_RING_W, cache._cursor))
    if handles is not None:
        watch.append((handles.files._hdr, filetable._H_RELEASED, handles._released))
    return watch
