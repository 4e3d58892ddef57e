"""--uid-map/--gid-map from a real guest (platform a: QEMU 7.2, Linux 6.1).

The daemon runs as the ordinary host user ``pyvirtiofsd-idmap``
(tests/idmap_user.py; scripts/setup.sh gives it /etc/subuid and /etc/subgid
ranges), with three ranges per map: namespace 0..999 -> SUB.., 1000 -> the
user itself, 1001..2999 -> SUB+1001... QEMU (root here) connects to the
socket the user's daemon created. In the guest (tests/guest/guest_idmap.py)
root and users 1000 and 1234 create files and directories; the host sees
the mapped ids, ``stat`` in the guest its own; an unmapped guest id cannot
create or be given, a host file of an unmapped id is nobody's.

The same boot is made with the Rust virtiofsd 1.13 and the same maps
(it runs the same newuidmap/newgidmap), and both must agree except for the
errno of an unmapped id, which each daemon chooses.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import RUST_DEFAULT_OPTS, DaemonProcess

from .conftest import BOOTS, guest_prerequisites
from .harness import python_in_guest

pytestmark = pytest.mark.guest

PREFIX = "IDMAP "
SCRIPT = f"exec(open({str(Path(__file__).with_name('guest_idmap.py'))!r}).read())"


def _command(kind: str, user, base: Path) -> list[str]:
    sock, share = base / "vfsd.sock", base / "share"
    if kind == "ours":
        cmd = [sys.executable, "-m", "daemon", "--socket-path", str(sock), "--shared-dir", str(share),
               "--cache", "auto"]
    else:
        from tests.guest.platforms import rust_virtiofsd_argv
        cmd = [*rust_virtiofsd_argv(), f"--socket-path={sock}", f"--shared-dir={share}", "--cache=auto",
               *RUST_DEFAULT_OPTS]
    return [*user.setpriv(), *cmd, *user.maps()]


def _start(kind: str, user, base: Path) -> DaemonProcess:
    from tests.idmap_user import start
    return start(kind, _command(kind, user, base), base, lambda d: os.path.exists(d.socket_path))


@pytest.fixture(scope="module", params=["ours", "rust"])
def idmap_run(request):
    from tests.idmap_user import IdmapUser, remove

    why = guest_prerequisites()
    if why:
        pytest.fail(f"guest tests cannot run: {why}")
    kind = request.param
    user = IdmapUser()
    base = user.make_base(f"vfsd-guest-idmap-{kind}-")
    share = base / "share"
    os.close(os.open(share / "host-root", os.O_CREAT | os.O_WRONLY, 0o644))   # root's, unmapped
    daemon = _start(kind, user, base)
    try:
        r = python_in_guest(daemon, SCRIPT, PREFIX, base / "console.log")
    finally:
        daemon.stop()
    BOOTS.append((kind, "--uid-map/--gid-map (3 ranges each), as an ordinary user", r.guest.duration,
                  f"guest-idmap {r.record}; console {base / 'console.log'}"))
    host = {}
    for name in ("by-root", "dir-root", "by-user", "pub/by-1234", "pub/dir-1234", "pub/by-5000"):
        try:
            st = os.lstat(share / name)
            host[name] = (st.st_uid, st.st_gid)
        except FileNotFoundError:
            host[name] = None
    yield {"kind": kind, "user": user, "seen": r.record, "guest": r.guest, "daemon_exit": r.daemon_exit,
           "log": r.daemon_log, "host": host, "contents": (share / "by-user").read_text()
           if (share / "by-user").exists() else None}
    remove(base)


def test_guest_ids_are_the_mapped_host_ids(idmap_run):
    seen, user, host = idmap_run["seen"], idmap_run["user"], idmap_run["host"]
    assert seen is not None and idmap_run["guest"].exit_status == 0, idmap_run["guest"].describe()
    assert seen["by_user"] == 0 and seen["by_1234"] == 0 and seen["dir_1234"] == 0, seen
    sub_u, sub_g = user.subuid, user.subgid
    assert host["dir-root"] == (sub_u, sub_g), "guest root's directory: namespace 0 is SUB on the host"
    assert host["by-user"] == (user.uid, user.gid), "guest user 1000 is the host user itself"
    assert host["pub/by-1234"] == (sub_u + 1234, sub_g + 1234)
    assert host["pub/dir-1234"] == (sub_u + 1234, sub_g + 1234)
    assert seen["chown_mapped"] == 0 and host["by-root"] == (sub_u + 1234, sub_g + 1234), seen
    assert idmap_run["contents"] == "by-user"


def test_stat_in_the_guest_shows_the_guest_ids(idmap_run):
    seen = idmap_run["seen"]
    assert seen is not None, idmap_run["guest"].describe()
    assert seen["mnt"] == [1000, 1000], "the share is the user's own: namespace id 1000"
    assert seen["stat"] == {"by-root": [1234, 1234], "dir-root": [0, 0], "by-user": [1000, 1000],
                            "pub/by-1234": [1234, 1234], "pub/dir-1234": [1234, 1234],
                            "host-root": [65534, 65534]}
    assert seen["host_root_listed"]


def test_an_unmapped_guest_id_cannot_own_a_file(idmap_run):
    seen, host = idmap_run["seen"], idmap_run["host"]
    assert seen is not None, idmap_run["guest"].describe()
    assert host["pub/by-5000"] is None
    # a create as an unmapped id: our credential switch is refused (EPERM),
    # the Rust daemon's setresuid says EINVAL; a chown to one is the host
    # kernel's EINVAL in both
    assert seen["unmapped"] == (errno.EPERM if idmap_run["kind"] == "ours" else errno.EINVAL), seen
    assert seen["chown_unmapped"] == errno.EINVAL, seen


def test_the_daemon_ends_cleanly(idmap_run):
    assert idmap_run["daemon_exit"] == 0, idmap_run["log"][-3000:]
    if idmap_run["kind"] == "ours":
        assert "Traceback" not in idmap_run["log"] and "user namespace: uid map" in idmap_run["log"]
