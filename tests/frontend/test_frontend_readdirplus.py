"""READDIRPLUS on the confined request worker (default sandbox and
seccomp), served in C unless PYVIRTIOFSD_PURE=1 or PYVIRTIOFSD_FASTOPS=0
(docs/compiled.md, "READDIRPLUS in C"; the worker's start-up line says
so): OPENDIR + READDIRPLUS chains list every name once with its lookup
(lseek, getdents64, newfstatat, openat, fstat pass the filter), a second
listing gives the same nodeids, FORGETs of both counts free them, and
the metrics socket counts every READDIRPLUS under its opcode."""

from __future__ import annotations

import errno
import os

import pytest

from tests.frontend.fuse_client import FuseErrorReply
from tests.frontend.test_frontend_worker_loop import ours_only, worker_pid  # noqa: F401 - ours_only: autouse
from tests.metrics_client import sample, scrape
from tests.procfs import fd_count

ROOT = 1
METRICS = f"/tmp/pyvirtiofsd-test-readdirplus-{os.getpid()}.sock"
FILES = 300


def _listing(frontend, nodeid: int, size: int) -> tuple[list, int]:
    """OPENDIR, READDIRPLUS of ``size`` until an empty reply, RELEASEDIR:
    (the records, the READDIRPLUS requests sent)."""
    fh = frontend.opendir(nodeid).fh
    out, off, calls = [], 0, 0
    try:
        while True:
            recs = frontend.readdirplus(nodeid, fh, off, size)
            calls += 1
            if not recs:
                return out, calls
            out += recs
            off = recs[-1].off
    finally:
        frontend.releasedir(nodeid, fh)


@pytest.mark.frontend_opts(extra_args=("--metrics-socket", METRICS))
def test_readdirplus_chains_list_every_name_once_and_are_counted(frontend):
    shared = frontend.shared_dir
    names = {f"file-{i:04d}-" + "n" * (i % 40) for i in range(FILES)}
    for n in names:
        (shared / n).write_bytes(b"x" * (len(n) % 7))
    (shared / "sub").mkdir()
    (shared / "ln").symlink_to("sub")
    os.mkfifo(shared / "fifo")
    everything = names | {"sub", "ln", "fifo"}
    worker = worker_pid(frontend, "request-1")
    fds = fd_count(worker)
    first, calls1 = _listing(frontend, ROOT, 4096)
    second, calls2 = _listing(frontend, ROOT, 1000)
    for listing in (first, second):
        got = [r.name.decode() for r in listing if r.name not in (b".", b"..")]
        assert sorted(got) == sorted(everything)
        for r in listing:
            if r.name in (b".", b".."):
                assert r.entry.nodeid == 0
                continue
            st = os.lstat(shared / r.name.decode())
            assert r.entry.nodeid > 1 and r.entry.attr.ino == st.st_ino == r.ino
            assert r.entry.attr.mode == st.st_mode and r.entry.attr.size == st.st_size
    assert {r.name: r.entry.nodeid for r in first} == {r.name: r.entry.nodeid for r in second}
    # the worker keeps one O_PATH fd per inode looked up, and nothing else
    assert fd_count(worker) == fds + len(everything)
    # two counts each: the second FORGET frees the nodeid (ESTALE after it)
    probe = next(r.entry.nodeid for r in first if r.name == b"sub")
    frontend.getattr(probe)
    frontend.forget(probe, 2)       # complete: the hiprio worker has taken both counts off
    with pytest.raises(FuseErrorReply) as e:
        frontend.getattr(probe)
    assert e.value.errno == errno.ESTALE
    frontend.forget(next(r.entry.nodeid for r in first if r.name == b"fifo"), 1)
    frontend.getattr(next(r.entry.nodeid for r in first if r.name == b"fifo"))     # one count left
    s = scrape(METRICS)
    w = {"worker": "request-1"}
    assert sample(s, "pyvirtiofsd_requests_total", op="READDIRPLUS", **w) == calls1 + calls2
    assert sample(s, "pyvirtiofsd_request_duration_seconds_count", op="READDIRPLUS", **w) == calls1 + calls2
    assert sample(s, "pyvirtiofsd_requests_total", op="OPENDIR", **w) == 2
    pure = os.environ.get("PYVIRTIOFSD_PURE", "") not in ("", "0") or os.environ.get("PYVIRTIOFSD_FASTOPS") == "0"
    ops = [ln for ln in frontend.daemon.log().splitlines() if "FUSE ops: " in ln]
    assert ops and ("all in Python" if pure else "READDIRPLUS compiled too") in ops[0], ops


def test_readdirplus_errors_and_a_released_handle(frontend):
    (frontend.shared_dir / "d").mkdir()
    d = frontend.lookup(ROOT, "d").nodeid
    fh = frontend.opendir(d).fh
    recs = frontend.readdirplus(d, fh, 0, 4096)
    assert sorted(r.name for r in recs) == [b".", b".."]
    assert frontend.readdirplus(d, fh, recs[-1].off, 4096) == []
    frontend.releasedir(d, fh)
    with pytest.raises(FuseErrorReply) as e:
        frontend.readdirplus(d, fh, 0, 4096)
    assert e.value.errno == errno.EBADF
