"""The Rust virtiofsd's options from a real guest (Linux 6.1, QEMU 7.2).

Boot 1, ``--xattrmap :map::user.virtiofs.: --tag vfstag``: the guest's
setfattr/getfattr (Debian's ``attr``, run from the host's root over 9p) set
``trusted.*`` and ``user.*`` attributes, which the host stores as
``user.virtiofs.*``; an attribute the host set itself stays invisible;
``setfattr -x`` removes the stored one. ``--tag`` offers protocol feature
CONFIG, which QEMU 7.2 strips for vhost-user-fs (with a warning): the guest
mounts with QEMU's own tag all the same.

Boot 2, ``--readonly --cache metadata --allow-mmap``: every modifying
system call the guest makes fails with EROFS and the host directory is
unchanged, while reading works; with Linux 6.1, which does not offer
FUSE_DIRECT_IO_ALLOW_MMAP, ``--allow-mmap`` has no effect: a shared mapping
of a direct-I/O file is still ENODEV (a private one works).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .conftest import BOOTS, _start_daemon, guest_dirs
from .harness import python_in_guest

pytestmark = pytest.mark.guest

PREFIX = "RUSTOPTS "

XATTR_SCRIPT = f"""
import json, subprocess
def run(*argv):
    r = subprocess.run(argv, capture_output=True, text=True)
    return [r.returncode, r.stdout, r.stderr]
out = {{}}
out["set_trusted"] = run("setfattr", "-n", "trusted.overlay.opaque", "-v", "y", "/mnt/f")
out["set_user"] = run("setfattr", "-n", "user.note", "-v", "hello", "/mnt/f")
out["set_gone"] = run("setfattr", "-n", "user.gone", "-v", "1", "/mnt/f")
out["remove"] = run("setfattr", "-x", "user.gone", "/mnt/f")
out["dump"] = run("getfattr", "--absolute-names", "-d", "-m", "-", "/mnt/f")
out["get_trusted"] = run("getfattr", "--absolute-names", "--only-values", "-n", "trusted.overlay.opaque", "/mnt/f")
out["setfacl_without_acl"] = run("setfacl", "-m", "u:1000:r", "/mnt/f")
out["get_host_only"] = run("getfattr", "--absolute-names", "-n", "user.host-only", "/mnt/f")
print({PREFIX!r} + json.dumps(out), flush=True)
"""

# in a file: too long for the kernel command line that carries the command
READONLY_SCRIPT = f"exec(open({str(Path(__file__).with_name('guest_readonly.py'))!r}).read())"

ACL_SCRIPT = f"exec(open({str(Path(__file__).with_name('guest_acl.py'))!r}).read())"

READONLY_REFUSED = ["open_wronly", "open_rdwr", "open_trunc", "create", "mkdir", "rmdir", "unlink",
                    "rename", "symlink", "link", "mkfifo", "chmod", "chown", "truncate", "utime",
                    "setxattr", "removexattr"]


def _boot(tmp_path_factory, name, args, script, prepare):
    base, shared, run_dir = guest_dirs(tmp_path_factory, name)
    prepare(shared)
    before = _snapshot(shared)
    d = _start_daemon("ours", shared, "auto", run_dir, args)
    try:
        r = python_in_guest(d, script, PREFIX, base / "console.log")
    finally:
        d.stop()
    BOOTS.append(("ours", " ".join(args), r.guest.duration,
                  f"{name} {r.record}; console {base / 'console.log'}"))
    return {"seen": r.record, "guest": r.guest, "daemon_exit": r.daemon_exit, "log": r.daemon_log,
            "shared": shared, "before": before, "after": _snapshot(shared)}


def _snapshot(shared):
    out = {}
    for name in sorted(os.listdir(shared)):
        p = shared / name
        st = os.lstat(p)
        out[name] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns,
                     {n: os.getxattr(p, n, follow_symlinks=False) for n in os.listxattr(p, follow_symlinks=False)})
    return out


def _prepare_xattr(shared):
    (shared / "f").write_bytes(b"")
    os.setxattr(shared / "f", "user.host-only", b"host")


def _prepare_readonly(shared):
    (shared / "f").write_bytes(b"data")
    os.chmod(shared / "f", 0o644)
    os.setxattr(shared / "f", "user.x", b"1")
    (shared / "d").mkdir()


@pytest.fixture(scope="module")
def xattr_run(tmp_path_factory):
    return _boot(tmp_path_factory, "guest-xattrmap",
                 ("--xattrmap", ":map::user.virtiofs.:", "--tag", "vfstag"), XATTR_SCRIPT, _prepare_xattr)


@pytest.fixture(scope="module")
def acl_run(tmp_path_factory):
    return _boot(tmp_path_factory, "guest-acl", ("--posix-acl",), ACL_SCRIPT, lambda shared: None)


@pytest.fixture(scope="module")
def readonly_run(tmp_path_factory):
    return _boot(tmp_path_factory, "guest-readonly", ("--readonly", "--cache", "metadata", "--allow-mmap"),
                 READONLY_SCRIPT, _prepare_readonly)


def test_xattrmap_guest_names_are_stored_under_the_prefix(xattr_run):
    seen = xattr_run["seen"]
    assert seen is not None and xattr_run["guest"].exit_status == 0, xattr_run["guest"].describe()
    for step in ("set_trusted", "set_user", "set_gone", "remove"):
        assert seen[step][0] == 0, (step, seen[step])
    host = xattr_run["after"]["f"][4]
    assert host == {"user.host-only": b"host", "user.virtiofs.trusted.overlay.opaque": b"y",
                    "user.virtiofs.user.note": b"hello"}


def test_xattrmap_guest_sees_its_own_names_and_not_the_hosts(xattr_run):
    seen = xattr_run["seen"]
    code, dump, _ = seen["dump"]
    assert code == 0
    names = sorted(line.split("=")[0] for line in dump.splitlines() if "=" in line)
    assert names == ["trusted.overlay.opaque", "user.note"], dump
    assert seen["get_trusted"][0] == 0 and seen["get_trusted"][1] == "y"
    assert seen["get_host_only"][0] != 0 and "No such attribute" in seen["get_host_only"][2]


def test_tag_is_harmless_to_qemu_7_2(xattr_run):
    """QEMU 7.1 to 8.0 are said to crash on a backend offering CONFIG; 7.2
    drops it with a warning and the guest mounts with QEMU's tag=."""
    assert xattr_run["seen"] is not None, xattr_run["guest"].describe()
    assert "GET_CONFIG" not in xattr_run["log"]
    assert xattr_run["daemon_exit"] == 0, xattr_run["log"][-3000:]


def test_readonly_every_change_is_erofs_in_the_guest(readonly_run):
    seen = readonly_run["seen"]
    assert seen is not None and readonly_run["guest"].exit_status == 0, readonly_run["guest"].describe()
    wrong = {op: seen[op] for op in READONLY_REFUSED if seen[op] != "EROFS"}
    assert not wrong, wrong
    assert readonly_run["after"] == readonly_run["before"]


def test_readonly_reads_work(readonly_run):
    seen = readonly_run["seen"]
    assert seen["read"] == "data" and seen["listdir"] == ["d", "f"] and seen["getxattr"] == "1"
    assert readonly_run["daemon_exit"] == 0, readonly_run["log"][-3000:]


def test_allow_mmap_has_no_effect_on_linux_6_1(readonly_run):
    seen = readonly_run["seen"]
    assert seen["mmap_shared"] == "ENODEV"     # 6.1 never offers FUSE_DIRECT_IO_ALLOW_MMAP
    assert seen["mmap_private"] == "data"


def test_without_posix_acl_setfacl_is_not_supported(xattr_run):
    code, _, err = xattr_run["seen"]["setfacl_without_acl"]
    assert code != 0 and "Operation not supported" in err, err


def _acl_lines(result):
    code, text, err = result
    assert code == 0, err
    return [line for line in text.splitlines() if line]


def test_posix_acl_default_acls_are_inherited(acl_run):
    seen = acl_run["seen"]
    assert seen is not None and acl_run["guest"].exit_status == 0, acl_run["guest"].describe()
    assert seen["set_default"][0] == 0, seen["set_default"]
    assert any(line.startswith("user:1000:rwx") for line in _acl_lines(seen["file_acl"]))
    assert "default:user:1000:rwx" in _acl_lines(seen["sub_acl"])
    assert seen["plain_mode"] == "0o644"              # no default ACL: the umask applies
    host = acl_run["shared"]
    assert os.getxattr(host / "inherit" / "file", "system.posix_acl_access")
    assert os.getxattr(host / "inherit", "system.posix_acl_default")
    assert seen["create_in_inherit_1000"] == "ok"      # the access entry grants it
    assert os.stat(host / "inherit" / "by1000").st_uid == 1000


def test_posix_acl_entries_grant_and_refuse_access(acl_run):
    seen = acl_run["seen"]
    assert seen["grant"][0] == 0, seen["grant"]
    assert seen["read_1000"] == "ok"
    assert seen["read_1001"] == "EACCES"
    assert seen["write_1000"] == "EACCES"
    assert seen["chmod"][0] == 0
    lines = _acl_lines(seen["secret_acl"])
    assert "mask::r--" in lines and "user:1000:r--" in lines, lines   # chmod g=r set the mask
    assert acl_run["daemon_exit"] == 0, acl_run["log"][-3000:]
