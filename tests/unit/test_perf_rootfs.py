"""The root-file-system boot's console reports (tests/guest/rootfs_boot.py) and
the bench rows made of them (tests/perf/rootfs_bench.py): what is read and
which way the ratios go, without booting anything."""

from __future__ import annotations

import os
from pathlib import Path

from tests.guest.rootfs import order_batches
from tests.guest.rootfs_boot import parse_reports
from tests.perf import bench, rootfs_bench, rootfs_ops

CONSOLE = """\
[    4.4] systemd[1]: Failed to find module 'autofs4'
[   58.6] rootfs-check[207]: @@ROOTFS boot 1@@
[   60.2] rootfs-check[207]: @@ROOTFS uptime-multi-user 60.12@@
[   61.7] rootfs-check[207]: @@ROOTFS multi-user active@@
[   62.1] rootfs-check[207]: @@ROOTFS root-mount rootfs,virtiofs,rw,relatime@@
[   63.0] rootfs-check[207]: @@ROOTFS failed systemd-foo.service@@
[   63.7] rootfs-check[207]: @@ROOTFS failed-count 1@@
[  110.8] rootfs-check[207]: @@ROOTFS install rc=0 seconds=35.08 packages=3@@
[  113.7] rootfs-check[207]: @@ROOTFS status file ii@@
[  216.3] rootfs-check[207]: @@ROOTFS verify rc=0 lines=0 seconds=95.44@@
[  221.3] rootfs-check[207]: @@ROOTFS rebooting@@
[   82.9] rootfs-check[202]: @@ROOTFS boot 2@@
[   83.5] rootfs-check[202]: @@ROOTFS uptime-multi-user 83.54@@
[   83.6] rootfs-check[202]: @@ROOTFS status file iU@@
"""


def test_reports_are_split_per_boot():
    first, second = parse_reports(CONSOLE)
    assert first["boot"] == "1" and second["boot"] == "2"
    assert first["uptime-multi-user"] == "60.12" and second["uptime-multi-user"] == "83.54"
    assert first["root-mount"] == "rootfs,virtiofs,rw,relatime"
    assert first["failed"] == ["systemd-foo.service"] and second["failed"] == []
    assert first["install"] == {"rc": "0", "seconds": "35.08", "packages": "3"}
    assert first["verify"]["lines"] == "0" and "install" not in second
    assert first["status"] == {"file": "ii"} and second["status"] == {"file": "iU"}
    assert "rebooting" in first and "rebooting" not in second


def test_reports_before_the_first_boot_line_are_ignored():
    assert parse_reports("@@ROOTFS install rc=0@@\n") == []


def test_rows_are_baseline_over_ours_seconds():
    part = {"a": {"install_set": "small", "cpu": {}, "failures": [],
                  "best": {"ours": {"boot": 50.0, "install": 40.0}, "c": {"boot": 100.0, "install": 20.0},
                           "rust": {"boot": 25.0}}}}
    rows = {r["name"]: r for r in rootfs_bench.rows(part, bench._row)}
    assert set(rows) == {"rootfs/a/boot", "rootfs/a/install"}  # nobody measured reboot/verify
    assert rows["rootfs/a/boot"]["ratio"] == 2.0 and rows["rootfs/a/boot"]["ratio_rust"] == 0.5
    assert rows["rootfs/a/install"]["ratio"] == 0.5 and rows["rootfs/a/install"]["ratio_rust"] is None
    assert "file + 2 libraries" in rows["rootfs/a/install"]["label"]
    table = bench.render_table(list(rows.values()))
    assert "2.00 (baseline / ours)" in table and "0.50 ⚠ (baseline / ours)" in table


def test_slowest_services_are_listed_per_boot():
    first, second = parse_reports("@@ROOTFS boot 1@@ @@ROOTFS blame a.service=7.32s@@ @@ROOTFS blame b.service=1s@@"
                                  " @@ROOTFS boot 2@@")
    assert first["blame"] == ["a.service=7.32s", "b.service=1s"] and second["blame"] == []


def test_install_batches_split_at_pre_depends():
    # python3 pre-depends on python3-minimal, which pre-depends on python3.11-minimal
    info = {"python3": ("p3", {"python3-minimal"}, {"python3-minimal", "python3.11", "libc6"}),
            "python3-minimal": ("p3m", {"python3.11-minimal"}, {"python3.11-minimal"}),
            "python3.11": ("p311", set(), {"python3.11-minimal", "libpython3.11-stdlib"}),
            "python3.11-minimal": ("p311m", set(), {"libpython3.11-minimal"}),
            "libpython3.11-minimal": ("lm", set(), set()),
            "libpython3.11-stdlib": ("ls", set(), {"libpython3.11-minimal", "libpython3.11-stdlib"})}
    batches = order_batches(info)
    assert batches == [["lm", "ls", "p311m"], ["p3m", "p311"], ["p3"]], batches
    flat = [x for b in batches for x in b]
    batch_of = {item: i for i, b in enumerate(batches) for item in b}
    for item, pre, deps in info.values():
        assert all(batch_of[info[p][0]] < batch_of[item] for p in pre), item  # configured before
        assert all(flat.index(info[d][0]) < flat.index(item) for d in deps if d in info and info[d][0] != item), item


def test_phase_requests_are_the_differences_between_scrapes():
    s = rootfs_ops.PhaseScraper("unused", Path("unused"))
    s.snaps = [("boot", {"LOOKUP": [10.0, 0.5], "FSYNC": [1.0, 0.0]}),
               ("install", {"LOOKUP": [15.0, 0.75], "FSYNC": [5.0, 0.0], "WRITE": [2.0, 0.25]}),
               ("verify", {"LOOKUP": [15.0, 0.75], "FSYNC": [5.0, 0.0], "WRITE": [2.0, 0.25]})]
    phases = s.phases()
    assert phases["boot"] == {"LOOKUP": [10.0, 0.5], "FSYNC": [1.0, 0.0]}
    assert phases["install"] == {"LOOKUP": [5.0, 0.25], "FSYNC": [4.0, 0.0], "WRITE": [2.0, 0.25]}
    assert phases["verify"] == {}
    text = rootfs_ops.summary(phases["install"])
    assert text.startswith("11 requests, 0.5 s in the daemon; by time: LOOKUP 0.2 s (5)")
    assert text.endswith("most: LOOKUP 5, FSYNC 4, WRITE 2")


def test_phase_cpu_is_the_difference_per_process_between_marks():
    s = rootfs_ops.PhaseScraper("unused", Path("unused"), daemon_pid=1)
    s.cpu_snaps = [("boot", {"vfsd-request-1": 2.0, "python3": 0.5}),
                   ("install", {"vfsd-request-1": 3.5, "python3": 0.5, "vfsd-keeper": 0.25})]
    assert s.phases_cpu() == {"boot": {"vfsd-request-1": 2.0, "python3": 0.5},
                              "install": {"vfsd-request-1": 1.5, "python3": 0.0, "vfsd-keeper": 0.25}}
    assert rootfs_ops.cpu_summary(s.phases_cpu()["install"]) == \
        "CPU 1.8 s: vfsd-request-1 1.5 s, vfsd-keeper 0.2 s, python3 0.0 s"
    s.wake_snaps = [("boot", {"vfsd-request-1": 1000, "python3": 3}),
                    ("install", {"vfsd-request-1": 31000, "python3": 3, "vfsd-keeper": 50})]
    assert s.phases_wakeups() == {"boot": {"vfsd-request-1": 1000, "python3": 3},
                                  "install": {"vfsd-request-1": 30000, "python3": 0, "vfsd-keeper": 50}}
    assert rootfs_ops.cpu_summary(s.phases_cpu()["install"], s.phases_wakeups()["install"]) == \
        ("CPU 1.8 s: vfsd-request-1 1.5 s (30,000 wake-ups, 50 µs each), "
         "vfsd-keeper 0.2 s (50 wake-ups, 5000 µs each), python3 0.0 s")


def test_tree_cpu_counts_a_busy_child_under_its_name():
    import subprocess
    import time
    child = subprocess.Popen(["python3", "-c", "import time\nopen('/proc/self/comm', 'w').write('cpu-burner')\n"
                              "t = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
                              "time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            cpu = rootfs_ops.tree_cpu(os.getpid())
            if cpu.get("cpu-burner", 0) >= 0.25:
                break
            time.sleep(0.1)
        assert cpu.get("cpu-burner", 0) >= 0.25, cpu
        assert rootfs_ops.tree_cpu(child.pid).keys() == {"cpu-burner"}
        # then it sleeps (time.sleep: a voluntary switch)
        while time.monotonic() < deadline and rootfs_ops.tree_wakeups(child.pid)["cpu-burner"] < 1:
            time.sleep(0.05)
        assert rootfs_ops.tree_wakeups(child.pid)["cpu-burner"] >= 1
    finally:
        child.kill()
        child.wait()
    assert rootfs_ops.tree_cpu(child.pid) == {}
