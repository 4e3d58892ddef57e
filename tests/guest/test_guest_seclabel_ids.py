"""--security-label and --translate-uid/--translate-gid from a real guest,
one boot on each platform (a: QEMU 7.2 + Linux 6.1, b: QEMU 10 + Linux 6.12).

The guest kernel is booted with ``security=selinux selinux=1`` and no
policy: SELinux then runs uninitialized, and Linux 6.1's
``security_dentry_init_security`` still gives every new entry a context
(the parent's initial SID, ``unlabeled``; 6.12 likewise), which the guest sends in
the FUSE_SECURITY_CTX extension of CREATE, MKNOD, MKDIR and SYMLINK. So
each entry the guest creates must arrive on the host with a
``security.selinux`` attribute, and no temporary name may remain. (With
Debian's default LSM, AppArmor, the guest sends an empty context, which the
frontend tests cover.)

``--translate-uid map:1000:2000:1 --translate-gid map:1000:2000:1``: a file
guest user 1000 creates is owned by 2000:2000 on the host while the guest
sees 1000:1000; a host file of 2000 shows as 1000 in the guest; a chown to
1000 in the guest stores 2000.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from daemon.fuse.seclabel import TEMP_PREFIX

from .conftest import BOOTS, _start_daemon, guest_dirs
from .harness import python_in_guest

pytestmark = pytest.mark.guest

PREFIX = "SECIDS "
SCRIPT = f"exec(open({str(Path(__file__).with_name('guest_seclabel.py'))!r}).read())"
ARGS = ("--security-label", "--translate-uid", "map:1000:2000:1", "--translate-gid", "map:1000:2000:1",
        "--translate-gid", "map:3000:3500:1")
KERNEL_ARGS = ("security=selinux", "selinux=1")


@pytest.fixture(scope="module", params=["a", "b"])
def run(tmp_path_factory, request):
    platform = request.param
    base, shared, run_dir = guest_dirs(tmp_path_factory, f"guest-seclabel-ids-{platform}")
    (shared / "host2000").write_bytes(b"")
    os.chown(shared / "host2000", 2000, 2000)
    (shared / "grp").mkdir()
    os.chown(shared / "grp", 0, 3500)          # the guest's group 3000
    os.chmod(shared / "grp", 0o2775)
    d = _start_daemon("ours", shared, "auto", run_dir, ARGS)
    try:
        r = python_in_guest(d, SCRIPT, PREFIX, base / "console.log", extra_kernel_args=KERNEL_ARGS,
                            platform=platform)
    finally:
        d.stop()
    BOOTS.append((f"ours {platform}", " ".join(ARGS), r.guest.duration, f"seclabel+ids {r.record}"))
    assert r.record is not None and r.guest.exit_status == 0, r.guest.describe()
    return {"seen": r.record, "shared": shared, "log": r.daemon_log, "exit": r.daemon_exit,
            "platform": platform}


def test_the_guest_runs_selinux(run):
    assert "selinux" in run["seen"]["lsm"], run["seen"]["lsm"]


def test_every_new_entry_carries_the_guests_label(run):
    shared = run["shared"]
    for name in ("lab_file", "lab_dir", "lab_fifo", "lab_link", "users"):
        # uninitialized SELinux labels every new entry with the initial SID's name
        assert os.getxattr(shared / name, "security.selinux", follow_symlinks=False) == b"unlabeled\0", name
    assert os.getxattr(shared / "users" / "by1000", "security.selinux") == b"unlabeled\0"
    assert not [n for n in os.listdir(shared) if n.startswith(TEMP_PREFIX)]
    assert run["seen"]["listing"] == ["grp", "host2000", "lab_dir", "lab_fifo", "lab_file", "lab_link"]
    assert run["exit"] == 0, run["log"][-3000:]


def test_a_guest_users_file_has_the_translated_owner_on_the_host(run):
    seen, shared = run["seen"], run["shared"]
    assert seen["user_create"] == "ok"
    st = os.stat(shared / "users" / "by1000")
    assert (st.st_uid, st.st_gid) == (2000, 2000)
    assert seen["user_file_ids"] == [1000, 1000]


def test_host_ids_are_shown_translated_and_chown_translates_back(run):
    seen, shared = run["seen"], run["shared"]
    assert seen["host2000_ids"] == [1000, 1000]
    assert seen["chowned_ids"] == [1000, 1000]
    st = os.stat(shared / "lab_file")
    assert (st.st_uid, st.st_gid) == (2000, 2000)


def test_a_create_with_the_group_and_the_label_extensions(run):
    """A file created SGID in a setgid directory of a group the user has only
    as a supplementary one (guest 3000, host 3500). Linux 6.12 sends that
    group and the label in one request; the group, translated, is the
    creator's on the host, so the host keeps SGID: proof that both
    extensions were read. Linux 6.1 sends only the label and the host
    clears SGID (docs/credentials.md)."""
    seen, shared = run["seen"], run["shared"]
    assert seen["group_create"] == "ok", seen["group_create"]
    host = shared / "grp" / "by1000"
    st = os.stat(host)
    mode = 0o2755 if run["platform"] == "b" else 0o755
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (2000, 3500, mode)
    assert seen["group_file"] == [1000, 3000, oct(mode)]
    assert os.getxattr(host, "security.selinux") == b"unlabeled\0"
    assert not [n for n in os.listdir(shared / "grp") if n.startswith(TEMP_PREFIX)]
