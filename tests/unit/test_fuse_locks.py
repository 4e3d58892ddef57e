"""Lock ops (daemon/fuse/locks.py) driven through FuseSession.handle."""

import errno
import fcntl
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from daemon.fuse import abi, credentials, locks
from daemon.fuse.abi import Opcode
from daemon.fuse.handles import KIND_FILE
from daemon.fuse.abi import OFFSET_MAX
from daemon.fuse.locks import F_RDLCK, F_UNLCK, F_WRLCK
from daemon.fuse.request import DEFERRED, MAX_DEFERRED, FUSEError, Request
from daemon.virtio.iovec import IoVec
from tests.unit.fusereq import module_handlers, start_session, without_cap

LOCK_OPS = module_handlers(locks)  # opcode -> handler (daemon/fuse/ops.py)

EOF = OFFSET_MAX  # what the kernel sends as `end` for "to end of file"


@pytest.fixture
def share(share):
    """The shared share fixture, with the file every test locks."""
    (share / "f").write_bytes(b"x" * 4096)
    os.chmod(share / "f", 0o666)
    return share


@pytest.fixture
def node(fuse):
    return fuse.lookup(1, "f")


def lk_args(fh, owner, start, end, lock_type, flock=False, pid=0):
    return abi.LK_IN.pack(fh, owner, start, end, lock_type, pid, abi.FUSE_LK_FLOCK if flock else 0)


def setlk(fuse, nodeid, fh, owner, start, end, lock_type, flock=False, wait=False, pid=0):
    op = Opcode.SETLKW if wait else Opcode.SETLK
    return fuse.submit(op, nodeid, lk_args(fh, owner, start, end, lock_type, flock, pid), 0)


def getlk(fuse, nodeid, fh, owner, start, end, lock_type):
    reply = fuse.call(Opcode.GETLK, nodeid, lk_args(fh, owner, start, end, lock_type), 24)
    return reply.error or abi.LK_OUT.unpack(reply.payload)


def host_conflict(path, lock_type, start, length):
    """What a host process taking an OFD lock on the file would run into."""
    credentials.restore()  # the session left the last caller's fsuid in place
    fd = os.open(path, os.O_RDONLY)  # F_OFD_GETLK needs no write access
    try:
        got = fcntl.fcntl(fd, locks.F_OFD_GETLK, locks.FLOCK.pack(lock_type, 0, start, length, 0))
        return locks.FLOCK.unpack(got)[0] != F_UNLCK
    finally:
        os.close(fd)


def test_two_owners_on_two_handles_exclude_each_other(fuse, share, node):
    a, _ = fuse.open(node, os.O_RDWR)
    b, _ = fuse.open(node, os.O_RDWR)
    assert setlk(fuse, node, a, 1, 0, 99, F_WRLCK, pid=101).reply().error == 0
    assert setlk(fuse, node, b, 2, 50, 60, F_WRLCK, pid=202).reply().error == errno.EAGAIN
    assert setlk(fuse, node, b, 2, 50, 60, F_RDLCK, pid=202).reply().error == errno.EAGAIN
    # GETLK names the guest process holding the conflicting lock
    assert getlk(fuse, node, b, 2, 50, 60, F_RDLCK) == (0, 99, F_WRLCK, 101)
    assert getlk(fuse, node, a, 1, 50, 60, F_WRLCK)[2] == F_UNLCK  # its own lock
    assert setlk(fuse, node, b, 2, 100, EOF, F_WRLCK, pid=202).reply().error == 0
    assert getlk(fuse, node, a, 1, 0, EOF, F_RDLCK) == (100, EOF, F_WRLCK, 202)
    # the host sees both locks
    assert host_conflict(share / "f", F_RDLCK, 10, 1)
    assert host_conflict(share / "f", F_RDLCK, 5000, 0)
    assert host_conflict(share / "f", F_RDLCK, 100, 0)
    # unlock in the middle: the rest stays
    assert setlk(fuse, node, a, 1, 0, 49, F_UNLCK).reply().error == 0
    assert not host_conflict(share / "f", F_WRLCK, 0, 50)
    assert host_conflict(share / "f", F_WRLCK, 50, 1)


def test_getlk_reports_pid_0_for_a_lock_held_on_the_host(fuse, share, node):
    fh, _ = fuse.open(node, os.O_RDWR)
    credentials.restore()
    host = os.open(share / "f", os.O_RDWR)
    try:
        fcntl.fcntl(host, locks.F_OFD_SETLK, locks.FLOCK.pack(F_WRLCK, 0, 0, 10, 0))
        assert getlk(fuse, node, fh, 1, 0, 0, F_RDLCK) == (0, 9, F_WRLCK, 0)
    finally:
        os.close(host)


def test_two_owners_sharing_one_handle_exclude_each_other(fuse, node):
    fh, _ = fuse.open(node, os.O_RDWR)  # a guest process forked after open
    assert setlk(fuse, node, fh, 1, 0, EOF, F_WRLCK).reply().error == 0
    assert setlk(fuse, node, fh, 2, 0, 0, F_RDLCK).reply().error == errno.EAGAIN
    assert getlk(fuse, node, fh, 2, 0, 0, F_RDLCK) == (0, EOF, F_WRLCK, 0)


def test_one_owner_on_two_handles_never_conflicts_and_close_releases_all(fuse, share, node):
    a, _ = fuse.open(node, os.O_RDWR)
    b, _ = fuse.open(node, os.O_RDONLY)
    assert setlk(fuse, node, a, 7, 0, 9, F_WRLCK).reply().error == 0
    assert setlk(fuse, node, b, 7, 5, 20, F_RDLCK).reply().error == 0  # merges/converts
    assert getlk(fuse, node, b, 7, 0, EOF, F_WRLCK)[2] == F_UNLCK
    assert host_conflict(share / "f", F_WRLCK, 15, 1)
    # POSIX: closing any fd of the file drops all the process's locks on it
    fuse.call(Opcode.FLUSH, node, abi.FLUSH_IN.pack(b, 7), 0).ok()
    assert not host_conflict(share / "f", F_WRLCK, 0, 0)
    # a FLUSH by another owner leaves them alone
    assert setlk(fuse, node, a, 7, 0, 9, F_WRLCK).reply().error == 0
    fuse.call(Opcode.FLUSH, node, abi.FLUSH_IN.pack(a, 8), 0).ok()
    assert host_conflict(share / "f", F_WRLCK, 0, 1)


def test_last_release_drops_every_lock_description(fuse, share, node):
    table = fuse.session.handles
    a, _ = fuse.open(node, os.O_RDWR)
    b, _ = fuse.open(node, os.O_RDWR)
    for owner in (1, 2, 3):
        assert setlk(fuse, node, a, owner, owner * 10, owner * 10 + 5, F_RDLCK).reply().error == 0
    assert table.host_fd_count == 5
    fuse.release(node, a).ok()
    assert table.host_fd_count == 4  # b still open: the owners keep their locks
    assert host_conflict(share / "f", F_WRLCK, 10, 1)
    fuse.release(node, b).ok()
    assert table.host_fd_count == 0
    assert not host_conflict(share / "f", F_WRLCK, 0, 0)


def test_setlkw_is_deferred_then_granted_after_unlock(fuse, share, node):
    session = fuse.session
    a, _ = fuse.open(node, os.O_RDWR)
    b, _ = fuse.open(node, os.O_RDWR)
    assert setlk(fuse, node, a, 1, 0, EOF, F_WRLCK).reply().error == 0
    waiting = setlk(fuse, node, b, 2, 0, 10, F_WRLCK, wait=True)
    assert waiting.reply() is None and session.has_pending()
    assert session.retry() == []
    assert waiting.reply() is None
    # other requests still flow while it waits
    assert fuse.read(node, b, 0, 4).ok() == b"xxxx"
    assert setlk(fuse, node, a, 1, 0, EOF, F_UNLCK).reply().error == 0
    done = session.retry()
    assert [token for token, _ in done] == [waiting.unique]
    assert waiting.reply().error == 0
    assert not session.has_pending()
    assert getlk(fuse, node, a, 1, 5, 5, F_RDLCK) == (0, 10, F_WRLCK, 0)


def test_setlkw_granted_at_once_when_free(fuse, node):
    fh, _ = fuse.open(node, os.O_RDWR)
    assert setlk(fuse, node, fh, 1, 0, 0, F_WRLCK, wait=True).reply().error == 0
    assert not fuse.session.has_pending()


def test_setlkw_on_a_released_handle_ends_with_ebadf_and_cancel_is_eintr(fuse, node):
    session = fuse.session
    a, _ = fuse.open(node, os.O_RDWR)
    b, _ = fuse.open(node, os.O_RDWR)
    c, _ = fuse.open(node, os.O_RDWR)
    assert setlk(fuse, node, a, 1, 0, EOF, F_WRLCK).reply().error == 0
    on_b = setlk(fuse, node, b, 2, 0, 0, F_RDLCK, wait=True)
    on_c = setlk(fuse, node, c, 3, 0, 0, F_RDLCK, wait=True)
    fuse.release(node, b).ok()
    assert [t for t, _ in session.retry()] == [on_b.unique]
    assert on_b.reply().error == errno.EBADF
    assert [t for t, _ in session.cancel_all()] == [on_c.unique]
    assert on_c.reply().error == errno.EINTR


def test_flock_belongs_to_the_open_file(fuse, node):
    a, _ = fuse.open(node, os.O_RDONLY)
    b, _ = fuse.open(node, os.O_RDONLY)
    assert setlk(fuse, node, a, 1, 0, EOF, F_WRLCK, flock=True).reply().error == 0
    # another process sharing the same open file: same lock, no conflict
    assert setlk(fuse, node, a, 2, 0, EOF, F_WRLCK, flock=True).reply().error == 0
    assert setlk(fuse, node, b, 3, 0, EOF, F_RDLCK, flock=True).reply().error == errno.EAGAIN
    waiting = setlk(fuse, node, b, 3, 0, EOF, F_RDLCK, flock=True, wait=True)
    assert waiting.reply() is None
    # flock and POSIX locks are independent
    assert setlk(fuse, node, b, 3, 0, EOF, F_RDLCK).reply().error == 0
    fuse.release(node, a, release_flags=abi.FUSE_RELEASE_FLOCK_UNLOCK, owner=1).ok()
    fuse.session.retry()
    assert waiting.reply().error == 0
    # GETLK is for POSIX locks only
    reply = fuse.call(Opcode.GETLK, node, lk_args(b, 3, 0, EOF, F_WRLCK, flock=True), 24)
    assert reply.error == errno.EINVAL


def test_ranges_and_types_are_validated(fuse, node):
    fh, _ = fuse.open(node, os.O_RDWR)
    assert setlk(fuse, node, fh, 1, 10, 9, F_WRLCK).reply().error == errno.EINVAL
    assert setlk(fuse, node, fh, 1, 1 << 63, EOF, F_WRLCK).reply().error == errno.EINVAL
    assert setlk(fuse, node, fh, 1, 0, 0, 3).reply().error == errno.EINVAL
    assert getlk(fuse, node, fh, 1, 0, 0, F_UNLCK) == errno.EINVAL
    assert setlk(fuse, node, fh + 50, 1, 0, 0, F_WRLCK).reply().error == errno.EBADF
    # 2^64 - 1 means to end of file as well
    assert setlk(fuse, node, fh, 1, 4, (1 << 64) - 1, F_WRLCK).reply().error == 0
    other, _ = fuse.open(node, os.O_RDWR)
    assert getlk(fuse, node, other, 2, 0, EOF, F_WRLCK) == (4, EOF, F_WRLCK, 0)
    # unlocking what an owner never locked is fine and opens nothing
    count = fuse.session.handles.host_fd_count
    assert setlk(fuse, node, other, 9, 0, EOF, F_UNLCK).reply().error == 0
    assert fuse.session.handles.host_fd_count == count


def test_read_only_caller_still_gets_read_locks(fuse, share, node):
    os.chmod(share / "f", 0o444)
    fuse.uid = fuse.gid = 1000  # may not open it for writing
    fh, _ = fuse.open(node, os.O_RDONLY)
    assert setlk(fuse, node, fh, 1, 0, EOF, F_RDLCK).reply().error == 0
    assert host_conflict(share / "f", F_WRLCK, 0, 1)


def test_read_only_description_refuses_a_write_lock(share):
    """Without CAP_DAC_OVERRIDE (--modcaps=-dac_override) the lock
    description of a file nobody may write is read-only: a write lock is
    the host's EBADF (the guest never sends one for a read-only fd)."""
    os.chmod(share / "f", 0o444)
    session, fuse = start_session(share)
    try:
        fuse.uid = fuse.gid = 1000
        node = fuse.lookup(1, "f")
        fh, _ = fuse.open(node, os.O_RDONLY)
        with without_cap(1):  # CAP_DAC_OVERRIDE
            assert setlk(fuse, node, fh, 1, 0, EOF, F_RDLCK).reply().error == 0
            assert setlk(fuse, node, fh, 1, 0, EOF, F_WRLCK).reply().error == errno.EBADF
    finally:
        session.close()
        session.inodes.close()


def test_lock_descriptions_count_against_the_open_file_bound(share, monkeypatch):
    session, fuse = start_session(share, max_open_files=2)
    try:
        node = fuse.lookup(1, "f")
        fh, _ = fuse.open(node, os.O_RDWR)
        assert setlk(fuse, node, fh, 1, 0, 0, F_RDLCK).reply().error == 0
        assert setlk(fuse, node, fh, 2, 1, 1, F_RDLCK).reply().error == errno.ENFILE
        fuse.call(Opcode.FLUSH, node, abi.FLUSH_IN.pack(fh, 1), 0).ok()
        assert setlk(fuse, node, fh, 2, 1, 1, F_RDLCK).reply().error == 0
    finally:
        session.close()
        session.inodes.close()


# -- hostile arguments ----------------------------------------------------------------------

@pytest.fixture
def direct(fuse, node):
    return fuse.session, {"fh": fuse.open(node, os.O_RDWR)[0], "node": node}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=st.sampled_from([Opcode.GETLK, Opcode.SETLK]), args=st.binary(max_size=56),
       use_fh=st.booleans(), lock_type=st.integers(0, 3), flags=st.integers(0, 3))
def test_decoders_raise_only_fuse_errors(direct, op, args, use_fh, lock_type, flags):
    session, state = direct
    if use_fh and len(args) >= 48:
        args = (state["fh"].to_bytes(8, "little") + args[8:32] + lock_type.to_bytes(4, "little")
                + args[36:40] + flags.to_bytes(4, "little") + args[44:])
    out = IoVec([memoryview(bytearray(16 + 24))])
    req = Request(op, 1, state["node"], 0, 0, 0, args, None, out)
    try:
        result = LOCK_OPS[op](session, req)
    except (FUSEError, OSError):
        return
    assert result is not DEFERRED
    if op == Opcode.GETLK:
        start, end, lock_type, pid = abi.LK_OUT.unpack(result)
        assert start <= end <= OFFSET_MAX and lock_type in (F_RDLCK, F_WRLCK, F_UNLCK)
    session.handles.get(state["fh"], KIND_FILE)


def test_setlkw_beyond_max_deferred_waiters_is_enolck(fuse, node):
    """Every waiting SETLKW has a slot in the worker's restart record
    (progress.py); one more that would wait is refused, not left out."""
    session = fuse.session
    holder, _ = fuse.open(node, os.O_RDWR)
    assert setlk(fuse, node, holder, 1, 0, EOF, F_WRLCK).reply().error == 0
    waiters = []
    for owner in range(2, 2 + MAX_DEFERRED):
        fh, _ = fuse.open(node, os.O_RDWR)
        waiting = setlk(fuse, node, fh, owner, 0, 0, F_RDLCK, wait=True)
        assert waiting.reply() is None
        waiters.append(waiting)
    assert not session.can_defer()
    extra, _ = fuse.open(node, os.O_RDWR)
    assert setlk(fuse, node, extra, 999, 0, 0, F_RDLCK, wait=True).reply().error == errno.ENOLCK
    # one that is granted at once needs no slot
    assert setlk(fuse, node, extra, 999, 0, 0, F_UNLCK, wait=True).reply().error == 0
    # FSYNC past the cap runs at once instead of on a helper thread
    assert fuse.call(Opcode.FSYNC, node, abi.FSYNC_IN.pack(extra, 0), 0).error == 0
    assert setlk(fuse, node, holder, 1, 0, EOF, F_UNLCK).reply().error == 0
    done = session.retry()
    assert sorted(token for token, _ in done) == sorted(w.unique for w in waiters)
    assert all(w.reply().error == 0 for w in waiters)
    assert session.can_defer()
    assert setlk(fuse, node, extra, 999, 0, EOF, F_WRLCK, wait=True).reply() is None


def test_setlkw_waiting_across_destroy_is_answered_eintr_not_lost(fuse, node):
    """A DESTROY (or another worker's INIT) ends the session under a
    waiting SETLKW: the request still owns its chain, so it is answered
    (EINTR, collected by the next retry) rather than dropped unanswered."""
    session = fuse.session
    a, _ = fuse.open(node, os.O_RDWR)
    b, _ = fuse.open(node, os.O_RDWR)
    assert setlk(fuse, node, a, 1, 0, EOF, F_WRLCK).reply().error == 0
    waiting = setlk(fuse, node, b, 2, 0, 0, F_WRLCK, wait=True)
    assert waiting.reply() is None
    assert fuse.call(Opcode.DESTROY, 0, b"", 0).error == 0
    assert session.has_pending()
    assert [t for t, _ in session.retry()] == [waiting.unique]
    assert waiting.reply().error == errno.EINTR
    assert not session.has_pending()
