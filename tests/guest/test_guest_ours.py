"""Our daemon (python -m daemon) under a real guest, on both platforms.

One boot per cache mode, and one more with ``--writeback`` (module-scoped
fixture), on platform a (QEMU 7.2 + Linux 6.1, FUSE 7.38) and platform b
(QEMU 10 + Linux 6.12, FUSE 7.41; GUEST_PLATFORMS below), each running the
in-guest differential suite (guest_ops.py) and
the ordinary tools (tools.sh) on the mount; then host-side checks of what
the guest wrote, the shape of the daemon's process tree while the guest
was attached, and a clean exit.
"""

from __future__ import annotations

import os
import re

import pytest

from . import guest_ops
from .harness import describe_failures, host_checks

pytestmark = pytest.mark.guest


# (platform, request queues) of every boot
GUEST_PLATFORMS = (("a", 1), ("b", 1), ("b", 2))
CONFIGS = [(p, q, c) for p, q in GUEST_PLATFORMS for c in ("auto", "never", "auto --writeback")]


@pytest.fixture(scope="module", params=CONFIGS,
                ids=[f"{p}-{q}q-{c.replace(' --', '-')}" for p, q, c in CONFIGS])
def run(request, guest_run_factory):
    platform, queues, options = request.param
    cache, *extra = options.split()
    # the platform's kernel limits (platforms.KERNEL_KNOWN) are the only
    # documented differences; boot_and_run adds them
    return guest_run_factory("ours", cache, tools=True, extra_args=extra, platform=platform,
                             num_request_queues=queues)


def test_guest_ran_to_the_end(run):
    assert not run.guest.timed_out, describe_failures(run)
    assert run.ops_summary is not None, describe_failures(run)
    assert run.guest.umount_status == 0, describe_failures(run)


def test_differential_suite(run):
    assert run.ops_summary is not None, describe_failures(run)
    assert set(run.ops) == set(guest_ops.CHECKS), describe_failures(run)
    assert run.ops_summary["failed"] == 0, describe_failures(run)


def test_writeback_cache_negotiated_only_when_asked_for(run, request):
    """The guest runs the suite above with its writeback cache on exactly
    in the --writeback boot (INIT's reply, as the daemon logs it)."""
    from daemon.fuse.abi import InitFlag

    m = re.search(r"FUSE session: guest 7\.\d+, replying 7\.\d+ flags (0x[0-9a-f]+)", run.daemon_log)
    assert m, run.daemon_log[-3000:]
    asked = "--writeback" in request.node.callspec.params["run"][2]
    assert bool(int(m.group(1), 16) & InitFlag.WRITEBACK_CACHE) == asked


def test_tools(run):
    assert run.tools_summary is not None, describe_failures(run)
    assert run.tools_summary["failed"] == 0, describe_failures(run)


def test_host_sees_what_the_guest_wrote(run):
    res = host_checks(run)
    assert res, "no host-side check applied"
    bad = {k: v for k, v in res.items() if v}
    assert not bad, bad


def test_process_tree_while_attached(run):
    """supervisor + hiprio worker + keeper + one request worker per request
    queue, seen from the host via /proc/*/stat ppid links."""
    tree = run.process_tree
    assert tree, "the process tree was not sampled (did the guest mount?)"
    assert len(tree) == 3 + run.num_request_queues, f"daemon process tree: {tree}"
    root = [p for p in tree if p[0] == tree[0][0]]
    assert root and all(pp == root[0][0] for pid, pp, _ in tree[1:]), \
        f"workers must be children of the supervisor: {tree}"


def test_daemon_exits_when_the_guest_is_gone(run):
    assert run.daemon_exit == 0, run.daemon_log[-3000:]


def test_workers_confined_while_the_guest_is_attached(run):
    """Seen from the host while the guest used the share: every worker has
    Seccomp 2, NoNewPrivs 1, exactly its role's capabilities, namespaces of
    its own and the share (request) or an empty root (hiprio, keeper) as its root."""
    from daemon.sandbox import capabilities

    seen = run.confinement
    assert seen and len(seen) == 3 + run.num_request_queues, seen
    supervisor_pid = run.process_tree[0][0]
    sup = seen[supervisor_pid]
    share = os.stat(run.shared_dir)
    roles = set()
    for pid, info in seen.items():
        assert info["seccomp"] == "2" and info["nnp"] == "1", info
        if pid == supervisor_pid:
            continue
        role = next(r for r in ("hiprio", "keeper", "request") if r in info["comm"])
        roles.add(role)
        assert info["capeff"] == capabilities.mask(capabilities.role_caps(role)), (role, info)
        assert all(info["ns"][k] != sup["ns"][k] for k in info["ns"]), (role, info["ns"], sup["ns"])
        assert (info["root"] == (share.st_dev, share.st_ino)) == (role == "request"), (role, info)
    assert roles == {"hiprio", "request", "keeper"}
