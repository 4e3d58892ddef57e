"""The Debian package, built, checked, installed and serving a real guest.

``scripts/build-deb.sh`` builds ``pyvirtiofsd_*.deb`` from this tree with
Debian's own python3 and pybuild and fails on any lintian error; the module
installs it with ``apt-get install ./pyvirtiofsd_*.deb`` (so its Debian
dependencies come from the archive, not from the venv), then runs the whole
in-guest differential suite and the tools against ``/usr/bin/pyvirtiofsd``,
and checks the systemd template unit the package ships with
``systemd-analyze``.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

import daemon

from . import guest_ops
from .conftest import REPO
from .harness import describe_failures

pytestmark = pytest.mark.guest

UNIT = "/lib/systemd/system/pyvirtiofsd@.service"
# systemd-analyze security's exposure, 0.0 (best) to 10.0; the unit's header says why not lower
EXPOSURE_OK = 2.0


def test_lintian_reports_no_error(installed):
    # build-deb.sh ran lintian --fail-on error; its tags are in the output
    assert not re.search(r"^E: ", installed["build"], re.M), installed["build"][-4000:]


def test_the_package_installs_what_a_user_and_libvirt_need(installed):
    files = set(installed["files"])
    for path in ("/usr/libexec/pyvirtiofsd", "/usr/bin/pyvirtiofsd",
                 "/usr/share/pyvirtiofsd/policy/request.policy",
                 "/usr/share/pyvirtiofsd/policy/hiprio.policy",
                 "/usr/share/pyvirtiofsd/policy/supervisor.policy",
                 "/usr/share/pyvirtiofsd/policy/keeper.policy",
                 "/usr/share/man/man1/pyvirtiofsd.1.gz",
                 "/usr/share/qemu/vhost-user/50-pyvirtiofsd.json",
                 UNIT, "/usr/lib/pyvirtiofsd/daemon/cli.py",
                 # the unit's RootDirectory= (made at install and at boot) and its multi-queue drop-in
                 "/usr/lib/tmpfiles.d/pyvirtiofsd.conf",
                 "/usr/share/doc/pyvirtiofsd/examples/multiqueue.conf"):
        assert path in files, path
    assert os.path.isdir("/run/pyvirtiofsd-root")
    # the package builds the compiled request path (docs/compiled.md)
    assert [f for f in files if f.startswith("/usr/lib/pyvirtiofsd/daemon/virtio/_vqcore.") and f.endswith(".so")]
    assert [f for f in files if f.startswith("/usr/lib/pyvirtiofsd/daemon/fuse/_fastops.") and f.endswith(".so")]
    # the modules are private to the program, not in dist-packages
    assert not [f for f in files if "dist-packages" in f or "site-packages" in f]
    assert os.path.realpath("/usr/bin/pyvirtiofsd") == "/usr/libexec/pyvirtiofsd"


def test_the_installed_program_runs_without_the_venv(installed):
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO)}
    r = subprocess.run(["/usr/bin/pyvirtiofsd", "--version"], capture_output=True, text=True,
                       env=env, timeout=30)
    assert r.returncode == 0 and r.stdout.split() == ["pyvirtiofsd", daemon.__version__], r
    # -I in the launcher: PYTHONPATH (pointing at this checkout) is ignored
    r = subprocess.run(["/usr/bin/python3", "-I", "-c",
                        "import sys; sys.path.insert(0, '/usr/lib/pyvirtiofsd');"
                        "import daemon, daemon.sandbox.seccomp as s; print(daemon.__file__, s.POLICY_DIR)"],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["/usr/lib/pyvirtiofsd/daemon/__init__.py",
                                "/usr/share/pyvirtiofsd/policy"]


def test_systemd_unit_verifies(installed):
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", UNIT.replace("@", "@share")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_systemd_unit_exposure_is_ok(installed):
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                        UNIT.replace("@", "@share")], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout[-3000:] + r.stderr
    assert float(m.group(1)) <= EXPOSURE_OK, r.stdout


@pytest.fixture(scope="module")
def run(installed, guest_run_factory):
    return guest_run_factory("installed", "auto", tools=True)


def test_installed_program_serves_the_differential_suite(run):
    assert run.ops_summary is not None, describe_failures(run)
    assert set(run.ops) == set(guest_ops.CHECKS), describe_failures(run)
    assert run.ops_summary["failed"] == 0, describe_failures(run)
    assert run.tools_summary is not None and run.tools_summary["failed"] == 0, describe_failures(run)


def test_the_daemon_that_served_was_the_installed_one(run):
    """Debian's python3 ran the launcher, isolated (-I), and its workers
    were confined as in the venv runs."""
    assert run.daemon_exit == 0, run.daemon_log[-3000:]
    seen = run.confinement
    assert seen and len(seen) == 4, run.process_tree   # supervisor, hiprio, request, keeper
    for info in seen.values():
        assert info["cmdline"][:3] == ["/usr/bin/python3", "-I", "/usr/bin/pyvirtiofsd"], info
    workers = [i for pid, i in seen.items() if pid != run.process_tree[0][0]]
    assert len(workers) == 3 and all(i["seccomp"] == "2" and i["nnp"] == "1" for i in workers), seen
