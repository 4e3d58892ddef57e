"""Issue 20 in a real guest: unprivileged callers with supplementary groups
(65534, groups 65532 and 65531) writing to root's SUID/SGID files, giving
their files to a supplementary group, and creating in directories they may
write only through one; the guest's tmpfs is the reference (guest_ops.py's
differential checks, which the full suites run too), and the host's view
of the bits is checked after the guest is gone.

One short boot per configuration: our daemon with each cache mode, with
``--writeback`` and with ``--killpriv-v2`` (both ways of clearing the bits),
and QEMU's C virtiofsd as the baseline.
"""

from __future__ import annotations

import os
import stat

import pytest

from .conftest import _start_daemon, guest_dirs
from .harness import boot_and_run, describe_failures

pytestmark = pytest.mark.guest

CHECKS = ("suid_write_by_non_owner", "chown_supp_group", "supp_group_create", "credentials")
# the C virtiofsd creates as the caller without its groups (lo_change_cred)
# and without CAP_DAC_OVERRIDE: EACCES in a directory the caller may write
# only through a supplementary group (a local disk, and ours, allow it)
KNOWN_C = ("supp_group_create",)

CONFIGS = {
    "ours auto": ("ours", "auto", ()),
    "ours never": ("ours", "never", ()),
    "ours auto --writeback": ("ours", "auto", ("--writeback",)),
    "ours auto --killpriv-v2": ("ours", "auto", ("--killpriv-v2",)),
    "ours never --killpriv-v2": ("ours", "never", ("--killpriv-v2",)),
    "c auto": ("c", "auto", ()),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def run(request, tmp_path_factory):
    kind, cache, extra = CONFIGS[request.param]
    base, shared, run_dir = guest_dirs(tmp_path_factory, "creds-" + request.param.replace(" ", "_"))
    daemon = _start_daemon(kind, shared, cache, run_dir, extra)
    try:
        yield boot_and_run(daemon, kind, cache, shared, tools=False, only=CHECKS,
                           known=KNOWN_C if kind == "c" else (), console_log=base / "console.log")
    finally:
        daemon.stop()


def test_the_checks_match_the_guests_tmpfs(run):
    assert run.ops_summary is not None, describe_failures(run)
    ran = {name for name, line in run.ops.items() if line["status"] != "skip"}
    assert ran == set(CHECKS), describe_failures(run)
    assert run.ops_summary["failed"] == 0, describe_failures(run)
    if run.kind == "ours":
        assert run.ops_summary["known"] == 0, describe_failures(run)


def host_mode(run, *parts) -> int:
    return stat.S_IMODE(os.lstat(run.shared_dir.joinpath("ops", *parts)).st_mode)


def test_the_host_sees_the_bits_cleared(run):
    d = ("suid_write_by_non_owner",)
    assert run.ops.get(d[0], {}).get("status") == "pass", describe_failures(run)
    modes = {name: host_mode(run, *d, name) for name in
             ("s4777", "s2777", "s6777", "s2767", "rw4777", "t4777", "o4777", "root4777")}
    assert modes == {"s4777": 0o777, "s2777": 0o777, "s6777": 0o777, "s2767": 0o2767,
                     "rw4777": 0o777, "t4777": 0o777, "o4777": 0o777, "root4777": 0o4777}


def test_the_host_sees_the_supplementary_group(run):
    c = run.shared_dir / "ops" / "chown_supp_group"
    assert run.ops.get("chown_supp_group", {}).get("status") == "pass", describe_failures(run)
    plain, bits = os.lstat(c / "plain"), os.lstat(c / "bits")
    assert (plain.st_uid, plain.st_gid) == (65534, 65531)
    assert (bits.st_gid, stat.S_IMODE(bits.st_mode)) == (65532, 0o555)
    assert stat.S_IMODE(os.lstat(c / "member").st_mode) == 0o2750
    if run.kind == "ours":
        s = run.shared_dir / "ops" / "supp_group_create" / "sgid"
        f, sub = os.lstat(s / "f"), os.lstat(s / "sub")
        assert (f.st_uid, f.st_gid) == (65534, 65531)
        assert sub.st_gid == 65531 and sub.st_mode & stat.S_ISGID
