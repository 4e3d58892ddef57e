"""QEMU 7.2's C virtiofsd under a real guest: the baseline the differential
suite and the tools script are calibrated against.

One boot per cache mode (module-scoped fixture): auto runs guest_ops.py and
tools.sh, none (our "never") runs guest_ops.py. tests/conftest.py starts the
C daemon with ``-o xattr -o posix_lock``, like ours offers by default.
"""

from __future__ import annotations

import pytest

from . import guest_ops
from .harness import describe_failures, host_checks

pytestmark = pytest.mark.guest

# Mismatches that are the C daemon's documented limits, not harness bugs:
# with -o posix_lock it answers SETLKW with EOPNOTSUPP (lo_setlk: "sleep"
# locks are not supported), so a blocking lock fails at once; and F_GETLK
# reports l_pid 0, not the guest process holding the lock. It creates as
# the caller without its supplementary groups and without CAP_DAC_OVERRIDE
# (EACCES in a directory writable only through one), and opens as root, so
# an open(O_TRUNC) by another user keeps SUID (test_guest_credentials.py).
KNOWN_C = ("fcntl_lock", "fcntl_getlk_pid", "supp_group_create", "supp_group_setgid_create",
           "suid_write_by_non_owner")


@pytest.fixture(scope="module", params=["auto", "never"])
def run(request, guest_run_factory):
    cache = request.param
    return guest_run_factory("c", cache, tools=(cache == "auto"), known=KNOWN_C)


@pytest.fixture(scope="module")
def auto_run(guest_run_factory):
    """The auto boot (the only one that also runs tools.sh; the same boot
    as ``run[auto]``: the factory boots once per configuration)."""
    return guest_run_factory("c", "auto", tools=True, known=KNOWN_C)


def test_guest_ran_to_the_end(run):
    assert run.guest.exit_status == 0 or run.ops_summary, describe_failures(run)
    assert not run.guest.timed_out, describe_failures(run)
    assert run.ops_summary is not None, describe_failures(run)
    assert run.guest.umount_status == 0, describe_failures(run)


def test_differential_suite(run):
    assert run.ops_summary is not None, describe_failures(run)
    assert set(run.ops) == set(guest_ops.CHECKS), describe_failures(run)
    assert run.ops_summary["failed"] == 0, describe_failures(run)


def test_tools(auto_run):
    assert auto_run.tools_summary is not None, describe_failures(auto_run)
    assert auto_run.tools_summary["failed"] == 0, describe_failures(auto_run)


def test_host_sees_what_the_guest_wrote(run):
    res = host_checks(run)
    assert res, "no host-side check applied"
    bad = {k: v for k, v in res.items() if v}
    assert not bad, bad


def test_daemon_exits_when_the_guest_is_gone(run):
    assert run.daemon_exit == 0, run.daemon_log[-2000:]
