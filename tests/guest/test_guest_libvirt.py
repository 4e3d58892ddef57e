"""Debian 12's libvirt 9.0 starts the installed pyvirtiofsd for real guests.

``scripts/libvirt-check.sh`` (virtlogd and libvirtd started by hand: no
systemd here) creates transient TCG domains whose ``<filesystem>`` has
``<driver type='virtiofs'/>`` and ``<binary path='/usr/bin/pyvirtiofsd'/>``,
the Debian package's program (the ``installed`` fixture builds and installs
it). libvirt 9.0 passes the C daemon's ``-o`` list and ``--fd``, with
supplementary group 0; each guest mounts the share, writes, reads it back,
reads a host file and sets an xattr. Two variants: plain, and xattr + cache
none + POSIX/flock locks + ``--sandbox chroot``. After ``virsh destroy`` no
daemon is left running.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from .conftest import BOOTS, REPO

pytestmark = pytest.mark.guest

VARIANTS = ("plain", "options")


def daemons_left() -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-f", "pyvirtiofsd.*--fd"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "pgrep" not in line]


def run_libvirt_check(prefix: list[str], variants, label: str, log_dir, share: str,
                      extra_env: dict | None = None) -> dict:
    """scripts/libvirt-check.sh for ``variants`` with the installed program,
    run under ``prefix`` (a command that takes it as its arguments, or
    none); its output, exit status and the daemons left behind."""
    env = {**os.environ, "LIBVIRT_CHECK_DAEMON": "/usr/bin/pyvirtiofsd",
           "LIBVIRT_CHECK_VARIANTS": " ".join(variants),
           "LIBVIRT_CHECK_DIR": "/var/lib/libvirt/images/pyvirtiofsd-check",
           "LIBVIRT_CHECK_SHARE": share, **(extra_env or {})}
    t0 = time.monotonic()
    r = subprocess.run([*prefix, str(REPO / "scripts" / "libvirt-check.sh")], capture_output=True, text=True,
                       env=env, timeout=900, cwd=REPO)
    (log_dir / "libvirt-check.log").write_text(r.stdout + r.stderr)
    BOOTS.append(("installed", f"{label} " + "+".join(variants), time.monotonic() - t0,
                  f"log {log_dir / 'libvirt-check.log'}"))
    deadline = time.monotonic() + 15
    while daemons_left() and time.monotonic() < deadline:
        time.sleep(0.2)
    return {"rc": r.returncode, "out": r.stdout + r.stderr, "left": daemons_left()}


@pytest.fixture(scope="module")
def check(installed, tmp_path_factory):
    work = tmp_path_factory.mktemp("libvirt")   # the script's output, kept
    return run_libvirt_check([], VARIANTS, "libvirt 9.0", work, "/srv/pyvirtiofsd-check")


def test_every_variant_mounts_writes_and_reads(check):
    assert check["rc"] == 0, check["out"][-6000:]
    for name in VARIANTS:
        assert f"PASS {name}" in check["out"], check["out"][-6000:]


def test_libvirt_ran_the_installed_program_with_the_c_daemon_options(check):
    ran = re.findall(r"libvirt ran: (.*)", check["out"])
    assert len(ran) == len(VARIANTS), check["out"][-4000:]
    for argv in ran:
        assert "/usr/bin/pyvirtiofsd" in argv and "--fd=" in argv and "-o source=" in argv, argv
    assert any("sandbox=chroot" in a and "cache=none" in a for a in ran), ran


def test_no_daemon_is_left_behind(check):
    assert check["left"] == []
