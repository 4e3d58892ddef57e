"""The packaged systemd unit, started for real by systemd.

No systemd runs as PID 1 on the CI machine, so ``systemd-nspawn --volatile=yes
-D / --boot`` boots the machine's own systemd as PID 1 of a container (the
host's /usr read-only, a throw-away /etc and /var) with the installed package
(this tree's .deb, the ``installed`` fixture) and a one-shot unit that runs
``unit_driver.py``: it starts ``pyvirtiofsd@srv-share.service`` with every
restriction of ``packaging/systemd/pyvirtiofsd@.service``, does file work over
its socket as QEMU and a guest would, looks at the service's processes, lets
the daemon exit at disconnect, waits for the restart and powers off. A unit
setting that takes away a system call or capability the daemon needs shows up
here as a dead daemon (it found two: seccomp and pidfd_getfd).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from daemon.sandbox import capabilities

from .conftest import REPO

pytestmark = pytest.mark.guest

DRIVER_UNIT = """\
[Unit]
Description=start pyvirtiofsd@.service and check it (tests/guest/unit_driver.py)
[Service]
Type=oneshot
ExecStart=/usr/bin/python3 /src/tests/guest/unit_driver.py /src /out/result.json
StandardOutput=file:/out/driver.log
StandardError=inherit
"""


@pytest.fixture(scope="module")
def seen(installed, tmp_path_factory):
    assert shutil.which("systemd-nspawn"), "scripts/setup.sh installs systemd-container"
    top = tmp_path_factory.mktemp("unit")
    share, out, home = top / "share", top / "out", top / "home"
    share.mkdir()
    out.mkdir()
    home.mkdir()
    (share / "hello").write_text("hello world\n")
    (home / "inhome").write_text("under /home\n")
    (top / "unit-check.service").write_text(DRIVER_UNIT)
    cmd = ["systemd-nspawn", "--volatile=yes", "--directory=/", f"--machine=pyvunit{os.getpid()}",
           "--register=no", "--keep-unit", "--console=pipe", "--private-network",
           f"--bind={out}:/out", f"--bind={share}:/srv/share", f"--bind={home}:/home/guest/share",
           f"--bind-ro={REPO}:/src",
           f"--bind-ro={top / 'unit-check.service'}:/etc/systemd/system/unit-check.service",
           "--boot", "systemd.unit=unit-check.service"]
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    report = out / "result.json"
    assert report.exists(), f"nspawn rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    result = json.loads(report.read_text())
    result["share"] = share
    return result


def test_the_unit_starts_the_daemon_and_it_serves(seen):
    assert seen["errors"] == [], seen["errors"][0] + seen["journal"]
    assert seen["start"][0] == 0 and seen["socket_appeared"], seen["journal"]
    work = seen["work"]
    assert work["read"] == "hello world\n"
    assert work["names"] == ["dir", "hello", "written"]
    share = seen["share"]
    assert (share / "written").read_bytes() == b"from the guest\n"
    st = os.stat(share / "written")
    assert (st.st_uid, st.st_gid) == (1000, 1000)        # created as the guest's caller
    st = os.stat(share / "dir")
    assert (st.st_uid, st.st_gid) == (1001, 1001)        # chown by guest root (CAP_CHOWN kept)


def test_restrict_suid_sgid_refuses_set_id_bits(seen):
    assert seen["work"]["suid_chmod"] == 1, seen["work"]                  # EPERM
    assert not os.stat(seen["share"] / "written").st_mode & 0o6000


def test_workers_are_confined_inside_the_service(seen):
    """Supervisor, two workers and the keeper, each under seccomp with
    no_new_privs; the children have their own mount and pid namespaces and
    share the unit's private net, ipc and uts ones (--inherit-namespaces)."""
    procs = seen["processes"]
    assert len(procs) == 4, procs
    sup, workers = procs[0], procs[1:]
    for p in procs:
        assert p["cmdline"][:3] == ["/usr/bin/python3", "-I", "/usr/libexec/pyvirtiofsd"], p
        assert p["seccomp"] == "2" and p["nnp"] == "1", p
    for w in workers:
        for ns in ("mnt", "pid"):
            assert w["ns"][ns] != sup["ns"][ns], (ns, w)
        for ns in ("net", "ipc", "uts", "user"):
            assert w["ns"][ns] == sup["ns"][ns], (ns, w)
    caps = sorted(w["capeff"] for w in workers)
    # hiprio and keeper: nothing; request: its set minus CAP_MKNOD, which
    # PrivateDevices= withholds
    assert caps == [0, 0, capabilities.mask(capabilities.REQUEST_CAPS - {"mknod"})], [hex(c) for c in caps]
    assert not sup["capbnd"] & ~capabilities.mask(capabilities.role_caps("supervisor", file_handles=True))


def test_the_daemon_exits_at_disconnect_and_systemd_starts_the_next(seen):
    assert seen["restarted"] and seen["socket_again"], seen["journal"]
    assert seen["after"]["Result"] == "success" and seen["after"]["ExecMainStatus"] == "0", seen["after"]


def test_a_worker_restart_keeps_an_open_file_without_pidfd_getfd(seen):
    """The unit refuses pidfd_getfd and offers one request queue: the
    replacement of a SIGKILLed request worker copies the open file from
    the keeper by its round trip and reads on through the same fh."""
    restart = seen["restart"]
    assert restart["replaced"] and restart["read"] == "hello world\n", restart
    assert "pidfd_getfd" not in seen["journal"], seen["journal"]


def test_the_service_sees_only_what_its_root_binds(seen):
    """RootDirectory=: /usr (with /lib and /lib64, where the loader and
    libraries are reached), the share, the socket directory and API file
    systems; nothing of the host's /etc, /var, /srv, /home or /root."""
    view = seen["root"]
    assert set(view["/"]) <= {"usr", "lib", "lib64", "proc", "dev", "sys", "tmp", "run", "srv", "var",
                              "etc", "root", "home"}, view
    assert view["srv"] == ["share"], view                   # the share, no other directory of /srv
    # the socket directory; systemd's own; ProtectHome=tmpfs's empty /run/user
    assert "pyvirtiofsd" in view["run"] and set(view["run"]) <= {"pyvirtiofsd", "systemd", "user"}, view
    assert view["etc"] in (2, []) or set(view["etc"]) <= {"machine-id", "resolv.conf"}, view
    assert view["var"] in (2, ["tmp"]), view                # PrivateTmp's /var/tmp only
    assert view["var/tmp"] in (2, []) and view["tmp"] == [], view
    assert view["home"] in (2, 13, []) and view["root"] in (2, 13, []), view   # absent, or ProtectHome's


def test_a_share_under_home_is_served_with_protect_home(seen):
    """ProtectHome=tmpfs gives an empty /home with the share bound in (yes
    would drop the bind: docs/service.md), so a share under /home is
    served, and nothing else of /home is there."""
    home = seen["home_share"]
    assert home["start"] == 0 and home["socket"], home["journal"]
    assert home["read"] == "under /home\n", home
    assert home["home"] == ["guest"] and home["home_guest"] == ["share"], home
