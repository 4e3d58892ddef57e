"""FORGET and BATCH_FORGET on the confined hiprio worker (vring 0: no share
root, its own tighter seccomp policy), served in C unless
PYVIRTIOFSD_PURE=1 or PYVIRTIOFSD_FASTOPS=0 (docs/compiled.md, "FORGET in
C"; the hiprio worker's start-up line says which): bursts of them free the
nodeids they should and no other, the request worker closes its O_PATH fds
of the freed inodes afterwards, and the metrics count them under their
opcodes on the hiprio worker."""

from __future__ import annotations

import errno
import os

import pytest

from tests.frontend.fuse_client import FuseErrorReply
from tests.frontend.test_frontend_worker_loop import ours_only, worker_pid  # noqa: F401 - ours_only: autouse
from tests.procfs import settled_fd_count, steady_fd_count

ROOT = 1
FILES = 40


def _compiled() -> bool:
    return (os.environ.get("PYVIRTIOFSD_PURE", "") in ("", "0")
            and os.environ.get("PYVIRTIOFSD_FASTOPS") != "0")


def _estale(frontend, nodeid: int) -> bool:
    try:
        frontend.getattr(nodeid)
    except FuseErrorReply as e:
        assert e.errno == errno.ESTALE
        return True
    return False


def _requests(path: str, op: str) -> float:
    from tests.metrics_client import scrape
    return sum(v for (name, labels), v in scrape(path).items()
               if name.endswith("requests_total") and dict(labels).get("worker") == "hiprio"
               and dict(labels).get("op") == op)


def _forget_bursts(frontend) -> tuple[list[int], list[int]]:
    """FILES names looked up twice each (two counts), a FORGET burst and
    a BATCH_FORGET burst queued without waiting; returns (the freed
    nodeids, the kept ones). Every reply waited for at the end."""
    shared = frontend.shared_dir
    for i in range(FILES):
        (shared / f"f{i}").write_bytes(b"x")
    nodeids = [frontend.lookup(ROOT, f"f{i}").nodeid for i in range(FILES)]
    assert [frontend.lookup(ROOT, f"f{i}").nodeid for i in range(FILES)] == nodeids
    assert len(set(nodeids)) == FILES
    half = FILES // 2
    pending = [frontend.forget(n, 1, wait=False) for n in nodeids]           # all still known
    pending += [frontend.forget(n, 1, wait=False) for n in nodeids[:half // 2]]  # freed
    pending.append(frontend.batch_forget([(n, 1) for n in nodeids[half // 2:half]] + [(ROOT, 1), (0, 5),
                                                                                       (1 << 40, 1)],
                                         wait=False))
    for p in pending:
        frontend.complete(p)
    return nodeids[:half], nodeids[half:]


def test_forget_bursts_free_the_nodeids_and_the_request_worker_closes_their_fds(frontend):
    worker = worker_pid(frontend, "request-1")
    base = steady_fd_count(worker)
    freed, kept = _forget_bursts(frontend)
    # every freed inode's O_PATH fd closed by the request worker at its next
    # wake-up (its reap after a batch, or its wait loop's watch on the freed
    # ring), the kept ones still held
    frontend.getattr(ROOT)
    assert settled_fd_count(worker, base + len(kept), timeout=10.0) == base + len(kept)
    assert all(_estale(frontend, n) for n in freed)
    assert not any(_estale(frontend, n) for n in kept)
    # a freed name is looked up again as a new inode (C's first LOOKUP)
    again = frontend.lookup(ROOT, "f0").nodeid
    frontend.getattr(again)
    frontend.batch_forget([(n, 1) for n in kept] + [(again, 1)])
    frontend.getattr(ROOT)
    assert settled_fd_count(worker, base, timeout=10.0) == base
    lines = [ln for ln in frontend.daemon.log().splitlines() if "hiprio ops: " in ln]
    want = "FORGET and BATCH_FORGET compiled" if _compiled() else "all in Python"
    assert len(lines) == 1 and want in lines[0], lines


@pytest.fixture
def metrics_path(tmp_path_factory):
    return str(tmp_path_factory.mktemp("metrics") / "m.sock")


@pytest.fixture
def metered_frontend(daemon_factory, daemon_kind, shared_dir, metrics_path):
    from tests.frontend.fuse_client import FuseClient
    from tests.frontend.vhost import start_frontend
    from pathlib import Path
    d = daemon_factory(daemon_kind, shared_dir, cache="auto", extra_args=("--metrics-socket", metrics_path))
    fe = start_frontend(d.socket_path, ram_size=128 << 20, num_request_queues=1, queue_size=128)
    fe.daemon = d
    fc = FuseClient(fe)
    fc.daemon, fc.kind, fc.shared_dir = d, d.kind, Path(shared_dir)
    fc.init()
    yield fc
    fe.close()


def test_forgets_are_counted_under_their_opcodes(metered_frontend, metrics_path):
    frontend = metered_frontend
    before = _requests(metrics_path, "FORGET"), _requests(metrics_path, "BATCH_FORGET")
    freed, kept = _forget_bursts(frontend)
    assert _requests(metrics_path, "FORGET") - before[0] == FILES + FILES // 4
    assert _requests(metrics_path, "BATCH_FORGET") - before[1] == 1
    assert all(_estale(frontend, n) for n in freed)
    lines = [ln for ln in frontend.daemon.log().splitlines() if "hiprio ops: " in ln]
    assert len(lines) == 1, lines
    if _compiled():
        assert "FORGET and BATCH_FORGET compiled" in lines[0] and "(counted by C)" in lines[0], lines
    else:
        assert "all in Python" in lines[0], lines
