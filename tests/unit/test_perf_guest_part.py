"""The bench's guest and daemon-bound parts (tests/perf/bench.py): the
daemons run in the given order in even rounds and reversed in odd ones,
every figure is the best of its rounds, and the footprint is taken once
per daemon (platform a, its first cache=auto boot)."""

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
