"""``--announce-submounts`` from a real guest.

The host mounts a small tmpfs inside the share (``sub``), next to a plain
directory (``plain``). The guest stats the share, ``plain`` and ``sub``,
writes a file into ``sub`` and lists its virtiofs mounts, in one
``SUBMOUNT {json}`` line. With the option the guest mounts ``sub`` apart:
a mount of its own, with a device number of its own, as on the host.
Without it the guest sees one device for the whole share (and the inode
numbers of the two file systems could collide). Either way the file lands
on the host's tmpfs. Two short boots, module scoped.
"""

from __future__ import annotations

import subprocess

import pytest

from .conftest import BOOTS, _start_daemon, guest_dirs
from .harness import python_in_guest

pytestmark = pytest.mark.guest

PREFIX = "SUBMOUNT "
GUEST_SCRIPT = f"""
import json, os
with open("/mnt/sub/from-guest", "w") as f:
    f.write("written in the guest")
# "name/.": stat(2) does not trigger an automount on its last component
r = {{name: os.stat(os.path.join("/mnt", name, ".")).st_dev for name in ("", "plain", "sub")}}
r["mounts"] = sorted(line.split()[1] for line in open("/proc/self/mounts")
                     if line.split()[2] == "virtiofs")
print({PREFIX!r} + json.dumps(r), flush=True)
"""


@pytest.fixture(scope="module", params=[False, True], ids=["default", "announce"])
def run(request, tmp_path_factory):
    announce = request.param
    base, shared, run_dir = guest_dirs(tmp_path_factory, "guest-submounts")
    (shared / "plain").mkdir()
    sub = shared / "sub"
    sub.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "vfsd-submount", str(sub)], check=True)
    d = None
    try:
        d = _start_daemon("ours", shared, "auto", run_dir,
                          ("--announce-submounts",) if announce else ())
        r = python_in_guest(d, GUEST_SCRIPT, PREFIX, base / "console.log")
        host_file = (sub / "from-guest").read_text() if (sub / "from-guest").exists() else None
        BOOTS.append(("ours", "auto" + (" --announce-submounts" if announce else ""), r.guest.duration,
                      f"submounts {r.record}; console {base / 'console.log'}"))
        yield {"announce": announce, "seen": r.record, "guest": r.guest, "host_file": host_file,
               "daemon_exit": r.daemon_exit, "log": r.daemon_log}
    finally:
        if d is not None:
            d.stop()
        subprocess.run(["umount", "-l", str(sub)], check=False)


def test_the_guest_reports(run):
    assert run["seen"] is not None, run["guest"].describe()
    assert run["guest"].exit_status == 0, run["guest"].describe()


def test_the_submount_has_its_own_device_only_when_announced(run):
    seen = run["seen"]
    assert seen is not None
    assert seen["plain"] == seen[""], seen  # a plain directory: the share's device
    if run["announce"]:
        assert seen["sub"] != seen[""], seen
        assert seen["mounts"] == ["/mnt", "/mnt/sub"], seen
    else:
        assert seen["sub"] == seen[""], seen
        assert seen["mounts"] == ["/mnt"], seen


def test_the_guests_file_is_on_the_hosts_tmpfs(run):
    assert run["host_file"] == "written in the guest"


def test_daemon_exits_cleanly(run):
    assert run["daemon_exit"] == 0, run["log"][-3000:]
