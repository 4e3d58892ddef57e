"""The root-file-system part of ``make bench``: a Debian 12 minimal root on
virtio-fs (tests/guest/rootfs.py, rootfs_boot.py) booted to multi-user, a
package installed with dpkg, every package verified, rebooted to multi-user.

Each daemon gets a fresh copy of the root and boots it with
``rootfstype=virtiofs root=TAG rw`` (cache=auto for all three, started as
for a root file system: rootfs_boot.ROOT_DAEMON_OPTS). Platform a (QEMU 7.2
+ Linux 6.1, our switch_root initramfs) and platform b (QEMU 10 + Linux
6.12, no initramfs): ours, the C virtiofsd (QEMU 7.2's, a vhost-user
back-end that QEMU 10 drives as well) and the Rust virtiofsd.

Figures, all in seconds, lower is better (the guest's own clock, printed by
the root's check unit):

- ``boot``: uptime when multi-user.target was reached, first boot;
- ``reboot``: the same after ``systemctl reboot`` (warm host page cache,
  same daemon: the device reset and the guest's second FUSE session);
- ``install``: ``dpkg -i`` of the install set (python3 and its dependencies;
  ``file`` and its two libraries with ``--quick``);
- ``verify``: ``dpkg --verify`` of every package of the root (``--quick``:
  of the installed ones).

And where the time goes: the CPU seconds QEMU (the guest: TCG) and the
daemon (its whole tree, reaped) used over the two boots, from
``getrusage(RUSAGE_CHILDREN)`` around each one's exit; and for ours, the
FUSE requests and the daemon's time per opcode in each phase (rootfs_ops.py).
A daemon whose boot, install or verify fails has no figure for it (no
ratio) and its failure, with dpkg's own error line, is listed.
"""

from __future__ import annotations

import resource
import shutil
import tempfile
from pathlib import Path

from tests.guest.rootfs import ensure_rootfs
from tests.guest.rootfs_boot import boot, prepare_share, start_root_daemon
from tests.perf import rootfs_ops

KINDS_BY_PLATFORM = {"a": ("ours", "c", "rust"), "b": ("ours", "c", "rust")}
PHASES = [("boot", "boot to multi-user (s)"), ("reboot", "reboot to multi-user (s)"),
          ("install", "dpkg -i {what} (s)"), ("verify", "dpkg --verify, {verified} (s)")]
INSTALL_LABEL = {"small": "file + 2 libraries", "python3": "python3 + 19 dependencies"}
TIMEOUT = 2400


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def root_run(kind: str, platform: str, install_set: str, log, verify_all: bool = True) -> dict:
    """One boot pair: {"figures": {phase: s}, "cpu": {"qemu": s, "daemon": s},
    "failure": str | None, "ops": {phase: {op: [requests, s]}} (ours)}."""
    base = Path(tempfile.mkdtemp(prefix=f"bench-rootfs-{kind}-{platform}-", dir="/var/tmp"))
    shared = base / "shared"
    shared.mkdir()
    try:
        prepare_share(shared, install_set, verify_all=verify_all)
        metrics = str(base / "metrics.sock")
        d = start_root_daemon(kind, shared, base, ("--metrics-socket", metrics) if kind == "ours" else ())
        scraper = (rootfs_ops.PhaseScraper(metrics, base / "console.log", d.proc.pid).start()
                   if kind == "ours" else None)
        c0 = _cpu()
        try:
            r = boot(d.socket_path, platform, base / "console.log", timeout=TIMEOUT)
            c1 = _cpu()
            d.wait(60)  # every daemon ends with QEMU's connection
        finally:
            if scraper:
                scraper.stop()
            d.stop(5)
        c2 = _cpu()
        figures, failure = {}, None
        b = r.boots
        if r.timed_out or r.qemu_returncode != 0 or len(b) != 2:
            failure = f"qemu rc {r.qemu_returncode}, timed out {r.timed_out}, {len(b)} boots"
        for i, key in ((0, "boot"), (1, "reboot")):
            if i < len(b) and b[i].get("multi-user") == "active" and not b[i]["failed"]:
                figures[key] = float(b[i]["uptime-multi-user"])
        if b and b[0].get("install", {}).get("rc") == "0":
            figures["install"] = float(b[0]["install"]["seconds"])
        elif not failure:
            failure = f"dpkg -i: {b[0].get('install') if b else None}: {_dpkg_error(shared)}"
        v = b[0].get("verify", {}) if b else {}
        if v.get("rc") == "0" and v.get("lines") == "0":
            figures["verify"] = float(v["seconds"])
        elif not failure:
            failure = f"dpkg --verify: {v}"
        for i, one in enumerate(b):
            if one["failed"] and not failure:
                failure = f"boot {i + 1}: failed units {', '.join(one['failed'])}"
        res = {"figures": figures, "cpu": {"qemu": c1 - c0, "daemon": c2 - c1}, "failure": failure,
               "wall": r.duration, "ops": scraper.phases() if scraper else {},
               "ops_cpu": scraper.phases_cpu() if scraper else {},
               "ops_wakeups": scraper.phases_wakeups() if scraper else {},
               "blame": [one.get("blame", []) for one in b],
               "ops_error": scraper.error if scraper else None}
        log(f"  rootfs {kind:4s} platform {platform}: " + ", ".join(f"{k} {v:.1f} s" for k, v in figures.items())
            + f"; CPU qemu {c1 - c0:.0f} s, daemon {c2 - c1:.1f} s" + (f"; FAILED: {failure}" if failure else ""))
        for phase, ops in res["ops"].items():
            log(f"    {phase}: " + rootfs_ops.summary(ops, top=4))
        for phase, cpu in res["ops_cpu"].items():
            log(f"    {phase}: " + rootfs_ops.cpu_summary(cpu, res["ops_wakeups"].get(phase)))
        if failure:
            res["console_tail"] = "\n".join(r.console_text.splitlines()[-40:])
        return res
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _dpkg_error(shared: Path) -> str:
    """dpkg's own error lines from the check script's log of ``dpkg -i``."""
    try:
        text = (shared / "var/lib/rootfs-check/dpkg-i.log").read_text(errors="replace")
    except OSError as e:
        return f"no dpkg log ({e.strerror})"
    errors = [line for line in text.splitlines() if "error" in line]
    return " / ".join(errors[:3]) or text.strip()[-300:]


def rootfs_part(platforms, rounds: int, install_set: str, log, verify_all: bool = True) -> dict:
    """{platform: {"best": {kind: {phase: s}}, "cpu": {kind: {...}},
    "failures": [...]}}: the lowest figure of ``rounds`` alternating runs."""
    ensure_rootfs()
    out = {}
    for plat in platforms:
        kinds = KINDS_BY_PLATFORM[plat]
        o = out[plat] = {"best": {k: {} for k in kinds}, "cpu": {}, "failures": [], "ops": {},
                         "install_set": install_set, "verify_all": verify_all}
        for rnd in range(rounds):
            for kind in kinds:
                res = root_run(kind, plat, install_set, log, verify_all)
                for phase, secs in res["figures"].items():
                    o["best"][kind][phase] = min(o["best"][kind].get(phase, secs), secs)
                if kind not in o["cpu"] or res["wall"] < o["cpu"][kind]["wall"]:
                    o["cpu"][kind] = dict(res["cpu"], wall=res["wall"])
                    if res["ops"]:
                        o["ops"][kind] = res["ops"]
                    if res["ops_cpu"]:
                        o.setdefault("ops_cpu", {})[kind] = res["ops_cpu"]
                        o.setdefault("ops_wakeups", {})[kind] = res["ops_wakeups"]
                    o.setdefault("blame", {})[kind] = res["blame"]
                if res.get("ops_error"):
                    o["failures"].append(f"{kind}, round {rnd + 1}: metrics: {res['ops_error']}")
                if res["failure"]:
                    o["failures"].append(f"{kind}, round {rnd + 1}: {res['failure']}")
    return out


def rows(part: dict, row) -> list[dict]:
    """Table rows (``row`` is bench._row): seconds, lower is better, so the
    ratios are baseline / ours (> 1: ours is faster)."""
    out = []
    for plat, res in part.items():
        best = res["best"]
        for key, label in PHASES:
            label = label.format(what=INSTALL_LABEL[res["install_set"]],
                                 verified="every package" if res.get("verify_all", True) else "the installed ones")
            figs = {k: v.get(key) for k, v in best.items()}
            if figs.get("ours") is None and not any(figs.values()):
                continue
            r = row(f"root file system on virtio-fs, platform {plat}, cache=auto", f"rootfs/{plat}/{key}",
                    label, figs, lower_better=True)
            o = figs.get("ours")
            r["ratio"] = figs["c"] / o if o and figs.get("c") else None
            r["ratio_rust"] = figs["rust"] / o if o and figs.get("rust") else None
            out.append(r)
    return out


def markdown(part: dict) -> list[str]:
    """The CPU split and the failures, for results.md."""
    md = []
    for plat, res in part.items():
        for kind, c in res["cpu"].items():
            md.append(f"- root file system, platform {plat}, {kind}: {c['wall']:.0f} s for both boots; "
                      f"CPU: QEMU (the guest, TCG) {c['qemu']:.0f} s, the daemon {c['daemon']:.1f} s")
        for kind, blame in res.get("blame", {}).items():
            for i, units in enumerate(blame):
                if units:
                    md.append(f"- root file system, platform {plat}, {kind}, slowest services of boot {i + 1} "
                              f"(inactive to active): {', '.join(units[:6])}")
        for kind, phases in res.get("ops", {}).items():
            for phase, ops in phases.items():
                md.append(f"- root file system, platform {plat}, {kind}, FUSE requests during {phase}: "
                          + rootfs_ops.summary(ops))
        for kind, phases in res.get("ops_cpu", {}).items():
            wakeups = res.get("ops_wakeups", {}).get(kind, {})
            for phase, cpu in phases.items():
                md.append(f"- root file system, platform {plat}, {kind}, daemon processes' {phase}: "
                          + rootfs_ops.cpu_summary(cpu, wakeups.get(phase)))
        md += [f"- root file system, platform {plat} FAILED: {f}" for f in res["failures"]]
    return md
