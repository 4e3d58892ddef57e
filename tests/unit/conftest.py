"""Fixtures shared by the FUSE op tests: a share directory, and sessions on
it driven through FuseSession.handle (tests/unit/fusereq.py)."""

from __future__ import annotations

import pytest

from tests.unit.fusereq import start_session


@pytest.fixture
def share(tmp_path, monkeypatch):
    root = tmp_path / "share"
    root.mkdir()
    monkeypatch.chdir("/proc/self/fd")  # the worker's cwd (INTERNALS.md)
    return root


@pytest.fixture
def connect(share):
    """connect(**config) -> a client of a new session on ``share`` after INIT."""
    sessions = []

    def connect(**config):
        session, client = start_session(share, **config)
        sessions.append(session)
        return client

    yield connect
    for session in sessions:
        session.close()
        session.inodes.close()


@pytest.fixture
def fuse(connect):
    return connect()


@pytest.fixture(params=[False, True], ids=["plain", "event-idx"])
def rig(request, tmp_path, monkeypatch):
    """The wait loop's rig (tests/unit/waitrig.py) in a fresh directory,
    without and with EVENT_IDX."""
    from tests.unit.waitrig import Rig

    monkeypatch.chdir(tmp_path)
    r = Rig(str(tmp_path), request.param)
    yield r
    r.close()


@pytest.fixture(autouse=True)
def closer_settled():
    """After each test, the C closer thread (daemon/fuse/_closer.h) has
    closed what the test's sessions queued: its closes land up to 5 ms
    later, and tests that count this process's fds must not see another
    test's."""
    yield
    import sys
    import time
    ext = sys.modules.get("daemon.fuse._fastops")
    if ext is None:
        return
    deadline = time.monotonic() + 5.0
    while ext.closer_stats()[0] and time.monotonic() < deadline:
        time.sleep(0.001)
