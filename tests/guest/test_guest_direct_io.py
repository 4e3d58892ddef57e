"""``--allow-direct-io`` from a real guest.

The guest writes 4 MiB to a new file with O_DIRECT and reads it back with
O_DIRECT (page-aligned buffers, as direct I/O wants), then prints the
checksums in one ``DIRECTIO {json}`` line. By default the host drops the
guest's O_DIRECT, so the data passed through the host page cache: the file
is resident there afterwards. With ``--allow-direct-io`` the host opened it
with O_DIRECT too: none of it is resident (``fincore``). Either way the
data is intact on both sides. Two short boots, module scoped.
"""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from .conftest import BOOTS, _start_daemon, guest_dirs
from .harness import python_in_guest

pytestmark = pytest.mark.guest

PREFIX = "DIRECTIO "
SIZE = 4 << 20
GUEST_SCRIPT = f"""
import hashlib, json, mmap, os
chunk = 1 << 20
data = os.urandom({SIZE})
buf = mmap.mmap(-1, chunk)  # page-aligned
fd = os.open("/mnt/direct", os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_DIRECT, 0o644)
for off in range(0, len(data), chunk):
    buf[:] = data[off:off + chunk]
    assert os.write(fd, buf) == chunk
os.close(fd)
fd = os.open("/mnt/direct", os.O_RDONLY | os.O_DIRECT)
got = bytearray()
while True:
    n = os.readv(fd, [buf])
    if not n:
        break
    got += buf[:n]
os.close(fd)
print({PREFIX!r} + json.dumps({{"written": hashlib.sha256(data).hexdigest(),
                               "read": hashlib.sha256(got).hexdigest()}}), flush=True)
"""


def resident_bytes(path) -> int:
    """How much of ``path`` is in the host page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip())


@pytest.fixture(scope="module", params=[False, True], ids=["default", "allow-direct-io"])
def run(request, tmp_path_factory):
    allow = request.param
    base, shared, run_dir = guest_dirs(tmp_path_factory, "guest-direct-io")
    d = _start_daemon("ours", shared, "auto", run_dir, ("--allow-direct-io",) if allow else ())
    try:
        r = python_in_guest(d, GUEST_SCRIPT, PREFIX, base / "console.log")
    finally:
        d.stop()
    path = shared / "direct"
    host = {"resident": None, "sha": None}
    if path.exists():
        host["resident"] = resident_bytes(path)  # before reading it here caches it
        host["sha"] = hashlib.sha256(path.read_bytes()).hexdigest()
    BOOTS.append(("ours", "auto" + (" --allow-direct-io" if allow else ""), r.guest.duration,
                  f"direct io {r.record} host {host}; console {base / 'console.log'}"))
    return {"allow": allow, "seen": r.record, "guest": r.guest, "host": host,
            "daemon_exit": r.daemon_exit, "log": r.daemon_log}


def test_the_guest_wrote_and_read_back_with_o_direct(run):
    seen = run["seen"]
    assert seen is not None and run["guest"].exit_status == 0, run["guest"].describe()
    assert seen["read"] == seen["written"]


def test_the_host_has_the_data_and_caches_it_only_without_the_option(run):
    resident = run["host"]["resident"]
    if run["allow"]:
        assert resident == 0, run["host"]
    else:
        assert resident > 0, run["host"]  # all of it, unless the host was short of memory
    assert run["host"]["sha"] == run["seen"]["written"]


def test_daemon_exits_cleanly(run):
    assert run["daemon_exit"] == 0, run["log"][-3000:]
