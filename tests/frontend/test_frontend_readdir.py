"""Plain READDIR on the confined request worker (default sandbox and
seccomp), served in C unless PYVIRTIOFSD_PURE=1 or PYVIRTIOFSD_FASTOPS=0
(docs/compiled.md, "READDIR in C"; the worker's start-up line says so):
a names-only listing as a Linux guest with READDIRPLUS_AUTO sends it
(READDIRPLUS for the first buffer, READDIR after, on one handle) lists
every name once with its ino and type (lseek and getdents64 pass the
filter), takes no lookup count and no fd for the READDIR part, a bad fh
is EBADF, and the metrics socket counts every READDIR under its
opcode."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from tests.frontend.fuse_client import FuseErrorReply
from tests.frontend.test_frontend_worker_loop import ours_only, worker_pid  # noqa: F401 - ours_only: autouse
from tests.metrics_client import sample, scrape
from tests.procfs import fd_count

ROOT = 1
METRICS = f"/tmp/pyvirtiofsd-test-readdir-{os.getpid()}.sock"
FILES = 400


@pytest.mark.frontend_opts(extra_args=("--metrics-socket", METRICS))
def test_names_only_listings_are_readdir_after_the_first_buffer(frontend):
    shared = frontend.shared_dir
    names = {f"file-{i:04d}-" + "n" * (i % 60) for i in range(FILES)}
    for n in names:
        (shared / n).touch()
    (shared / "sub").mkdir()
    (shared / "ln").symlink_to("sub")
    os.mkfifo(shared / "fifo")
    everything = names | {"sub", "ln", "fifo"}
    worker = worker_pid(frontend, "request-1")
    fh = frontend.opendir(ROOT).fh
    fds = fd_count(worker)
    first = frontend.readdirplus(ROOT, fh, 0, 4096)
    looked_up = [r for r in first if r.entry.nodeid]
    assert fd_count(worker) == fds + len(looked_up)
    fds = fd_count(worker)
    listing, off, calls = [(r.name, r.ino, r.type) for r in first], first[-1].off, 0
    while recs := frontend.readdir(ROOT, fh, off, 4096):
        calls += 1
        listing += [(r.name, r.ino, r.type) for r in recs]
        off = recs[-1].off
    calls += 1
    assert fd_count(worker) == fds      # READDIR opens nothing
    frontend.releasedir(ROOT, fh)
    assert calls > 3
    got = sorted(n.decode() for n, _, _ in listing if n not in (b".", b".."))
    assert got == sorted(everything)
    for name, ino, typ in listing:
        st = os.lstat(shared / name.decode())
        assert ino == st.st_ino and typ == stat.S_IFMT(st.st_mode) >> 12
    s = scrape(METRICS)
    w = {"worker": "request-1"}
    assert sample(s, "pyvirtiofsd_requests_total", op="READDIR", **w) == calls
    assert sample(s, "pyvirtiofsd_request_duration_seconds_count", op="READDIR", **w) == calls
    assert sample(s, "pyvirtiofsd_requests_total", op="READDIRPLUS", **w) == 1
    pure = os.environ.get("PYVIRTIOFSD_PURE", "") not in ("", "0") or os.environ.get("PYVIRTIOFSD_FASTOPS") == "0"
    ops = [ln for ln in frontend.daemon.log().splitlines() if "FUSE ops: " in ln]
    assert ops and ("all in Python" if pure else "READDIR compiled too") in ops[0], ops


def test_readdir_of_an_empty_directory_and_a_released_handle(frontend):
    (frontend.shared_dir / "d").mkdir()
    d = frontend.lookup(ROOT, "d").nodeid
    fh = frontend.opendir(d).fh
    recs = frontend.readdir(d, fh, 0, 4096)
    assert sorted(r.name for r in recs) == [b".", b".."]
    assert frontend.readdir(d, fh, recs[-1].off, 4096) == []
    assert [r.name for r in frontend.readdir(d, fh, 0, 40)] == [recs[0].name]
    frontend.releasedir(d, fh)
    with pytest.raises(FuseErrorReply) as e:
        frontend.readdir(d, fh, 0, 4096)
    assert e.value.errno == errno.EBADF
