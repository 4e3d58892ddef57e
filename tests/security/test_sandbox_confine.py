"""Confined workers, checked from inside and from outside (/proc/PID/...).

Runs as root (namespaces, mounts, pivot_root). Each test spawns a child the
way the supervisor spawns a worker (``sandbox.spawn_confined``); the child
calls ``sandbox.confine`` exactly as the worker entry does.
"""

from __future__ import annotations

import errno
import os
import signal
import socket

import pytest

from daemon import sandbox
from daemon.sandbox import capabilities, namespaces
from tests.procfs import ns_inodes
from tests.security.confined import make_config, run_confined

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

REQUEST_CAPEFF = capabilities.mask(capabilities.role_caps("request"))  # --inode-file-handles=never


@pytest.fixture(autouse=True, scope="module")
def _preload():
    sandbox.validate()       # parse policies + import worker modules in the parent, as the supervisor does


@pytest.fixture
def shared(tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    (d / "file").write_text("hello")
    (d / "sub").mkdir()
    return d


def status_fields(pid) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def outside_view(pid):
    st = status_fields(pid)
    root = os.stat(f"/proc/{pid}/root")
    try:
        root_entries = sorted(os.listdir(f"/proc/{pid}/root"))
    except OSError as e:
        root_entries = e.errno
    return {
        "seccomp": st["Seccomp"], "nnp": st["NoNewPrivs"], "capeff": int(st["CapEff"], 16),
        "capprm": int(st["CapPrm"], 16), "capbnd": int(st["CapBnd"], 16), "capinh": int(st["CapInh"], 16),
        "capamb": int(st["CapAmb"], 16),
        "ns": ns_inodes(pid), "root": (root.st_dev, root.st_ino), "root_entries": root_entries,
        "cwd": os.readlink(f"/proc/{pid}/cwd"),
        "fd_targets": [os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")],
    }


@pytest.mark.parametrize("mode", ["namespace", "chroot"])
def test_request_worker_confined(shared, mode):
    cfg = make_config(shared, mode, "kill")

    def body(info):
        # inside: root is the shared dir, cwd is /proc/self/fd, O_PATH re-open works
        fd = os.open("file", os.O_PATH, dir_fd=info.root_fd)
        rfd = os.open(str(fd), os.O_RDONLY)      # (builtin open() would ioctl(TCGETS): not allowed)
        data = os.read(rfd, 100).decode()
        os.close(rfd)
        return {"pid": os.getpid(), "root": sorted(os.listdir("/")), "data": data,
                "caps": info.caps, "rules": info.seccomp_rules, "cwd_is_fd_dir": os.path.exists(str(fd))}

    res = run_confined("request", cfg, body, inspect=outside_view)
    assert os.WIFEXITED(res.status) and os.WEXITSTATUS(res.status) == 0, res
    inside = eval(res.report)  # noqa: S307 - our own child's repr
    out = res.outside
    assert inside["root"] == ["file", "sub"]
    assert inside["data"] == "hello"
    assert inside["cwd_is_fd_dir"]
    assert inside["caps"] == REQUEST_CAPEFF
    assert inside["rules"] > 0
    assert out["seccomp"] == "2" and out["nnp"] == "1"
    assert out["capeff"] == out["capprm"] == out["capbnd"] == REQUEST_CAPEFF
    assert out["capinh"] == out["capamb"] == 0
    sh = os.stat(shared)
    assert out["root"] == (sh.st_dev, sh.st_ino)
    assert sorted(out["root_entries"]) == ["file", "sub"]
    mine = ns_inodes()
    if mode == "namespace":
        assert inside["pid"] == 1
        for ns in ("mnt", "pid", "net", "ipc", "uts"):
            assert out["ns"][ns] != mine[ns], ns
    else:
        assert out["ns"] == mine


@pytest.mark.parametrize("role", ["request", "hiprio"])
def test_inherited_namespaces_are_the_supervisors_and_the_rest_own(shared, role):
    """--inherit-namespaces net,ipc,uts (the systemd unit, whose
    RestrictNamespaces=mnt pid forbids the others): the worker still gets
    its own mount and pid namespaces and its root change, and shares the
    rest with its parent."""
    cfg = make_config(shared, "namespace", "kill",
                      inherit_namespaces=namespaces.parse_inherited("net,ipc,uts"))

    def body(info):      # (the hiprio list has no openat: its root is looked at from outside)
        return {"pid": os.getpid(), "root": sorted(os.listdir("/")) if role == "request" else None}

    res = run_confined(role, cfg, body, inspect=outside_view)
    assert os.WIFEXITED(res.status) and os.WEXITSTATUS(res.status) == 0, res
    inside = eval(res.report)  # noqa: S307 - our own child's repr
    mine = ns_inodes()
    assert inside["pid"] == 1
    assert inside["root"] in (["file", "sub"], None)
    assert sorted(res.outside["root_entries"]) == (["file", "sub"] if role == "request" else [])
    for ns in ("mnt", "pid"):
        assert res.outside["ns"][ns] != mine[ns], ns
    for ns in ("net", "ipc", "uts"):
        assert res.outside["ns"][ns] == mine[ns], ns


@pytest.mark.parametrize("mode", ["namespace", "chroot"])
def test_hiprio_worker_confined(shared, mode):
    cfg = make_config(shared, mode, "kill")

    def body(info):
        try:
            os.listdir("/")          # getdents64 is not in the hiprio list: must not get here
        except OSError:
            pass
        return "unreachable"

    res = run_confined("hiprio", cfg, body, inspect=outside_view)
    out = res.outside
    assert out["seccomp"] == "2" and out["nnp"] == "1"
    assert out["capeff"] == out["capprm"] == out["capbnd"] == out["capinh"] == out["capamb"] == 0
    assert out["root_entries"] == []
    assert out["root"] != (os.stat(shared).st_dev, os.stat(shared).st_ino)
    assert not any(t.startswith("/") and os.path.basename(t) == "shared" for t in out["fd_targets"])
    # openat is not in the hiprio list: the body's first fs call killed it
    assert os.WIFSIGNALED(res.status) and os.WTERMSIG(res.status) == signal.SIGSYS, res
    if mode == "namespace":
        for ns in ("mnt", "pid", "net", "ipc", "uts"):
            assert out["ns"][ns] != ns_inodes()[ns], ns


def test_hiprio_root_is_read_only_and_empty(shared):
    cfg = make_config(shared, "namespace", "none")

    def body(info):
        try:
            os.mkdir("/x")
            return "writable"
        except OSError as e:
            return (e.errno, os.listdir("/"), os.getpid())

    res = run_confined("hiprio", cfg, body)
    assert res.report == repr((30, [], 1)), res          # EROFS, empty, PID 1


@pytest.mark.parametrize("role, call", [
    ("request", "socket"),       # no networking
    ("request", "fork"),         # clone without CLONE_THREAD
    ("request", "execve"),
    ("request", "mount"),
    ("request", "clone3"),       # returns ENOSYS: not a kill, the child reports it
    ("hiprio", "openat"),
])
def test_syscall_outside_the_list(shared, role, call):
    cfg = make_config(shared, "namespace", "kill")

    def body(info):
        if call == "socket":
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        elif call == "fork":
            pid = os.fork()
            if pid == 0:
                os._exit(0)
        elif call == "execve":
            os.execv("/bin/true", ["true"])
        elif call == "mount":
            from daemon.sandbox import mounts
            mounts.mount("none", "/", "tmpfs", 0)
        elif call == "clone3":
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            r = libc.syscall(435, 0, 0)
            return ("clone3", r, ctypes.get_errno())
        elif call == "openat":
            os.open("/", os.O_RDONLY)
        return "survived"

    res = run_confined(role, cfg, body)
    if call == "clone3":
        assert res.report == repr(("clone3", -1, 38))
        return
    assert os.WIFSIGNALED(res.status) and os.WTERMSIG(res.status) == signal.SIGSYS, res


def test_seccomp_log_mode_allows(shared):
    cfg = make_config(shared, "namespace", "log")

    def body(info):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.close()
        return "survived"

    res = run_confined("request", cfg, body, inspect=outside_view)
    assert res.report == repr("survived")
    assert res.outside["seccomp"] == "2"


def test_seccomp_trap_mode_sigsys(shared):
    cfg = make_config(shared, "namespace", "trap")

    def body(info):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        return "survived"

    res = run_confined("request", cfg, body)
    assert os.WIFSIGNALED(res.status) and os.WTERMSIG(res.status) == signal.SIGSYS


def test_request_thread_allowed_under_kill(shared):
    cfg = make_config(shared, "namespace", "kill")

    def body(info):
        import threading
        out = []
        t = threading.Thread(target=lambda: out.append(os.getpid()))
        t.start()
        t.join()
        return out

    res = run_confined("request", cfg, body)
    assert res.report == "[1]", res


def test_modcaps_applied(shared):
    cfg = make_config(shared, "namespace", "kill", modcaps="-mknod:+lease")
    res = run_confined("request", cfg, lambda info: info.caps, inspect=outside_view)
    want = capabilities.mask((capabilities.role_caps("request") - {"mknod"}) | {"lease"})
    assert res.report == repr(want)
    assert res.outside["capeff"] == want


def test_file_handles_add_dac_read_search(shared):
    """--inode-file-handles=prefer needs CAP_DAC_READ_SEARCH (open_by_handle_at)."""
    cfg = make_config(shared, "namespace", "kill", file_handles=True)
    res = run_confined("request", cfg, lambda info: info.caps, inspect=outside_view)
    want = capabilities.mask(capabilities.role_caps("request", file_handles=True))
    assert "dac_read_search" in capabilities.role_caps("request", file_handles=True)
    assert res.outside["capeff"] == want != REQUEST_CAPEFF


def test_rlimit_nofile(shared):
    cfg = make_config(shared, "namespace", "kill", rlimit_nofile=4096)
    res = run_confined("request", cfg, lambda info: info.nofile)
    assert res.report == repr((4096, 4096))
    res = run_confined("hiprio", cfg, lambda info: None, inspect=lambda pid: open(f"/proc/{pid}/limits").read())
    line = next(ln for ln in res.outside.splitlines() if ln.startswith("Max open files"))
    assert line.split()[3:5] == ["256", "256"]


def test_bad_shared_dir_is_one_line_error(tmp_path, capfd):
    cfg = make_config(tmp_path / "missing", "namespace", "kill")
    res = run_confined("request", cfg, lambda info: "confined")
    assert os.WIFEXITED(res.status) and os.WEXITSTATUS(res.status) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sandbox: bind-mount" in err[0], err


def test_none_mode_keeps_host_root_but_cuts_caps(shared):
    cfg = make_config(shared, "none", "kill")

    def body(info):
        return (os.getpid() != 1, sorted(os.listdir(info.root_fd)) if False else None, info.caps)

    res = run_confined("request", cfg, body, inspect=outside_view)
    assert res.outside["root"] == (os.stat("/").st_dev, os.stat("/").st_ino)
    assert res.outside["capeff"] == REQUEST_CAPEFF and res.outside["seccomp"] == "2"


@pytest.fixture
def shared_mounts(shared):
    """The request workers' shared mount namespace (sandbox/sharedns.py) built
    for ``shared`` as the pool builds it: its fd; released after the test."""
    fd = sandbox.share_request_mounts(make_config(shared, "namespace", "kill"))
    assert fd >= 0
    yield fd
    sandbox.release_request_mounts()


def test_request_workers_join_one_mount_namespace(shared, shared_mounts):
    """Two request workers confined after share_request_mounts sit in the
    one namespace it built (so their fds are on one mount of the share:
    LINK/RENAME between them work), not the supervisor's; each still has
    its own pid namespace and its proc (cwd /proc/self/fd re-opens its
    fds); the root holds the share only; the hiprio worker (and keeper)
    close the inherited namespace fd."""
    cfg = make_config(shared, "namespace", "kill")
    shared_ns = os.fstat(shared_mounts).st_ino

    def body(info):
        fd = os.open("file", os.O_PATH, dir_fd=info.root_fd)
        rfd = os.open(str(fd), os.O_RDONLY)
        data = os.read(rfd, 100).decode()
        os.close(rfd)
        return {"pid": os.getpid(), "root": sorted(os.listdir("/")), "data": data}

    mine = ns_inodes()
    for _ in range(2):
        res = run_confined("request", cfg, body, inspect=outside_view)
        assert os.WIFEXITED(res.status) and os.WEXITSTATUS(res.status) == 0, res
        inside = eval(res.report)  # noqa: S307 - our own child's repr
        assert inside == {"pid": 1, "root": ["file", "sub"], "data": "hello"}
        assert res.outside["ns"]["mnt"] == shared_ns != mine["mnt"]
        assert res.outside["ns"]["pid"] != mine["pid"]
        assert sorted(res.outside["root_entries"]) == ["file", "sub"]
        assert not any(t.startswith("mnt:") for t in res.outside["fd_targets"]), res.outside["fd_targets"]
    res = run_confined("hiprio", cfg, lambda info: None, inspect=outside_view)
    assert os.WIFEXITED(res.status) and os.WEXITSTATUS(res.status) == 0, res
    assert res.outside["ns"]["mnt"] != shared_ns
    assert not any(t.startswith("mnt:") for t in res.outside["fd_targets"]), res.outside["fd_targets"]


def test_shared_mount_namespace_read_only(shared):
    """--readonly: the shared namespace's bind mount of the share is read-only."""
    cfg = make_config(shared, "namespace", "kill", readonly=True)
    sandbox.share_request_mounts(cfg)
    try:
        def body(info):
            try:
                os.open("new", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=info.root_fd)
            except OSError as e:
                return e.errno
            return 0

        res = run_confined("request", cfg, body)
        assert res.report == repr(errno.EROFS), res
    finally:
        sandbox.release_request_mounts()
    assert not (shared / "new").exists()


def test_shared_mount_namespace_of_a_missing_dir_is_one_error(tmp_path):
    """A share that cannot be mounted: SandboxError naming the step, no fd
    left open, the helper reaped."""
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(sandbox.SandboxError, match="bind-mount .*missing"):
        sandbox.share_request_mounts(make_config(tmp_path / "missing", "namespace", "kill"))
    assert sorted(os.listdir("/proc/self/fd")) == before
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)
    assert sandbox.share_request_mounts(make_config(tmp_path, "chroot", "kill")) == -1
