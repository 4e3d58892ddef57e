"""The seccomp policy files and their loader; --modcaps; capability sets."""

from __future__ import annotations

import marshal
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import prctl
import pytest

from daemon.sandbox import capabilities, programs, seccomp
from daemon.sandbox.namespaces import SandboxError
from daemon.sandbox.seccomp import PolicyError, parse_policy
from tests.procfs import children

REPO = Path(__file__).resolve().parents[2]


def test_shipped_policies_load_and_are_sorted():
    pols = seccomp.load_all()
    for role, pol in pols.items():
        names = pol.names
        assert names == sorted(names), role
        assert len(set(names)) == len(names), role
        assert all(r.reason for r in pol.rules), role
    # the worker lists are narrower than the filter they inherit
    sup = {r.name for r in seccomp.effective_rules("supervisor", pols)}
    assert set(pols["request"].names) <= sup and set(pols["hiprio"].names) <= sup


def test_hiprio_list_has_no_file_system_or_process_calls():
    names = set(seccomp.load_policy("hiprio").names)
    for forbidden in ("openat", "open", "execve", "clone", "clone3", "socket", "connect", "mount",
                      "unlinkat", "renameat2", "setfsuid", "ptrace", "open_by_handle_at"):
        assert forbidden not in names


def test_request_list_cannot_fork_or_exec_or_network():
    pol = seccomp.load_policy("request")
    names = set(pol.names)
    for forbidden in ("execve", "execveat", "fork", "vfork", "socket", "connect", "bind", "ptrace",
                      "mount", "unshare", "setns", "pivot_root", "chroot", "seccomp",
                      "setuid", "setresuid", "kill", "tgkill"):
        assert forbidden not in names, forbidden
    clone = next(r for r in pol.rules if r.name == "clone")
    assert clone.args == ((0, 0x10000, (0x10000,)),)          # CLONE_THREAD only
    prctl = next(r for r in pol.rules if r.name == "prctl")
    assert prctl.args == ((0, 0xFFFFFFFF, (4,)),)             # PR_SET_DUMPABLE only
    # per-request credentials (docs/credentials.md): capset can only move
    # capabilities between the effective set and the permitted set that
    # the sandbox already cut (no_new_privs, bounding set); setgroups (a
    # create's one supplementary group, then none) takes at most 63 groups
    setgroups = next(r for r in pol.rules if r.name == "setgroups")
    assert setgroups.args == ((0, 0xFFFFFFFFFFFFFFC0, (0,)),)


GOOD = "close  # a\nread  # b\n\n# comment\nwrite  # c\n"


def test_parse_good_with_comments_and_blank_lines():
    pol = parse_policy(GOOD, "x.policy")
    assert pol.names == ["close", "read", "write"]
    assert [r.reason for r in pol.rules] == ["a", "b", "c"]


@pytest.mark.parametrize("text, message", [
    ("read  # b\nclose  # a\n", "out of order"),
    ("close  # a\nclose  # again\n", "duplicate 'close'"),
    ("close  # a\nnot_a_syscall  # x\n", "unknown syscall 'not_a_syscall'"),
    ("socketcall  # i386 only\n", "unknown syscall 'socketcall'"),
    ("close\n", "has no '# reason'"),
    ("close  #   \n", "has no '# reason'"),
    ("Close  # caps\n", "is not a syscall name"),
    ("close  errno=EWHAT  # x\n", "unknown errno"),
    ("close  arg9&1==1  # x\n", "bad option"),
    ("close  errno=EPERM  arg0&1==1  # x\n", "cannot be combined"),
    ("# only comments\n\n", "no syscalls"),
])
def test_parse_rejects(text, message):
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "bad.policy")
    assert message in str(e.value)
    assert str(e.value).startswith("bad.policy")
    assert "\n" not in str(e.value)


def test_parse_options():
    pol = parse_policy("clone  arg0&0x10000==0x10000  # threads\nclone3  errno=ENOSYS  # fallback\n")
    assert pol.rules[0].args == ((0, 0x10000, (0x10000,)),)
    assert pol.rules[1].errno == 38
    pol = parse_policy("ioctl  arg1&0xffffffff==0x5421|0x5401  # either\n")
    assert pol.rules[0].args == ((1, 0xFFFFFFFF, (0x5401, 0x5421)),)


def test_load_policy_reports_the_file(tmp_path):
    for role in seccomp.ROLES:
        (tmp_path / f"{role}.policy").write_text(GOOD)
    (tmp_path / "request.policy").write_text("write  # c\nread  # b\n")
    with pytest.raises(PolicyError, match=r"request\.policy:2: 'read' is out of order"):
        seccomp.load_all(tmp_path)
    (tmp_path / "request.policy").unlink()
    with pytest.raises(PolicyError, match="request.policy"):
        seccomp.load_all(tmp_path)


def test_supervisor_union_prefers_plain_allow():
    pols = {
        "supervisor": parse_policy("clone  # fork\n", role="supervisor"),
        "request": parse_policy("clone  arg0&0x10000==0x10000  # t\nclone3  errno=ENOSYS  # f\n", role="request"),
        "hiprio": parse_policy("read  # r\n", role="hiprio"),
        "keeper": parse_policy("recvmsg  # k\n", role="keeper"),
    }
    rules = {r.name: r for r in seccomp.effective_rules("supervisor", pols)}
    assert rules["clone"].args == () and rules["clone"].errno is None
    assert rules["clone3"].errno == 38
    assert set(rules) == {"clone", "clone3", "read", "recvmsg"}
    pols["supervisor"] = parse_policy("clone  # fork\nioctl  arg1&0xffffffff==0x5421  # a\n", role="supervisor")
    pols["hiprio"] = parse_policy("ioctl  arg1&0xffffffff==0x5401|0x5421  # b\n", role="hiprio")
    rules = {r.name: r for r in seccomp.effective_rules("supervisor", pols)}
    assert rules["ioctl"].args == ((1, 0xFFFFFFFF, (0x5401, 0x5421)),)


def _exported(role, action, pols) -> bytes:
    r, w = os.pipe()
    with os.fdopen(w, "wb") as f:
        seccomp.build_filter(seccomp.effective_rules(role, pols), action).export_bpf(f)
    with os.fdopen(r, "rb") as f:
        return f.read()


@pytest.mark.parametrize("action", ["kill", "log", "trap"])
def test_programs_built_in_a_child_are_libseccomps(action):
    """programs.build answers, from its throwaway child, exactly the program
    libseccomp exports for each role, with its rule count."""
    pols = seccomp.load_all()
    progs = programs.build(action)
    assert progs.action == action
    assert set(progs.by_role) == set(seccomp.ROLES)
    for role in seccomp.ROLES:
        prog, rules = progs.by_role[role]
        assert prog == _exported(role, action, pols)
        assert rules == len(seccomp.effective_rules(role, pols))
    assert progs.seccomp_nr == seccomp.resolve("seccomp")
    assert programs.build("none").by_role == {}


def test_programs_follow_the_policy_dir(tmp_path):
    """A --policy-dir's lists are compiled, not the shipped ones; a broken
    file there is a SandboxError with the parser's path:line message, from
    the child, even with --seccomp none."""
    for role in seccomp.ROLES:
        (tmp_path / f"{role}.policy").write_text(GOOD)
    narrow = programs.build("kill", tmp_path)
    assert narrow.by_role["hiprio"] == (_exported("hiprio", "kill", seccomp.load_all(tmp_path)), 3)
    assert narrow.by_role["hiprio"] != programs.build("kill").by_role["hiprio"]
    (tmp_path / "request.policy").write_text("write  # c\nread  # b\n")
    for action in ("kill", "none"):
        with pytest.raises(SandboxError, match=r"request\.policy:2: 'read' is out of order"):
            programs.build(action, tmp_path)
    with pytest.raises(SandboxError, match="--seccomp bogus"):
        programs.build("bogus")


def test_long_lived_processes_never_import_pyseccomp():
    """The supervisor (and so every worker it forks) validates the policies
    and gets every program without importing pyseccomp, its ctypes.util /
    subprocess imports or the other modules kept out to save memory."""
    code = (
        "import sys\n"
        "import daemon.cli, daemon.supervisor, daemon.workers.entry\n"
        "from daemon import sandbox\n"
        "progs = sandbox.validate()\n"
        "assert progs.by_role['request'][1] > 0\n"
        "print(sorted(m for m in ('pyseccomp', 'daemon.sandbox.seccomp', 'ctypes.util', 'subprocess',"
        " 'tempfile', 'shutil', 'dataclasses', 'inspect') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("answer", [
    b"", b"garbage", marshal.dumps(["ok"]), marshal.dumps(("ok", {}, 317)),
    marshal.dumps(("ok", {"hiprio": (b"x", 1)}, 317)),
    marshal.dumps(("ok", {r: (b"\0" * 8, 1) for r in programs.ROLES}, -1)),
    marshal.dumps(("ok", {r: (b"\0" * 7, 1) for r in programs.ROLES}, 317)),
])
def test_malformed_compiler_answers_are_sandbox_errors(answer):
    with pytest.raises(SandboxError, match="seccomp compiler"):
        programs._decode(answer, 0, "kill")
    good = marshal.dumps(("ok", {r: (b"\0" * 8, 1) for r in programs.ROLES}, 317))
    assert programs._decode(good, 0, "kill").by_role["request"] == (b"\0" * 8, 1)


def test_compiler_error_answer_is_the_error_message():
    with pytest.raises(SandboxError) as e:
        programs._decode(marshal.dumps(("error", "request.policy:3: broken")), 0, "kill")
    assert str(e.value) == "request.policy:3: broken"


def test_compiler_that_hangs_is_killed_and_a_sandbox_error(monkeypatch):
    """A compiler child that never answers does not hang start-up: after
    COMPILE_TIMEOUT it is killed (and reaped) and build raises."""
    monkeypatch.setattr(programs, "COMPILE_TIMEOUT", 0.5)
    monkeypatch.setattr(programs, "_compile_and_answer", lambda w, action, policy_dir: time.sleep(60))
    children_before = set(children(os.getpid()))
    t0 = time.monotonic()
    with pytest.raises(SandboxError, match="did not answer within"):
        programs.build("kill")
    assert time.monotonic() - t0 < 10
    assert set(children(os.getpid())) == children_before   # killed and reaped: no zombie


def test_compiler_that_dies_is_a_sandbox_error():
    good = marshal.dumps(("ok", {}, 317))
    assert programs._decode(good, 0, "none").by_role == {}
    with pytest.raises(SandboxError, match="failed"):
        programs._decode(good, 9, "none")   # killed by SIGKILL


def _child_status(body) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


@pytest.mark.parametrize("outside", [False, True])
def test_program_loaded_in_a_forked_child(monkeypatch, tmp_path, outside):
    """What a worker does: the program compiled before the fork, loaded
    after it with one system call; a listed call runs, an unlisted one
    kills the process."""
    pols = seccomp.load_all()
    progs = programs.build("kill")
    monkeypatch.setattr(seccomp, "build_filter", None)  # the child must not build

    def body():
        prctl.set_no_new_privs(1)
        assert programs.install("hiprio", progs) == len(seccomp.effective_rules("hiprio", pols))
        os.getpid()
        if outside:
            os.mkdir(tmp_path / "x")  # not in hiprio.policy
        os._exit(7)

    status = _child_status(body)
    if outside:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS
        assert not (tmp_path / "x").exists()
    else:
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7


def test_load_refused_is_a_sandbox_error():
    """Without no_new_privs and CAP_SYS_ADMIN the kernel refuses the filter
    (EACCES): a SandboxError naming the role, not an OSError."""
    progs = programs.build("kill")

    def body():
        prctl.cap_effective.sys_admin = False  # no_new_privs is not set in a fresh child
        try:
            programs.install("hiprio", progs)
        except SandboxError as e:
            os._exit(3 if "hiprio" in str(e) and "denied" in str(e).lower() else 4)
        os._exit(5)

    status = _child_status(body)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3


# -- capabilities ---------------------------------------------------------------

def test_modcaps_parse():
    assert capabilities.parse_modcaps("+sys_admin:-mknod") == ({"sys_admin"}, {"mknod"})
    assert capabilities.parse_modcaps("-CAP_FSETID") == (frozenset(), {"fsetid"})
    assert capabilities.parse_modcaps("+Chown") == ({"chown"}, frozenset())


@pytest.mark.parametrize("text", ["", "sys_admin", "+", "+nope", "-cap_nope", "+mknod:-mknod", "+mknod::-chown"])
def test_modcaps_rejects(text):
    with pytest.raises(capabilities.ModcapsError) as e:
        capabilities.parse_modcaps(text)
    assert str(e.value).startswith("--modcaps")


def test_role_caps():
    req = {"chown", "dac_override", "fowner", "fsetid", "setgid", "setuid", "mknod", "setfcap"}
    assert capabilities.role_caps("request") == req
    assert capabilities.role_caps("request", file_handles=True) == req | {"dac_read_search"}
    assert capabilities.role_caps("request", "-mknod:+lease") == (req - {"mknod"}) | {"lease"}
    assert capabilities.role_caps("hiprio", "+sys_admin") == frozenset()
    sup = capabilities.role_caps("supervisor")
    assert req | {"sys_admin", "sys_chroot", "setpcap"} == sup
    assert capabilities.mask(req) == 0x880000DB
