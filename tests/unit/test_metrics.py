"""daemon/metrics: the worker's counters, their exposition, the socket.

The counters are driven through a real ``FuseSession`` (tests/unit/fusereq.py)
and the exposition is read back with prometheus_client's own parser."""

from __future__ import annotations

import errno
import os
import socket

import pytest
from hypothesis import given, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from daemon.config import CacheMode
from daemon.fuse import abi
from daemon.fuse.abi import Opcode
from daemon.metrics import counters as c, exposition
from daemon.metrics.server import MAX_CLIENTS, MetricsError, MetricsServer
from tests.procfs import fd_count
from tests.unit.fusereq import chain, in_header


def scrape_text(area, **kw) -> dict:
    """{(name, frozenset(labels)): value} of a rendered exposition."""
    args = dict(uptime_s=1.5, inodes=3, inode_capacity=100, restarts={}, live={1: 42})
    args.update(kw)
    text = exposition.render(area, **args).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0)


@pytest.fixture
def metered(connect):
    """A session counting into slot 1 of a fresh area: (client, area)."""
    area = c.MetricsArea(2)
    client = connect(cache=CacheMode.NEVER)
    client.session.meter = c.WorkerMeter(area.slot(1), fd_limit=1234)
    return client, area


def test_a_guest_s_work_is_what_the_exposition_says(metered):
    client, area = metered
    data = b"x" * 5000
    for i in range(3):
        nodeid, fh = client.create(1, f"f{i}")
        client.write(nodeid, fh, 0, data).ok()
        assert client.read(nodeid, fh, 0, 8192).ok() == data
        client.release(nodeid, fh)
    for i in range(4):
        assert client.call(Opcode.LOOKUP, 1, b"missing%d\0" % i).error == errno.ENOENT
    client.session.meter.batch(7, client.session)
    s = scrape_text(area)
    w = {"worker": "request-1"}
    assert value(s, "pyvirtiofsd_requests_total", op="CREATE", **w) == 3
    assert value(s, "pyvirtiofsd_requests_total", op="WRITE", **w) == 3
    assert value(s, "pyvirtiofsd_requests_total", op="LOOKUP", **w) == 4
    assert value(s, "pyvirtiofsd_errors_total", op="LOOKUP", errno="ENOENT", **w) == 4
    assert value(s, "pyvirtiofsd_errors_total", op="CREATE", errno="ENOENT", **w) == 0
    assert value(s, "pyvirtiofsd_written_bytes_total", **w) == 3 * len(data)
    assert value(s, "pyvirtiofsd_read_bytes_total", **w) == 3 * len(data)
    assert value(s, "pyvirtiofsd_request_duration_seconds_count", op="READ", **w) == 3
    assert value(s, "pyvirtiofsd_request_duration_seconds_bucket", op="READ", le="+Inf", **w) == 3
    assert 0 < value(s, "pyvirtiofsd_request_duration_seconds_sum", op="READ", **w) < 3
    assert value(s, "pyvirtiofsd_queue_batch_size_bucket", le="8.0", **w) == 1
    assert value(s, "pyvirtiofsd_queue_batch_size_bucket", le="4.0", **w) == 0
    assert value(s, "pyvirtiofsd_queue_batch_size_max", **w) == 7
    assert value(s, "pyvirtiofsd_queue_polls_total", outcome="found", **w) == 0
    assert value(s, "pyvirtiofsd_fd_limit", **w) == 1234
    assert value(s, "pyvirtiofsd_inode_fds", **w) == 3      # the three files' O_PATH fds
    assert value(s, "pyvirtiofsd_open_files", **w) == 0     # all released
    assert value(s, "pyvirtiofsd_worker_up", **w) == 1
    assert value(s, "pyvirtiofsd_inodes") == 3
    # the hiprio slot (0) never started and its vring has no live worker
    assert not [k for k in s if ("worker", "hiprio") in k[1]]


def test_histograms_are_cumulative_and_latency_lands_in_its_bucket():
    area = c.MetricsArea(1)
    meter = c.WorkerMeter(area.slot(0), clock=iter([0, 30_000, 0, 2_000_000]).__next__)
    req, out, buf = chain(in_header(Opcode.GETATTR, 1, 0, 1), 0)
    for _ in range(2):
        start = meter.clock()
        abi.OUT_HEADER.pack_into(buf, 0, 16, 0, 1)
        meter.request(req, out, 16, meter.clock() - start)
    s = scrape_text(area, live={0: 1})
    w = {"worker": "hiprio", "op": "GETATTR"}
    b = "pyvirtiofsd_request_duration_seconds_bucket"
    assert value(s, b, le="2.5e-05", **w) == 0
    assert value(s, b, le="5e-05", **w) == 1      # 30 us
    assert value(s, b, le="0.001", **w) == 1
    assert value(s, b, le="0.0025", **w) == 2     # 2 ms
    assert value(s, b, le="+Inf", **w) == 2
    assert value(s, "pyvirtiofsd_request_duration_seconds_sum", **w) == pytest.approx(0.00203)


@given(opcode=st.integers(0, 2**32 - 1), error=st.integers(-2**31, 2**31 - 1),
       split=st.integers(0, 40), written=st.sampled_from([None, 0, 8, 16, 24, 4096]))
def test_any_header_counts_somewhere_and_never_raises(opcode, error, split, written):
    """Whatever the guest put in the headers, one request is counted in a
    bounded slot (opcodes and errnos out of range go to OTHER)."""
    area = c.MetricsArea(1)
    meter = c.WorkerMeter(area.slot(0))
    req, out, buf = chain(in_header(opcode, 1, 0, 1), 4096, split_at=(split,))
    abi.OUT_HEADER.pack_into(buf, 0, 16, error, 1)
    meter.request(req, out, written, 5)
    words = area.slot(0)
    op = opcode if opcode < c.OPCODE_SLOTS else 0
    assert words[c.OPS + op * c.OP_WORDS + c.OP_REQUESTS] == 1
    errors = sum(words[c.ERRORS:c.SLOT_WORDS].tolist())
    assert errors == (1 if written is not None and written >= 16 and error != 0 else 0)
    scrape_text(area, live={0: 1})    # and it renders


def test_a_deferred_request_counts_its_error_when_answered():
    area = c.MetricsArea(1)
    meter = c.WorkerMeter(area.slot(0))
    req, out, buf = chain(in_header(Opcode.SETLKW, 1, 0, 1), 0)
    meter.request(req, out, None, 0)
    abi.OUT_HEADER.pack_into(buf, 0, 16, -errno.EINTR, 1)
    meter.completed(out, 16)
    s = scrape_text(area, live={0: 1})
    assert value(s, "pyvirtiofsd_requests_total", worker="hiprio", op="SETLKW") == 1
    assert value(s, "pyvirtiofsd_errors_total", worker="hiprio", op="OTHER", errno="EINTR") == 1


def test_restart_reasons_are_labels_escaped():
    area = c.MetricsArea(2)
    s = scrape_text(area, restarts={(1, 'SIGSYS'): 2, (1, 'odd "reason"\n'): 1}, live={})
    assert value(s, "pyvirtiofsd_worker_restarts_total", worker="request-1", reason="SIGSYS") == 2
    assert value(s, "pyvirtiofsd_worker_restarts_total", worker="request-1", reason='odd "reason"\n') == 1


# -- the socket -------------------------------------------------------------------

def read_all(path) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def serve_until_done(server, rounds=200):
    import select
    for _ in range(rounds):
        poller = select.poll()
        poller.register(server.fileno(), select.POLLIN)
        for fd in server.clients:
            poller.register(fd, select.POLLOUT)
        for fd, _ in poller.poll(10):
            if fd == server.fileno():
                server.accept()
            else:
                server.writable(fd)
        server.expire()


def test_socket_answers_and_closes(tmp_path):
    path = tmp_path / "m.sock"
    server = MetricsServer(str(path), lambda: b"a 1\n")
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        import threading
        got = []
        t = threading.Thread(target=lambda: got.append(read_all(path)))
        t.start()
        serve_until_done(server, 50)
        t.join(5)
        assert got == [b"a 1\n"]
        assert not server.clients
    finally:
        server.close()
    assert not path.exists()


def test_clients_that_never_read_cost_a_bounded_time_and_number(tmp_path):
    path = tmp_path / "m.sock"
    now = [0.0]
    big = b"#" * (8 << 20)             # far more than a socket buffer holds
    server = MetricsServer(str(path), lambda: big, clock=lambda: now[0])
    before = fd_count(os.getpid())
    idle = []
    try:
        for _ in range(MAX_CLIENTS + 3):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(path))
            idle.append(s)
            server.accept()
        assert len(server.clients) == MAX_CLIENTS   # the rest closed at accept
        for fd in list(server.clients):
            server.writable(fd)                     # never blocks: the buffer is full
        assert len(server.clients) == MAX_CLIENTS
        now[0] = 5.0                                # DEADLINE later
        server.expire()
        assert not server.clients
        assert fd_count(os.getpid()) == before + len(idle)
    finally:
        for s in idle:
            s.close()
        server.close()


def test_a_path_that_cannot_be_bound_is_one_error(tmp_path):
    with pytest.raises(MetricsError, match="--metrics-socket"):
        MetricsServer(str(tmp_path / "no" / "dir.sock"), lambda: b"")
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(MetricsError):
        MetricsServer(str(plain), lambda: b"")


def test_daemon_refuses_a_metrics_path_that_is_not_its_own(tmp_path):
    import subprocess
    import sys
    share = tmp_path / "share"
    share.mkdir()
    taken = tmp_path / "taken"
    taken.write_text("someone's file")
    r = subprocess.run([sys.executable, "-m", "daemon", "--socket-path", str(tmp_path / "v.sock"),
                        "--shared-dir", str(share), "--metrics-socket", str(taken)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"pyvirtiofsd: error: socket path {taken} exists and is not a socket"]
    assert taken.read_text() == "someone's file"
    assert not (tmp_path / "v.sock").exists()


def test_polling_counters_are_exposed():
    area = c.MetricsArea(2)
    w = area.slot(1)
    w[c.STARTS] = 1
    w[c.POLL_FOUND], w[c.POLL_MISSED], w[c.POLL_NS] = 41, 3, 2_500_000_000
    s = scrape_text(area)
    wl = {"worker": "request-1"}
    assert value(s, "pyvirtiofsd_queue_polls_total", outcome="found", **wl) == 41
    assert value(s, "pyvirtiofsd_queue_polls_total", outcome="missed", **wl) == 3
    assert value(s, "pyvirtiofsd_queue_poll_seconds_total", **wl) == 2.5
