"""RELEASEDIR on the confined request worker (default sandbox and seccomp),
served in C unless PYVIRTIOFSD_PURE=1 or PYVIRTIOFSD_FASTOPS=0
(docs/compiled.md, "RELEASEDIR in C"; the worker's start-up line names it
among the ops in C): OPENDIR, READDIRPLUS and READDIR part of the way or
to the end, RELEASEDIR through the vhost-user frontend; each directory
fd closed (the worker's fd count back where it was, but for the looked-up
entries' O_PATH fds), a released fh EBADF for READDIR and for RELEASEDIR,
the metrics socket counting every RELEASEDIR under its opcode."""

from __future__ import annotations

import errno
import os

import pytest

from tests.frontend.fuse_client import FuseErrorReply
from tests.frontend.test_frontend_worker_loop import fuse_ops, ours_only, worker_pid  # noqa: F401 - ours_only: autouse
from tests.metrics_client import sample, scrape
from tests.procfs import fd_count, settled_fd_count

ROOT = 1
METRICS = f"/tmp/pyvirtiofsd-test-releasedir-{os.getpid()}.sock"


@pytest.mark.frontend_opts(extra_args=("--metrics-socket", METRICS))
def test_releasedirs_through_the_confined_worker(frontend):
    shared = frontend.shared_dir
    (shared / "d").mkdir()
    for i in range(200):
        (shared / "d" / f"f{i:03d}").write_bytes(b"x")
    d = frontend.lookup(ROOT, "d").nodeid
    worker = worker_pid(frontend, "request-1")
    fds = fd_count(worker)
    # a partial names-only listing, a whole one, one never read, two on the root
    fh_part, fh_all, fh_none = (frontend.opendir(d).fh for _ in range(3))
    fh_roots = [frontend.opendir(ROOT).fh for _ in range(2)]
    assert len({fh_part, fh_all, fh_none, *fh_roots}) == 5
    assert fd_count(worker) == fds + 5
    assert frontend.readdir(d, fh_part, 0, 512)
    looked_up = sum(1 for r in frontend.readdirplus(ROOT, fh_roots[0], 0, 4096) if r.entry.nodeid)
    names, off = [], 0
    while recs := frontend.readdir(d, fh_all, off, 4096):
        names += [r.name for r in recs]
        off = recs[-1].off
    assert len(names) == 202
    fds = fd_count(worker)
    released = [(d, fh_part), (d, fh_all), (d, fh_none), (ROOT, fh_roots[0]), (ROOT, fh_roots[1])]
    for nodeid, fh in released:
        frontend.releasedir(nodeid, fh)
    assert settled_fd_count(worker, fds - 5, timeout=2.0) == fds - 5     # every directory fd closed
    for nodeid, fh in released[:2]:
        with pytest.raises(FuseErrorReply) as e:
            frontend.readdir(nodeid, fh, 0, 4096)
        assert e.value.errno == errno.EBADF
        with pytest.raises(FuseErrorReply) as e:
            frontend.releasedir(nodeid, fh)
        assert e.value.errno == errno.EBADF
    assert fd_count(worker) == fds - 5
    assert looked_up >= 1       # "d" (the root's other names: ".", "..")
    s = scrape(METRICS)
    w = {"worker": "request-1"}
    assert sample(s, "pyvirtiofsd_requests_total", op="RELEASEDIR", **w) == 7
    assert sample(s, "pyvirtiofsd_request_duration_seconds_count", op="RELEASEDIR", **w) == 7
    ops, compiled = fuse_ops(frontend)
    assert ops and ("RELEASE, RELEASEDIR" if compiled else "all in Python") in ops[0], ops
