"""Mount options from a real guest: ``ro``, ``remount,ro`` and back to
``rw``; and atime, which the host's mount decides whatever the guest's.

Two boots of tests/guest/mount_guest.py per platform (a: QEMU 7.2 + Linux
6.1, b: QEMU 10 + Linux 6.12), each on a shared directory that is a tmpfs
the test mounts on the host:

- host ``strictatime``, guest mounts read-write: write, ``remount,ro``,
  writes refused, ``remount,rw``, writes work;
- host ``noatime``, guest mounts with ``ro`` (the boot's mount option):
  writes refused from the start, then ``remount,rw``.

Each time the same steps run on a tmpfs in the guest: virtiofs must answer
as that local file system does (EROFS for every write; reads work). Then
the guest remounts /mnt ``noatime``, ``strictatime`` and ``relatime`` in
turn and reads a file the host made with an atime in 2000: on the
strictatime host every read moves the host's atime to now, on the noatime
host none does. ~15-25 s per boot.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from .conftest import BOOTS, _start_daemon, guest_dirs
from .mount_guest import ATIME_OPTS
from .vm import guest_path, run_guest

pytestmark = [pytest.mark.guest, pytest.mark.usecase]

SCRIPT = guest_path(os.path.join(os.path.dirname(__file__), "mount_guest.py"))
OLD_TIME = 946_684_800  # 2000-01-01
# (platform, host tmpfs atime option, guest mount options)
CASES = [(p, h, g) for p in ("a", "b") for h, g in (("strictatime", ""), ("noatime", "ro"))]


def record(text: str, prefix: str):
    found = None
    for line in text.splitlines():
        if line.startswith(prefix):
            try:
                found = json.loads(line[len(prefix):])
            except ValueError:
                pass
    return found


@pytest.fixture(scope="module", params=CASES,
                ids=[f"{p}-host-{h}-guest-{g or 'rw'}" for p, h, g in CASES])
def run(request, tmp_path_factory):
    platform, host_opt, guest_opts = request.param
    base, shared, run_dir = guest_dirs(tmp_path_factory, f"mount-{host_opt}-{platform}")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=16m,mode=0755,{host_opt}",
                    "vfsd-atime", str(shared)], check=True)
    d = None
    try:
        (shared / "atime").mkdir()
        for opt in ATIME_OPTS:
            p = shared / "atime" / opt
            p.write_bytes(b"read me\n")
            os.utime(p, (OLD_TIME, OLD_TIME))
        if guest_opts == "ro":  # the guest cannot make it
            (shared / "ro").mkdir()
            (shared / "ro" / "before").write_bytes(b"before")
        d = _start_daemon("ours", shared, "auto", run_dir)
        t0 = time.time()
        guest = run_guest(d.socket_path, f"export PYTHONDONTWRITEBYTECODE=1; python3 {SCRIPT}",
                          timeout=600, mount_opts=guest_opts, console_log=base / "console.log",
                          platform=platform)
        daemon_exit = d.wait(30)
        host_atime = {opt: os.stat(shared / "atime" / opt).st_atime for opt in ATIME_OPTS}
        ro_before = (shared / "ro" / "before").read_bytes() if (shared / "ro" / "before").exists() else None
        host_mount = next(line.split()[3] for line in open("/proc/self/mounts")
                          if line.split()[1] == str(shared))
        BOOTS.append(("ours", f"auto mount options host {host_opt} guest {guest_opts or 'rw'}, "
                      f"platform {platform}",
                      guest.duration, f"console {base / 'console.log'}"))
        yield {"host_opt": host_opt, "shared": shared, "guest_opts": guest_opts, "guest": guest, "t0": t0,
               "mount": record(guest.output, "MOUNT "), "atime": record(guest.output, "ATIME "),
               "host_atime": host_atime, "ro_before": ro_before, "host_mount": host_mount, "daemon_exit": daemon_exit,
               "log": d.log()}
    finally:
        if d is not None:
            d.stop()
        subprocess.run(["umount", "-l", str(shared)], check=False)


def test_the_guest_ran(run):
    assert run["guest"].exit_status == 0, run["guest"].describe()
    assert run["mount"] is not None and run["atime"] is not None, run["guest"].describe()
    assert run["daemon_exit"] == 0, run["log"][-2000:]


def test_read_only_behaves_as_on_a_local_file_system(run):
    ref, vfs = run["mount"]["ref"], run["mount"]["vfs"]
    assert vfs == ref, json.dumps(run["mount"], indent=1)
    assert vfs["started_ro"] == (run["guest_opts"] == "ro")
    assert vfs["is_ro"] and not vfs["is_ro_after"] and vfs["remount_rw"] == "ok"
    if not vfs["started_ro"]:
        assert vfs["write_rw"] == "ok" and vfs["remount_ro"] == "ok"
    refused = dict(vfs["refused"])
    assert {refused.pop(k) for k in ("read", "stat", "listdir")} == {"ok"}
    assert set(refused.values()) == {"EROFS"}, refused
    assert set(vfs["after"].values()) == {"ok"}, vfs["after"]


def test_the_host_kept_only_what_was_written_read_write(run):
    shared = run["shared"]
    assert run["ro_before"] == b"before+more"
    assert sorted(os.listdir(shared / "ro")) == ["before", "dir"]
    assert sorted(os.listdir(shared)) == ["atime", "ro"]


def atime_mode(options: str) -> str:
    """What /proc/mounts says of atime: noatime, relatime or strictatime
    (shown as neither)."""
    opts = options.split(",")
    return "noatime" if "noatime" in opts else "relatime" if "relatime" in opts else "strictatime"


def test_host_atime_follows_the_host_mount_not_the_guest_option(run):
    atime, host = run["atime"], run["host_atime"]
    assert all(atime[o]["remount"] == "ok" for o in ATIME_OPTS), atime
    for opt in ATIME_OPTS:
        assert atime_mode(atime[opt]["options"]) == opt, atime[opt]
    assert atime_mode(run["host_mount"]) == run["host_opt"], run["host_mount"]
    if run["host_opt"] == "strictatime":
        assert all(host[o] >= run["t0"] - 1 for o in ATIME_OPTS), host
    else:
        assert all(host[o] == OLD_TIME for o in ATIME_OPTS), host
