"""FUSE_HANDLE_KILLPRIV_V2 in a real guest: what it saves (issues 15/16).

With extended attributes (our default ``--xattr``) a Linux guest asks a
GETXATTR of ``security.capability`` before a write (``file_remove_privs``:
does the file carry capabilities to drop?), because a FUSE superblock is
not SB_NOSEC. When the daemon accepts HANDLE_KILLPRIV_V2 the guest sets
SB_NOSEC, so after the first write that finds nothing to drop the inode is
S_NOSEC and the guest stops asking (until the inode changes mode or
capabilities); it flags the writes of callers without CAP_FSETID instead
(docs/credentials.md).

One boot per platform and setting, the daemon's ``--metrics-socket``
scraped by the host at markers the guest drops between phases (the guest
sleeps meanwhile, so the counts between two markers are one phase's):
``N`` 4 KiB pwrites by root on its file, then ``N`` by user 65534 on its
own. The counts of WRITE and GETXATTR per phase are asserted: every write
is one WRITE; without KILLPRIV_V2 (the default) each also costs a
GETXATTR, with ``--killpriv-v2`` at most the first of each file.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests.metrics_client import scrape

from .conftest import BOOTS, _start_daemon, guest_dirs
from .harness import python_in_guest

pytestmark = pytest.mark.guest

N = 150 if os.environ.get("PYVIRTIOFSD_GUEST_QUICK") else 600
PREFIX = "KILLPRIV "
PHASES = ("root", "user")
GUEST_SCRIPT = f"""
import json, os, time
N = {N}

def mark(name):
    open("/mnt/" + name, "w").close()
    time.sleep(2.5)            # idle while the host scrapes

def loop(path):
    fd = os.open(path, os.O_WRONLY)
    for i in range(N):
        os.pwrite(fd, b"x" * 4096, (i % 64) * 4096)
    os.close(fd)

for name in ("root.dat", "user.dat"):
    with open("/mnt/" + name, "wb") as f:
        f.write(bytes(64 * 4096))
os.chown("/mnt/user.dat", 65534, 65534)
mark("m-start")
loop("/mnt/root.dat")
mark("m-root")
pid = os.fork()
if pid == 0:
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
    loop("/mnt/user.dat")
    os._exit(0)
_, status = os.waitpid(pid, 0)
mark("m-user")
print({PREFIX!r} + json.dumps({{"user_status": status}}), flush=True)
"""

CONFIGS = {  # id: (platform, daemon options)
    "a --killpriv-v2": ("a", ("--killpriv-v2",)),
    "a default": ("a", ()),
    "b --killpriv-v2": ("b", ("--killpriv-v2",)),
    "b default": ("b", ()),
}


def count(samples, op: str) -> float:
    return sum(v for (name, labels), v in samples.items()
               if name == "pyvirtiofsd_requests_total" and ("op", op) in labels)


@pytest.fixture(scope="module", params=list(CONFIGS))
def run(request, tmp_path_factory):
    platform, extra = CONFIGS[request.param]
    base, shared, run_dir = guest_dirs(tmp_path_factory, "killpriv-" + request.param.replace(" ", "_"))
    path = str(run_dir / "metrics.sock")
    d = _start_daemon("ours", shared, "auto", run_dir, ("--metrics-socket", path) + extra)
    marks: dict[str, dict] = {}
    errors: list[str] = []
    stop = threading.Event()

    def scraper():
        while not stop.is_set() and len(marks) < 3:
            for m in ("m-start", "m-root", "m-user"):
                if m not in marks and (shared / m).exists():
                    time.sleep(0.7)           # the guest's last replies are counted
                    try:
                        marks[m] = scrape(path)
                    except (OSError, ValueError) as e:
                        errors.append(repr(e))
            time.sleep(0.1)

    t = threading.Thread(target=scraper, daemon=True)
    t.start()
    try:
        r = python_in_guest(d, GUEST_SCRIPT, PREFIX, base / "console.log", platform=platform)
    finally:
        stop.set()
        t.join(10)
        d.stop()
    deltas = {}
    if len(marks) == 3:
        for phase, (a, b) in zip(PHASES, (("m-start", "m-root"), ("m-root", "m-user"))):
            deltas[phase] = {op: count(marks[b], op) - count(marks[a], op) for op in ("WRITE", "GETXATTR")}
    BOOTS.append(("ours " + platform, "auto " + " ".join(extra), r.guest.duration, f"per phase {deltas}"))
    return {"r": r, "deltas": deltas, "errors": errors, "killpriv": "--killpriv-v2" in extra}


def test_every_write_is_one_write_request(run):
    assert run["r"].record == {"user_status": 0}, run["r"].guest.describe()
    assert run["errors"] == [] and set(run["deltas"]) == set(PHASES), (run["errors"], run["deltas"])
    for phase in PHASES:
        assert run["deltas"][phase]["WRITE"] == N, (phase, run["deltas"])


def test_getxattr_before_every_write_unless_killpriv_v2(run):
    for phase in PHASES:
        getxattr = run["deltas"][phase]["GETXATTR"]
        if run["killpriv"]:
            assert getxattr <= 1, (phase, run["deltas"])   # the first write of the file at most
        else:
            assert getxattr >= N, (phase, run["deltas"])
