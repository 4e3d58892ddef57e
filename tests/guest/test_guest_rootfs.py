"""Root file system on virtio-fs: a Debian 12 minimal root (tests/guest/rootfs.py,
built once by scripts/setup.sh) unpacked into a fresh directory, served by the
daemon, booted with ``rootfstype=virtiofs root=TAG rw`` into its own systemd
(platform a: Linux 6.1 through our switch_root initramfs, which loads
virtiofs; platform b: Linux 6.12 mounts the root itself, no initramfs).

In the guest (tests/guest/rootfs_boot.py): systemd reaches multi-user.target
with no failed unit, ``dpkg -i`` of a package and the dependencies the root
lacks succeeds, ``dpkg --verify`` and ``dpkg --audit`` are clean; then the guest reboots in place on the same
daemon and the second boot finds the packages installed, verified and
runnable. On the host: the install is in the shared directory.

Quick mode (``make test``, ~4 min a boot pair): one small package (``file``
and its two libraries), verified alone, ours on both platforms. Full mode:
python3 and its 19 dependencies, ``dpkg --verify`` of every package of the
root, and the same boots with the Rust virtiofsd on both platforms (where it
differs from ours, the difference is ours; ``make bench`` times both).
"""

from __future__ import annotations

import os

import pytest

from .conftest import BOOTS, guest_dirs
from .harness import QUICK
from .rootfs import INSTALLED_FILE, ensure_rootfs
from .rootfs_boot import boot, prepare_share, start_root_daemon

pytestmark = [pytest.mark.guest, pytest.mark.usecase]

INSTALL_SET = "small" if QUICK else "python3"
# (daemon, platform)
CASES = [("ours", "a"), ("ours", "b")] + ([] if QUICK else [("rust", "a"), ("rust", "b")])
# what the installed program prints (rootfs_boot.RUN_ARG runs it; spaces are _)
RUN_EXPECT = {"small": "ELF_64-bit", "python3": "Beautiful_is_better_than_ugly"}
TIMEOUT = 1800


@pytest.fixture(scope="module", params=CASES, ids=[f"{k}-{p}" for k, p in CASES])
def run(request, tmp_path_factory):
    kind, platform = request.param
    ensure_rootfs()  # setup.sh built it; a miss builds it here (minutes)
    base, shared, run_dir = guest_dirs(tmp_path_factory, f"rootfs-{kind}-{platform}")
    prepare_share(shared, INSTALL_SET, verify_all=not QUICK)
    d = start_root_daemon(kind, shared, run_dir)
    try:
        result = boot(d.socket_path, platform, base / "console.log", timeout=TIMEOUT)
        daemon_rc = d.wait(30)
    finally:
        d.stop()
    b = result.boots
    BOOTS.append((kind, f"auto root file system, platform {platform}", result.duration,
                  f"multi-user at {[x.get('uptime-multi-user') for x in b]} s, "
                  f"dpkg -i {b[0].get('install', {}).get('seconds') if b else '?'} s; "
                  f"console {base / 'console.log'}"))
    dpkg_log = shared / "var/lib/rootfs-check/dpkg-i.log"
    return {"result": result, "shared": shared, "daemon_rc": daemon_rc, "log": d.log(), "kind": kind,
            "dpkg_log": dpkg_log.read_text(errors="replace")[-3000:] if dpkg_log.exists() else "(no dpkg log)"}


def test_both_boots_ran_to_their_poweroff(run):
    r = run["result"]
    assert not r.timed_out and r.qemu_returncode == 0, r.describe()
    assert [b.get("boot") for b in r.boots] == ["1", "2"], r.describe()
    assert "powering-off" in r.boots[1], r.describe()


def test_systemd_reached_multi_user_on_the_virtiofs_root(run):
    for b in run["result"].boots:
        assert b["multi-user"] == "active", b
        dev, fstype, opts = b["root-mount"].split(",", 2)
        assert (dev, fstype) == ("rootfs", "virtiofs"), b["root-mount"]
        assert opts.split(",")[0] == "rw", b["root-mount"]


def test_no_unit_failed(run):
    for b in run["result"].boots:
        assert b["failed"] == [] and b["failed-count"] == "0", (b, run["result"].describe(120))


def test_dpkg_install_succeeded_and_verifies(run):
    first = run["result"].boots[0]
    assert first["install"]["rc"] == "0", (first["install"], run["dpkg_log"], run["log"][-2000:])
    assert int(first["install"]["packages"]) >= 1
    assert first["status"] and all(s == "ii" for s in first["status"].values()), first["status"]
    assert first["verify"]["rc"] == "0" and first["verify"]["lines"] == "0", run["result"].describe(80)
    assert first["audit-lines"] == "0"
    assert first["run"]["rc"] == "0" and RUN_EXPECT[INSTALL_SET] in run["result"].console_text


def test_the_reboot_finds_the_installed_packages(run):
    first, second = run["result"].boots
    assert second["status"] == first["status"], (first["status"], second["status"])
    assert second["verify"]["rc"] == "0" and second["verify"]["lines"] == "0", run["result"].describe(80)
    assert second["audit-lines"] == "0"
    assert second["run"]["rc"] == "0", second


def test_the_install_is_in_the_host_directory(run):
    shared = run["shared"]
    path = shared / INSTALLED_FILE[INSTALL_SET].lstrip("/")
    st = os.stat(path)
    assert st.st_uid == 0 and st.st_mode & 0o111, oct(st.st_mode)
    status = (shared / "var/lib/dpkg/status").read_text()
    for name in run["result"].boots[0]["status"]:
        entry = status.split(f"Package: {name}\n", 1)[1].split("\n\n", 1)[0]
        assert "Status: install ok installed" in entry, entry
    assert (shared / "var/lib/rootfs-check/boots").read_text().strip() == "2"


def test_the_daemon_ended_cleanly(run):
    if run["kind"] == "ours":  # QEMU's exit after poweroff ends the session
        assert run["daemon_rc"] == 0, run["log"][-3000:]
