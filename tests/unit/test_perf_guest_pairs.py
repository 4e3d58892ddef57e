"""tests/perf/guest_pairs.py: the guest command it boots with, the line it
reads back, the per-I/O figures and the report."""

import json
import shlex

from tests.perf import guest_pairs as gp


def test_guest_command_marks_around_the_job_only():
    cmd = gp.guest_command("--rw=randwrite --bs=4k", 32, 6)
    prep, go, job, done = (cmd.index(s) for s in ("--name=prep", gp.GO, "--name=j", gp.DONE))
    assert prep < cmd.index("drop_caches") < go < job < done
    assert "--size=32M" in cmd and "--runtime=6 " in cmd and "--rw=randwrite --bs=4k" in cmd
    # the summary survives the shell: one python3 -c argument
    words = shlex.split(cmd.split("python3 -c ", 1)[1])
    assert len(words) == 1 and "total_ios" in words[0]


def test_parse_result_finds_the_line():
    out = "boot noise\nPAIR " + json.dumps({"iops": 10.5, "bw_bytes": 1 << 20, "total_ios": 63}) + "\nend\n"
    assert gp.parse_result(out) == {"iops": 10.5, "bw_bytes": 1 << 20, "total_ios": 63}
    assert gp.parse_result("no result here\n") is None


def test_per_io_divides_the_marks_difference():
    before = {"run_s": 1.0, "vcsw": 100}
    after = {"run_s": 1.5, "vcsw": 300}
    res = gp.per_io({"iops": 100.0, "bw_bytes": 2 << 20, "total_ios": 1000}, before, after)
    assert res == {"iops": 100.0, "mib_s": 2.0, "cpu_us": 500.0, "wakeups": 0.2}


def test_report_has_each_pair_and_the_median():
    boot = {"iops": 1000.0, "mib_s": 3.9, "cpu_us": 30.0, "wakeups": 2.0}
    lines = gp.report({"ours": [boot, dict(boot, iops=3000.0), dict(boot, iops=2000.0)], "rust": [boot]})
    assert lines[2].startswith("| ours | 1,000, 3,000, 2,000 (median 2,000) |")
    assert lines[3] == "| rust | 1,000 | 3.9 | 30.0 | 2.00 |"
