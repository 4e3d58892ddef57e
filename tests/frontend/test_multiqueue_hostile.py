"""Several request queues, driven the way a hostile or confused guest (or
QEMU) could: out-of-order INITs, a queue stopped under load, more queues
than offered. A clear error each time; no crash, no hang, no fd leak."""

from __future__ import annotations

import errno

import pytest

from daemon.fuse import abi
from daemon.fuse.abi import Opcode
from tests.frontend.fuse_client import FuseClient, FuseErrorReply, reply_errno
from tests.frontend.test_multiqueue import _fds, clients, settled_fds
from tests.frontend.vhost import VhostUserFrontend


def _frontend(d, queues: int) -> VhostUserFrontend:
    fe = VhostUserFrontend(d.socket_path, ram_size=64 << 20, num_request_queues=queues)
    fe.realize()
    fe.start()
    return fe


@pytest.fixture
def daemon(daemon_factory, shared_dir):
    return daemon_factory("ours", shared_dir)


def test_requests_before_init_on_another_queue(daemon):
    fe = _frontend(daemon, 2)
    try:
        q1, q2 = clients(fe)
        # no session yet: every queue answers EIO, nothing is opened
        assert reply_errno(q2.getattr, 1) == errno.EIO
        assert reply_errno(q2.lookup, 1, "x") == errno.EIO
        q1.init()
        assert q2.getattr(1).attr.nlink >= 2
        # DESTROY on queue 2 ends the session for queue 1 as well
        q2.destroy()
        assert reply_errno(q1.getattr, 1) == errno.EIO
        q2.init()
        assert q1.getattr(1).attr.nlink >= 2
    finally:
        fe.close()


@pytest.fixture
def session(daemon):
    """(frontend, queue 1 client, queue 2 client) after INIT on queue 1."""
    fe = _frontend(daemon, 2)
    q1, q2 = clients(fe)
    q1.init()
    q2.getattr(1)
    yield fe, q1, q2
    fe.close()


def test_second_init_on_another_queue_starts_a_new_session(daemon, session, shared_dir):
    _fe, q1, q2 = session
    baseline = _fds(daemon)
    (shared_dir / "f").write_bytes(b"data")
    node = q1.lookup(1, "f").nodeid
    fh = q1.open(node).fh
    dfh = q1.opendir(1).fh
    assert q2.read(node, fh, 0, 4) == b"data"
    q2.init()                 # a new session: the old one's names are gone
    assert reply_errno(q1.read, node, fh, 0, 4) == errno.EBADF
    assert reply_errno(q2.read, node, fh, 0, 4) == errno.EBADF
    assert reply_errno(q1.readdir, 1, dfh, 0) == errno.EBADF
    assert reply_errno(q1.getattr, node) == errno.ESTALE
    node2 = q1.lookup(1, "f").nodeid
    assert q2.getattr(node2).attr.size == 4
    q1.forget(node2, 1)
    # a new session drops the old one's copies: a worker may end with fewer
    # fds than before the old session's files were opened, never more
    after = settled_fds(daemon, q1, q2, baseline, at_most=True)
    assert after.keys() == baseline.keys(), after
    assert all(n <= baseline[k] for k, n in after.items()), ("fds of the old session stayed open", after)


def test_queue_stopped_and_restarted_while_the_other_runs(session, shared_dir):
    fe, q1, q2 = session
    (shared_dir / "s").write_bytes(b"stopped")
    node = q2.lookup(1, "s").nodeid
    fh = q2.open(node).fh
    fe.set_vring_enable(2, False)         # the supervisor stops request-2's ring
    fe.get_features()                     # a round trip: the stop is done
    used = q2.rq.used_idx()
    waiting = q2.send(Opcode.GETATTR, node, abi.GETATTR_IN.pack(0, 0, 0), [abi.ATTR_OUT.size])
    for _ in range(20):                   # queue 1 serves on, even what queue 2 opened
        assert q1.read(node, fh, 0, 7) == b"stopped"
    assert q2.rq.used_idx() == used, "a stopped queue was served"
    fe.set_vring_enable(2, True)
    reply = q2.complete(waiting)
    assert reply.error == 0
    assert q2.read(node, fh, 0, 4) == b"stop"
    q1.release(node, fh)


def test_more_queues_than_offered(daemon_factory, shared_dir):
    """QEMU refuses a device whose num-request-queues exceeds what the
    backend offers (GET_QUEUE_NUM) and hangs up: one clear line says why."""
    d = daemon_factory("ours", shared_dir, extra_args=("--request-queues", "1"))
    fe = VhostUserFrontend(d.socket_path, ram_size=64 << 20, num_request_queues=2)
    fe.features = fe.get_features()
    fe.offered_protocol_features = fe.get_protocol_features()
    fe.set_protocol_features(fe.offered_protocol_features & 0x8009)
    assert fe.get_queue_num() == 2            # hiprio + 1 request queue
    fe.close()                                # what QEMU does next
    assert d.wait(10) == 0
    log = d.log()
    assert "QEMU disconnected right after asking how many queues we offer " \
           "(1 request queues, --request-queues)" in log, log[-2000:]


def test_vring_beyond_the_offered_queues_is_not_served(daemon_factory, shared_dir):
    """A frontend that starts more rings than offered anyway: the extra one
    is left alone (logged), the others serve, nothing crashes."""
    d = daemon_factory("ours", shared_dir, extra_args=("--request-queues", "1"))
    fe = _frontend(d, 2)
    try:
        q1, q2 = FuseClient(fe, request_queue=1), FuseClient(fe, request_queue=2, timeout=0.5)
        q2._unique = 1 << 40
        q1.init()
        with pytest.raises((FuseErrorReply, TimeoutError)):
            q2.getattr(1)
        assert q1.getattr(1).attr.nlink >= 2
        assert d.proc.poll() is None
        assert "vring 2 has no worker (at most 1 request queues, see --request-queues)" in d.log()
    finally:
        fe.close()
