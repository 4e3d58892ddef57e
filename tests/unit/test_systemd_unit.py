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
DROP_IN = REPO / "packaging" / "systemd" / "multiqueue.conf"
# the unit offers one request queue and refuses what only several need
# (pidfd_getfd: workers copying each other's fds); DROP_IN gives it back
SEVERAL_QUEUES_ONLY = {"pidfd_getfd"}
# systemd-analyze security's figure: the unit, and with DROP_IN
EXPOSURE = 2.0
EXPOSURE_MULTIQUEUE = 2.2

# made before the supervisor's own filter exists (daemon/sandbox/__init__.py)
SET_UP = {"seccomp", "prctl", "capget", "capset", "unshare", "setns", "mount", "umount2", "pivot_root",
          "setgroups", "prlimit64"}

# what the unit withholds on purpose (its header says why)
WITHHELD_CAPS = {"mknod"}        # PrivateDevices= drops it: no device nodes in a share


def settings(name: str, path: Path = UNIT) -> list[str]:
    return [line.split("=", 1)[1] for line in path.read_text().splitlines() if line.startswith(name + "=")]


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


def allowed_syscalls(drop_in: bool = False) -> set[str]:
    """SystemCallFilter= as systemd merges it: the first line is an allow-list,
    a later ~ line takes names out, a later plain line puts names in (the
    drop-in's lines come last)."""
    lines = settings("SystemCallFilter") + (settings("SystemCallFilter", DROP_IN) if drop_in else [])
    assert lines and not lines[0].startswith("~"), "the unit's filter is an allow-list"
    allowed: set[str] = set()
    for line in lines:
        deny = line.startswith("~")
        for item in line.lstrip("~").split():
            names = group(item) if item.startswith("@") else {item}
            allowed = allowed - names if deny else allowed | names
    return allowed


def used_syscalls() -> set[str]:
    used = set(SET_UP)
    for role in seccomp.ROLES:
        used |= set(seccomp.load_policy(role).names)
    return used


def test_every_system_call_the_daemon_makes_is_allowed():
    missing = sorted(used_syscalls() - SEVERAL_QUEUES_ONLY - allowed_syscalls())
    assert not missing, f"the unit's SystemCallFilter= refuses {missing}"
    # the unit offers one request queue, which never needs the rest
    assert "--request-queues 1" in settings("ExecStart")[0]
    assert not SEVERAL_QUEUES_ONLY & allowed_syscalls()


def test_the_multiqueue_drop_in_allows_the_rest_and_only_changes_the_queue_count():
    missing = sorted(used_syscalls() - allowed_syscalls(drop_in=True))
    assert not missing, f"with {DROP_IN.name}, SystemCallFilter= still refuses {missing}"
    assert allowed_syscalls(drop_in=True) - allowed_syscalls() == SEVERAL_QUEUES_ONLY
    reset, exec_start = settings("ExecStart", DROP_IN)
    assert reset == ""
    [unit_exec_start] = settings("ExecStart")
    assert exec_start.replace("--request-queues 4", "--request-queues 1") == unit_exec_start
    from daemon import startup
    assert startup.MULTIQUEUE_DROP_IN.endswith("/" + DROP_IN.name)     # what the refusal names
    assert f"{DROP_IN} usr/share/doc/pyvirtiofsd/examples".replace(f"{REPO}/", "") in \
        (REPO / "packaging" / "debian" / "install").read_text().splitlines()


def test_the_filter_keeps_out_what_the_header_says():
    allowed = allowed_syscalls()
    for name in ("@resources", "@clock", "@module", "@raw-io", "@reboot", "@swap", "@obsolete", "@cpu-emulation",
                 "@debug"):
        assert not allowed & group(name), name
    assert not allowed_syscalls(drop_in=True) & (group("@debug") - {"pidfd_getfd"})   # ptrace, perf_event_open...


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


def exposure(unit: Path) -> float:
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    return float(m.group(1))


def test_exposure_is_the_figure_the_header_gives(tmp_path):
    """The header explains each point the unit loses; its figure is the
    one systemd-analyze gives (the packaged copy: test_guest_debian_package),
    at most 2.0; with the multi-queue drop-in, 2.2."""
    unit = tmp_path / "pyvirtiofsd@share.service"
    unit.write_text(UNIT.read_text())
    figure = exposure(unit)
    assert f"rates this unit\n# {figure:.1f} (" in UNIT.read_text()
    assert figure <= EXPOSURE
    # a drop-in is merged by systemd-analyze only where systemd looks:
    # append its [Service] lines to a copy instead (same result)
    merged = tmp_path / "pyvirtiofsd@multi.service"
    merged.write_text(UNIT.read_text().replace("[Install]", DROP_IN.read_text().split("[Service]", 1)[1]
                                               + "\n[Install]"))
    assert exposure(merged) == EXPOSURE_MULTIQUEUE
    assert f"{EXPOSURE_MULTIQUEUE:.1f}" in DROP_IN.read_text()
