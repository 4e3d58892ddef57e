"""The seccomp policy files and their loader; --modcaps; capability sets."""

from __future__ import annotations

import os
import signal

import prctl
import pytest

from daemon.sandbox import capabilities, seccomp
from daemon.sandbox.seccomp import PolicyError, parse_policy


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
                      "mount", "unshare", "setns", "pivot_root", "chroot", "seccomp", "prctl",
                      "capset", "setuid", "setresuid", "setgroups", "kill", "tgkill"):
        assert forbidden not in names, forbidden
    clone = next(r for r in pol.rules if r.name == "clone")
    assert clone.args == ((0, 0x10000, (0x10000,)),)          # CLONE_THREAD only


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
    }
    rules = {r.name: r for r in seccomp.effective_rules("supervisor", pols)}
    assert rules["clone"].args == () and rules["clone"].errno is None
    assert rules["clone3"].errno == 38
    assert set(rules) == {"clone", "clone3", "read"}
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


def test_precompiled_programs_are_libseccomps_and_built_once(monkeypatch):
    monkeypatch.setattr(seccomp, "_programs", {})
    pols = seccomp.load_all()
    seccomp.precompile("none", pols)
    assert seccomp._programs == {}
    seccomp.precompile("kill", pols)
    assert set(seccomp._programs) == {(role, "kill") for role in seccomp.ROLES}
    for role in seccomp.ROLES:
        prog, rules = seccomp._programs[(role, "kill")]
        assert prog == _exported(role, "kill", pols)
        assert rules == len(seccomp.effective_rules(role, pols))
    hiprio = seccomp._programs[("hiprio", "kill")][0]
    assert hiprio != seccomp.compile_program("hiprio", "log", pols)[0]  # the action is in the program

    def no_build(*a):
        raise AssertionError("filter built again after precompile")

    monkeypatch.setattr(seccomp, "build_filter", no_build)
    assert seccomp.compile_program("hiprio", "kill", pols)[0] is hiprio


def test_programs_follow_the_policies_they_were_built_from(monkeypatch):
    """A cached program is only reused for the same policies: others (a
    --policy-dir, a test's own lists) are built again, not answered with a
    stale program."""
    monkeypatch.setattr(seccomp, "_programs", {})
    pols = seccomp.load_all()
    full = seccomp.compile_program("hiprio", "kill", pols)
    narrow = dict(pols, hiprio=parse_policy("read  # r\n", role="hiprio"))
    prog, rules = seccomp.compile_program("hiprio", "kill", narrow)
    assert rules == 1 and prog != full[0]
    assert prog == _exported("hiprio", "kill", narrow)


def _child_status(body) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


@pytest.mark.parametrize("outside", [False, True])
def test_precompiled_program_loaded_in_a_forked_child(monkeypatch, tmp_path, outside):
    """What a worker does: the program compiled before the fork, loaded
    after it with one system call; a listed call runs, an unlisted one
    kills the process."""
    monkeypatch.setattr(seccomp, "_programs", {})
    pols = seccomp.load_all()
    seccomp.precompile("kill", pols)
    monkeypatch.setattr(seccomp, "build_filter", None)  # the child must not build

    def body():
        prctl.set_no_new_privs(1)
        assert seccomp.install("hiprio", "kill", pols) == len(seccomp.effective_rules("hiprio", pols))
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


def test_load_refused_is_a_sandbox_error(monkeypatch):
    """Without no_new_privs and CAP_SYS_ADMIN the kernel refuses the filter
    (EACCES): a SandboxError naming the role, not an OSError."""
    pols = seccomp.load_all()
    seccomp.precompile("kill", pols)

    def body():
        prctl.cap_effective.sys_admin = False  # no_new_privs is not set in a fresh child
        try:
            seccomp.install("hiprio", "kill", pols)
        except seccomp.SandboxError as e:
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
