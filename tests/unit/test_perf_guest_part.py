"""The bench's guest and daemon-bound parts (tests/perf/bench.py): the
daemons run in the given order in even rounds and reversed in odd ones,
every figure is the best of its rounds, every round is kept and compared
within the round, and the footprint is taken once per daemon (platform
a, its first cache=auto boot)."""

from tests.perf import bench


def test_round_order_reverses_every_other_round():
    assert bench.round_order(("ours", "c", "rust"), 0) == ["ours", "c", "rust"]
    assert bench.round_order(("ours", "c", "rust"), 1) == ["rust", "c", "ours"]
    assert bench.round_order(("ours", "c", "rust"), 2) == ["ours", "c", "rust"]


def test_guest_part_order_best_and_footprint(monkeypatch):
    calls = []
    figures = {"ours": [3.0, 5.0, 4.0, 1.0], "c": [2.0, 2.5, 2.0, 2.0], "rust": [1.0, 1.5, 9.0, 0.5]}

    def fake(kind, cache, p, tarball, with_footprint, extra_args=(), platform="a",
             num_request_queues=1, command=None):
        calls.append((kind, cache, with_footprint))
        v = figures[kind].pop(0)
        return {"phases": {"create": {"ops": v, "seconds": 1.0}},
                "memory": {"idle": {"pss": v}}, "seconds": 1.0, "status": 0, "failures": []}

    monkeypatch.setattr(bench, "guest_run", fake)
    monkeypatch.setattr(bench, "source_tarball", lambda files: None)
    res = bench.guest_part(dict(bench.QUICK), 2, "a")
    assert [(k, c) for k, c, _ in calls] == (
        [(k, "never") for k in ("ours", "c", "rust", "rust", "c", "ours")]
        + [(k, "auto") for k in ("ours", "c", "rust", "rust", "c", "ours")])
    assert [k for k, _c, f in calls if f] == ["ours", "c", "rust"]
    assert all(c == "auto" for _k, c, f in calls if f)
    assert res["never"]["best"] == {"ours": {"create": 5.0}, "c": {"create": 2.5}, "rust": {"create": 1.5}}
    assert res["auto"]["best"] == {"ours": {"create": 4.0}, "c": {"create": 2.0}, "rust": {"create": 9.0}}
    # every round kept, by round (not by the order the daemons ran in)
    assert res["never"]["runs"] == {"ours": {"create": [3.0, 5.0]}, "c": {"create": [2.0, 2.5]},
                                    "rust": {"create": [1.0, 1.5]}}
    assert res["auto"]["runs"]["rust"] == {"create": [9.0, 0.5]}


def test_paired_rounds_and_verdict():
    assert bench.paired_rounds([2.0, None, 3.0], [4.0, 1.0, 2.0]) == [0.5, 1.5]
    assert bench.paired_rounds([2.0, 3.0], [None, 0.0]) == []
    assert bench.round_verdict([0.9, 0.8]) == "below"
    assert bench.round_verdict([1.1, 1.0]) == "above"
    assert bench.round_verdict([0.9, 1.1, 0.7]) == "mixed"
    assert bench.round_verdict([0.5]) is None


def _guest(ours, c, rust):
    runs = {"ours": {"create": ours}, "c": {"create": c}, "rust": {"create": rust}}
    best = {k: {"create": max(v["create"])} for k, v in runs.items()}
    return {"a": {"never": {"best": best, "runs": runs, "memory": {}},
                  "auto": {"best": {k: {} for k in bench.KINDS}, "runs": {}, "memory": {}}}}


def test_rows_and_report_tell_every_round_from_best_of_only():
    # best-of: ours 5 < Rust 6 in both; within rounds: below Rust in
    # round 1 only (3/6), above in round 2 (5/4); below C in both
    rows = bench.build_rows(_guest([3.0, 5.0], [4.0, 5.5], [6.0, 4.0]), None, None, dict(bench.QUICK))
    (row,) = rows
    assert row["rounds_ratio_rust"] == [0.5, 1.25]
    assert row["rounds_ratio"] == [0.75, 5.0 / 5.5]
    lines = bench.rounds_goal_lines(rows)
    assert lines[0] == ("- guest rows below Rust in every round (ours / Rust of each round): 0 of 1 "
                        "(about 0.2 by chance alone were the daemons equal)")
    assert lines[1] == "- below Rust in the best-of only, above it in some round: a/never/create (0.50, 1.25)"
    assert lines[2] == ("- guest rows below C in every round (ours / C of each round): 1 of 1 "
                        "(about 0.2 by chance alone were the daemons equal): a/never/create (0.75, 0.91)")
    table = bench.render_rounds(rows)
    assert "| a/never/create | 3.0, 5.0 | 4.0, 5.5 | 6.0, 4.0 | 0.75, 0.91 | 0.50, 1.25 |" in table


def test_results_without_rounds_still_render():
    g = _guest([3.0], [4.0], [6.0])
    del g["a"]["never"]["runs"]
    rows = bench.build_rows(g, None, None, dict(bench.QUICK))
    assert "rounds" not in rows[0]
    assert bench.rounds_goal_lines(rows) == [] and bench.render_rounds(rows) == []


def test_frontend_part_reverses_the_order_too(monkeypatch):
    calls = []

    def fake(kind, ops, depths, seconds, extra_args=(), env=None, cpu=None):
        calls.append(kind)
        cpu["getattr-d1"] = 2.0
        return {"getattr-d1": 10.0 * (len(calls))}

    monkeypatch.setattr(bench, "daemon_rates", fake)
    res = bench.frontend_part(dict(bench.QUICK), 2)
    assert calls == ["ours", "c", "rust", "rust", "c", "ours"]
    assert res["ours"]["getattr-d1"] == 60.0 and res["rust"]["getattr-d1"] == 40.0
    assert res["c"]["cpu:getattr-d1"] == 2.0
