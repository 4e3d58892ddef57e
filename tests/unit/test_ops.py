"""The op table (daemon/fuse/ops.py): complete, and what it says is what the
session, the hiprio role, --readonly and the restart path do."""

from __future__ import annotations

import errno

import pytest

from daemon.config import Config
from daemon.fuse import abi, ops
from daemon.fuse.abi import Opcode
from daemon.fuse.inodes import InodeTable
from daemon.fuse.session import FuseSession
from daemon.virtio.iovec import IoVec
from daemon.workers import progress
from tests.unit.fusereq import NUL, chain, in_header, parse_reply

CREATING = {Opcode.MKNOD, Opcode.MKDIR, Opcode.SYMLINK, Opcode.CREATE}


@pytest.fixture
def env(fuse, share):
    """(session, client, share) after INIT (conftest.py)."""
    return fuse.session, fuse, share


def test_every_opcode_has_a_row_or_is_enosys_on_purpose():
    rows = set(ops.TABLE)
    enosys = {int(op) for op in ops.ENOSYS}
    assert rows.isdisjoint(enosys)
    assert rows | enosys == {int(op) for op in Opcode}
    assert all(reason for reason in ops.ENOSYS.values())


def test_rows_are_keyed_by_their_opcode_and_have_documented_handlers():
    for op, row in ops.TABLE.items():
        assert op == row.opcode and type(op) is int
        assert row.handler.__name__ == f"do_{row.opcode.name.lower()}"
        assert row.handler.__doc__, row.opcode.name  # says its replies and lookup-count effects


def test_a_doubled_row_is_refused():
    row = ops.TABLE[int(Opcode.GETATTR)]
    with pytest.raises(AssertionError, match="GETATTR has two rows"):
        ops._index((row, row))


def test_enosys_opcodes_are_answered_enosys(env):
    _fs, client, _ = env
    for op in ops.ENOSYS:
        assert client.call(op, 1, bytes(64)).error == errno.ENOSYS, op.name


def test_the_columns():
    assert ops.HIPRIO == {Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT}
    assert ops.NO_REPLY == {Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT}
    assert ops.AS_CALLER == CREATING
    assert {op for op, row in ops.TABLE.items() if row.too_big == errno.ERANGE} \
        == {Opcode.GETXATTR, Opcode.LISTXATTR}
    assert ops.too_big(Opcode.GETXATTR) == errno.ERANGE
    assert ops.too_big(Opcode.STATFS) == ops.too_big(250) == errno.EIO
    assert ops.TABLE[Opcode.CREATE].reply == abi.ENTRY_OUT.size + abi.OPEN_OUT.size
    assert ops.TABLE[Opcode.GETATTR].reply == abi.ATTR_OUT.size
    assert ops.TABLE[Opcode.READ].reply == 0  # variable size
    assert ops.name(Opcode.LOOKUP) == "LOOKUP" and ops.name(250) == "250"


def test_in_structs_are_what_the_handlers_need(env):
    """Each row's in-struct with one byte missing: the op is refused EINVAL
    (or, for the lenient ones, not run at all / answered as without it),
    and with the whole struct the handler gets past decoding."""
    fs, client, _ = env
    lenient = {Opcode.GETATTR, Opcode.SYNCFS}
    for op, row in ops.TABLE.items():
        if row.in_struct is None or op in lenient or row.no_reply:
            continue
        reply = client.send(op, 1, bytes(row.in_struct.size - 1), 4096)
        assert reply is not None and reply.error == errno.EINVAL, row.opcode.name


def test_reply_minimums_are_checked_before_the_handler_runs(env, monkeypatch):
    fs, client, _ = env
    ran = []
    for op, row in ops.TABLE.items():
        if not row.reply:
            continue
        monkeypatch.setitem(fs._ops, op, lambda fs_, req: ran.append(req.opcode) or b"")
        assert client.call(op, 1, bytes(64), row.reply - 1).error == errno.EIO, row.opcode.name
        assert client.call(op, 1, bytes(64), row.reply).error == 0, row.opcode.name
    assert len(ran) == len([row for row in ops.TABLE.values() if row.reply])


def test_only_rows_marked_as_caller_get_the_callers_credentials(env, monkeypatch):
    fs, client, _ = env
    seen = {}

    def handler(fs_, req):
        try:
            with fs_.as_caller(req):
                seen[req.opcode] = True
        except RuntimeError:
            seen[req.opcode] = False
            raise
        return b""

    for op in ops.TABLE:
        if op in (Opcode.INIT, Opcode.DESTROY):
            continue
        monkeypatch.setitem(fs._ops, op, handler)
        client.send(op, 1, bytes(64), 4096)
    assert {op for op, ok in seen.items() if ok} == CREATING
    assert client.call(Opcode.SETATTR, 1, bytes(88), 4096).error == errno.EIO  # refused: a bug


def test_the_hiprio_role_runs_only_hiprio_rows(tmp_path):
    table = InodeTable(16)
    hiprio = FuseSession(Config(shared_dir=str(tmp_path)), table, "hiprio")
    try:
        assert set(hiprio._ops) == ops.HIPRIO
        readable, writable, out = chain(in_header(Opcode.GETATTR, 1, 16, 7) + bytes(16), 104)
        assert hiprio.handle(readable, writable, None) == 0  # dropped, unanswered
        assert bytes(out) == bytes(len(out))
    finally:
        hiprio.close()
        table.close()


def test_no_reply_rows_agree_with_the_restart_path(env):
    """What the session leaves unanswered, a dead worker's successor leaves
    unanswered too (progress.fail_chain); everything else it answers EIO."""
    fs, _client, _ = env
    for op, row in ops.TABLE.items():
        args = bytes(row.in_struct.size if row.in_struct else 0)
        request = in_header(op, 1, len(args), 9) + args
        readable, writable, out = chain(request, 4096)
        failed = progress.fail_chain(_Chain(readable, writable))
        if row.no_reply:
            assert failed == 0 and bytes(out) == bytes(len(out)), row.opcode.name
            # the session answers none of them either, even with room
            readable, writable, out = chain(request, 4096)
            assert fs.handle(readable, writable, None) == 0, row.opcode.name
        else:
            assert failed == abi.OUT_HEADER.size, row.opcode.name
            assert parse_reply(out, 9).error == errno.EIO


def test_no_reply_rows_run_without_a_writable_part(env):
    fs, client, share = env
    (share / "f").write_bytes(b"")
    nodeid = client.lookup(1, "f")
    assert fs.inodes.get(nodeid) is not None
    request = in_header(Opcode.FORGET, nodeid, 8, 5) + abi.FORGET_IN.pack(1)
    readable = IoVec([memoryview(bytearray(request))])
    assert fs.handle(readable, IoVec([]), None) == 0
    assert fs.inodes.get(nodeid) is None  # it ran
    # any other op arriving like that is dropped unexecuted
    request = in_header(Opcode.MKDIR, 1, 8 + 2, 6) + abi.MKDIR_IN.pack(0o755, 0) + b"d" + NUL
    assert fs.handle(IoVec([memoryview(bytearray(request))]), IoVec([]), None) == 0
    assert not (share / "d").exists()


def test_readonly_refuses_exactly_the_modifying_rows(connect):
    client = connect(readonly=True)
    refused = set()
    for op, row in ops.TABLE.items():
        if op not in (Opcode.INIT, Opcode.DESTROY) and not row.no_reply:
            if client.call(op, 1, bytes(128), 4096).error == errno.EROFS:
                refused.add(op)
    assert refused == ops.MODIFYING
    assert Opcode.WRITE in refused and Opcode.READ not in refused


class _Chain:
    def __init__(self, readable, writable):
        self.readable, self.writable = readable, writable
