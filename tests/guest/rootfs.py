"""A Debian 12 minimal root file system for booting a guest with its root on
virtio-fs (test_guest_rootfs.py, the root-boot part of ``make bench``).

``ensure_rootfs()`` returns the cache directory holding:

    root.tar          mmdebstrap --variant=minbase --include=ROOT_PACKAGES
                      bookworm, as a tarball (owners, modes, device nodes)
    debs/<set>/*.deb  for each INSTALL_SETS entry: the package and every
                      dependency the root lacks, for ``dpkg -i`` in the guest
    .complete         written last; a partial build is redone

The directory's name carries a hash of the package lists, so changing a list
builds a new root and a second ``scripts/setup.sh`` run only checks the
marker (``python -m tests.guest.rootfs``).

``initrd_for(platform)``: Linux 6.12 (platform b) has virtio_pci, fuse and
virtiofs built in and mounts ``root=TAG rootfstype=virtiofs`` itself, so it
boots with no initramfs at all. Linux 6.1 (platform a) has them as modules:
a busybox initramfs of our own loads them, mounts the tag named by ``root=``
with ``rootfstype=`` (read-write if ``rw`` is on the command line) and
``switch_root``\\ s into it, handing over to the root's /sbin/init (systemd).
"""

from __future__ import annotations

import hashlib
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from .initrd import cached_cpio, find_busybox
from .kernel import cache_dir, ensure_kernel

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
ROOT_PACKAGES = ("systemd-sysv", "udev", "procps")
# what the guest installs with dpkg: "small" (quick mode: one small package
# and the two it depends on) and "python3" (the interpreter and its
# dependencies, the install a Debian user would try)
INSTALL_SETS = {"small": ("file",), "python3": ("python3",)}
# a file each set installs, looked for again after the reboot
INSTALLED_FILE = {"small": "/usr/bin/file", "python3": "/usr/bin/python3.11"}


def _log(msg: str) -> None:
    print(f"rootfs: {msg}", file=sys.stderr, flush=True)


def _key() -> str:
    h = hashlib.sha256(repr((SUITE, ROOT_PACKAGES, sorted(INSTALL_SETS.items()))).encode())
    return h.hexdigest()[:16]


def rootfs_dir() -> Path:
    return cache_dir() / f"rootfs-{SUITE}-{_key()}"


def _build(final: Path) -> None:
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="rootfs-build-") as tmp:
        out = Path(tmp) / "out"
        (out / "debs").mkdir(parents=True)
        # the packages each set adds to the root, downloaded by the root's own
        # apt (its lists, its idea of what is installed) before mmdebstrap's
        # clean-up; copied out, then dropped from the root
        hooks = []
        for name, pkgs in INSTALL_SETS.items():
            (out / "debs" / name).mkdir()
            hooks += ["--customize-hook", f'mkdir -p "$1/debs-{name}/partial"', "--customize-hook",
                      f'chroot "$1" apt-get install -y -q --download-only --no-install-recommends '
                      f'-o Dir::Cache::archives=/debs-{name} {" ".join(pkgs)}',
                      "--customize-hook", f"sync-out /debs-{name} {out / 'debs' / name}",
                      "--customize-hook", f'rm -rf "$1/debs-{name}"']
        argv = ["mmdebstrap", "--mode=root", "--variant=minbase", "--format=tar",
                f"--include={','.join(ROOT_PACKAGES)}", *hooks,
                SUITE, str(out / "root.tar"), MIRROR]
        _log(f"building the {SUITE} root ({', '.join(ROOT_PACKAGES)}) and the install sets; a few minutes")
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        for name in INSTALL_SETS:
            for p in (out / "debs" / name).iterdir():
                if not p.name.endswith(".deb"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            if not any((out / "debs" / name).glob("*.deb")):
                raise RuntimeError(f"no .deb downloaded for install set {name}")
        (out / ".complete").write_text("\n".join(ROOT_PACKAGES) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        out.rename(final)
    for old in cache_dir().glob(f"rootfs-{SUITE}-*"):  # roots of older package lists
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    _log(f"cached {final.name}")


def ensure_rootfs() -> Path:
    """The cached root (see the module docstring); built only if missing."""
    final = rootfs_dir()
    if not (final / ".complete").is_file():
        _build(final)
    return final


def _names(field: str) -> set[str]:
    """The package names of a Depends-style field ("a (>= 1), b:any | c")."""
    return {alt.split()[0].split(":")[0] for dep in field.split(",") for alt in dep.split("|") if alt.strip()}


def install_batches(install_set: str) -> list[list[Path]]:
    """The install set's .debs as successive ``dpkg -i`` runs. One run
    unpacks its packages in the order given, each after the packages of the
    set it (pre-)depends on, and configures them at its end; a package whose
    Pre-Depends is in the same run is refused ("pre-dependency problem":
    python3-minimal pre-depends on python3.11-minimal, python3 on
    python3-minimal), so it starts the next run, as apt would split them."""
    found = sorted((ensure_rootfs() / "debs" / install_set).glob("*.deb"))
    info = {}
    for deb in found:
        out = subprocess.run(["dpkg-deb", "-f", str(deb), "Package", "Pre-Depends", "Depends"],
                             check=True, capture_output=True, text=True).stdout
        f = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
        pre = _names(f.get("Pre-Depends", ""))
        info[f["Package"]] = (deb, pre, pre | _names(f.get("Depends", "")))
    return order_batches(info)


def order_batches(info: dict) -> list[list]:
    """``info``: package -> (item, its Pre-Depends names, all its dependency
    names). The items in dependency order, split before each package that
    pre-depends on one of the current batch."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order or name not in info:
            return
        order.append(name)  # marks it (a dependency cycle ends here); moved to its place below
        for dep in sorted(info[name][2]):
            visit(dep)
        order.remove(name)
        order.append(name)

    for name in sorted(info):
        visit(name)
    batches: list[list] = [[]]
    batch_names: set[str] = set()
    for name in order:
        if info[name][1] & batch_names:
            batches.append([])
            batch_names = set()
        batches[-1].append(info[name][0])
        batch_names.add(name)
    return batches


def debs(install_set: str) -> list[Path]:
    return [deb for batch in install_batches(install_set) for deb in batch]


def unpack_root(dest: Path) -> None:
    """Unpack the cached root into the (empty) directory ``dest``."""
    subprocess.run(["tar", "-xpf", str(ensure_rootfs() / "root.tar"), "-C", str(dest),
                    "--numeric-owner", "--xattrs", "--xattrs-include=*"], check=True)


# ------------------------------------------------------------------------
# platform a's initramfs: load virtiofs, mount root=, switch_root

SWITCH_INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /bin /proc /sys /dev /newroot
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
fail() { echo "@@ROOTFS-INITRAMFS-FAILED $*@@"; poweroff -f; sleep 5; echo o > /proc/sysrq-trigger; }
for m in $(cat /modules/load-order); do insmod /modules/$m.ko || fail "insmod $m"; done
ROOT= FSTYPE=virtiofs MODE=ro
for w in $(cat /proc/cmdline); do
    case "$w" in root=*) ROOT=${w#root=};; rootfstype=*) FSTYPE=${w#rootfstype=};;
                 rw) MODE=rw;; ro) MODE=ro;; esac
done
[ -n "$ROOT" ] || fail "no root= on the command line"
mount -t "$FSTYPE" -o "$MODE" "$ROOT" /newroot || fail "mount $FSTYPE $ROOT"
umount /proc
umount /dev
exec switch_root /newroot /sbin/init
"""


def initrd_for(platform: str) -> Path | None:
    """The initramfs platform ``platform`` boots the virtio-fs root with
    (None: its kernel mounts it alone). Cached by content."""
    from .platforms import platform as get_platform
    series = get_platform(platform).kernel
    _vmlinuz, mods = ensure_kernel(series)
    order = [m for m in (mods / "load-order").read_text().split()
             if m not in ("netfs", "fscache", "9pnet", "9pnet_virtio", "9p")]
    if "virtiofs" not in order:
        return None  # built in
    d = stat.S_IFDIR | 0o755
    entries = [(n, d, b"") for n in ("bin", "dev", "proc", "sys", "newroot", "modules")]
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, find_busybox().read_bytes()))
    entries.append(("init", stat.S_IFREG | 0o755, SWITCH_INIT.encode()))
    entries.append(("modules/load-order", stat.S_IFREG | 0o644, ("\n".join(order) + "\n").encode()))
    for m in order:
        entries.append((f"modules/{m}.ko", stat.S_IFREG | 0o644, (mods / f"{m}.ko").read_bytes()))
    return cached_cpio(entries, f"rootfs-initrd-{series}")[0]


if __name__ == "__main__":
    print(ensure_rootfs())
    for name in INSTALL_SETS:
        print(name, len(debs(name)), "debs")
