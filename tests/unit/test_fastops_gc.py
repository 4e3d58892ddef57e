"""FastOps (daemon/fuse/_fastops.c) and the cyclic garbage collector.

A FastOps holds its session, the inode table's two views and, with
--metrics-socket, the meter and a held buffer of the meter's words.
tp_traverse must report every one of them (else a cycle through the
missing one is never collected) and tp_clear must break them. The
session's fds are closed by ``end``/``close`` (DESTROY, worker exit),
never by the collector: a FastOps in a cycle with its session changes
nothing about when they close (the fuzz target's fd check relies on it).
"""

from __future__ import annotations

import gc
import os
import weakref

import pytest

from daemon.fuse import abi, credentials, dirs, fastpath, handles
from daemon.fuse.abi import Opcode
from daemon.metrics.counters import MetricsArea, WorkerMeter
from tests import procfs
from tests.unit.fusereq import entry_nodeid, start_session

pytestmark = pytest.mark.skipif(not fastpath.EXTENSION_BUILT, reason="needs daemon.fuse._fastops")


@pytest.fixture
def share(tmp_path):
    cwd = os.getcwd()
    os.chdir("/proc/self/fd")   # handlers reopen fds relative to it
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(b"x" * 100)
    yield tmp_path
    os.chdir(cwd)


def _open_some(client) -> None:
    """A few fds in the session: looked-up inodes and an open file."""
    nodeids = [entry_nodeid(client.call(Opcode.LOOKUP, 1, name + b"\0", abi.ENTRY_OUT.size).ok())
               for name in (b"a", b"b")]
    client.call(Opcode.OPEN, nodeids[0], abi.OPEN_IN.pack(os.O_RDONLY, 0), abi.OPEN_OUT.size).ok()


def test_traverse_reports_every_reference(share):
    """The session, both table views, the meter and, with LOOKUP in C, the
    table's index and thread lock, with CREATE in C its two Python helpers
    and the credentials' state, with MKDIR in C its Python helper and the
    credentials' state again, with READDIRPLUS in C its Python step and
    the DirStream type, with RELEASE in C the FileTable, its thread lock
    and header view (and both tables' TableLocks when they lock with
    them), with OPEN in C its Python helper and the OpenHandle
    type, with READLINK and STATFS in C their Python tails: what
    gc.get_referents (tp_traverse)
    lists (not the meter's words memoryview, whose buffer FastOps holds:
    nothing leads from it back to a FastOps, see fastops_traverse)."""
    session, _client = start_session(share)
    meter = WorkerMeter(MetricsArea(1).slot(0), fd_limit=1024)
    session.meter = meter
    try:
        fast = fastpath.make(session)
        held = gc.get_referents(fast)
        table = session.inodes
        files = session.handles.files
        assert not fastpath.lookup_unsupported(session)
        for name, obj in (("session", session), ("header", table._hdr), ("slots", table._q),
                          ("meter", meter), ("index", table._hash),
                          ("thread lock", table._tlock), ("create_rest", fastpath.create_rest),
                          ("add_created", fastpath.add_created), ("credentials", credentials._state),
                          ("mkdir_rest", fastpath.mkdir_rest),
                          ("plus_entry", dirs.plus_entry), ("DirStream", dirs.DirStream),
                          ("FileTable", files), ("its thread lock", files._tlock), ("its header", files._hdr),
                          ("add_handle", fastpath.add_handle), ("OpenHandle", handles.OpenHandle),
                          ("reply_too_big", fastpath.reply_too_big), ("statfs_rest", fastpath.statfs_rest)):
            assert any(r is obj for r in held), f"tp_traverse does not visit the {name}"
        # and each table's TableLock when the tables lock with it
        locks = [t._table_lock for t in (table, files) if t._lock_kind == "futex"]
        for lock in locks:
            assert any(r is lock for r in held), "tp_traverse does not visit a TableLock"
        assert len(held) == 20 + len(locks)
        assert sum(r is credentials._state for r in held) == 2     # CREATE's and MKDIR's
        # without a meter: the others only
        session.meter = None
        assert len(gc.get_referents(fastpath.make(session))) == 19 + len(locks)
    finally:
        session.meter = None
        session.close()
        session.inodes.close()


def test_a_fastops_in_a_cycle_with_its_session_is_collected(share):
    """session -> FastOps -> session (and the meter): unreachable, it is
    gone after one collection; the fds closed by ``close`` stay closed and
    the collection closes or opens none."""
    before = procfs.fd_count(os.getpid())
    session, client = start_session(share)
    _open_some(client)
    assert procfs.fd_count(os.getpid()) > before
    session.meter = WorkerMeter(MetricsArea(1).slot(0), fd_limit=1024)
    session.compiled_ops = fastpath.make(session)   # the cycle
    gone = weakref.ref(session)
    session.close()
    session.inodes.close()
    closed = procfs.settled_fd_count(os.getpid(), before, timeout=2.0)
    assert closed == before, "close left fds open"
    gc.disable()
    try:
        del session, client
        assert gone() is not None, "not a cycle: the test proves nothing"
        gc.collect()
        assert gone() is None, "a FastOps in a cycle with its session was not collected"
    finally:
        gc.enable()
    assert procfs.fd_count(os.getpid()) == before
