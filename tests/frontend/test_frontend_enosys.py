"""The opcodes the op table answers ENOSYS (ops.ENOSYS: IOCTL, POLL,
ACCESS, ...) on the confined request worker, answered in C unless
PYVIRTIOFSD_PURE=1 or PYVIRTIOFSD_FASTOPS=0 (docs/compiled.md, "READLINK,
STATFS and ENOSYS in C"; the start-up line lists them): ENOSYS for each,
with its args, none or a request extension; a NOTIFY_REPLY without a
writable part dropped (Python's, logged); the worker still serving; the
metrics socket counting each under its opcode and ENOSYS; and the same
in a fresh worker whose LOOKUP, CREATE, OPEN, WRITE, GETXATTR and SETATTR
are Python's."""

from __future__ import annotations

import errno
import os

import pytest

from daemon.fuse import abi, ops
from daemon.fuse.abi import Opcode
from tests.frontend.fuse_client import FuseErrorReply
from tests.frontend.test_frontend_worker_loop import fuse_ops, ours_only, worker_pid  # noqa: F401 - ours_only: autouse
from tests.metrics_client import scrape

ROOT = 1
METRICS = f"/tmp/pyvirtiofsd-test-enosys-{os.getpid()}.sock"
ARGS = {Opcode.ACCESS: abi.ACCESS_IN.pack(os.R_OK), Opcode.IOCTL: bytes(32), Opcode.POLL: bytes(24),
        Opcode.TMPFILE: bytes(16) + b"t\0"}
NAMES = "ACCESS, BMAP, IOCTL, POLL, NOTIFY_REPLY, SETUPMAPPING, REMOVEMAPPING, TMPFILE"


def _all_enosys(frontend) -> int:
    """Each ENOSYS opcode three ways (its args, none, an extension): the
    requests sent."""
    sent = 0
    for op in sorted(ops.ENOSYS):
        for args, ext in ((ARGS.get(op, bytes(16)), b""), (b"", b""), (bytes(8), bytes(8))):
            with pytest.raises(FuseErrorReply) as e:
                frontend.call(op, ROOT, args, [16], ext=ext)
            assert e.value.errno == errno.ENOSYS, op.name
            sent += 1
    return sent


@pytest.mark.frontend_opts(extra_args=("--metrics-socket", METRICS))
def test_enosys_through_the_confined_worker(frontend):
    worker = worker_pid(frontend, "request-1")
    sent = _all_enosys(frontend)
    head = frontend.send_raw([frontend.header(Opcode.NOTIFY_REPLY, 0, 16, 77) + bytes(16)], [])
    assert frontend.raw_reply(head)[0] == 0         # no room for a reply: dropped
    assert frontend.getattr(ROOT).attr.nlink >= 2
    assert worker_pid(frontend, "request-1") == worker
    s = scrape(METRICS)
    w = {"worker": "request-1"}
    for op in ops.ENOSYS:
        labels = {"op": op.name, **w}
        want = 3 + (op == Opcode.NOTIFY_REPLY)
        assert s.get(("pyvirtiofsd_requests_total", frozenset(labels.items())), 0) == want, op.name
        assert s.get(("pyvirtiofsd_errors_total", frozenset({**labels, "errno": "ENOSYS"}.items())), 0) == 3, op.name
    assert sent == 3 * len(ops.ENOSYS)
    fuse, compiled = fuse_ops(frontend)
    assert len(fuse) == 1 and (f"ENOSYS answered in C: {NAMES}" if compiled else "all in Python") in fuse[0], fuse
    assert "FUSE NOTIFY_REPLY without room for a reply: dropped" in frontend.daemon.log()


@pytest.mark.frontend_opts(extra_args=("--readonly", "--announce-submounts", "--no-xattr"))
def test_enosys_in_c_in_a_worker_whose_siblings_are_python(frontend):
    worker = worker_pid(frontend, "request-1")
    _all_enosys(frontend)
    assert frontend.getattr(ROOT).attr.nlink >= 2
    assert worker_pid(frontend, "request-1") == worker
    fuse, compiled = fuse_ops(frontend)
    assert len(fuse) == 1 and (not compiled or f"ENOSYS answered in C: {NAMES}" in fuse[0]), fuse
    assert "SIGSEGV" not in frontend.daemon.log()
