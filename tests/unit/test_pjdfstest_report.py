"""tests/guest/pjdfstest.py's reading of ``prove -v --timer`` output and
its comparison of daemons (the guest run itself is
tests/guest/test_guest_pjdfstest.py)."""

from __future__ import annotations

from pathlib import Path

from tests.guest.pjdfstest import DaemonRun, only_ours, parse_prove, report

T = "/work/x/.cache/guest/pjdfstest-85a8aea9e685/tests"

PROVE = f"""\
[15:20:01] {T}/chmod/12.t ..
1..4
ok 1
not ok 2 - tried '-u 65534 -g 65534 open pjdfstest_a O_WRONLY : write 0 x', expected 0, got EPERM
ok 3
not ok 4 - tried 'lstat pjdfstest_a mode', expected 0777, got 04777
Failed 2/4 subtests
[15:20:09] {T}/chown/00.t ..
1..3
ok 1
not ok 2 # TODO Linux: known
ok 3
ok     3411 ms ( 0.00 usr  0.00 sys +  1.10 cusr  2.20 csys =  3.30 CPU)
[15:20:13] {T}/open/02.t ...
1..3
ok 1
ok 2
Failed 1/3 subtests
[15:20:14]

Test Summary Report
-------------------
{T}/chmod/12.t (Wstat: 0 Tests: 4 Failed: 2)
  Failed tests:  2, 4
Files=3, Tests=10, 13 wallclock secs ( 0.04 usr  0.01 sys +  3.10 cusr  5.35 csys =  8.50 CPU)
Result: FAIL
"""


def test_failed_assertions_per_file_without_todo():
    r = parse_prove(PROVE)
    assert sorted(r.files) == ["chmod/12.t", "chown/00.t", "open/02.t"]
    assert r.failed == {"chmod/12.t": [2, 4]}
    assert r.files["chmod/12.t"].failed[2].endswith("expected 0, got EPERM")
    assert r.failed_count == 2
    assert r.files["chown/00.t"].ms == 3411
    assert (r.total_files, r.total_tests) == (3, 10)


def test_a_file_cut_short_is_incomplete():
    r = parse_prove(PROVE)
    assert r.incomplete() == ["open/02.t"]
    assert parse_prove(PROVE.split("Files=")[0]).total_tests is None   # prove did not finish


def _run(kind, text):
    return DaemonRun(kind, "a", (), parse_prove(text), 60.0, Path("/dev/null"), 0)


def test_ours_only_are_failures_no_reference_daemon_shows():
    ours = _run("ours", PROVE)
    c_fails_2 = _run("c", PROVE.replace("not ok 4 -", "ok 4 -"))
    rust_fails_4 = _run("rust", PROVE.replace("not ok 2 -", "ok 2 -"))
    passes = _run("rust", PROVE.replace("not ok 2 -", "ok 2 -").replace("not ok 4 -", "ok 4 -"))
    assert only_ours({"ours": ours, "c": c_fails_2, "rust": rust_fails_4}) == {}
    assert only_ours({"ours": ours, "c": c_fails_2, "rust": passes}) == {"chmod/12.t": [4]}
    assert only_ours({"ours": ours, "c": passes, "rust": passes}) == {"chmod/12.t": [2, 4]}
    text = report({"ours": ours, "c": passes})
    assert "chmod/12.t (2,4)" in text and "chmod/12.t #4: tried 'lstat" in text
