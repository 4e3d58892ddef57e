"""Boot a guest whose root file system is a virtio-fs share: the Debian root
of rootfs.py unpacked into a fresh directory, a daemon serving it, QEMU
booting ``root=TAG rootfstype=virtiofs rw`` into the root's own systemd.

``prepare_share(dest, install_set)`` unpacks the root and adds the check:
a oneshot unit ordered after multi-user.target (``rootfs-check.service``)
whose script reports on the serial console, one ``@@ROOTFS key value@@``
line per fact. First boot: the uptime at which multi-user was reached, the
root's mount line, the failed units, ``dpkg -i`` of the install set (and
its time), the slowest services (what ``systemd-analyze blame`` shows),
``dpkg --verify`` (of every package, or of the installed ones only),
``dpkg --audit``;
then ``systemctl reboot``. QEMU restarts the machine in place (the same
daemon: the device is reset and the guest's FUSE session starts again).
Second boot: the same reports, the installed packages verified again and
their program run; then ``systemctl poweroff``, which ends QEMU.

``boot(socket_path, platform, console_log, timeout)`` runs QEMU to its exit
(or the timeout) and returns the reports of each boot.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import time
from pathlib import Path

from .kernel import ensure_kernel
from .platforms import platform as get_platform
from .platforms import qemu_argv
from .rootfs import INSTALLED_FILE, initrd_for, install_batches, unpack_root
from .vm import kill_qemu

TAG = "rootfs"
CHECK_SCRIPT = r"""#!/bin/sh
# rootfs-check: what a virtio-fs root did for systemd and dpkg (tests/guest/rootfs_boot.py)
say() { echo "@@ROOTFS $*@@"; }
state=/var/lib/rootfs-check
boot=$(( $(cat $state/boots 2>/dev/null || echo 0) + 1 ))
echo $boot > $state/boots
sync
say boot $boot
say uptime-multi-user $(cut -d' ' -f1 /proc/uptime)
say multi-user $(systemctl is-active multi-user.target)
say root-mount $(awk '$2 == "/" {print $1 "," $3 "," $4}' /proc/mounts | tr ',' ' ' | tr -s ' ' ,)
for u in $(systemctl --failed --plain --no-legend --no-pager | awk '{print $1}'); do
    say failed $u
done
say failed-count $(systemctl --failed --plain --no-legend --no-pager | grep -c .)
# the slowest services of this boot, "unit=seconds" from leaving inactive to
# active (systemd-analyze blame refuses while this unit keeps the boot going)
systemctl show -p Id -p InactiveExitTimestampMonotonic -p ActiveEnterTimestampMonotonic '*.service' |
    awk -F= '/^Id=/ {id = $2} /^InactiveExitTimestampMonotonic=/ {s = $2} /^ActiveEnterTimestampMonotonic=/ {e = $2}
        /^$/ {if (s > 0 && e > s) printf "%.2f %s\n", (e - s) / 1e6, id; s = e = 0}
        END {if (s > 0 && e > s) printf "%.2f %s\n", (e - s) / 1e6, id}' |
    sort -rn | head -n 8 | while read t u; do say blame $u=${t}s; done
PKGS=$(for d in $state/debs/*/*.deb; do dpkg-deb -f "$d" Package; done | sort)
if [ $boot = 1 ]; then
    say installing
    t0=$(date +%s.%N)
    : > $state/dpkg-i.log
    rc=0
    for b in $state/debs/*/; do  # one dpkg -i per batch (rootfs.install_batches)
        dpkg -i $b*.deb >> $state/dpkg-i.log 2>&1 || { rc=$?; break; }
    done
    t1=$(date +%s.%N)
    tail -n 20 $state/dpkg-i.log
    say install rc=$rc seconds=$(echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}') packages=$(echo $PKGS | wc -w)
    sync
fi
for p in $PKGS; do say status $p $(dpkg-query -W -f='${db:Status-Abbrev}' $p | tr -d ' '); done
say verifying
t0=$(date +%s.%N)
if [ "$VERIFY" = all ]; then dpkg --verify; else dpkg --verify $PKGS; fi > $state/verify.log 2>&1
rc=$?
t1=$(date +%s.%N)
head -n 20 $state/verify.log
say verify rc=$rc lines=$(grep -c . $state/verify.log) seconds=$(echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}')
say audit-lines $(dpkg --audit 2>&1 | grep -c .)
if [ -x "$RUN_FILE" ]; then
    "$RUN_FILE" $RUN_ARG > $state/run.log 2>&1
    say run rc=$? $(head -c 120 $state/run.log | tr -s ' \n' '__')
else
    say run missing
fi
sync
if [ $boot = 1 ]; then say rebooting; systemctl reboot; else say powering-off; systemctl poweroff; fi
"""

UNIT = """[Unit]
Description=virtio-fs root checks (tests/guest/rootfs_boot.py)
After=multi-user.target

[Service]
Type=oneshot
Environment="RUN_FILE={run_file}" "RUN_ARG={run_arg}" "VERIFY={verify}"
ExecStart=/usr/local/sbin/rootfs-check
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""

# How each daemon is started for a root file system: as its users start it
# for one (docs/rootfs.md). xattrs on, for file capabilities and ACLs. The C
# virtiofsd keeps its default no_posix_lock: with -o posix_lock it answers
# every blocking lock (FUSE_SETLKW) EOPNOTSUPP, as it implements only
# non-blocking ones, and dpkg (its triggers lock), systemd-sysusers
# (lckpwdf) and systemd-update-utmp (glibc's wtmp lock) all fail; without it
# the guest kernel keeps POSIX locks itself. The Rust virtiofsd has no
# remote POSIX locks either way.
ROOT_DAEMON_OPTS = {"ours": (), "c": ("-o", "xattr"), "rust": ("--xattr",)}

# what the installed program is run with after each boot
# (file reads the magic database of libmagic-mgc; python3 imports from its stdlib)
RUN_ARG = {"/usr/bin/file": "/usr/bin/file", "/usr/bin/python3.11": "-m this"}


def start_root_daemon(kind: str, shared: Path, run_dir: Path, extra_args=()):
    """The daemon ``kind`` serving ``shared`` as a root file system
    (cache=auto, ROOT_DAEMON_OPTS), started by tests/conftest.py."""
    from tests.conftest import start_daemon

    return start_daemon(kind, shared, "auto", extra_args=(*ROOT_DAEMON_OPTS[kind], *extra_args),
                        run_dir=str(run_dir), startup_timeout=30.0, default_opts=())


def prepare_share(dest: Path, install_set: str, verify_all: bool = True) -> None:
    """Unpack the root into ``dest`` and install the check unit, enabled,
    with the install set's .debs under /var/lib/rootfs-check/debs/NN/, one
    directory per ``dpkg -i`` run.
    ``verify_all``: ``dpkg --verify`` every package of the root (about
    100 s under TCG), not only the installed ones."""
    unpack_root(dest)
    state = dest / "var/lib/rootfs-check"
    for i, batch in enumerate(install_batches(install_set)):  # debs/NN/: one dpkg -i each, in order
        (state / "debs" / f"{i + 1:02d}").mkdir(parents=True)
        for deb in batch:
            shutil.copyfile(deb, state / "debs" / f"{i + 1:02d}" / deb.name)
    script = dest / "usr/local/sbin/rootfs-check"
    script.write_text(CHECK_SCRIPT)
    script.chmod(0o755)
    run_file = INSTALLED_FILE[install_set]
    arg = RUN_ARG[run_file]
    unit = UNIT.format(run_file=run_file, run_arg=arg, verify="all" if verify_all else "installed")
    (dest / "etc/systemd/system/rootfs-check.service").write_text(unit)
    wants = dest / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / "rootfs-check.service").symlink_to("/etc/systemd/system/rootfs-check.service")
    # the console is the check's: no login prompt on it
    (dest / "etc/systemd/system/serial-getty@ttyS0.service").symlink_to("/dev/null")
    (dest / "etc/hostname").write_text("vfsroot\n")


REPORT_RE = re.compile(r"@@ROOTFS (\S+) ?(.*?)@@")


@dataclasses.dataclass
class RootBoot:
    boots: list[dict]          # per boot: key -> value (failed/status: lists)
    console_text: str
    qemu_returncode: int | None
    timed_out: bool
    duration: float
    qemu_stderr: str = ""

    def describe(self, tail: int = 60) -> str:
        return (f"qemu_rc={self.qemu_returncode} timed_out={self.timed_out} duration={self.duration:.1f}s "
                f"boots={len(self.boots)}\nqemu stderr: {self.qemu_stderr.strip()[-2000:]}\nconsole tail:\n"
                + "\n".join(self.console_text.splitlines()[-tail:]))


def parse_reports(text: str) -> list[dict]:
    boots: list[dict] = []
    for m in REPORT_RE.finditer(text):
        key, val = m.group(1), m.group(2).strip()
        if key == "boot":
            boots.append({"failed": [], "status": {}, "blame": []})
        if not boots:
            continue
        if key in ("failed", "blame"):
            boots[-1][key].append(val)
        elif key == "status":
            name, _, st = val.partition(" ")
            boots[-1]["status"][name] = st
        elif key in ("install", "verify", "run"):
            fields = {}
            for w in val.split():
                k, _, v = w.partition("=")
                fields[k] = v
            boots[-1][key] = fields
        else:
            boots[-1][key] = val
    return boots


def boot(socket_path: str, platform: str, console_log: Path, timeout: float = 1500,
         mem: str = "1G", smp: int = 2) -> RootBoot:
    """Boot the root served on ``socket_path`` (its daemon is started) until
    QEMU exits after the second boot's poweroff, or ``timeout`` s."""
    vmlinuz, _ = ensure_kernel(get_platform(platform).kernel)
    initrd = initrd_for(platform)
    append = f"console=ttyS0 panic=-1 mitigations=off rootfstype=virtiofs root={TAG} rw"
    console_log.parent.mkdir(parents=True, exist_ok=True)
    console_log.write_bytes(b"")
    mem_mib = int(mem.rstrip("G")) * 1024
    argv = [*qemu_argv(platform), "-accel", "tcg,thread=multi", "-cpu", "max",
            "-m", f"{mem_mib}M", "-smp", str(smp), "-nodefaults", "-display", "none",
            "-monitor", "none", "-serial", f"file:{console_log}",
            "-object", f"memory-backend-memfd,id=mem,size={mem_mib}M,share=on",
            "-numa", "node,memdev=mem",
            "-chardev", f"socket,id=char0,path={socket_path}",
            "-device", f"vhost-user-fs-pci,queue-size=1024,chardev=char0,tag={TAG}",
            "-kernel", str(vmlinuz), "-append", append]
    if initrd is not None:
        argv += ["-initrd", str(initrd)]
    err_path = console_log.with_suffix(".qemu-stderr")
    start = time.monotonic()
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                start_new_session=True)
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        kill_qemu(proc)
    text = console_log.read_text(errors="replace").replace("\r\n", "\n")
    return RootBoot(parse_reports(text), text, proc.returncode, timed_out, time.monotonic() - start,
                    err_path.read_text(errors="replace"))
