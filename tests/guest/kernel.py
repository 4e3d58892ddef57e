"""The guest kernels, unpacked into a cache directory: Debian 12's 6.1
(platform a) and bookworm-backports' 6.12 (platform b, see platforms.py).

``ensure_kernel(series="6.1")`` returns ``(vmlinuz_path, modules_dir)``. The
first call downloads the ``linux-image-*`` package that ``linux-image-amd64``
of that suite depends on (``apt-get download``, nothing is installed into
/boot), unpacks it with ``dpkg-deb -x`` into a temporary directory, and keeps
only vmlinuz and the modules the guest needs (decompressed; 6.12 has virtio,
virtio_pci, fuse and virtiofs built in, so only 9p's modules remain). Later
calls only check the cache. scripts/setup.sh runs ``python -m tests.guest.kernel``.

Cache: ``$PYVIRTIOFSD_GUEST_CACHE`` or ``<repo>/.cache/guest``. Layout::

    kernel-6.1.0-56-amd64/vmlinuz
    kernel-6.1.0-56-amd64/modules/<name>.ko   (every module needed, plain ELF)
    kernel-6.1.0-56-amd64/modules/load-order  (one name per line, deps first)
    current -> kernel-6.1.0-56-amd64          (written last: marks completion)
    current-6.12 -> kernel-6.12.95+deb12-amd64
"""

from __future__ import annotations

import dataclasses
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# What the guest needs, in load order. Dependencies found in the modules'
# .modinfo ("depends=") are added before the module that needs them.
WANTED_MODULES = (
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
    "virtio_pci", "fuse", "virtiofs",
    "netfs", "fscache", "9pnet", "9pnet_virtio", "9p",
)

IMAGE_RE = re.compile(r"^linux-image-(6\.1\.0-\d+-amd64)$")


@dataclasses.dataclass(frozen=True)
class Series:
    image_re: re.Pattern
    link: str                   # the cache's symlink to the unpacked kernel
    suite: str | None = None    # None: the system's apt sources (bookworm)
    optional: tuple = ()        # wanted modules this kernel may lack entirely


SERIES = {
    "6.1": Series(IMAGE_RE, "current"),
    # 6.12: fscache is part of netfs, virtio*/fuse/virtiofs are built in
    "6.12": Series(re.compile(r"^linux-image-(6\.12\.\d+\+deb12-amd64)$"), "current-6.12",
                   suite="bookworm-backports", optional=("fscache",)),
}


def cache_dir() -> Path:
    return Path(os.environ.get("PYVIRTIOFSD_GUEST_CACHE") or REPO / ".cache" / "guest")


def _log(msg: str) -> None:
    print(f"kernel: {msg}", file=sys.stderr, flush=True)


def _apt_opts(series: Series) -> list[str]:
    if series.suite is None:
        return []
    from .platforms import apt_options
    return apt_options(series.suite)


def _package_from_depends(series: Series) -> str | None:
    what = f"linux-image-amd64/{series.suite}" if series.suite else "linux-image-amd64"
    out = subprocess.run(["apt-cache", *_apt_opts(series), "depends", what],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:"):
            name = line.split(":", 1)[1].strip()
            if series.image_re.match(name):
                return name
    return None


def _package_from_search() -> str | None:
    out = subprocess.run(["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-amd64$"],
                         capture_output=True, text=True).stdout
    names = [l.split(" ", 1)[0] for l in out.splitlines() if IMAGE_RE.match(l.split(" ", 1)[0])]
    if not names:
        return None
    return max(names, key=lambda n: int(n.split("-")[3]))


def resolve_package(series: Series = SERIES["6.1"]) -> str:
    """The exact linux-image package name (apt-get update only if unknown)."""
    if series.suite:
        name = _package_from_depends(series)
        if not name:
            raise RuntimeError(f"cannot find the linux-image package of {series.suite}")
        return name
    for attempt in range(2):
        name = _package_from_depends(series) or _package_from_search()
        if name:
            return name
        if attempt == 0:
            _log("no linux-image-6.1.0-*-amd64 known to apt; running apt-get update")
            subprocess.run(["apt-get", "update", "-qq"], check=True)
    raise RuntimeError("cannot find a linux-image-6.1.0-*-amd64 package in apt")


def _current(series: Series) -> tuple[Path, Path] | None:
    cur = cache_dir() / series.link
    if not cur.is_symlink() and not cur.is_dir():
        return None
    kdir = cur.resolve()
    vmlinuz, mods = kdir / "vmlinuz", kdir / "modules"
    if vmlinuz.is_file() and (mods / "load-order").is_file():
        names = (mods / "load-order").read_text().split()
        if all((mods / f"{n}.ko").is_file() for n in names):
            return vmlinuz, mods
    return None


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.zst"):
        return subprocess.run(["zstd", "-dc", str(path)], input=data,
                              capture_output=True, check=True).stdout
    if path.name.endswith(".ko.gz"):
        import gzip
        return gzip.decompress(data)
    return data


def _modinfo_depends(ko: bytes) -> list[str]:
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    if not m or not m.group(1):
        return []
    return [d.decode() for d in m.group(1).split(b",") if d]


def _builtin_names(moddir: Path) -> set[str]:
    f = moddir / "modules.builtin"
    if not f.is_file():
        return set()
    return {Path(l.strip()).name.split(".ko")[0] for l in f.read_text().splitlines() if l.strip()}


def _install(package: str, series: Series) -> tuple[Path, Path]:
    version = series.image_re.match(package).group(1)
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix="unpack-") as tmp:
        tmp = Path(tmp)
        _log(f"downloading {package}")
        what = f"{package}/{series.suite}" if series.suite else package
        subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *_apt_opts(series), what],
                       cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        debs = list(tmp.glob(f"{package}_*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"apt-get download produced {debs}")
        x = tmp / "x"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(x)], check=True)
        kernels = list((x / "boot").glob("vmlinuz-*"))
        if len(kernels) != 1:
            raise RuntimeError(f"no single vmlinuz in {package}: {kernels}")
        moddir = x / "lib" / "modules" / version
        by_name: dict[str, Path] = {}
        for p in (moddir / "kernel").rglob("*.ko*"):
            name = p.name.split(".ko")[0]
            by_name[name] = p
            by_name.setdefault(name.replace("-", "_"), p)
        builtin = _builtin_names(moddir)

        out = root / f"kernel-{version}.new"
        shutil.rmtree(out, ignore_errors=True)
        (out / "modules").mkdir(parents=True)
        order: list[str] = []
        visiting: set[str] = set()

        def add(name: str) -> None:
            if name in order:
                return
            if name not in by_name:
                if name in builtin or name.replace("_", "-") in builtin or name in series.optional:
                    return  # built into this kernel (or merged into another): nothing to load
                raise RuntimeError(f"module {name} is neither in {package} nor built in")
            if name in visiting:
                raise RuntimeError(f"module dependency cycle at {name}")
            visiting.add(name)
            ko = _read_module(by_name[name])
            for dep in _modinfo_depends(ko):
                add(dep)
            (out / "modules" / f"{name}.ko").write_bytes(ko)
            order.append(name)

        for name in WANTED_MODULES:
            add(name)
        (out / "modules" / "load-order").write_text("\n".join(order) + "\n")
        shutil.copyfile(kernels[0], out / "vmlinuz")
        final = root / f"kernel-{version}"
        shutil.rmtree(final, ignore_errors=True)
        out.rename(final)
    link = root / series.link
    tmp_link = root / f"{series.link}.new"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    tmp_link.symlink_to(final.name)
    tmp_link.replace(link)
    _log(f"cached {version}: {', '.join(order)}")
    return final / "vmlinuz", final / "modules"


def ensure_kernel(series: str = "6.1") -> tuple[Path, Path]:
    """(vmlinuz, modules_dir) of kernel ``series`` ("6.1" or "6.12");
    downloads and unpacks only if not cached."""
    s = SERIES[series]
    got = _current(s)
    if got:
        return got
    try:
        return _install(resolve_package(s), s)
    except subprocess.CalledProcessError:
        if not s.suite:
            raise
        # our lists of that suite may name a kernel the archive replaced
        from .platforms import apt_options
        apt_options(s.suite, refresh=True)
        return _install(resolve_package(s), s)


def main() -> int:
    for series in (sys.argv[1:] or ["6.1"]):
        vmlinuz, mods = ensure_kernel(series)
        print(vmlinuz)
        print(mods)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
