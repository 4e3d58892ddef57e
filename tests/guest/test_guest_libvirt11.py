"""bookworm-backports' libvirt 11.3 starts the installed pyvirtiofsd for real guests.

libvirt 11.3 is not installed: ``platforms.ensure_libvirt11`` unpacks its
packages under the guest cache, and ``scripts/libvirt11-env.sh`` runs
``scripts/libvirt-check.sh`` in private mount and pid namespaces where 11.3's
libvirtd, virtlogd, virsh, driver modules and state replace the system's 9.0
(docs/libvirt.md). 11.3 reads our ``--print-capabilities`` ("separate-options")
and passes our long options: ``--fd``, ``--shared-dir``, ``--xattr``,
``--cache``, ``--sandbox`` and, from ``<openfiles max='4096'/>``,
``--rlimit-nofile``. (It refuses ``<lock>`` for such a daemon, as for the
Rust one: the options variant is run without it.) Each guest mounts the
share, writes, reads back, reads a host file and sets an xattr; after
``virsh destroy`` no daemon is left.

``<idmap>``: 11.3 appends ``--uid-map=:START:TARGET:COUNT:`` per ``<uid>``,
then ``--gid-map=...`` per ``<gid>``. A system domain's daemon is started
as root and confines itself to the maps (the Rust virtiofsd refuses them as
root); in ``qemu:///session`` the ordinary user's own libvirtd starts QEMU
and the daemon as that user (newuidmap/newgidmap write the maps). Either
way guest root's new file is the mapped host id, a host file of a mapped
id is the guest id, and ``virsh destroy`` leaves no daemon, socket file or
bound socket.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from . import platforms
from .conftest import REPO
from .test_guest_libvirt import run_libvirt_check

pytestmark = pytest.mark.guest

# plain and openfiles passed here under libvirt 11.3; libvirt-check.sh's
# "nolock" variant (xattr, cache none, sandbox chroot for 11.3) waits for a
# run: the guest slots were full before the deadline
VARIANTS = ("plain", "openfiles")


@pytest.fixture(scope="module")
def check(installed, tmp_path_factory):
    root = platforms.ensure_libvirt11()
    work = tmp_path_factory.mktemp("libvirt11")
    env_sh = [str(REPO / "scripts" / "libvirt11-env.sh"), str(root), str(work / "state")]
    return run_libvirt_check(env_sh, VARIANTS, "libvirt 11.3", work, "/srv/pyvirtiofsd-check11")


def test_it_is_libvirt_11_3_and_every_variant_mounts_writes_and_reads(check):
    assert re.search(r"Running against daemon: 11\.3\.|Using library: libvirt 11\.3\.", check["out"]), \
        check["out"][:2000]
    assert check["rc"] == 0, check["out"][-6000:]
    for name in VARIANTS:
        assert f"PASS {name}" in check["out"], check["out"][-6000:]


def test_libvirt_11_passes_our_long_options(check):
    ran = re.findall(r"libvirt ran: (.*)", check["out"])
    assert len(ran) == len(VARIANTS), check["out"][-4000:]
    for argv in ran:
        assert "--fd=" in argv and "--shared-dir" in argv and " -o " not in argv, argv
    # the trace wrapper's record of the openfiles variant
    traced = re.findall(r"argv: (.*)", check["out"])
    assert any(re.search(r"--rlimit-nofile[= ]4096\b", a) for a in traced), traced


def test_no_daemon_is_left_behind(check):
    assert check["left"] == []


# ---------------------------------------------------------------------------
# <idmap> in a system domain: libvirt 11.3 starts the daemon as root with
# --uid-map=:0:BASE:65536: --gid-map=:0:BASE:65536:, and the daemon confines
# itself to that user namespace

IDMAP_BASE = 400000


@pytest.fixture(scope="module")
def idmap_check(installed, tmp_path_factory):
    root = platforms.ensure_libvirt11()
    work = tmp_path_factory.mktemp("libvirt11-idmap")
    env_sh = [str(REPO / "scripts" / "libvirt11-env.sh"), str(root), str(work / "state")]
    return run_libvirt_check(env_sh, ("idmap",), "libvirt 11.3", work, "/srv/pyvirtiofsd-check11",
                             extra_env={"LIBVIRT_CHECK_IDMAP_BASE": str(IDMAP_BASE)})


def _still_ours() -> str:
    """An assertion hint: the installed program is shared by everything on
    the machine, and another run's ``apt-get install`` may replace it."""
    for rel in ("daemon/startup.py", "daemon/sandbox/userns.py"):
        try:
            if (Path("/usr/lib/pyvirtiofsd") / rel).read_bytes() != (REPO / rel).read_bytes():
                return f"(the installed {rel} is not this tree's: another run reinstalled the package)\n"
        except OSError as e:
            return f"(the installed {rel}: {e})\n"
    return ""


def _guest_ls(out: str) -> dict[str, tuple[int, int]]:
    """The guest's ``ls -ln /mnt`` lines: name -> (uid, gid)."""
    return {m[3]: (int(m[1]), int(m[2]))
            for m in re.finditer(r"\|\s+[-d]\S+\s+\d+\s+(\d+)\s+(\d+)\s+\d+\s.*\s(from-\w+)\s*$", out, re.M)}


def test_idmap_libvirt_passes_the_maps_to_the_root_daemon(idmap_check):
    out = idmap_check["out"]
    assert idmap_check["rc"] == 0 and "PASS idmap" in out, _still_ours() + out[-6000:]
    ran = re.findall(r"libvirt ran: (.*)", out)
    assert len(ran) == 1, out[-4000:]
    assert f"--uid-map=:0:{IDMAP_BASE}:65536:" in ran[0] and f"--gid-map=:0:{IDMAP_BASE}:65536:" in ran[0], ran
    traced = re.findall(r"argv: (.*)", out)
    assert traced and "Uid: 0 0 0 0" in out, "libvirt started it as root"


def test_idmap_the_guest_sees_mapped_ids(idmap_check):
    out = idmap_check["out"]
    assert "PASS idmap" in out, out[-6000:]
    # guest root's new file is the mapped host id; the host's file of
    # BASE+1234 is 1234 in the guest
    assert f"host sees from-guest as {IDMAP_BASE}:{IDMAP_BASE}" in out, out[-4000:]
    assert _guest_ls(out) == {"from-guest": (0, 0), "from-host": (1234, 1234)}, out[-4000:]


def test_idmap_no_daemon_is_left_behind(idmap_check):
    assert idmap_check["left"] == []


# ---------------------------------------------------------------------------
# qemu:///session: the ordinary user pyvirtiofsd-idmap's own libvirtd 11.3
# (scripts/setup.sh gives it /etc/subuid and /etc/subgid ranges) starts QEMU
# and the daemon as that user, with the <idmap> libvirt would make itself:
# guest 0 is the user, guest 1.. its subordinate ids

SESSION_USER = "pyvirtiofsd-idmap"


@pytest.fixture(scope="module")
def session_check(installed, tmp_path_factory):
    from tests.idmap_user import IdmapUser
    user = IdmapUser()
    root = platforms.ensure_libvirt11()
    work = tmp_path_factory.mktemp("libvirt11-session")
    env_sh = [str(REPO / "scripts" / "libvirt11-env.sh"), str(root), str(work / "state")]
    result = run_libvirt_check(env_sh, ("session",), "libvirt 11.3 session", work, "/srv/pyvirtiofsd-check11",
                               extra_env={"LIBVIRT_CHECK_SESSION_USER": SESSION_USER})
    return {**result, "user": user}


def test_session_the_users_libvirt_starts_the_daemon_with_the_maps(session_check):
    out, user = session_check["out"], session_check["user"]
    assert session_check["rc"] == 0 and "PASS session" in out, out[-6000:]
    assert f"QEMU runs as {SESSION_USER} " in out, out[-4000:]
    ran = re.findall(r"libvirt ran: (.*)", out)
    assert len(ran) == 1, out[-4000:]
    for option, own, sub in (("--uid-map", user.uid, user.subuid), ("--gid-map", user.gid, user.subgid)):
        assert f"{option}=:0:{own}:1: {option}=:1:{sub}:65536:" in ran[0], ran


def test_session_the_guest_sees_mapped_ids(session_check):
    out, user = session_check["out"], session_check["user"]
    assert "PASS session" in out, out[-6000:]
    assert f"host sees from-guest as {user.uid}:{user.gid}" in out, "guest root is the user"
    assert _guest_ls(out) == {"from-guest": (0, 0), "from-host": (1234, 1234)}, out[-4000:]


def test_session_destroy_leaves_no_daemon_socket_or_fd(session_check):
    out = session_check["out"]
    running = re.search(r"before destroy: daemons=(\d+) bound-sockets=(\d+)", out)
    assert running and int(running[1]) >= 1 and int(running[2]) >= 1, out[-4000:]
    assert "after destroy: daemons=0 socket-files=0 bound-sockets=0" in out, out[-4000:]
    assert session_check["left"] == []
