"""``--metrics-socket`` scraped while a real guest works.

The guest (cache=never, so every operation reaches the daemon) creates,
fsyncs, reads and misses files in known numbers, then drops a marker file
and waits. A host thread scrapes the metrics socket all along; every scrape
must parse with prometheus_client's parser, counters never go down, and the
scrape taken after the marker must show exactly the guest's work.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.metrics_client import scrape

from .conftest import BOOTS, _start_daemon, guest_dirs
from .harness import python_in_guest

pytestmark = pytest.mark.guest

PREFIX = "METRICS "
FILES, SIZE, MISSES = 20, 10_000, 15
GUEST_SCRIPT = f"""
import json, os, time
data = bytes(range(256)) * ({SIZE} // 256 + 1)
data = data[:{SIZE}]
for i in range({FILES}):
    with open(f"/mnt/f{{i}}", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
got = 0
for i in range({FILES}):
    with open(f"/mnt/f{{i}}", "rb") as f:
        got += len(f.read())
misses = 0
for i in range({MISSES}):
    try:
        os.stat(f"/mnt/missing{{i}}")
    except FileNotFoundError:
        misses += 1
held = open("/mnt/f0", "rb")      # one inode and one open file while the host looks
open("/mnt/done", "w").close()
time.sleep(4)
held.close()
print({PREFIX!r} + json.dumps({{"read": got, "misses": misses}}), flush=True)
"""


def get(samples, name, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base, shared, run_dir = guest_dirs(tmp_path_factory, "guest-metrics")
    path = str(run_dir / "metrics.sock")
    d = _start_daemon("ours", shared, "never", run_dir, ("--metrics-socket", path))
    scrapes, final, errors = [], [], []
    stop = threading.Event()

    def scraper():
        while not stop.is_set():
            try:
                s = scrape(path)
            except (OSError, ValueError) as e:
                if not stop.is_set():
                    errors.append(repr(e))
                break
            scrapes.append(s)
            if not final and (shared / "done").exists():
                time.sleep(0.5)           # the guest's last replies are published
                final.append(scrape(path))
            time.sleep(0.2)

    t = threading.Thread(target=scraper, daemon=True)
    t.start()
    try:
        r = python_in_guest(d, GUEST_SCRIPT, PREFIX, base / "console.log")
    finally:
        stop.set()
        t.join(10)
        d.stop()
    BOOTS.append(("ours", "never --metrics-socket", r.guest.duration,
                  f"{len(scrapes)} scrapes; console {base / 'console.log'}"))
    return {"r": r, "scrapes": scrapes, "final": final[0] if final else None, "errors": errors}


def test_the_guest_did_its_work(run):
    r = run["r"]
    assert r.record == {"read": FILES * SIZE, "misses": MISSES}, r.guest.describe()


def test_every_scrape_parsed_and_counters_never_went_down(run):
    # errors: a scrape that failed while the daemon still served
    assert run["errors"] == [] or len(run["scrapes"]) > 5, run["errors"]
    assert len(run["scrapes"]) > 5
    for before, after in zip(run["scrapes"], run["scrapes"][1:]):
        for key, v in before.items():
            if key[0].endswith(("_total", "_count", "_bucket")):
                assert after.get(key, 0) >= v, key


def test_the_counts_match_the_guest_s_work(run):
    s = run["final"]
    assert s is not None, "no scrape after the guest finished"
    w = {"worker": "request-1"}
    assert get(s, "pyvirtiofsd_requests_total", op="CREATE", **w) == FILES + 1   # + the marker
    assert get(s, "pyvirtiofsd_requests_total", op="FSYNC", **w) == FILES
    assert get(s, "pyvirtiofsd_requests_total", op="WRITE", **w) == FILES
    assert get(s, "pyvirtiofsd_request_duration_seconds_count", op="WRITE", **w) == FILES
    assert get(s, "pyvirtiofsd_written_bytes_total", **w) == FILES * SIZE
    assert get(s, "pyvirtiofsd_read_bytes_total", **w) == FILES * SIZE
    assert get(s, "pyvirtiofsd_errors_total", op="LOOKUP", errno="ENOENT", **w) >= MISSES
    assert get(s, "pyvirtiofsd_requests_total", op="INIT", **w) == 1
    assert get(s, "pyvirtiofsd_worker_up", **w) == 1
    assert get(s, "pyvirtiofsd_worker_up", worker="hiprio") == 1
    assert get(s, "pyvirtiofsd_inodes") >= 1          # f0, held open
    assert get(s, "pyvirtiofsd_open_files", **w) == 1
    assert get(s, "pyvirtiofsd_inode_fds", **w) >= 1
    assert get(s, "pyvirtiofsd_fd_limit", **w) > 0
    assert get(s, "pyvirtiofsd_queue_batch_size_count", **w) > 0
    assert get(s, "pyvirtiofsd_uptime_seconds") > 0
