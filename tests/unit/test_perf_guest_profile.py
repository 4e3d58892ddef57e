"""tests/perf/guest_profile.py: the counters it reads from /proc for a
process tree, and the per-operation table it makes of them."""

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.perf import guest_profile as gp

RUN_SH = Path(gp.WORKLOADS) / "run.sh"
PARALLEL_SH = Path(gp.WORKLOADS) / "parallel.sh"


def test_descendants_finds_children_and_grandchildren():
    child = subprocess.Popen([sys.executable, "-c",
                              "import subprocess, sys; p = subprocess.Popen(['sleep', '30']); "
                              "print(p.pid, flush=True); p.wait()"], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        tree = gp.descendants(child.pid)
        assert tree[0] == child.pid
        assert grandchild in tree
        assert os.getpid() not in tree
    finally:
        child.kill()
        child.wait()
        subprocess.run(["kill", str(grandchild)], check=False)


def test_counters_see_sleeps_and_run_time_of_every_thread():
    # a child with a second, living thread that sleeps 20 times (20
    # voluntary switches); the main thread burns CPU, then waits for us
    code = ("import threading, time, sys\n"
            "e = threading.Event()\n"
            "t = threading.Thread(target=lambda: ([time.sleep(0.001) for _ in range(20)], e.set(), time.sleep(60)),"
            " daemon=True); t.start(); e.wait()\n"
            "import mmap; m = mmap.mmap(-1, 64 << 12); [m[i << 12] for i in range(64)]\n"
            "end = time.process_time() + 0.2\n"
            "while time.process_time() < end: pass\n"
            "print('done', flush=True); sys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        before = time.monotonic()
        assert child.stdout.readline() == "done\n"
        c = gp.counters([child.pid])
        total = c["total"]
        assert set(total) == set(gp.COUNTERS)
        # both threads are summed: the sleeper's 20 and the main thread's wait
        assert total["vcsw"] >= 21
        assert 0.2 <= total["run_s"] <= time.monotonic() - before + 1.0
        assert total["syscw"] >= 1  # its print
        assert total["minflt"] >= 64  # the 64 pages it touched
        name, (cpu, vcsw, run) = next(iter(c["by_name"].items()))
        assert run == total["run_s"] and vcsw == total["vcsw"]
    finally:
        child.kill()
        child.wait()
    # a process that is gone is skipped, not an error
    assert gp.counters([child.pid])["total"]["run_s"] == 0.0


def test_run_sh_marks_what_the_profiler_reads():
    text = RUN_SH.read_text()
    assert 'echo "@@BENCH-MARK $1 $2@@"' in text
    assert '[ -n "$BENCH_MARKS" ] || return 0' in text
    for step in ("idle", "$job", "latency", "metadata"):
        assert f"mark start {step}" in text and f"mark end {step}" in text
    # run.sh's own mark(): silent without BENCH_MARKS (make bench), a line
    # the profiler's pattern reads with it
    mark = next(line for line in text.splitlines() if line.startswith("mark() {"))
    env = {k: v for k, v in os.environ.items() if k != "BENCH_MARKS"}
    silent = subprocess.run(["sh", "-c", mark + "\nmark start rand-read"], env=env, capture_output=True,
                            text=True, check=True)
    assert silent.stdout == ""
    said = subprocess.run(["sh", "-c", mark + "\nmark end rand-read"], env={**env, "BENCH_MARKS": "1"},
                          capture_output=True, text=True, check=True)
    assert gp.MARK.fullmatch(said.stdout.strip()).groups() == ("end", "rand-read")
    m = gp.MARK.search("x\r\n@@BENCH-MARK start rand-read@@\r\n")
    assert m and m.groups() == ("start", "rand-read")
    assert not gp.MARK.search("@@BENCH-MARK begin rand-read@@")


def test_parallel_sh_marks_its_fio_steps_as_par_steps():
    """guest_profile --parallel reads par-seq-write ... par-rand-write from
    parallel.sh (parallel_meta.py marks the metadata phases)."""
    text = PARALLEL_SH.read_text()
    assert 'mark start "$job"' in text and 'mark end "$job"' in text
    mark = next(line for line in text.splitlines() if line.startswith("mark() {"))
    env = {k: v for k, v in os.environ.items() if k != "BENCH_MARKS"}
    assert subprocess.run(["sh", "-c", mark + "\nmark start seq-read"], env=env, capture_output=True,
                          text=True, check=True).stdout == ""
    said = subprocess.run(["sh", "-c", mark + "\nmark end seq-read"], env={**env, "BENCH_MARKS": "1"},
                          capture_output=True, text=True, check=True)
    edge, step = gp.MARK.fullmatch(said.stdout.strip()).groups()
    assert (edge, step) == ("end", "par-seq-read") and step in gp.PAR_STEPS


def _run(fig_ops, seconds, daemon_run, qemu_run, vcsw, step="rand-read"):
    zero = dict.fromkeys(gp.COUNTERS, 0.0)
    return {"phases": {step: {"iops": fig_ops / seconds, "ops": fig_ops, "seconds": seconds}},
            "steps": {step: {"seconds": seconds,
                             "daemon": {**zero, "run_s": daemon_run, "vcsw": vcsw, "syscr": 2 * vcsw,
                                        "syscw": vcsw, "minflt": 16 * vcsw},
                             "qemu": {**zero, "run_s": qemu_run, "wait_s": qemu_run / 2, "vcsw": 5 * vcsw},
                             "daemon_by_name": {}}}}


def test_summary_is_per_operation_and_the_median_of_the_rounds():
    runs = {"ours": [_run(1000, 1.0, 0.02, 1.0, 1000), _run(2000, 1.0, 0.04, 1.5, 2000),
                     _run(500, 1.0, 0.5, 1.0, 500)],
            "rust": [_run(1500, 1.0, 0.03, 1.2, 1500)]}
    lines = gp.summarize(runs)
    assert lines[0] == "## rand-read"
    ours = next(line for line in lines if line.startswith("| ours"))
    rust = next(line for line in lines if line.startswith("| rust"))
    cells = [c.strip() for c in ours.strip("|").split("|")]
    # figure: median IOPS; daemon ran 20, 20, 1000 µs/op -> 20; wake-ups 1/op;
    # syscalls 3/op; 16 minor faults/op; QEMU ran 1000, 750, 2000 µs/op -> 1000, waited half of it
    assert cells == ["ours (n=3)", "1,000", "20.0", "0.0", "1.00", "3.00", "16.00", "1000", "500", "5.00", "1.0"]
    assert rust.startswith("| rust (n=1) | 1,500 | 20.0 |")


def test_step_ops_adds_the_metadata_and_latency_phases():
    phases = {"create": {"ops": 10}, "stat": {"ops": 10}, "readdir": {"ops": 10}, "unlink": {"ops": 10},
              "untar": {"ops": 99}, "lat-getattr": {"ops": 3}, "lat-lookup": {"ops": 4},
              "rand-read": {"ops": 7}}
    assert gp.step_ops("metadata", phases) == 40
    assert gp.step_ops("latency", phases) == 7
    assert gp.step_ops("rand-read", phases) == 7
    assert gp.step_ops("seq-read", phases) == 0


def test_parallel_steps_are_per_operation_with_a_split_by_process():
    run = _run(5000, 1.0, 0.05, 1.0, 5000, step="par-stat")
    run["steps"]["par-stat"]["daemon_by_name"] = {"worker-1": [0.1, 3000, 0.03], "hiprio": [0.0, 10, 0.001]}
    assert gp.step_ops("par-stat", run["phases"]) == 5000
    assert gp.step_ops("par-unlink", run["phases"]) == 0
    lines = gp.summarize({"ours": [run]})
    assert lines[0] == "## par-stat"
    # 0.03 s over 5,000 operations: 6 µs and 0.6 wake-ups per operation
    assert "| ours | worker-1 | 6.0 | 0.60 |" in lines
    assert "| ours | hiprio | 0.2 | 0.00 |" in lines


def test_parallel_meta_marks_each_phase_only_with_bench_marks(monkeypatch, capsys):
    from tests.perf.guest_workloads import parallel_meta
    monkeypatch.setattr(parallel_meta.time, "sleep", lambda s: None)
    monkeypatch.delenv("BENCH_MARKS", raising=False)
    parallel_meta.mark("start", "stat")
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("BENCH_MARKS", "1")
    parallel_meta.mark("end", "stat")
    assert gp.MARK.fullmatch(capsys.readouterr().out.strip()).groups() == ("end", "par-stat")


def test_metadata_marks_its_phases_unless_a_barrier_runs_it(monkeypatch, capsys):
    """metadata.py's phases are steps of their own with BENCH_MARKS=1 (the
    mark before and after the timed part, so drop_caches and its FORGETs
    stay outside), none without it, and none under parallel_meta.py's
    barrier (which marks par- steps itself); the summary gives each phase
    its per-process table."""
    from tests.perf.guest_workloads import metadata
    monkeypatch.setattr(metadata.time, "sleep", lambda s: None)
    monkeypatch.delenv("BENCH_MARKS", raising=False)
    metadata.timed("stat", 3, lambda: None)
    assert "@@BENCH-MARK" not in capsys.readouterr().out
    monkeypatch.setenv("BENCH_MARKS", "1")
    metadata.timed("stat", 3, lambda: print("work"))
    out = capsys.readouterr().out.splitlines()
    assert [gp.MARK.fullmatch(out[0]).groups(), out[1], gp.MARK.fullmatch(out[3]).groups()] == \
        [("start", "stat"), "work", ("end", "stat")]
    assert out[2].startswith('BENCH {"phase": "stat"')
    r, w = os.pipe()
    try:
        os.write(w, b"g")       # the go byte, read back by the barrier itself
        barrier = metadata.Barrier(f"{r},{w}")
        barrier.timed("stat", 3, lambda: None)
    finally:
        os.close(r)
        os.close(w)
    assert "@@BENCH-MARK" not in capsys.readouterr().out
    run = _run(1000, 1.0, 0.05, 1.0, 1000, step="stat")
    run["steps"]["stat"]["daemon_by_name"] = {"vfsd-request-1": [0.1, 1000, 0.04]}
    lines = gp.summarize({"ours": [run]})
    assert lines[0] == "## stat" and "| ours | vfsd-request-1 | 40.0 | 1.00 |" in lines


def test_make_profile_keeps_the_hand_written_guest_section():
    from tests.perf import profile
    generated = "# Where the time goes\n\n## The floor, and threads\n\n| a | b |\n"
    hand = f"\n{profile.KEPT_HEADING}\n\nmeasured by hand\n\n### more\n\ntext\n"
    assert profile.kept_section(generated + hand) == hand
    assert profile.kept_section(generated) == ""
    assert profile.kept_section("") == ""
    # what main() writes: the new generated part, then the kept tail
    assert (generated + profile.kept_section(generated + hand)).endswith("### more\n\ntext\n")
