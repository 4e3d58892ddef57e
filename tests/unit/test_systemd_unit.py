"""The packaged unit's restrictions leave the daemon what it uses.

packaging/systemd/pyvirtiofsd@.service confines the whole service with a
system call allow-list, a capability bounding set and a namespace
restriction. Each must keep what the daemon does: the calls of its own
allow-lists (policy/*.policy: the supervisor's is what it and a worker
setting itself up make) and of its set-up before any filter, the
supervisor's capabilities (daemon/sandbox/capabilities.py), the namespaces
a worker makes (daemon/sandbox/namespaces.py). A real start under systemd
is tests/guest/test_guest_systemd_unit.py; this one says which item broke.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
from pathlib import Path

from daemon.sandbox import capabilities, namespaces, seccomp

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "packaging" / "systemd" / "pyvirtiofsd@.service"

# made before the supervisor's own filter exists (daemon/sandbox/__init__.py)
SET_UP = {"seccomp", "prctl", "capget", "capset", "unshare", "setns", "mount", "umount2", "pivot_root",
          "setgroups", "prlimit64"}

# what the unit withholds on purpose (its header says why)
WITHHELD_CAPS = {"sys_chroot",   # --sandbox chroot: the unit runs the namespace sandbox
                 "mknod"}        # PrivateDevices= drops it: no device nodes in a share


def settings(name: str) -> list[str]:
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith(name + "=")]


@functools.cache
def group(name: str) -> frozenset[str]:
    """A systemd system call group, nested groups expanded (systemd-analyze:
    scripts/setup.sh installs systemd)."""
    out = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True,
                         check=True).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if item and not item.startswith("#"):
            names |= group(item) if item.startswith("@") else {item}
    return frozenset(names)


def allowed_syscalls() -> set[str]:
    """SystemCallFilter= as systemd merges it: the first line is an allow-list,
    a later ~ line takes names out, a later plain line puts names in."""
    lines = settings("SystemCallFilter")
    assert lines and not lines[0].startswith("~"), "the unit's filter is an allow-list"
    allowed: set[str] = set()
    for line in lines:
        deny = line.startswith("~")
        for item in line.lstrip("~").split():
            names = group(item) if item.startswith("@") else {item}
            allowed = allowed - names if deny else allowed | names
    return allowed


def test_every_system_call_the_daemon_makes_is_allowed():
    used = set(SET_UP)
    for role in seccomp.ROLES:
        used |= set(seccomp.load_policy(role).names)
    missing = sorted(used - allowed_syscalls())
    assert not missing, f"the unit's SystemCallFilter= refuses {missing}"


def test_the_filter_keeps_out_what_the_header_says():
    allowed = allowed_syscalls()
    for name in ("@resources", "@clock", "@module", "@raw-io", "@reboot", "@swap", "@obsolete", "@cpu-emulation"):
        assert not allowed & group(name), name
    assert not allowed & (group("@debug") - {"pidfd_getfd"})      # ptrace, perf_event_open, ...


def test_the_bounding_set_keeps_the_supervisors_capabilities():
    bounding = {c.lower().removeprefix("cap_") for line in settings("CapabilityBoundingSet") for c in line.split()}
    need = capabilities.role_caps("supervisor", file_handles=True) - WITHHELD_CAPS
    assert need <= bounding, sorted(need - bounding)
    assert bounding <= need, f"kept but unused: {sorted(bounding - need)}"
    assert settings("PrivateDevices") == ["yes"]        # the reason CAP_MKNOD is not listed


def test_namespaces_the_workers_make_are_the_ones_allowed():
    flags = {"mnt": namespaces.CLONE_NEWNS, "pid": namespaces.CLONE_NEWPID, "net": namespaces.CLONE_NEWNET,
             "ipc": namespaces.CLONE_NEWIPC, "uts": namespaces.CLONE_NEWUTS}
    [allowed] = settings("RestrictNamespaces")
    [exec_start] = settings("ExecStart")
    argv = shlex.split(exec_start)
    inherited = namespaces.parse_inherited(argv[argv.index("--inherit-namespaces") + 1])
    made = (namespaces.WORKER_NAMESPACES | namespaces.CLONE_NEWPID) & ~inherited
    assert made == sum(flags[n] for n in allowed.split())
    # what the workers leave to the unit, the unit gives the whole service
    assert settings("PrivateNetwork") == settings("PrivateIPC") == settings("ProtectHostname") == ["yes"]
    assert settings("RestrictAddressFamilies") == ["AF_UNIX"]


def test_exposure_is_the_figure_the_header_gives(tmp_path):
    """The header explains each point the unit loses; its figure is the
    one systemd-analyze gives (the packaged copy: test_guest_debian_package)."""
    unit = tmp_path / "pyvirtiofsd@share.service"
    unit.write_text(UNIT.read_text())
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    assert f"rates this unit\n# {m.group(1)} (" in UNIT.read_text()
    assert float(m.group(1)) <= 2.2
