"""QEMU's C virtiofsd command line (daemon/compat.py), as libvirt passes it."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from daemon import cli, compat
from daemon.config import CacheMode


@pytest.mark.parametrize("text,items", [
    ("source=/srv,cache=auto", ["source=/srv", "cache=auto"]),
    ("source=/srv/a,,b,xattr", ["source=/srv/a,b", "xattr"]),
    ("source=/a,,,,b", ["source=/a,,b"]),
    ("xattr,", ["xattr"]),
    (",,", [","]),
    ("", []),
])
def test_split_options_golden(text, items):
    assert compat.split_options(text) == items


@given(st.lists(st.text(min_size=1).filter(lambda s: "\0" not in s), max_size=6))
def test_split_options_inverts_libvirts_escaping(items):
    """libvirt doubles the commas of a value and joins with single ones."""
    text = ",".join(item.replace(",", ",,") for item in items)
    # an item that starts with a comma runs into the separator before it:
    # such lists are ambiguous on the wire, for any parser
    if any(item.startswith(",") for item in items[1:]):
        return
    assert compat.split_options(text) == items


@given(st.text(max_size=40))
def test_split_options_takes_any_text(text):
    items = compat.split_options(text)
    assert all(items)  # no empty option
    # every comma kept in a value was written twice
    assert sum(item.count(",") for item in items) <= text.count(",") // 2


def test_expand_maps_every_option():
    argv = ["--fd=3", "-o", "source=/srv/a,,b,cache=none,sandbox=chroot,log_level=err,modcaps=-mknod,"
            "xattr,no_readdirplus,writeback,no_posix_lock,no_flock,announce_submounts,allow_direct_io",
            "--thread-pool-size=2"]
    assert compat.expand(argv) == [
        "--fd=3", "--shared-dir=/srv/a,b", "--cache=never", "--sandbox=chroot",
        "--log-level=error", "--modcaps=-mknod", "--xattr", "--no-readdirplus", "--writeback",
        "--no-posix-lock", "--no-flock", "--announce-submounts", "--allow-direct-io",
        "--thread-pool-size=2"]


def test_expand_joined_form_debug_and_double_dash():
    assert compat.expand(["-osource=/x", "-d"]) == ["--shared-dir=/x", "--log-level=debug"]
    assert compat.expand(["-o", "debug"]) == ["--log-level", "debug"]
    assert compat.expand(["--", "-o", "x"]) == ["--", "-o", "x"]
    assert compat.expand(["--socket-path=/s", "--shared-dir=/d"]) == ["--socket-path=/s", "--shared-dir=/d"]


@pytest.mark.parametrize("argv,fragment", [
    (["-o"], "-o needs"),
    (["-o", "timeout=5"], "-o timeout=5: not an option"),
    (["-o", "norace"], "-o norace: not an option"),
    (["-o", "source"], "-o source needs a value"),
    (["-o", "xattr=1"], "-o xattr=1: not an option"),
])
def test_expand_refuses_what_we_do_not_implement(argv, fragment):
    with pytest.raises(compat.CompatError, match=fragment):
        compat.expand(argv)


def test_libvirt_9_0_command_line_gives_the_config(tmp_path):
    """What libvirt 9.0 (Debian 12) runs for <filesystem> with
    <binary xattr='on'><cache mode='none'/><lock posix='on' flock='off'/>
    <sandbox mode='chroot'/><thread_pool size='4'/></binary>."""
    share = tmp_path / "share,with comma"
    share.mkdir()
    escaped = str(share).replace(",", ",,")
    config = cli.parse_config(["--fd=7", "-o", f"source={escaped},cache=none,sandbox=chroot,xattr,"
                               "flock,no_posix_lock,modcaps=-mknod", "--thread-pool-size=4", "-d"])
    assert config.shared_dir == str(share)
    assert (config.socket_fd, config.cache, config.sandbox, config.xattr, config.flock,
            config.posix_lock, config.max_request_workers, config.log_level) == \
        (7, CacheMode.NEVER, "chroot", True, True, False, 4, "debug")
    assert config.modcaps == "-mknod"  # a value that starts with "-"


def test_values_are_checked_as_our_own_options(tmp_path):
    with pytest.raises(cli.UsageError, match="--cache"):
        cli.parse_config(["--fd=3", "-o", f"source={tmp_path},cache=sometimes"])
    with pytest.raises(cli.UsageError, match="--writeback needs"):
        cli.parse_config(["--fd=3", "-o", f"source={tmp_path},cache=none,writeback"])


def test_expand_xattrmap_and_the_off_acl_and_label_spellings():
    argv = ["-o", "source=/s,xattrmap=:map::user.virtiofs.:,no_posix_acl,no_security_label,posix_acl"]
    assert compat.expand(argv) == ["--shared-dir=/s", "--xattrmap=:map::user.virtiofs.:",
                                   "--posix-acl=never", "--security-label=never", "--posix-acl"]
    assert compat.expand(["-o", "security_label"]) == ["--security-label"]
    # a rule set with commas: libvirt doubles them
    assert compat.expand(["-o", "xattrmap=/ok/all/a,,b//"]) == ["--xattrmap=/ok/all/a,b//"]
    with pytest.raises(compat.CompatError, match="-o security_labels: not an option"):
        compat.expand(["-o", "security_labels"])


def test_killpriv_v2_as_the_c_daemon_spells_it(tmp_path):
    """-o killpriv_v2 / no_killpriv_v2 (QEMU's C virtiofsd; off by default in
    both daemons)."""
    assert compat.expand(["-o", "killpriv_v2,no_killpriv_v2"]) == ["--killpriv-v2", "--no-killpriv-v2"]
    assert not cli.parse_config(["--fd=3", "-o", f"source={tmp_path}"]).killpriv_v2
    assert cli.parse_config(["--fd=3", "-o", f"source={tmp_path},killpriv_v2"]).killpriv_v2
