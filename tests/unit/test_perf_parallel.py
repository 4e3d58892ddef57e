"""The bench's parallel part (tests/perf/bench.py): daemons interleaved
round by round, each figure the median of its rounds, the spread reported."""

import argparse

from tests.perf import bench


def scripted(monkeypatch, figures):
    """guest_run answers from ``figures[name]`` (the kind, "-noxattr" added
    for ours with --no-xattr), one value per call, and records the order of
    the calls."""
    calls = []

    def fake(kind, cache, p, tarball, with_footprint, extra_args=(), platform="a",
             num_request_queues=1, command=None):
        name = kind + ("-noxattr" if "--no-xattr" in extra_args else "")
        calls.append((name, num_request_queues, platform))
        v = figures[name].pop(0)
        phases = {"par-create": {"ops": v, "seconds": 1.0},
                  "par-seq-read": {"bw_bytes": v * (1 << 20), "iops": v, "seconds": 1.0, "ops": 1}}
        return {"phases": phases, "memory": {}, "seconds": 1.0, "status": 0 if v else 1,
                "failures": [] if v else ["BENCH-FAIL par-x"]}

    monkeypatch.setattr(bench, "guest_run", fake)
    return calls


def test_rounds_alternate_the_daemons_and_keep_the_median(monkeypatch):
    calls = scripted(monkeypatch, {"ours": [10.0, 1000.0, 30.0], "ours-noxattr": [40.0, 50.0, 45.0],
                                   "rust": [5.0, 7.0, 6.0]})
    res = bench.parallel_part(dict(bench.QUICK), 3)
    assert [c[0] for c in calls] == ["ours", "ours-noxattr", "rust"] * 3
    assert all(c[2] == "b" for c in calls)
    assert dict((k, q) for k, q, _ in calls) == {"ours": 2, "ours-noxattr": 2, "rust": 1}
    # one outlier (a neighbour's burst, or its absence) does not make the figure
    assert res["ours"]["median"]["par-create"] == 30.0
    assert res["rust"]["median"]["par-seq-read"] == 6.0
    assert res["ours"]["runs"]["par-create"] == [10.0, 1000.0, 30.0]
    assert len(res["ours"]["load"]) == 3
    assert res["ours"]["failures"] == []
    rows = {r["name"]: r for r in bench.build_rows(None, None, {}, bench.QUICK, res)}
    assert rows["b/par-create"]["ratio_rust"] == 5.0
    # the same Rust runs against ours without extended attributes (Rust's default)
    assert rows["b-noxattr/par-create"]["ours"] == 45.0
    assert rows["b-noxattr/par-create"]["ratio_rust"] == 7.5
    assert "ours --no-xattr with 2 request queues" in rows["b-noxattr/par-create"]["section"]


def test_a_failed_round_is_reported(monkeypatch):
    scripted(monkeypatch, {"ours": [10.0, 0.0], "ours-noxattr": [10.0, 10.0], "rust": [5.0, 6.0]})
    res = bench.parallel_part(dict(bench.QUICK), 2)
    assert len(res["ours"]["failures"]) == 1 and res["ours"]["failures"][0].startswith("round 2:")


def test_spread_and_markdown_show_median_lowest_highest(monkeypatch):
    assert bench.spread([3.0, 1.0, 2.0]) == "2.0 (1.0–3.0, n=3)"
    assert bench.spread([]) == "–"
    scripted(monkeypatch, {"ours": [10.0, 20.0, 30.0], "ours-noxattr": [11.0, 21.0, 31.0],
                           "rust": [5.0, 7.0, 6.0]})
    p = dict(bench.QUICK)
    res = bench.parallel_part(p, 3)
    rows = bench.build_rows(None, None, {}, p, res)
    info = {"date": "d", "platform_a": "a", "platform_b": "b"}
    md = bench.render_markdown(rows, info, p, argparse.Namespace(quick=True), None, 60.0, parallel=res)
    assert ("| create small files, 2 processes (/s) | 20.0 (10.0–30.0, n=3) | 21.0 (11.0–31.0, n=3) "
            "| 6.0 (5.0–7.0, n=3) |") in md
    assert "ours --no-xattr, 2 q" in md
    assert "load average (1 min) at each run" in md


def test_markdown_of_a_run_cut_short_names_the_parts_not_measured(monkeypatch):
    scripted(monkeypatch, {"ours": [10.0], "ours-noxattr": [11.0], "rust": [5.0]})
    p = dict(bench.QUICK)
    res = bench.parallel_part(p, 1)
    rows = bench.build_rows(None, None, {}, p, res)
    info = {"date": "d", "platform_a": "a", "platform_b": "b"}
    md = bench.render_markdown(rows, info, p, argparse.Namespace(quick=True), None, 60.0, parallel=res,
                               pending=["rootfs"])
    assert "**Incomplete:**" in md and "not measured (yet): rootfs." in md
    full = bench.render_markdown(rows, info, p, argparse.Namespace(quick=True), None, 60.0, parallel=res)
    assert "Incomplete" not in full


def test_a_daemon_failing_one_frontend_run_is_retried_not_fatal(monkeypatch):
    calls = []

    def rates(kind, ops, depths, seconds, cpu=None):
        calls.append(kind)
        if kind == "rust" and calls.count("rust") == 1:
            raise TimeoutError("INIT unique 2: no completion")
        if kind == "c":
            raise RuntimeError("c daemon exited with 1")
        keys = [f"{op}-d{d}" for op in ops for d in depths]
        cpu.update({k: 1.0 for k in keys})
        return {k: 10.0 for k in keys}

    monkeypatch.setattr(bench, "daemon_rates", rates)
    monkeypatch.setattr(bench, "log", lambda msg: None)
    best = bench.frontend_part(dict(bench.QUICK), 1)
    assert calls == ["ours", "c", "c", "rust", "rust"]
    assert best["rust"]["getattr-d1"] == 10.0 and best["c"] == {}
    # the rows skip what a baseline never measured instead of failing the report
    assert not [r for r in bench.build_rows(None, best, {}, dict(bench.QUICK)) if r["name"] == "getattr-d1"]


def test_markdown_names_the_parallel_rounds_only_when_that_part_ran():
    info = {"date": "d", "platform_a": "a", "platform_b": "b"}
    md = bench.render_markdown([], info, dict(bench.QUICK), argparse.Namespace(quick=True), None, 1.0)
    assert "interleaved runs)" not in md
    assert "alternating runs of each daemon (the order reversed every other round) on a shared 2-core machine." in md


def barrier_pair():
    """One child's side of parallel_meta's barrier (metadata.Barrier) and
    the parent's fds for it."""
    from tests.perf.guest_workloads import metadata
    import os
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    return metadata.Barrier(f"{go_r},{ready_w}"), ready_r, go_w


def test_phase_barrier_lets_no_process_start_a_phase_before_the_other_is_ready():
    import threading
    import time
    from tests.perf.guest_workloads import parallel_meta
    sides = [barrier_pair() for _ in range(2)]
    log = []

    def child(i, delay):
        for phase in parallel_meta.PHASES:
            time.sleep(delay)
            log.append(("ready", i, phase))
            sides[i][0].wait()
            log.append(("go", i, phase))
            sides[i][0].done()

    threads = [threading.Thread(target=child, args=(0, 0.0)), threading.Thread(target=child, args=(1, 0.05))]
    for t in threads:
        t.start()
    parallel_meta.release_phases([s[1] for s in sides], [s[2] for s in sides])
    for t in threads:
        t.join(5)
    for phase in parallel_meta.PHASES:
        first_go = min(n for n, e in enumerate(log) if e[0] == "go" and e[2] == phase)
        both_ready = max(n for n, e in enumerate(log) if e[0] == "ready" and e[2] == phase)
        assert both_ready < first_go, log


def test_phase_barrier_stops_the_other_process_when_one_goes_away():
    import os
    import pytest
    from tests.perf.guest_workloads import parallel_meta
    sides = [barrier_pair() for _ in range(2)]
    # the second process failed before its first phase: its ready end closes
    os.close(sides[1][0].fds[1])
    os.close(sides[1][0].fds[0])
    os.write(sides[0][0].fds[1], b"r")
    parallel_meta.release_phases([s[1] for s in sides], [s[2] for s in sides])
    with pytest.raises(SystemExit, match="barrier"):
        sides[0][0].wait()   # its next phase: no go byte, the parent's end is closed
