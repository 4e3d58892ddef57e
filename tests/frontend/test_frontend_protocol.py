"""vhost-user level behaviour, driven as QEMU 7.2 drives a backend.

Run with ``--daemon=c`` to see the baseline (QEMU 7.2's C virtiofsd).
"""

from __future__ import annotations

import os

import pytest

from daemon.fuse.abi import Opcode
from tests.frontend.fuse_client import FuseClient
from tests.frontend.vhost import (F_PROTOCOL_FEATURES, F_RING_INDIRECT_DESC, F_VERSION_1, PF,
                                  QEMU_PROTOCOL_FEATURE_MASK, Req, VhostUserError,
                                  VhostUserFrontend)

NO_MEM_SLOTS = QEMU_PROTOCOL_FEATURE_MASK & ~PF.CONFIGURE_MEM_SLOTS


def connect(daemon, **kw) -> VhostUserFrontend:
    return VhostUserFrontend(daemon.socket_path, **kw)


@pytest.fixture
def fresh(daemon_proc):
    """A connected but not yet negotiated frontend."""
    fe = connect(daemon_proc)
    fe.daemon = daemon_proc
    yield fe
    fe.close()


@pytest.mark.parametrize("mem_path", ["set_mem_table", "add_mem_reg"])
def test_negotiation_sequence(fresh, mem_path):
    fe = fresh
    if mem_path == "set_mem_table":
        fe.protocol_mask = NO_MEM_SLOTS
    fe.realize()
    assert fe.features & F_VERSION_1, "vhost-user-fs-pci is modern-only: VERSION_1 is required"
    assert fe.features & F_PROTOCOL_FEATURES
    assert fe.offered_protocol_features & PF.REPLY_ACK
    if fe.protocol_features & PF.MQ:
        assert fe.queue_num >= fe.nvqs
    if mem_path == "add_mem_reg" and not fe.protocol_features & PF.CONFIGURE_MEM_SLOTS:
        pytest.skip("backend does not offer CONFIGURE_MEM_SLOTS (QEMU then uses SET_MEM_TABLE)")
    if fe.max_mem_slots is not None:
        assert fe.max_mem_slots >= 2
    # nothing unsolicited after the realize block (an extra reply would
    # desynchronise QEMU: it would read it as the answer to a later request)
    assert fe.no_reply_pending()
    fe.start()
    assert fe.no_reply_pending()
    names = [n for n, _, _ in fe.sent]
    start = names.index("SET_FEATURES")
    assert names[start - fe.nvqs:start] == ["SET_VRING_CALL"] * fe.nvqs
    fc = FuseClient(fe)
    io = fc.init()
    assert io.major == 7
    assert fc.getattr(1).attr.nlink >= 2
    bases = fe.stop()
    assert bases == [0, 2]
    assert fe.no_reply_pending()


def test_features_without_indirect(fresh):
    """A driver that does not ack INDIRECT_DESC sends direct chains."""
    fe = fresh
    fe.driver_features = F_VERSION_1
    fe.realize()
    fe.start()
    assert not fe.acked_features & F_RING_INDIRECT_DESC
    fc = FuseClient(fe)
    fc.init()
    assert fc.statfs().namelen > 0
    e, o = fc.create(1, "direct")
    assert fc.write(e.nodeid, o.fh, 0, b"d" * 9000) == 9000
    assert fc.read(e.nodeid, o.fh, 0, 9000) == b"d" * 9000


def test_get_vring_base_counts_consumed(frontend):
    fe = frontend.vhost
    for _ in range(7):
        frontend.getattr(1)
    os.mkdir(os.path.join(frontend.shared_dir, "x"))
    e = frontend.lookup(1, "x")
    frontend.forget(e.nodeid, 1)
    frontend.lookup(1, "x")
    frontend.forget(e.nodeid, 1)
    frontend.lookup(1, "x")
    frontend.batch_forget([(e.nodeid, 1)])
    # vring 1: INIT + 7 GETATTR + 3 LOOKUP; vring 0: 2 FORGET + 1 BATCH_FORGET
    assert fe.stop() == [3, 11]


def test_stop_and_restart_keeps_serving(frontend):
    """VM pause/resume: stop (GET_VRING_BASE) and the DRIVER_OK block again
    with SET_VRING_BASE = the returned bases; the guest's rings are kept."""
    fe = frontend.vhost
    frontend.getattr(1)
    assert fe.stop() == [0, 2]
    fe.start()
    for _ in range(3):
        frontend.getattr(1)
    assert fe.stop() == [0, 5]
    fe.start()
    e, o = frontend.create(1, "after-restart")
    assert frontend.write(e.nodeid, o.fh, 0, b"ok") == 2
    assert fe.stop() == [0, 7]


def test_requests_queued_while_stopped_run_after_restart(frontend):
    fe = frontend.vhost
    frontend.getattr(1)
    fe.stop()
    p = frontend.send(Opcode.GETATTR, 1, bytes(16), [104])  # kicked while stopped
    with pytest.raises(TimeoutError):
        p.vring.wait(p.head, 0.3)
    fe.start()  # the backend must re-scan the avail ring once enabled
    assert frontend.complete(p, timeout=5).error == 0


@pytest.mark.frontend_opts(protocol_mask=NO_MEM_SLOTS)
def test_second_set_mem_table_while_running(frontend):
    """QEMU may resend SET_MEM_TABLE while the rings run (memory hot-plug).
    Same table again, then one more region, then a READ into the new region."""
    fe = frontend.vhost
    assert not fe.protocol_features & PF.CONFIGURE_MEM_SLOTS
    frontend.getattr(1)
    fe.set_mem_table()  # unchanged table, new fds
    assert frontend.getattr(1).attr.nlink >= 2
    data = os.urandom(20000)
    with open(os.path.join(frontend.shared_dir, "f"), "wb") as f:
        f.write(data)
    new = fe.mem.add_region(0x1_0000_0000, 16 << 20)
    fe.set_mem_table()
    rq = frontend.rq
    rq.buffer_region = new.gpa
    e = frontend.lookup(1, "f")
    fh = frontend.open(e.nodeid).fh
    p = frontend.send_read(e.nodeid, fh, 0, 20000)
    assert rq.inflight[p.head].writable[0][0] >= new.gpa  # really in the new region
    r = frontend.complete(p)
    assert r.error == 0 and r.payload == data
    rq.buffer_region = None
    assert fe.stop() == [0, 6]


def test_add_mem_reg_while_running(frontend):
    fe = frontend.vhost
    if not fe.protocol_features & PF.CONFIGURE_MEM_SLOTS:
        pytest.skip("CONFIGURE_MEM_SLOTS not negotiated: covered by the SET_MEM_TABLE test")
    new = fe.mem.add_region(0x1_0000_0000, 16 << 20)
    fe.set_mem_table()  # -> ADD_MEM_REG for the new region only
    assert fe.sent[-1][0] == "ADD_MEM_REG"
    frontend.rq.buffer_region = new.gpa
    assert frontend.getattr(1).attr.nlink >= 2


def test_set_vring_call_several_times(frontend):
    """Every SET_VRING_CALL replaces the call fd: the latest one must be signalled."""
    fe = frontend.vhost
    rq = frontend.rq
    for _ in range(3):
        old = rq.call_fd
        rq.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fe.set_vring_call(rq.index, rq.call_fd)
        assert frontend.getattr(1).attr.nlink >= 2  # fails if only the old fd is signalled
        os.close(old)
    # and the hiprio queue too
    hq = frontend.hq
    old = hq.call_fd
    hq.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    fe.set_vring_call(0, hq.call_fd)
    os.close(old)
    e = frontend.mkdir(1, "d")
    frontend.forget(e.nodeid, 1)


def test_unsolicited_reply_never_sent_for_no_reply_messages(frontend):
    fe = frontend.vhost
    fe.set_vring_call(1, frontend.rq.call_fd)
    fe.set_vring_enable(1, True)
    # (not SET_FEATURES: QEMU 7.2 sends it only in vhost_dev_start, while the
    # rings are stopped)
    assert fe.no_reply_pending(0.2)
    assert frontend.getattr(1).attr.nlink >= 2


def test_need_reply_is_acked(frontend):
    """REPLY_ACK negotiated: a message with NEED_REPLY gets flags 0x5, u64 0."""
    fe = frontend.vhost
    assert fe.reply_ack
    fe._set(Req.SET_VRING_CALL, (1).to_bytes(8, "little"), [frontend.rq.call_fd], need_reply=True)
    assert frontend.getattr(1).attr.nlink >= 2


def test_clean_disconnect_exits(vhost, daemon_proc):
    vhost.stop()
    vhost.disconnect()
    rc = daemon_proc.wait(10)
    assert rc is not None, "daemon still running 10 s after the front-end disconnected"
    if daemon_proc.kind == "c":
        # QEMU 7.2's C virtiofsd: virtio_loop sees POLLHUP ("Unexpected poll
        # revents"), leaves its loop and main() returns 0.
        assert rc == 0
    else:
        assert rc == 0


def test_disconnect_while_running_exits(vhost, daemon_proc):
    """QEMU killed without stopping the rings: the daemon must still exit."""
    vhost.disconnect()
    rc = daemon_proc.wait(10)
    assert rc is not None, "daemon still running 10 s after the front-end vanished"
    assert rc == 0


def test_two_request_queues(daemon_proc):
    """num-request-queues=2: Linux 6.1 uses only vring 1, but vring 2 must work too."""
    fe = connect(daemon_proc, num_request_queues=2)
    try:
        fe.realize()
        if fe.queue_num is not None and fe.queue_num < 3:
            pytest.skip(f"backend supports only {fe.queue_num} queues")
        fe.start()
        fc1 = FuseClient(fe, request_queue=1)
        fc1.init()
        fc2 = FuseClient(fe, request_queue=2)
        fc2._unique = 1000
        assert fc2.getattr(1).attr.nlink >= 2
        assert fc1.getattr(1).attr.nlink >= 2
        assert fe.stop() == [0, 2, 1]
    finally:
        fe.close()


def test_unknown_message_id_is_ignored(frontend):
    """An unknown message id without NEED_REPLY is ignored (docs/protocol.md, "Transport and framing");
    the daemon keeps serving."""
    fe = frontend.vhost
    fe.send_raw(200, b"\0" * 8)
    if frontend.kind == "c":
        # Known difference: libvhost-user in QEMU 7.2's C virtiofsd panics on
        # an unhandled request ("fv_panic: libvhost-user: Unhandled request:
        # 200"): it hangs up and exits 1.
        with pytest.raises(VhostUserError):
            fe.recv_reply(5)
        assert frontend.daemon.wait(5) == 1
        return
    assert fe.no_reply_pending(0.2)
    assert frontend.daemon.proc.poll() is None, "daemon exited on an unknown message id"
    assert frontend.getattr(1).attr.nlink >= 2


def test_unknown_message_id_with_need_reply_is_nacked(frontend):
    fe = frontend.vhost
    fe.send_raw(200, b"\0" * 8, flags=0x9)
    if frontend.kind == "c":
        # Known difference: C virtiofsd panics and exits (see above).
        with pytest.raises(VhostUserError):
            fe.recv_reply(5)
        return
    r = fe.recv_reply(5)
    assert (r.request, r.flags, len(r.payload)) == (200, 0x5, 8)
    assert int.from_bytes(r.payload, "little") != 0
    assert frontend.getattr(1).attr.nlink >= 2
