"""Smoke test for tests/perf/frontend_bench.py: it runs and counts (no timing assertions)."""

from __future__ import annotations

import pytest

from tests.perf.frontend_bench import OPS, requests_per_second


@pytest.mark.frontend_opts(queue_size=1024)
@pytest.mark.parametrize("depth", [1, 64])
def test_bench_smoke(frontend, depth):
    for op in OPS:
        rate = requests_per_second(frontend, op, depth, 0.2)
        assert rate > 0, op
    # the frontend is still usable afterwards
    assert frontend.getattr(1).attr.nlink >= 2
