#!/usr/bin/env bash
# Installs everything pyvirtiofsd's demo, tests and benchmarks need on a fresh
# Debian 12 machine (run as root): Debian packages, the project venv, and the
# guest cache: both guest platforms' kernels, QEMU 10 and the Rust virtiofsd
# unpacked under .cache/guest. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  qemu-system-x86   # QEMU 7.2: the guest, and the C virtiofsd baseline (qemu-system-common)
  busybox-static    # the guest's initrd userland
  libcap-dev gcc    # python-prctl builds from source against libcap
  libseccomp2       # pyseccomp is ctypes over libseccomp
  fio               # guest I/O workloads and benchmarks
  cpio xz-utils zstd  # building the initrd, unpacking kernel modules
  libvirt-daemon-system libvirt-clients  # libvirt 9.0 starting our packaged daemon (tests/guest)
  systemd           # systemd-analyze checks the packaged unit
  systemd-container # systemd-nspawn boots the host's systemd as PID 1 to start the unit for real (tests/guest)
  attr              # setfattr/getfattr: guest tests of --xattrmap (the guest runs the host's programs)
  acl               # setfacl/getfacl: tests of --posix-acl (frontend, and the guest runs them too)
  uidmap            # newuidmap/newgidmap: --uid-map/--gid-map (an unprivileged daemon's user namespace)
  python3-prctl python3-seccomp  # Debian's python3 runs root's --uid-map test daemon (tests/frontend/test_idmap.py)
  git autoconf automake make perl  # pjdfstest (make pjdfstest): built from a clone; the guest runs perl's prove
  mmdebstrap        # the Debian root the root-on-virtiofs test boots (tests/guest/rootfs.py)
)

scripts/apt-ensure.sh setup "${PACKAGES[@]}"

# an ordinary user with subordinate id ranges (Debian's uidmap package:
# newuidmap/newgidmap): the tests of --uid-map/--gid-map start the daemon
# as this user (tests/idmap_user.py)
IDMAP_USER=pyvirtiofsd-idmap
IDMAP_SUBIDS=300000-365535
if ! id -u "$IDMAP_USER" >/dev/null 2>&1; then
  echo "setup: creating user $IDMAP_USER (subordinate ids $IDMAP_SUBIDS)"
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$IDMAP_USER"
fi
if ! grep -qs "^$IDMAP_USER:300000:65536\$" /etc/subuid || ! grep -qs "^$IDMAP_USER:300000:65536\$" /etc/subgid; then
  usermod --add-subuids "$IDMAP_SUBIDS" --add-subgids "$IDMAP_SUBIDS" "$IDMAP_USER"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
# editable_mode=compat: a plain path entry in a .pth file, not setuptools'
# import-hook finder, which makes every Python process of the venv (the
# daemon's included) import pathlib, urllib.parse and ipaddress at start-up.
if ! .venv/bin/python -c "import daemon, prctl, pyseccomp, pytest, hypothesis, atheris, prometheus_client, ruff, mypy" 2>/dev/null \
   || ls .venv/lib/python3*/site-packages/__editable___*_finder.py >/dev/null 2>&1; then
  echo "setup: installing pyvirtiofsd and its test dependencies into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test]" --config-settings editable_mode=compat
fi

# the compiled request path (docs/compiled.md): the editable install builds
# daemon/virtio/_vqcore*.so and daemon/fuse/_fastops*.so in place; rebuild
# them when their C source changed since
# (setuptools compares timestamps: a no-op otherwise). Optional: without a
# compiler this warns and the workers run the pure-Python path.
.venv/bin/python setup.py -q build_ext --inplace 2>&1 | grep -i "error\|failed" || true

echo "setup: guest kernel cache"
.venv/bin/python -m tests.guest.kernel >/dev/null
echo "setup: guest platforms (a: QEMU 7.2 + Linux 6.1; b: QEMU 10 + Linux 6.12) and the Rust virtiofsd"
# unpacked under .cache/guest, nothing installed system-wide (tests/guest/platforms.py)
.venv/bin/python -m tests.guest.platforms >/dev/null
echo "setup: the Debian 12 root for the root-on-virtiofs test (built once, a few minutes)"
.venv/bin/python -m tests.guest.rootfs >/dev/null
echo "setup: done"
