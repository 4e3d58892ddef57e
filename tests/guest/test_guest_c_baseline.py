"""The baselines under a real guest: QEMU 7.2's C virtiofsd and the Rust
virtiofsd 1.13, which the differential suite and the tools script are
calibrated against (so a difference in test_guest_ours.py is ours, not the
guest kernel's).

One boot per (daemon, platform, cache mode) (module-scoped fixture): auto
runs guest_ops.py and tools.sh, none (our "never") runs guest_ops.py. The C
daemon runs on platform a (its own QEMU 7.2) and b, the Rust one on both too,
each with one request queue (the Rust daemon serves only one: the guest
hangs at its first request on a second). tests/conftest.py starts the C
daemon with ``-o xattr -o posix_lock`` and the Rust one with ``--xattr``,
like ours offers by default.
"""

from __future__ import annotations

import pytest

from . import guest_ops
from .harness import describe_failures, host_checks

pytestmark = pytest.mark.guest

# Mismatches that are a daemon's documented limits, not harness bugs. The C
# daemon: with -o posix_lock it answers SETLKW with EOPNOTSUPP (lo_setlk:
# "sleep" locks are not supported), so a blocking lock fails at once, and
# F_GETLK reports l_pid 0, not the guest process holding the lock; it
# creates as the caller without its supplementary groups and without
# CAP_DAC_OVERRIDE (EACCES in a directory writable only through one), and
# opens as root, so an open(O_TRUNC) by another user keeps SUID
# (test_guest_credentials.py). The Rust daemon keeps SUID there too. Linux
# 6.1 cannot name the caller's supplementary group (platform a:
# platforms.KERNEL_KNOWN, which boot_and_run adds).
KNOWN = {
    "c": ("fcntl_lock", "fcntl_getlk_pid", "supp_group_create", "supp_group_setgid_create",
          "suid_write_by_non_owner"),
    "rust": ("suid_write_by_non_owner",),
}
# the Rust daemon on both platforms; QEMU 7.2's C daemon with the QEMU it
# ships with (platform a)
CONFIGS = [(k, p, c) for k, platforms in (("c", ("a",)), ("rust", ("a", "b")))
           for p in platforms for c in ("auto", "never")]


@pytest.fixture(scope="module", params=CONFIGS, ids=[f"{k}-{p}-{c}" for k, p, c in CONFIGS])
def run(request, guest_run_factory):
    kind, platform, cache = request.param
    return guest_run_factory(kind, cache, tools=(cache == "auto"), known=KNOWN[kind],
                             platform=platform)


def test_guest_ran_to_the_end(run):
    assert run.guest.exit_status == 0 or run.ops_summary, describe_failures(run)
    assert not run.guest.timed_out, describe_failures(run)
    assert run.ops_summary is not None, describe_failures(run)
    assert run.guest.umount_status == 0, describe_failures(run)


def test_differential_suite(run):
    assert run.ops_summary is not None, describe_failures(run)
    assert set(run.ops) == set(guest_ops.CHECKS), describe_failures(run)
    assert run.ops_summary["failed"] == 0, describe_failures(run)


def test_tools(run):
    """tools.sh runs in the auto boots only."""
    if run.cache != "auto":
        assert run.tools_summary is None, "tools.sh ran in a boot that was not asked to run it"
        return
    assert run.tools_summary is not None, describe_failures(run)
    assert run.tools_summary["failed"] == 0, describe_failures(run)


def test_host_sees_what_the_guest_wrote(run):
    res = host_checks(run)
    assert res, "no host-side check applied"
    bad = {k: v for k, v in res.items() if v}
    assert not bad, bad


def test_daemon_exits_when_the_guest_is_gone(run):
    assert run.daemon_exit == 0, run.daemon_log[-2000:]
