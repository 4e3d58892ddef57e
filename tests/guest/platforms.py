"""The two guest platforms, and the Rust virtiofsd baseline, unpacked into the cache.

Platform ``a``: Debian 12's own QEMU 7.2 (installed by scripts/setup.sh; it also
ships the C virtiofsd) with Debian 12's Linux 6.1.

Platform ``b``: QEMU 10.0 and Linux 6.12 from Debian's bookworm-backports suite.
Neither is installed: ``apt-get download`` fetches the packages with a source
list of our own (the system's apt configuration is not touched) and
``dpkg-deb -x`` unpacks them under the cache. QEMU 10's shared libraries are
all present on Debian 12 (QEMU 7.2 pulled them in), but it loads its modules
(display, audio) from the fixed directory /usr/lib/x86_64-linux-gnu/qemu, where
7.2's live and abort it ("Only modules from the same build can be loaded"). So
``qemu_argv("b")`` runs it in a private mount namespace with the unpacked
module directory bound over that one (``unshare -m``; the system sees nothing).

The Rust virtiofsd (Debian 13 "trixie" package ``virtiofsd``) needs a newer
glibc than Debian 12's: its binary is unpacked with trixie's ``libc6``,
``libseccomp2``, ``libcap-ng0`` and ``libgcc-s1`` into one directory and run by
trixie's own dynamic loader (``rust_virtiofsd_argv()``).

Cache (``$PYVIRTIOFSD_GUEST_CACHE`` or ``<repo>/.cache/guest``)::

    apt/<suite>/...        source list, package lists (apt-get update once)
    qemu-10/               QEMU 10 unpacked; ``.complete`` written last
    rust-virtiofsd/        virtiofsd + trixie's loader and libraries; ``.complete``
    kernel-6.12.*/         see kernel.py

``python -m tests.guest.platforms`` fills everything (scripts/setup.sh runs it);
a second run only checks the ``.complete`` markers.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .kernel import cache_dir

MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
BACKPORTS, TRIXIE = "bookworm-backports", "trixie"

QEMU10_PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data")
RUST_PACKAGES = ("virtiofsd", "libc6", "libseccomp2", "libcap-ng0", "libgcc-s1")
# libvirt 11.3, run unpacked beside the system's 9.0 (scripts/libvirt11-env.sh)
LIBVIRT11_PACKAGES = ("libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-daemon-common",
                      "libvirt-daemon-log", "libvirt-common", "libvirt0", "libvirt-clients")
SYSTEM_QEMU_MODULES = "/usr/lib/x86_64-linux-gnu/qemu"
LIBDIR = "usr/lib/x86_64-linux-gnu"


@dataclasses.dataclass(frozen=True)
class Platform:
    name: str
    qemu: str       # what the guest's QEMU is, for reports
    kernel: str     # kernel series, kernel.py's key


PLATFORMS = {
    "a": Platform("a", "QEMU 7.2 (Debian 12)", "6.1"),
    "b": Platform("b", "QEMU 10.0 (bookworm-backports)", "6.12"),
}


# In-guest checks a platform's kernel cannot pass whatever the daemon does:
# Linux 6.1 does not name the caller's supplementary group in a create
# (FUSE_CREATE_SUPP_GROUP is 6.6+), so a setgid create through one loses SGID
# (docs/credentials.md). Every boot on that platform expects it.
KERNEL_KNOWN = {"a": ("supp_group_setgid_create",), "b": ()}


def platform(name: str) -> Platform:
    try:
        return PLATFORMS[name]
    except KeyError:
        raise ValueError(f"unknown guest platform {name!r} (choose from {sorted(PLATFORMS)})") from None


def _log(msg: str) -> None:
    print(f"platforms: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# apt with a source list of our own


def apt_options(suite: str, refresh: bool = False) -> list[str]:
    """``-o`` options that make apt-get/apt-cache see only ``suite`` (lists
    kept under the cache; ``apt-get update`` runs the first time, or again
    with ``refresh``: the archive drops superseded versions)."""
    root = cache_dir() / "apt" / suite
    lists = root / "lists"
    opts = ["-o", f"Dir::Etc::sourcelist={root / 'sources.list'}", "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={root / 'cache'}",
            "-o", "APT::Sandbox::User=root"]
    if refresh or not (root / ".updated").is_file():
        (lists / "partial").mkdir(parents=True, exist_ok=True)
        (root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        (root / "sources.list").write_text(f"deb [signed-by={KEYRING}] {MIRROR} {suite} main\n")
        _log(f"apt-get update ({suite})")
        subprocess.run(["apt-get", "update", "-qq", *opts], check=True, stdout=subprocess.DEVNULL)
        (root / ".updated").write_text("")
    return opts


def download(suite: str, packages, dest: Path) -> list[Path]:
    """``apt-get download`` each package's ``suite`` version into ``dest``
    (the lists are refreshed once if that fails: they may name a version
    the archive no longer has)."""
    argv = ["apt-get", "download", "-q", *(f"{p}/{suite}" for p in packages)]
    if subprocess.run(argv[:3] + apt_options(suite) + argv[3:], cwd=dest, stdout=subprocess.DEVNULL).returncode:
        subprocess.run(argv[:3] + apt_options(suite, refresh=True) + argv[3:], cwd=dest, check=True,
                       stdout=subprocess.DEVNULL)
    debs = sorted(dest.glob("*.deb"))
    if len(debs) != len(packages):
        raise RuntimeError(f"apt-get download {packages} from {suite} produced {debs}")
    return debs


def _unpack_into(name: str, suite: str, packages) -> Path:
    """Download and unpack ``packages`` into cache/<name> (atomic: a
    ``.complete`` marker is written last; a partial unpack is redone)."""
    final = cache_dir() / name
    if (final / ".complete").is_file():
        return final
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="unpack-") as tmp:
        tmp = Path(tmp)
        _log(f"downloading {' '.join(packages)} from {suite}")
        debs = download(suite, packages, tmp)
        x = tmp / "x"
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(x)], check=True)
        (x / ".complete").write_text("".join(f"{d.name}\n" for d in debs))
        shutil.rmtree(final, ignore_errors=True)
        x.rename(final)
    _log(f"unpacked {name}")
    return final


# --------------------------------------------------------------------------
# QEMU


def ensure_qemu10() -> Path:
    """The unpacked root of QEMU 10 (bookworm-backports)."""
    return _unpack_into("qemu-10", BACKPORTS, QEMU10_PACKAGES)


def qemu_argv(name: str = "a") -> list[str]:
    """The command that starts platform ``name``'s qemu-system-x86_64;
    QEMU's own arguments follow it."""
    platform(name)
    if name == "a":
        return ["qemu-system-x86_64"]
    root = ensure_qemu10()
    # sh -c '... "$@"' qemu10 ARGS...: unshare -m (private propagation by
    # default) execs sh, which execs QEMU: one pid, killable as before.
    script = (f'mount --bind "$Q/{LIBDIR}/qemu" {SYSTEM_QEMU_MODULES} && '
              f'exec "$Q/usr/bin/qemu-system-x86_64" -L "$Q/usr/share/qemu" -L /usr/share/seabios "$@"')
    return ["env", f"Q={root}", "unshare", "-m", "sh", "-c", script, "qemu10"]


def qemu_version(name: str = "a") -> str:
    out = subprocess.run([*qemu_argv(name), "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "?"


def ensure_libvirt11() -> Path:
    """The unpacked root of libvirt 11.3 (bookworm-backports): its other
    dependencies are bookworm's, installed with 9.0 (scripts/setup.sh)."""
    return _unpack_into("libvirt-11", BACKPORTS, LIBVIRT11_PACKAGES)


# --------------------------------------------------------------------------
# the Rust virtiofsd


def ensure_rust_virtiofsd() -> Path:
    """The directory holding trixie's virtiofsd, loader and libraries."""
    return _unpack_into("rust-virtiofsd", TRIXIE, RUST_PACKAGES)


def rust_virtiofsd_argv() -> list[str]:
    """The Rust virtiofsd, run by trixie's loader on trixie's libraries;
    the daemon's own arguments follow."""
    root = ensure_rust_virtiofsd()
    lib = root / LIBDIR
    return [str(lib / "ld-linux-x86-64.so.2"), "--library-path", str(lib),
            str(root / "usr" / "libexec" / "virtiofsd")]


def ensure_all() -> None:
    from .initrd import ensure_initrd
    for name in PLATFORMS:
        ensure_initrd(name)
        qemu_argv(name)
    ensure_rust_virtiofsd()
    ensure_libvirt11()


def main() -> int:
    ensure_all()
    for name, p in PLATFORMS.items():
        print(f"platform {name}: {qemu_version(name)}; Linux {p.kernel}")
    out = subprocess.run([*rust_virtiofsd_argv(), "--version"], capture_output=True, text=True)
    print(f"rust virtiofsd: {(out.stdout or out.stderr).strip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
