"""Issue 20 in a real guest: unprivileged callers with supplementary groups
(65534, groups 65532 and 65531) writing to root's SUID/SGID files, giving
their files to a supplementary group, and creating in directories they may
write only through one; the guest's tmpfs is the reference (guest_ops.py's
differential checks, which the full suites run too), and the host's view
of the bits is checked after the guest is gone.

One short boot per configuration: our daemon with each cache mode, with
``--writeback``, without KILLPRIV_V2 (the default) and with
``--killpriv-v2`` (both ways of clearing the bits; ours also runs guest_ops' ``killpriv``
check: owner writes, ftruncate and open(O_TRUNC), file capabilities),
and QEMU's C virtiofsd as the baseline, on platform a (QEMU 7.2 + Linux
6.1, no supplementary-group extension); and on platform b (QEMU 10 + Linux
6.12, which sends it) ours and the Rust virtiofsd 1.13.
"""

from __future__ import annotations

import os
import stat

import pytest

from .conftest import _start_daemon, guest_dirs
from .platforms import KERNEL_KNOWN
from .harness import boot_and_run, describe_failures

pytestmark = pytest.mark.guest

CHECKS = ("suid_write_by_non_owner", "chown_supp_group", "supp_group_create",
          "supp_group_setgid_create", "credentials")
# Linux 6.1 does not name the caller's supplementary group (6.6+ does)
KNOWN_6_1 = KERNEL_KNOWN["a"]
# The C virtiofsd's differences from a local disk (ours has neither):
# it creates as the caller without its groups (lo_change_cred) and without
# CAP_DAC_OVERRIDE: EACCES in a directory the caller may write only through
# a supplementary group; and it opens as root with CAP_FSETID, so an
# open(O_TRUNC) by another user keeps SUID (Linux 6.1 truncates inside the
# OPEN and sends no chmod for it).
KNOWN_C = ("supp_group_create", "suid_write_by_non_owner") + KNOWN_6_1
# The Rust virtiofsd 1.13 opens as root with CAP_FSETID too (it drops it
# only for FUSE_OPEN_KILL_SUIDGID, with --killpriv-v2): SUID stays
KNOWN_RUST = ("suid_write_by_non_owner",)
KNOWN = {"c": KNOWN_C, "rust": KNOWN_RUST}

# ours also runs guest_ops' killpriv check (KILLPRIV_V2's cases, with
# --killpriv-v2 and without); the reference daemons differ there on purpose
OURS_CHECKS = CHECKS + ("killpriv",)

CONFIGS = {  # id: (platform, daemon, cache, daemon options)
    "a ours auto": ("a", "ours", "auto", ()),
    "a ours never": ("a", "ours", "never", ()),
    "a ours auto --writeback": ("a", "ours", "auto", ("--writeback",)),
    "a ours auto --killpriv-v2": ("a", "ours", "auto", ("--killpriv-v2",)),
    "a ours never --killpriv-v2": ("a", "ours", "never", ("--killpriv-v2",)),
    "a c auto": ("a", "c", "auto", ()),
    "b ours auto": ("b", "ours", "auto", ()),
    "b ours auto --killpriv-v2": ("b", "ours", "auto", ("--killpriv-v2",)),
    "b ours never --killpriv-v2": ("b", "ours", "never", ("--killpriv-v2",)),
    "b rust auto": ("b", "rust", "auto", ()),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def run(request, tmp_path_factory):
    platform, kind, cache, extra = CONFIGS[request.param]
    base, shared, run_dir = guest_dirs(tmp_path_factory, "creds-" + request.param.replace(" ", "_"))
    daemon = _start_daemon(kind, shared, cache, run_dir, extra)
    try:
        yield boot_and_run(daemon, kind, cache, shared, tools=False,
                           only=OURS_CHECKS if kind == "ours" else CHECKS,
                           known=KNOWN.get(kind, ()),
                           console_log=base / "console.log",
                           platform=platform)
    finally:
        daemon.stop()


def test_the_checks_match_the_guests_tmpfs(run):
    assert run.ops_summary is not None, describe_failures(run)
    ran = {name for name, line in run.ops.items() if line["status"] != "skip"}
    assert ran == set(OURS_CHECKS if run.kind == "ours" else CHECKS), describe_failures(run)
    assert run.ops_summary["failed"] == 0, describe_failures(run)
    if run.kind == "ours":  # on platform a only the 6.1 limit may differ
        assert set(run.ops_summary["known_checks"]) <= set(KNOWN_6_1), describe_failures(run)


def host_mode(run, *parts) -> int:
    return stat.S_IMODE(os.lstat(run.shared_dir.joinpath("ops", *parts)).st_mode)


def test_the_host_sees_the_bits_cleared(run):
    d = ("suid_write_by_non_owner",)
    assert run.ops.get(d[0], {}).get("status") == ("pass" if run.kind == "ours" else "known"), \
        describe_failures(run)
    modes = {name: host_mode(run, *d, name) for name in
             ("s4777", "s2777", "s6777", "rw4777", "t4777", "o4777", "root4777")}
    # the reference daemons keep SUID after an open(O_TRUNC) by another user
    assert modes == {"s4777": 0o777, "s2777": 0o777, "s6777": 0o777, "rw4777": 0o777,
                     "t4777": 0o777, "o4777": 0o777 if run.kind == "ours" else 0o4777,
                     "root4777": 0o4777}


def test_the_host_sees_what_killpriv_clears(run):
    """guest_ops' killpriv check (ours): the bits and the file capability
    as the host has them after the guest, with or without KILLPRIV_V2."""
    if run.kind != "ours":
        assert "killpriv" not in run.ops, describe_failures(run)
        return
    assert run.ops.get("killpriv", {}).get("status") == "pass", describe_failures(run)
    names = ("own_write", "own_ftrunc", "own_otrunc", "other_ftrunc", "other_otrunc", "root_ftrunc",
             "root_otrunc")
    modes = {name: host_mode(run, "killpriv", name) for name in names}
    assert modes == {"own_write": 0o775, "own_ftrunc": 0o755, "own_otrunc": 0o755, "other_ftrunc": 0o777,
                     "other_otrunc": 0o777, "root_ftrunc": 0o6777, "root_otrunc": 0o4777}
    for name in ("own_cap", "root_cap"):
        with pytest.raises(OSError):     # ENODATA: the write dropped it
            os.getxattr(run.shared_dir / "ops" / "killpriv" / name, "security.capability")


def test_the_host_sees_the_supplementary_group(run):
    c = run.shared_dir / "ops" / "chown_supp_group"
    assert run.ops.get("chown_supp_group", {}).get("status") == "pass", describe_failures(run)
    plain, bits = os.lstat(c / "plain"), os.lstat(c / "bits")
    assert (plain.st_uid, plain.st_gid) == (65534, 65531)
    assert (bits.st_gid, stat.S_IMODE(bits.st_mode)) == (65532, 0o555)
    assert stat.S_IMODE(os.lstat(c / "member").st_mode) == 0o2750
    if run.kind != "c":
        s = run.shared_dir / "ops" / "supp_group_create" / "sgid"
        f, sub = os.lstat(s / "f"), os.lstat(s / "sub")
        assert (f.st_uid, f.st_gid) == (65534, 65531)
        assert sub.st_gid == 65531 and sub.st_mode & stat.S_ISGID


def test_setgid_create_by_a_supplementary_member(run, request):
    """Platform b sends FUSE_CREATE_SUPP_GROUP: the new setgid file keeps
    its bit on the host, as on the guest's tmpfs. Platform a cannot: ours
    creates it without the bit (the documented limit), the C daemon not at
    all (EACCES)."""
    platform = CONFIGS[request.node.callspec.params["run"]][0]
    status = run.ops.get("supp_group_setgid_create", {}).get("status")
    path = run.shared_dir / "ops" / "supp_group_setgid_create" / "sgid" / "f"
    if run.kind == "c":
        assert status == "known" and not path.exists(), describe_failures(run)
        return
    assert status == ("pass" if platform == "b" else "known"), describe_failures(run)
    f = os.lstat(path)
    assert (f.st_uid, f.st_gid) == (65534, 65531)
    assert stat.S_IMODE(f.st_mode) == (0o2750 if platform == "b" else 0o750)
