"""The guest's initrd: static busybox, the kernel modules, and an /init.

``ensure_initrd(platform="a")`` returns the path of a gzip'd newc cpio archive
with that platform's kernel modules, built once per content (busybox binary +
modules + /init text) in the cache dir. The /init is the same for both
kernels: it loads whatever the kernel's ``load-order`` lists (6.12 has
virtio and virtiofs built in, so only 9p's modules).

What /init does (all parameters come from the kernel command line):

1. mounts proc, sysfs, devtmpfs; ``insmod``s every module in load order;
2. mounts the host root read-only over 9p (tag ``hostroot``) at /host, then
   proc/sys/dev inside it, a tmpfs at /host/tmp (the guest's scratch space,
   also the reference file system of the differential runs) and /host/run;
   with ``vfs_sync=1``, a read-write 9p export (tag ``sync``) at /host/run/sync:
   a channel between the host and the guest that bypasses the mount under test;
3. mounts virtiofs ``vfs_tag`` at /host``vfs_mnt`` (default /mnt) with the
   options in ``vfs_opts`` (comma separated, may be empty);
4. runs ``chroot /host /bin/sh -c "$(base64 -d vfs_cmd)"``;
5. syncs, unmounts the virtiofs mount (so the daemon sees DESTROY), prints
   ``@@GUEST-EXIT status=N umount=M@@`` and ``poweroff -f``.

A setup failure prints ``@@GUEST-SETUP-FAILED <what>@@`` then the exit
marker with status 254.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
from pathlib import Path

from .kernel import cache_dir, ensure_kernel

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

EXIT_MARKER_PREFIX = "@@GUEST-EXIT "
BEGIN_MARKER = "@@GUEST-CMD-BEGIN@@"
SETUP_FAILED_STATUS = 254

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /bin /sbin /proc /sys /dev /host /tmp
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1

param() {
    for w in $(cat /proc/cmdline); do
        case "$w" in "$1="*) echo "${w#*=}"; return 0;; esac
    done
    echo "$2"
}

finish() {
    echo "@@GUEST-EXIT status=$1 umount=$2@@"
    poweroff -f
    sleep 5
    echo b > /proc/sysrq-trigger
}

fail() {
    echo "@@GUEST-SETUP-FAILED $*@@"
    dmesg | tail -n 30
    finish 254 -1
}

for m in $(cat /modules/load-order); do
    insmod /modules/$m.ko || fail "insmod $m"
done

TAG=$(param vfs_tag myfs)
OPTS=$(param vfs_opts "")
MNT=$(param vfs_mnt /mnt)
CMD=$(param vfs_cmd "" | base64 -d)

mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host || fail "9p host root"
mount -t proc proc /host/proc || fail "proc in /host"
mount -t sysfs sys /host/sys || fail "sys in /host"
mount -t devtmpfs dev /host/dev || fail "dev in /host"
mount -t tmpfs -o mode=1777 tmp /host/tmp || fail "tmpfs /host/tmp"
mount -t tmpfs -o mode=755 run /host/run || fail "tmpfs /host/run"
mkdir -p /host/run/harness
mount -t 9p -o trans=virtio,version=9p2000.L,ro harness /host/run/harness || fail "9p harness scripts"
if [ "$(param vfs_sync 0)" = 1 ]; then
    mkdir -p /host/run/sync
    mount -t 9p -o trans=virtio,version=9p2000.L sync /host/run/sync || fail "9p sync directory"
fi
if [ "$TAG" != "none" ]; then
    if [ -n "$OPTS" ]; then
        mount -t virtiofs -o "$OPTS" "$TAG" "/host$MNT" || fail "virtiofs $TAG at $MNT opts $OPTS"
    else
        mount -t virtiofs "$TAG" "/host$MNT" || fail "virtiofs $TAG at $MNT"
    fi
fi

echo "@@GUEST-CMD-BEGIN@@"
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp \
    LANG=C.UTF-8 TERM=dumb GUEST_MNT="$MNT" \
    chroot /host /bin/sh -c "cd /tmp && $CMD"
rc=$?
sync
um=0
if [ "$TAG" != "none" ]; then
    umount "/host$MNT"; um=$?
fi
finish $rc $um
"""


def _newc_entry(name: str, mode: int, data: bytes = b"", ino: int = 0) -> bytes:
    nb = name.encode() + b"\0"
    hdr = "070701" + "".join(f"{v:08X}" for v in (
        ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
    out = hdr.encode() + nb
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def build_cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    buf = io.BytesIO()
    for i, (name, mode, data) in enumerate(entries, start=1):
        buf.write(_newc_entry(name, mode, data, ino=i))
    buf.write(_newc_entry("TRAILER!!!", 0, b"", ino=0))
    return buf.getvalue()


def cached_cpio(entries: list[tuple[str, int, bytes]], stem: str) -> tuple[Path, bool]:
    """The gzip'd cpio of ``entries`` at ``<cache>/<stem>-<content hash>.cpio.gz``,
    written only if missing: (its path, whether it was written now)."""
    h = hashlib.sha256()
    for name, mode, data in entries:
        h.update(name.encode() + b"\0" + str(mode).encode() + b"\0" + hashlib.sha256(data).digest())
    out = cache_dir() / f"{stem}-{h.hexdigest()[:16]}.cpio.gz"
    if out.is_file():
        return out, False
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(gzip.compress(build_cpio(entries), compresslevel=6, mtime=0))
    tmp.replace(out)
    return out, True


def find_busybox() -> Path:
    for c in BUSYBOX_CANDIDATES:
        p = Path(c)
        if p.is_file():
            return p
    raise RuntimeError("busybox not found: apt-get install busybox-static")


def ensure_initrd(platform: str = "a") -> Path:
    from .platforms import platform as get_platform
    series = get_platform(platform).kernel
    _vmlinuz, mods = ensure_kernel(series)
    busybox = find_busybox().read_bytes()
    if b"GLIBC_" in busybox[:4096] or b"ld-linux" in busybox[:8192]:
        raise RuntimeError("busybox is dynamically linked: install busybox-static")
    order = (mods / "load-order").read_text().split()
    entries: list[tuple[str, int, bytes]] = []
    d = stat.S_IFDIR | 0o755
    for dname in ("bin", "sbin", "dev", "proc", "sys", "tmp", "host", "modules"):
        entries.append((dname, d, b""))
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, busybox))
    entries.append(("bin/sh", stat.S_IFLNK | 0o777, b"busybox"))
    entries.append(("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode()))
    entries.append(("modules/load-order", stat.S_IFREG | 0o644, "\n".join(order).encode() + b"\n"))
    for m in order:
        entries.append((f"modules/{m}.ko", stat.S_IFREG | 0o644, (mods / f"{m}.ko").read_bytes()))
    out, fresh = cached_cpio(entries, f"initrd-{series}")
    if not fresh:
        return out
    # drop this kernel's older initrds (and those named before the series was)
    for old in [*cache_dir().glob(f"initrd-{series}-*.cpio.gz"),
                *cache_dir().glob("initrd-" + "[0-9a-f]" * 16 + ".cpio.gz")]:
        if old != out:
            try:
                old.unlink()
            except OSError:
                pass
    return out


if __name__ == "__main__":
    import sys
    for name in (sys.argv[1:] or ["a"]):
        print(ensure_initrd(name))
