"""From the guest: absolute and relative symlinks pointing outside the share,
".." at the share root, hard links to outside paths, mknod + open of device
nodes, FIFOs and sockets, setgid directory inheritance by a non-member, and
100,000 open files — none reaches outside the share or harms the host.

One guest boot against our daemon with its default options (namespace
sandbox, seccomp kill, cache auto), module scoped. The host puts canaries
outside the share: one next to it (``area/outside/canary.txt``, the share
is ``area/shared``) and one directly in the host's /tmp, each holding a
random token. Both live under the host's /tmp, which the guest cannot see
by itself (its /tmp is a tmpfs over the 9p view of the host root), so the
token can only reach the guest through the daemon. The guest runs
guest_escape.py (one ``ESCAPE {json}`` line per check); then the host
checks the canaries, the share's surroundings, what the guest left in the
share, the console (no token) and the daemon's exit status.

Device nodes, FIFOs and sockets on the share are opened by the *guest*
kernel (they are its own devices and pipes: no FUSE OPEN reaches the
daemon), so the in-guest checks compare /mnt with the guest's tmpfs; the
daemon's own refusal to open them (EACCES) is for a hostile guest kernel
and is exercised by the frontend tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shlex
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path

import pytest

from . import guest_escape
from .conftest import BOOTS, _start_daemon, guest_prerequisites
from .harness import IDLE_TIMEOUT, QUICK, json_record, process_tree
from .vm import GuestResult, guest_path, run_guest

pytestmark = pytest.mark.guest

HERE = Path(__file__).resolve().parent
GUEST_ESCAPE = HERE / "guest_escape.py"

# 100,000 open files at once (5,000 with PYVIRTIOFSD_GUEST_QUICK=1), opened
# round robin over FILES files. Measured under TCG on 2 busy cores: 5,000
# opens in 2.5-2.9 s, the 100,000 (most of them refused past the worker's
# limit) in 46-72 s, closing ~20,000 in 11-43 s; the module in 70-125 s.
OPENS = 5_000 if QUICK else 100_000
FILES = 100
OPEN_SECONDS = 330          # the guest's own cap on the open loop
GUEST_TIMEOUT = 720


def _daemon_budget() -> int:
    from daemon.config import DEFAULTS
    return DEFAULTS["max_open_files"]


@dataclasses.dataclass
class EscapeRun:
    area: Path
    shared: Path
    canaries: dict            # host path -> (content bytes, stat snapshot)
    tokens: list
    around_before: list
    around_after: list
    guest: GuestResult
    checks: dict              # name -> ESCAPE line
    summary: dict | None
    step_rc: int | None
    daemon_exit: int | None
    daemon_log: str
    seconds: float
    worker_nofile: dict       # pid -> (comm, RLIMIT_NOFILE soft) while the guest was attached

    def describe(self, tail: int = 40) -> str:
        text = [f"guest: {self.guest.describe(tail=0 if self.summary else tail)}"]
        if self.daemon_log:
            text.append("daemon log tail:\n" + "\n".join(self.daemon_log.splitlines()[-20:]))
        return "\n".join(text)


def _snapshot(path: Path) -> dict:
    s = os.lstat(path)
    return {"ino": s.st_ino, "mode": oct(s.st_mode), "uid": s.st_uid, "gid": s.st_gid,
            "size": s.st_size, "mtime_ns": s.st_mtime_ns, "ctime_ns": s.st_ctime_ns,
            "nlink": s.st_nlink}


def _around(area: Path, shared: Path) -> list:
    """Everything under ``area`` but inside the share: (path, type, size, mtime)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(area):
        if Path(dirpath) == area:
            dirnames[:] = [d for d in dirnames if area / d != shared]
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            s = os.lstat(p)
            out.append((str(p.relative_to(area)), stat.S_IFMT(s.st_mode), s.st_size,
                        s.st_mtime_ns))
    return sorted(out)


def _nofile(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                v = line.split()[3]
                return -1 if v == "unlimited" else int(v)
    except OSError:
        pass
    return None


def _parse(text: str):
    checks, summary, rc = {}, None, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(guest_escape.PREFIX):
            obj = json_record(line, guest_escape.PREFIX)
            if obj is None:
                continue
            if obj.get("summary"):
                summary = obj
            elif "check" in obj:
                checks[obj["check"]] = obj
        elif line.startswith("@@STEP escape rc="):
            rc = int(line.split("rc=")[1].strip("@"))
    return checks, summary, rc


@pytest.fixture(scope="module")
def escape(tmp_path_factory):
    why = guest_prerequisites()
    if why:
        pytest.fail(f"guest tests cannot run: {why}")
    base = tmp_path_factory.mktemp("guest-escape")
    # the share and its neighbours always under the host's /tmp: hidden from
    # the guest, whose /tmp is its own tmpfs (pytest's basetemp may be elsewhere)
    area = Path(tempfile.mkdtemp(prefix="pyvfs-escape-", dir="/tmp"))
    os.chmod(area, 0o755)
    shared = area / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    (area / "outside").mkdir()
    tokens = [f"CANARY-{secrets.token_hex(16)}", f"CANARY-{secrets.token_hex(16)}"]
    sibling = area / "outside" / "canary.txt"
    host_tmp = Path(f"/tmp/pyvfs-escape-canary-{secrets.token_hex(6)}.txt")
    sibling.write_text(tokens[0] + "\n")
    host_tmp.write_text(tokens[1] + "\n")
    for p in (sibling, host_tmp):
        os.chmod(p, 0o644)
        os.utime(p, ns=(1_234_567_890_000_000_000, 1_234_567_890_000_000_000))
    canaries = {str(p): (p.read_bytes(), _snapshot(p)) for p in (sibling, host_tmp)}
    canaries[str(area / "outside")] = (None, _snapshot(area / "outside"))
    around_before = _around(area, shared)

    run_dir = base / "run"
    run_dir.mkdir()
    # quick mode opens 5,000 files: a 4,096-fd worker (open-file budget
    # 2,048) still has its table filled, as the full 100,000 fill the default
    extra = ("--rlimit-nofile", "4096") if QUICK else ()
    daemon = _start_daemon("ours", shared, "auto", run_dir, extra)
    try:
        args = ["python3", guest_path(GUEST_ESCAPE), "--mnt", "/mnt", "--ref", "/tmp/escape-ref",
                "--canary", str(sibling), "--canary", str(host_tmp),
                "--sibling-rel", "outside/canary.txt",
                "--sibling-name", "shared", "--sibling-name", "outside",
                "--sibling-name", area.name,
                "--opens", str(OPENS), "--files", str(FILES), "--open-seconds", str(OPEN_SECONDS)]
        cmd = (f"export PYTHONDONTWRITEBYTECODE=1; {shlex.join(args)}; "
               "echo \"@@STEP escape rc=$?@@\"; true")

        def daemon_died():
            if daemon.proc.poll() is not None:
                return f"the daemon exited with {daemon.proc.returncode} while the guest was running"
            return None

        worker_nofile = {}

        def on_booted(_text):
            time.sleep(0.5)  # let every worker settle after the mount
            for pid, _ppid, comm in process_tree(daemon.pid)[1:]:
                worker_nofile[pid] = (comm, _nofile(pid))

        t0 = time.monotonic()
        guest = run_guest(daemon.socket_path, cmd, timeout=GUEST_TIMEOUT,
                          console_log=base / "console.log", idle_timeout=IDLE_TIMEOUT,
                          abort_if=daemon_died, on_booted=on_booted)
        seconds = time.monotonic() - t0
        daemon_exit = daemon.wait(15)
        checks, summary, rc = _parse(guest.output)
        run = EscapeRun(area=area, shared=shared, canaries=canaries, tokens=tokens,
                        around_before=around_before, around_after=_around(area, shared),
                        guest=guest, checks=checks, summary=summary, step_rc=rc,
                        daemon_exit=daemon_exit, daemon_log=daemon.log(), seconds=seconds,
                        worker_nofile=worker_nofile)
        s = summary or {}
        many = checks.get("many_open", {}).get("detail", {})
        BOOTS.append(("ours", "escape", seconds,
                      f"escape {s.get('passed', '?')} pass/{s.get('failed', '?')} fail in "
                      f"{s.get('seconds', '?')} s; opens: {many.get('held_open', '?')} held, "
                      f"errors {many.get('errors', '?')}, open {many.get('open_s', '?')} s, "
                      f"close {many.get('close_s', '?')} s; console {base / 'console.log'}"))
        yield run
    finally:
        daemon.stop()
        host_tmp.unlink(missing_ok=True)
        # the guest made real device nodes (1:1 is /dev/mem) in the share:
        # never leave them lying around on the host
        shutil.rmtree(area, ignore_errors=True)


def _check(run: EscapeRun, name: str) -> dict:
    line = run.checks.get(name)
    assert line is not None, f"the guest did not report check {name!r}\n{run.describe()}"
    return line


def _assert_ok(run: EscapeRun, *names: str):
    bad = {}
    for name in names:
        line = _check(run, name)
        if not line["ok"]:
            bad[name] = line["detail"]
    assert not bad, "failed in the guest:\n" + json.dumps(bad, indent=1, default=str)


def _shared_path(run: EscapeRun, *parts: str) -> Path:
    return run.shared.joinpath("escape", *parts)


# --------------------------------------------------------------------------


def test_guest_ran_to_the_end(escape):
    assert not escape.guest.timed_out and escape.guest.aborted is None, escape.describe()
    assert escape.summary is not None, escape.describe()
    assert escape.step_rc is not None, escape.describe()
    assert escape.guest.umount_status == 0, escape.describe()
    missing = set(guest_escape.CHECKS) - set(escape.checks)
    assert not missing, f"checks not reported: {sorted(missing)}\n{escape.describe()}"


def test_symlinks_resolve_in_the_guest_namespace(escape):
    """Absolute and relative symlinks to /etc/passwd, the host canaries,
    ../outside/canary.txt and ../../../../..: the guest reaches its own
    files (or nothing), never the host's; lchown/lutimes act on the link."""
    _assert_ok(escape, "symlink_absolute", "symlink_relative", "symlink_setattr_nofollow")
    # on the host the links are stored verbatim, not resolved
    for i, canary in enumerate(str(p) for p in list(escape.canaries)[:2]):
        link = _shared_path(escape, "abs", f"canary{i}")
        assert link.is_symlink() and os.readlink(link) == canary, \
            f"{link} on the host: expected a symlink to {canary}"
    assert os.readlink(_shared_path(escape, "abs", "passwd")) == "/etc/passwd"


def test_dotdot_at_the_share_root_is_the_guests(escape):
    """/mnt/.. and above are the guest's own /; forged FUSE file handles
    open nothing off the share."""
    _assert_ok(escape, "dotdot_at_root", "forged_handles")


def test_hard_links_to_outside_paths_are_exdev(escape):
    _assert_ok(escape, "hardlink_exdev")
    d = _shared_path(escape, "link")
    leaked = sorted(n for n in os.listdir(d) if n in ("x", "p", "q", "r") or n.startswith("hard_follow"))
    assert not leaked, f"cross-device links/renames left names in the share: {leaked}"
    for i in range(2):
        p = d / f"hard_nofollow{i}"
        assert p.is_symlink(), f"{p}: a hard link of the symlink itself, expected a symlink on the host"


def test_device_nodes_are_the_guests_own(escape):
    """mknod 1:1 / 1:3 / 1:5 / 10:232 / 7:0 in /mnt as root: opening them
    behaves exactly as on the guest's tmpfs (the guest's drivers), a
    non-root guest user gets EPERM."""
    _assert_ok(escape, "device_nodes", "unprivileged_mknod")
    # the nodes exist on the host with what the guest asked (informational:
    # they are why the share should be on a nodev mount, see the report)
    d = _shared_path(escape, "dev")
    mem = os.lstat(d / "mem")
    assert stat.S_ISCHR(mem.st_mode) and (os.major(mem.st_rdev), os.minor(mem.st_rdev)) == (1, 1)
    unpriv = os.listdir(_shared_path(escape, "unpriv"))
    assert unpriv == ["fifo"], f"a non-root guest user made {unpriv} on the host"


def test_fifo_and_socket_stay_in_the_guest(escape):
    _assert_ok(escape, "fifo_socket")
    d = _shared_path(escape, "fifo")
    assert stat.S_ISFIFO(os.lstat(d / "fifo").st_mode)
    # the host end of the FIFO carries nothing the guest wrote
    fd = os.open(d / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert os.read(fd, 100) == b""
    finally:
        os.close(fd)
    # the socket node on the host has no listener: the guest's socket is not bridged
    assert stat.S_ISSOCK(os.lstat(d / "sock").st_mode)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with pytest.raises(ConnectionRefusedError):
            s.connect(str(d / "sock"))
    finally:
        s.close()


def test_setgid_directory_and_non_member(escape):
    """2777 dir of group 4242: a non-member's file gets gid 4242, its subdir
    keeps S_ISGID, an explicit S_ISGID (create 02755, chmod 02755) is
    dropped; the host sees the same. (A *member* via a supplementary group
    also loses an explicit S_ISGID on the share, unlike tmpfs: Linux 6.1's
    FUSE carries no supplementary groups; reported in the detail as
    member_known_deviation, the safe direction, not failed.)"""
    _assert_ok(escape, "setgid_dir")
    d = _shared_path(escape, "sg", "sgid")
    for name in ("f", "g", "n"):
        s = os.lstat(d / name)
        assert s.st_uid == 1234, f"{name} owned by {s.st_uid} on the host"
        assert not s.st_mode & stat.S_ISGID, f"{name} carries S_ISGID on the host: {oct(s.st_mode)}"
    for name in ("g", "n"):
        assert os.lstat(d / name).st_gid == 4242
    for name in ("sub", "sub2"):
        s = os.lstat(d / name)
        assert s.st_gid == 4242 and s.st_mode & stat.S_ISGID, \
            f"{name} on the host: gid {s.st_gid} mode {oct(s.st_mode)}"


def test_setuid_setgid_cleared_on_change(escape):
    _assert_ok(escape, "suid_cleared_on_change")
    d = _shared_path(escape, "su", "suid")
    for name in ("s", "t", "c"):
        m = os.lstat(d / name).st_mode
        assert not m & (stat.S_ISUID | stat.S_ISGID), f"{name} on the host: {oct(m)}"


def test_100k_open_files(escape):
    """OPENS files held open at once. The request worker's budget is
    Config.max_open_files capped at half its RLIMIT_NOFILE (handles.
    open_file_budget: the other half stays for inode fds and temporary
    fds). The guest gets ENFILE past it and nothing else, the daemon keeps
    running, and the mount works after closing them all."""
    line = _check(escape, "many_open")
    det = line["detail"]
    assert "raised" not in det, det
    budget = _daemon_budget()
    nofile = max((n for _c, n in escape.worker_nofile.values() if n), default=None)
    assert nofile, f"the request worker's RLIMIT_NOFILE was not sampled: {escape.worker_nofile}"
    limit = min(budget, nofile // 2)
    assert det.get("attempted") == OPENS, f"only {det.get('attempted')} of {OPENS} opens tried: {det}"
    assert set(det.get("errors", {})) <= {"E:ENFILE"}, det
    held = det.get("held_open", 0)
    if OPENS <= limit:
        assert held == OPENS and not det["errors"], det
    else:
        assert held == limit, \
            f"held {held} open files; budget {limit} (max_open_files {budget}, RLIMIT_NOFILE {nofile}): {det}"
        assert sum(det["errors"].values()) == OPENS - held, det
        assert "open file table full" in escape.daemon_log, escape.daemon_log[-2000:]
    assert line["ok"], json.dumps(det, indent=1)


def test_mount_usable_while_the_open_file_table_is_full(escape):
    """With the guest holding as many open files as the worker allows, a
    stat of a known file and a read of a held one still work. (They do when
    the worker's limit is its open-file budget — ENFILE from the handle
    table, with fds to spare — but not when RLIMIT_NOFILE is reached first:
    every LOOKUP, even d_revalidate's, needs a transient O_PATH fd.)"""
    det = _check(escape, "many_open")["detail"]
    assert "raised" not in det, det
    full = det.get("while_full") or {}
    assert det.get("errors"), f"the open-file table never filled: {det}"
    assert full.get("read_held") == "x", f"while full: {full}"
    assert full.get("stat") == "ok", (
        f"stat(2) of a known file failed while the guest held {det['held_open']} open files "
        f"(open errors {det['errors']}): while full {full}; request worker RLIMIT_NOFILE "
        f"{escape.worker_nofile}, open-file budget {_daemon_budget()}")


def test_close_never_fails_at_the_fd_limit(escape):
    """close(2) of every held file succeeds, also the first ones while the
    worker is at its fd limit. (A FLUSH that needs a spare host fd — dup() to
    report delayed write errors — fails with EMFILE when the worker is at
    its RLIMIT_NOFILE, and the guest's close() returns that error.)"""
    det = _check(escape, "many_open")["detail"]
    assert "raised" not in det, det
    assert not det.get("close_errors"), (
        f"close(2) in the guest failed {det['close_errors']} (first at #{det['first_close_error_at']} "
        f"of {det['held_open']}) after filling the worker's fd table: "
        f"while full {det.get('while_full')}; worker RLIMIT_NOFILE {escape.worker_nofile}")


def test_mount_still_works(escape):
    _assert_ok(escape, "mount_health")


def test_host_canaries_unchanged(escape):
    for path, (content, snap) in escape.canaries.items():
        p = Path(path)
        assert p.exists(), f"canary {path} is gone"
        if content is not None:
            assert p.read_bytes() == content, f"canary {path} content changed"
        now = _snapshot(p)
        if content is None:  # the directory: its mtime/ctime would move if an entry was added
            assert now == snap, f"{path} changed: {snap} -> {now}"
        else:
            assert now == snap, f"canary {path} metadata changed: {snap} -> {now}"


def test_nothing_created_outside_the_share(escape):
    assert escape.around_after == escape.around_before, \
        f"next to the share: before {escape.around_before}\nafter {escape.around_after}"
    host_names = set(os.listdir("/tmp"))
    assert "escape-ref" not in host_names, "the guest's reference dir appeared in the host's /tmp"
    for p in list(escape.canaries)[:2]:
        assert not Path(p).is_symlink()


def test_guest_never_saw_the_canary_tokens(escape):
    for token in escape.tokens:
        assert token not in escape.guest.console_text, f"canary token {token} reached the guest console"
        assert token[7:] not in escape.guest.console_text


def test_daemon_exits_cleanly(escape):
    assert escape.daemon_exit == 0, escape.daemon_log[-3000:]
    assert "Traceback" not in escape.daemon_log, escape.daemon_log[-3000:]
