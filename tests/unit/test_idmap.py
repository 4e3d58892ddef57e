"""--uid-map/--gid-map parsing (daemon/sandbox/idmap.py) and the CLI's
errors for them: the Rust virtiofsd's spelling, and everything the kernel
would refuse caught as a usage error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon import cli
from daemon.sandbox import idmap
from daemon.sandbox.idmap import IdMapError, IdRange, check_map, parse_range
from tests.conftest import REPO_ROOT

ids = st.integers(0, idmap.ID_LIMIT - 1)
separators = st.characters(blacklist_categories=("L", "N", "Cs"), blacklist_characters="\0")


def test_the_rust_spelling():
    assert parse_range(":0:100000:65536:") == IdRange(0, 100000, 65536)
    assert parse_range("/1000/1000/1/") == IdRange(1000, 1000, 1)
    assert parse_range("-5-6-7-") == IdRange(5, 6, 7)
    assert str(IdRange(0, 100000, 65536)) == ":0:100000:65536:"


@pytest.mark.parametrize("text, why", [
    ("", "expected"),
    (":", "expected"),
    ("0:1:2:", "same separator"),
    (":0:1:2", "same separator"),
    ("a0a1a2a", "not a letter or digit"),
    ("101112", "not a letter or digit"),
    (":0:1:2:3:", "three fields"),
    (":0:1:", "three fields"),
    (":0::2:", "'' is not a number"),
    (":0:1:2;", "same separator"),
    (":-1:1:2:", "is not a number"),
    (":0:0x10:2:", "is not a number"),
    (": 0:1:2:", "is not a number"),
    (":0:1:٣:", "is not a number"),       # a non-ASCII digit
    (":0:1:0:", "at least 1"),
    (":4294967295:0:1:", "namespace ids run past"),
    (":0:4294967295:1:", "host ids run past"),
    (":4294967290:0:6:", "namespace ids run past"),
    (":0:1:4294967295:", "run past"),
])
def test_bad_ranges_say_what_is_wrong(text, why):
    with pytest.raises(IdMapError, match=why):
        parse_range(text)


@given(ids, ids, st.integers(1, idmap.ID_LIMIT), separators)
def test_any_range_the_kernel_takes_round_trips(inside, outside, count, sep):
    text = f"{sep}{inside}{sep}{outside}{sep}{count}{sep}"
    if inside + count > idmap.ID_LIMIT - 0 or outside + count > idmap.ID_LIMIT:
        with pytest.raises(IdMapError):
            parse_range(text)
        return
    rng = parse_range(text)
    assert rng == IdRange(inside, outside, count)
    assert parse_range(str(rng)) == rng
    assert rng.to_host(inside) == outside and rng.to_host(inside + count - 1) == outside + count - 1
    assert rng.to_host(inside + count) is None
    assert inside == 0 or rng.to_host(inside - 1) is None


@given(st.text(max_size=40))
def test_any_text_parses_or_is_one_clear_error(text):
    try:
        rng = parse_range(text)
    except IdMapError as e:
        assert "\n" not in str(e)
    else:
        assert rng.length >= 1 and rng.inside + rng.length <= idmap.ID_LIMIT


@given(st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 3000), st.integers(1, 500)), min_size=1, max_size=8))
def test_a_whole_map_is_kept_only_without_overlaps(triples):
    ranges = [IdRange(*t) for t in triples]

    def overlap(side):
        seen: set[int] = set()
        for r in ranges:
            span = set(range(getattr(r, side), getattr(r, side) + r.length))
            if seen & span:
                return True
            seen |= span
        return False

    maps_root = any(r.to_host(0) is not None for r in ranges)
    if overlap("inside") or overlap("outside") or not maps_root:
        with pytest.raises(IdMapError):
            check_map("uid", ranges)
        return
    checked = check_map("uid", ranges)
    assert sorted(checked) == sorted(ranges) and list(checked) == sorted(checked)
    # each namespace id maps to at most one host id, and back
    for r in checked:
        for ns_id in (r.inside, r.inside + r.length - 1):
            hosts = [x.to_host(ns_id) for x in checked if x.to_host(ns_id) is not None]
            assert hosts == [r.to_host(ns_id)]


def test_map_rules():
    with pytest.raises(IdMapError, match="must map namespace uid 0"):
        check_map("uid", [IdRange(1, 1000, 1)])
    with pytest.raises(IdMapError, match="overlap on the host side"):
        check_map("gid", [IdRange(0, 1000, 10), IdRange(10, 1005, 1)])
    with pytest.raises(IdMapError, match="overlap on the namespace side"):
        check_map("gid", [IdRange(0, 1000, 10), IdRange(9, 5000, 1)])
    with pytest.raises(IdMapError, match="at most 340"):
        check_map("uid", [IdRange(i, 10000 + i, 1) for i in range(341)])
    assert len(check_map("uid", [IdRange(i, 10000 + i, 1) for i in range(340)])) == 340
    assert idmap.newidmap_args((IdRange(0, 5, 1), IdRange(1, 100, 9))) == ["0", "5", "1", "1", "100", "9"]


def test_the_cli_collects_several_ranges(tmp_path):
    base = ["--shared-dir", str(tmp_path), "--fd", "3"]
    assert (cli.parse_config(base).uid_map, cli.parse_config(base).gid_map) == ((), ())
    config = cli.parse_config(base + ["--uid-map", ":1:300001:99:", "--uid-map", ":0:1000:1:",
                                      "--gid-map=/0/300000/100/"])
    assert config.uid_map == (IdRange(0, 1000, 1), IdRange(1, 300001, 99))
    assert config.gid_map == (IdRange(0, 300000, 100),)
    # the other map defaults to namespace 0 -> this user's own id
    config = cli.parse_config(base + ["--uid-map", ":0:1000:1:"])
    assert config.gid_map == (IdRange(0, os.getgid(), 1),)
    config = cli.parse_config(base + ["--gid-map", ":0:1000:1:"])
    assert config.uid_map == (IdRange(0, os.getuid(), 1),)


@pytest.mark.parametrize("args, message", [
    (["--uid-map", ":0:1:2"], "argument --uid-map: ':0:1:2': must start and end with the same separator"),
    (["--gid-map", ":0:x:2:"], "argument --gid-map: ':0:x:2:': host_id 'x' is not a number"),
    (["--uid-map", ":0:100:10:", "--uid-map", ":5:200:1:"], "--uid-map :0:100:10: and :5:200:1: overlap"),
    (["--gid-map", ":3:100:10:"], "--gid-map must map namespace gid 0"),
    (["--uid-map", ":0:100:10:", "--sandbox", "chroot"], "not with --sandbox chroot"),
    (["--uid-map", ":0:100:10:", "--sandbox", "none"], "not with --sandbox none"),
])
def test_a_bad_map_is_one_line_and_status_1(tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "daemon", "--shared-dir", str(tmp_path), "--socket-path",
                        str(tmp_path / "s"), *args], cwd=str(REPO_ROOT), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvirtiofsd: error: ") and message in lines[0], r.stderr
    assert not (tmp_path / "s").exists()


def test_libvirt_11_argv_with_idmap_parses(tmp_path):
    """libvirt 11.3 (qemu_virtiofs.c) appends one ``--uid-map=:START:TARGET:COUNT:``
    per <idmap><uid .../>, then one ``--gid-map=...`` per <gid .../>, after
    its other long options; in qemu:///session without <idmap> it makes
    ``:0:EUID:1:`` and ``:1:SUBUID_START:SUBUID_COUNT:`` itself."""
    argv = ["--fd=3", f"--shared-dir={tmp_path}", "--cache=auto", "--sandbox=namespace", "--xattr",
            "--rlimit-nofile=4096",
            "--uid-map=:0:1000:1:", "--uid-map=:1:300000:65536:",
            "--gid-map=:0:1000:1:", "--gid-map=:1:300000:65536:"]
    config = cli.parse_config(argv)
    assert config.socket_fd == 3 and config.sandbox == "namespace"
    assert config.uid_map == (IdRange(0, 1000, 1), IdRange(1, 300000, 65536))
    assert config.gid_map == config.uid_map
