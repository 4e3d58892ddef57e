"""The Rust virtiofsd 1.13's options (issue 17), driven through the test
frontend against a real daemon: --xattrmap, --readonly, --cache metadata,
--allow-mmap, --preserve-noatime, --socket-group, --tag and --syslog. Each
checks the effect on the wire and on the host, not merely the parsing.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import subprocess
import sys
import time

import pytest

from daemon.fuse import abi
from tests.procfs import children
from daemon.fuse.abi import InitFlag
from tests.conftest import REPO_ROOT
from tests.frontend.fuse_client import LINUX_INIT_FLAGS, FuseClient
from tests.frontend.test_frontend_ops import expect_errno
from tests.frontend.vhost import FLAG_VERSION, Req, VhostUserFrontend, start_frontend

ROOT = 1
NOBODY = 65534


def host_xattrs(path) -> dict[str, bytes]:
    return {n: os.getxattr(path, n) for n in os.listxattr(path)}


# -- --xattrmap ----------------------------------------------------------------------
@pytest.mark.frontend_opts(extra_args=("--xattrmap", ":map::user.virtiofs.:"))
def test_xattrmap_map_all_stores_every_guest_name_under_the_prefix(frontend):
    fc = frontend
    path = fc.shared_dir / "f"
    path.write_bytes(b"")
    os.setxattr(path, "user.host-only", b"h")     # not the guest's: hidden
    nodeid = fc.lookup(ROOT, "f").nodeid
    fc.setxattr(nodeid, "trusted.guest", b"t")
    fc.setxattr(nodeid, "user.plain", b"u")
    assert host_xattrs(path) == {"user.host-only": b"h", "user.virtiofs.trusted.guest": b"t",
                                 "user.virtiofs.user.plain": b"u"}
    assert sorted(fc.listxattr(nodeid, 4096)) == [b"trusted.guest", b"user.plain"]
    assert fc.listxattr(nodeid, 0) == len(b"trusted.guest\0user.plain\0")
    assert fc.getxattr(nodeid, "trusted.guest", 64) == b"t"
    expect_errno(fc.getxattr, nodeid, "user.host-only", 64, errnos=errno.ENODATA)
    fc.removexattr(nodeid, "trusted.guest")
    assert "user.virtiofs.trusted.guest" not in os.listxattr(path)


SELECTIVE = ("/prefix/all/trusted./user.virtiofs./ /bad/server//trusted./ "
             "/bad/client/user.virtiofs.// /unsupported/all/security./security./ /ok/all///")


@pytest.mark.frontend_opts(extra_args=("--xattrmap", SELECTIVE))
def test_xattrmap_selective_rules_refuse_and_hide(frontend):
    fc = frontend
    path = fc.shared_dir / "f"
    path.write_bytes(b"")
    os.setxattr(path, "trusted.host", b"x")         # hidden by /bad/server//trusted./
    os.setxattr(path, "user.virtiofs.trusted.a", b"a")
    nodeid = fc.lookup(ROOT, "f").nodeid
    # the stored form may not be named directly (EPERM; reading it: ENODATA,
    # as the Rust daemon answers), security.* is ENOTSUP
    expect_errno(fc.getxattr, nodeid, "user.virtiofs.trusted.a", 64, errnos=errno.ENODATA)
    expect_errno(fc.removexattr, nodeid, "user.virtiofs.trusted.a", errnos=errno.EPERM)
    expect_errno(fc.setxattr, nodeid, "user.virtiofs.x", b"v", errnos=errno.EPERM)
    expect_errno(fc.setxattr, nodeid, "security.selinux", b"v", errnos=errno.ENOTSUP)
    fc.setxattr(nodeid, "user.free", b"f")             # /ok/all///: unchanged
    assert os.getxattr(path, "user.free") == b"f"
    assert fc.getxattr(nodeid, "trusted.a", 64) == b"a"
    assert sorted(fc.listxattr(nodeid, 4096)) == [b"trusted.a", b"user.free"]


def test_xattrmap_malformed_is_one_line_at_start(tmp_path):
    for rules, says in ((":prefix:client:trusted.", "incomplete"), (":frob:all:::", "unknown type"),
                        (":map::a.::ok:all:::", "map rule"), ("   ", "no rules")):
        r = subprocess.run([sys.executable, "-m", "daemon", "--shared-dir", str(tmp_path),
                            "--socket-path", str(tmp_path / "s"), "--xattrmap", rules],
                           cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.startswith("pyvirtiofsd: error: --xattrmap: ") and says in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1
        assert not (tmp_path / "s").exists()


# -- --readonly ----------------------------------------------------------------------
@pytest.mark.frontend_opts(extra_args=("--readonly",))
def test_readonly_refuses_every_change_and_serves_reads(frontend):
    fc = frontend
    share = fc.shared_dir
    (share / "f").write_bytes(b"data")
    os.chmod(share / "f", 0o644)
    (share / "d").mkdir()
    os.setxattr(share / "f", "user.x", b"1")
    before = sorted(os.listdir(share))
    f = fc.lookup(ROOT, "f").nodeid
    d = fc.lookup(ROOT, "d").nodeid
    rofs = dict(errnos=errno.EROFS)
    expect_errno(fc.create, ROOT, "new", **rofs)
    expect_errno(fc.mkdir, ROOT, "newdir", **rofs)
    expect_errno(fc.mknod, ROOT, "fifo", stat.S_IFIFO | 0o644, **rofs)
    expect_errno(fc.symlink, ROOT, "ln", "f", **rofs)
    expect_errno(fc.link, f, ROOT, "hard", **rofs)
    expect_errno(fc.unlink, ROOT, "f", **rofs)
    expect_errno(fc.rmdir, ROOT, "d", **rofs)
    expect_errno(fc.rename, ROOT, "f", ROOT, "g", **rofs)
    expect_errno(fc.rename2, ROOT, "f", ROOT, "g", 1, **rofs)
    expect_errno(fc.setattr, f, mode=0o600, **rofs)
    expect_errno(fc.setattr, f, size=0, **rofs)
    expect_errno(fc.setxattr, f, "user.y", b"2", **rofs)
    expect_errno(fc.removexattr, f, "user.x", **rofs)
    expect_errno(fc.open, f, os.O_WRONLY, **rofs)
    expect_errno(fc.open, f, os.O_RDWR, **rofs)
    expect_errno(fc.open, f, os.O_RDONLY | os.O_TRUNC, **rofs)
    opened = fc.open(f, os.O_RDONLY)
    assert fc.read(f, opened.fh, 0, 64) == b"data"
    expect_errno(fc.write, f, opened.fh, 0, b"x", **rofs)
    expect_errno(fc.fallocate, f, opened.fh, 0, 4096, **rofs)
    expect_errno(fc.copy_file_range, f, opened.fh, 0, f, opened.fh, 8, 4, **rofs)
    fc.release(f, opened.fh)
    assert fc.getxattr(f, "user.x", 16) == b"1"
    assert {e.name for e in fc.readdir_all(d)} >= {b".", b".."}
    assert sorted(os.listdir(share)) == before and (share / "f").read_bytes() == b"data"
    assert stat.S_IMODE(os.stat(share / "f").st_mode) == 0o644
    assert host_xattrs(share / "f") == {"user.x": b"1"}


def test_readonly_mounts_the_share_read_only_in_the_worker(daemon_factory, tmp_path):
    """The request worker's root is a read-only mount: even a request the
    op table let through would meet EROFS from the host kernel."""
    d = daemon_factory("ours", extra_args=("--readonly",))
    fe = start_frontend(d.socket_path, ram_size=64 << 20)
    try:
        FuseClient(fe).init()
        worker = _request_worker_pid(d.proc.pid)
        mountinfo = open(f"/proc/{worker}/mountinfo").read().splitlines()
        root = [line for line in mountinfo if line.split()[4] == "/"]
        assert root and "ro" in root[-1].split()[5].split(","), root
    finally:
        fe.close()


def _request_worker_pid(supervisor: int) -> int:
    """The supervisor's child whose root is not the hiprio worker's empty tmpfs."""
    from tests.procfs import children
    for pid in children(supervisor):
        try:
            if "pyvirtiofsd-empty" not in open(f"/proc/{pid}/mountinfo").read():
                return pid
        except OSError:
            continue
    raise AssertionError(f"no request worker among {children(supervisor)}")


# -- --cache metadata, --allow-mmap, --preserve-noatime --------------------------------
@pytest.mark.frontend_opts(cache="metadata")
def test_cache_metadata_caches_attributes_a_day_and_no_file_data(frontend):
    fc = frontend
    (fc.shared_dir / "f").write_bytes(b"x")
    (fc.shared_dir / "d").mkdir()
    entry = fc.lookup(ROOT, "f")
    assert entry.entry_valid == 86400 and entry.attr_valid == 86400
    assert fc.open(entry.nodeid).open_flags & abi.FOPEN_DIRECT_IO
    _, created = fc.create(ROOT, "new")
    assert created.open_flags & abi.FOPEN_DIRECT_IO
    d = fc.lookup(ROOT, "d").nodeid
    assert fc.opendir(d).open_flags & abi.FOPEN_CACHE_DIR


ALLOW_MMAP_BIT2 = int(InitFlag.DIRECT_IO_ALLOW_MMAP) >> 32


@pytest.mark.parametrize("cache,args,granted", [
    ("metadata", ("--allow-mmap",), True),
    ("never", ("--allow-mmap",), True),
    ("auto", ("--allow-mmap",), False),      # no direct I/O: nothing to allow
    ("never", (), False),
])
def test_allow_mmap_granted_with_direct_io_caching_only(daemon_factory, cache, args, granted):
    d = daemon_factory("ours", cache=cache, extra_args=args)
    fe = start_frontend(d.socket_path, ram_size=64 << 20)
    try:
        fc = FuseClient(fe)
        out = fc.init(flags2=0xB | ALLOW_MMAP_BIT2)          # what a 6.6+ guest offers
        assert bool(out.flags2 & ALLOW_MMAP_BIT2) == granted
        if granted:
            assert not FuseClient.init(fc, flags2=0xB).flags2 & ALLOW_MMAP_BIT2  # 6.1: not offered
    finally:
        fe.close()


@pytest.mark.parametrize("preserve", [False, True], ids=["default", "preserve-noatime"])
def test_o_noatime_dropped_unless_preserved(daemon_factory, tmp_path, preserve):
    """The guest's O_NOATIME reaches the host open only with
    --preserve-noatime: the request worker's open file carries it (fdinfo)."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "roots").write_bytes(b"r")
    os.chmod(share / "roots", 0o644)
    d = daemon_factory("ours", shared_dir=share, extra_args=("--preserve-noatime",) if preserve else ())
    fe = start_frontend(d.socket_path, ram_size=64 << 20)
    try:
        fc = FuseClient(fe)
        fc.init()
        nodeid = fc.lookup(ROOT, "roots").nodeid
        opened = fc.open(nodeid, os.O_RDONLY | os.O_NOATIME, uid=NOBODY, gid=NOBODY)
        assert fc.read(nodeid, opened.fh, 0, 8, uid=NOBODY, gid=NOBODY) == b"r"
        flags = []
        for pid in children(d.pid):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}").endswith("/roots"):
                        info = open(f"/proc/{pid}/fdinfo/{fd}").read()
                        flags.append(int(info.split("flags:")[1].split()[0], 8))
                except OSError:
                    pass
        opens = [f for f in flags if f & 3 == os.O_RDONLY and not f & 0o10000000]   # not O_PATH
        assert opens, flags
        assert all(bool(f & os.O_NOATIME) == preserve for f in opens), [oct(f) for f in opens]
    finally:
        fe.close()


# -- --socket-group, --tag -------------------------------------------------------------
def test_socket_group_sets_group_and_mode_0660(daemon_factory):
    d = daemon_factory("ours", extra_args=("--socket-group", "daemon"))
    st = os.stat(d.socket_path)
    assert st.st_gid == 1 and stat.S_IMODE(st.st_mode) == 0o660


def _negotiate(fe: VhostUserFrontend, want: int) -> int:
    fe.get_features()
    offered = fe.get_protocol_features()
    fe.set_protocol_features(offered & want)
    return offered


def test_tag_offers_config_and_get_config_answers_it(daemon_factory):
    d = daemon_factory("ours", extra_args=("--tag", "mytag", "--thread-pool-size", "2"))
    fe = VhostUserFrontend(d.socket_path)
    try:
        offered = _negotiate(fe, (1 << 9) | 1)
        assert offered & (1 << 9)
        fe.send_raw(Req.GET_CONFIG, struct.pack("<III", 0, 40, 0) + bytes(40))
        reply = fe.recv_reply()
        assert reply.request == Req.GET_CONFIG
        offset, size, _ = struct.unpack_from("<III", reply.payload)
        tag, queues = struct.unpack_from("<36sI", reply.payload, 12)
        assert (offset, size) == (0, 40) and tag.rstrip(b"\0") == b"mytag" and queues == 2
    finally:
        fe.close()


def test_no_tag_no_config_feature(daemon_factory):
    d = daemon_factory("ours")
    fe = VhostUserFrontend(d.socket_path)
    try:
        assert not _negotiate(fe, 1) & (1 << 9)
        # GET_CONFIG unasked-for: ignored, the connection goes on
        fe.send_raw(Req.GET_CONFIG, struct.pack("<III", 0, 40, 0) + bytes(40), flags=FLAG_VERSION)
        assert fe.get_features() & (1 << 32)
    finally:
        fe.close()


# -- --syslog --------------------------------------------------------------------------
SYSLOG_WRAPPER = r"""
set -e
T=$1; shift
mount --make-rprivate /
mkdir -p "$T/olddev"
mount --rbind /dev "$T/olddev"
mount -t tmpfs -o mode=755 devtmp /dev
for n in null zero full random urandom; do touch /dev/$n; mount --bind "$T/olddev/$n" /dev/$n; done
mkdir /dev/shm /dev/pts
mount --rbind "$T/olddev/shm" /dev/shm
ln -s /proc/self/fd /dev/fd
exec "$@"
"""

LISTENER = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("/dev/log")
out = open(sys.argv[1], "ab", buffering=0)
print("listening", flush=True)
while True:
    out.write(s.recv(65536) + b"\n")
"""


def test_syslog_lines_from_supervisor_and_workers_reach_dev_log(tmp_path):
    """A private /dev/log (a tmpfs /dev in a mount namespace of the test's
    own): the supervisor and the request worker (after pivot_root) log there,
    nothing goes to stderr."""
    share = tmp_path / "share"
    share.mkdir()
    sock = tmp_path / "vhost.sock"
    received = tmp_path / "syslog.txt"
    script = (
        f"{sys.executable} -c '{LISTENER}' {received} & "
        f"while ! [ -S /dev/log ]; do sleep 0.05; done; "
        f"exec {sys.executable} -m daemon --syslog --socket-path {sock} --shared-dir {share}")
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(["unshare", "-m", "sh", "-c", SYSLOG_WRAPPER, "wrapper", str(tmp_path),
                                 "sh", "-c", script], cwd=str(REPO_ROOT), stdout=err, stderr=err,
                                start_new_session=True)
    fe = None
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.05)
        fe = start_frontend(str(sock), ram_size=64 << 20)
        FuseClient(fe).init()
        fe.close()
        fe = None
        assert proc.wait(20) == 0
    finally:
        if fe is not None:
            fe.close()
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
        else:
            try:
                os.killpg(proc.pid, 9)      # the listener
            except ProcessLookupError:
                pass
    lines = received.read_text(errors="replace").splitlines()
    assert any(line.startswith("<30>pyvirtiofsd[") and "request-1 INFO: FUSE session" in line
               for line in lines), lines     # 30 = daemon.info; from the confined worker
    assert any("supervisor" in line for line in lines), lines
    assert "FUSE session" not in stderr.read_text()


def test_syslog_without_dev_log_is_an_error_at_start(tmp_path):
    """In the same private /dev, with no listener: one line, exit 1."""
    cmd = [sys.executable, "-m", "daemon", "--syslog", "--shared-dir", str(tmp_path),
           "--socket-path", str(tmp_path / "s")]
    r = subprocess.run(["unshare", "-m", "sh", "-c", SYSLOG_WRAPPER, "wrapper", str(tmp_path), *cmd],
                       cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stderr.startswith("pyvirtiofsd: error: --syslog: cannot reach /dev/log"), \
        r.stderr


# -- --posix-acl -----------------------------------------------------------------------
ACL_BIT = int(InitFlag.POSIX_ACL)


def _acl(path, *spec):
    subprocess.run(["setfacl", *spec, str(path)], check=True)


def _getfacl(path) -> list[str]:
    out = subprocess.run(["getfacl", "--omit-header", "--numeric", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line]


def test_without_posix_acl_the_acl_attributes_are_refused_and_hidden(daemon_factory, tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(b"")
    _acl(share / "f", "-m", "u:1000:r")
    d = daemon_factory("ours", shared_dir=share)
    fe = start_frontend(d.socket_path, ram_size=64 << 20)
    try:
        fc = FuseClient(fe)
        assert not fc.init(flags=LINUX_INIT_FLAGS | ACL_BIT).flags & ACL_BIT
        f = fc.lookup(ROOT, "f").nodeid
        assert b"system.posix_acl_access" not in fc.listxattr(f, 4096)
        expect_errno(fc.getxattr, f, "system.posix_acl_access", 256, errnos=errno.ENOTSUP)
        expect_errno(fc.setxattr, f, "system.posix_acl_default", b"\2\0\0\0", errnos=errno.ENOTSUP)
    finally:
        fe.close()


def test_posix_acl_granted_and_default_acls_inherited_with_the_umask_only_elsewhere(daemon_factory, tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    (share / "inherit").mkdir()
    _acl(share / "inherit", "-d", "-m", "u:1000:rwx")      # a default ACL: umask not applied
    (share / "plain").mkdir()
    d = daemon_factory("ours", shared_dir=share, extra_args=("--posix-acl",))
    fe = start_frontend(d.socket_path, ram_size=64 << 20)
    try:
        fc = FuseClient(fe)
        granted = fc.init(flags=LINUX_INIT_FLAGS | ACL_BIT).flags
        assert granted & ACL_BIT and granted & InitFlag.DONT_MASK
        inherit = fc.lookup(ROOT, "inherit").nodeid
        plain = fc.lookup(ROOT, "plain").nodeid
        # DONT_MASK: the guest sends the mode unmasked and its umask apart
        fc.mkdir(inherit, "sub", mode=0o777, umask=0o077)
        fc.create(inherit, "file", mode=0o100666, umask=0o077)
        fc.mkdir(plain, "sub", mode=0o777, umask=0o022)
        fc.create(plain, "file", mode=0o100666, umask=0o022)
        fc.mknod(plain, "fifo", stat.S_IFIFO | 0o666, umask=0o027)
        assert "user:1000:rwx" in _getfacl(share / "inherit" / "sub")
        assert "default:user:1000:rwx" in _getfacl(share / "inherit" / "sub")
        assert any(line.startswith("user:1000:rwx") for line in _getfacl(share / "inherit" / "file"))
        assert stat.S_IMODE(os.stat(share / "plain" / "sub").st_mode) == 0o755
        assert stat.S_IMODE(os.stat(share / "plain" / "file").st_mode) == 0o644
        assert stat.S_IMODE(os.stat(share / "plain" / "fifo").st_mode) == 0o640
        assert not os.listxattr(share / "plain" / "file")
        # the ACL attributes pass through, and chmod keeps the mask in step
        f = fc.lookup(plain, "file").nodeid
        acl = os.getxattr(share / "inherit" / "file", "system.posix_acl_access")
        fc.setxattr(f, "system.posix_acl_access", acl)
        assert fc.getxattr(f, "system.posix_acl_access", 256) == acl
        fc.setattr(f, mode=0o100640)
        assert "mask::r--" in _getfacl(share / "plain" / "file")
    finally:
        fe.close()


def test_posix_acl_always_refuses_a_guest_without_it(daemon_factory):
    d = daemon_factory("ours", extra_args=("--posix-acl=always",))
    fe = start_frontend(d.socket_path, ram_size=64 << 20)
    try:
        fc = FuseClient(fe)
        expect_errno(fc.init, flags=LINUX_INIT_FLAGS & ~ACL_BIT, errnos=errno.EPROTO)
        assert fc.init(flags=LINUX_INIT_FLAGS | ACL_BIT).flags & ACL_BIT
    finally:
        fe.close()
