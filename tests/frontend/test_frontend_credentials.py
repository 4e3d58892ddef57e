"""Credentials and SUID/SGID through the real, confined daemon (seccomp
kill): the KILL_SUIDGID flags of WRITE, SETATTR, OPEN and CREATE, the
supplementary-group extension as Linux >= 6.6 lays it out, and the two
EPERMs of issue 20, each checked on the host file (docs/credentials.md).

``daemon_kind``-parametrized: ``--daemon=both`` runs them against QEMU's
C virtiofsd too, where it behaves the same (noted where it does not)."""

from __future__ import annotations

import contextlib
import os
import stat

import pytest

from daemon.fuse import abi
from daemon.fuse.abi import InitFlag
from tests.frontend.fuse_client import LINUX_INIT_FLAGS2

ROOT = 1
USER = {"uid": 65534, "gid": 65534}


def supp_group_ext(gid: int) -> bytes:
    """fuse_ext_header {16, FUSE_EXT_GROUPS} + fuse_supp_groups {1, [gid]}."""
    return abi.EXT_HEADER.pack(16, abi.FUSE_EXT_GROUPS) + abi.SUPP_GROUPS.pack(1) + gid.to_bytes(4, "little")


@contextlib.contextmanager
def as_user(fc, uid=65534, gid=65534):
    """Requests from this guest user (the header's uid/gid)."""
    saved = fc.uid, fc.gid
    fc.uid, fc.gid = uid, gid
    try:
        yield fc
    finally:
        fc.uid, fc.gid = saved


def host(fc, *parts) -> str:
    return os.path.join(str(fc.shared_dir), *parts)


def suid_file(fc, name, mode=0o4777) -> int:
    path = host(fc, name)
    with open(path, "wb") as f:
        f.write(b"0123456789")
    os.chmod(path, mode)
    return fc.lookup(ROOT, name).nodeid


def mode_of(fc, name) -> int:
    return stat.S_IMODE(os.lstat(host(fc, name)).st_mode)


def test_write_with_kill_suidgid_clears_the_bits(frontend):
    f = suid_file(frontend, "f", 0o6777)
    fh = frontend.open(f, os.O_WRONLY, **USER).fh
    frontend.write(f, fh, 0, b"a", **USER)
    assert mode_of(frontend, "f") == 0o6777  # no flag: the daemon's CAP_FSETID keeps them
    frontend.write(f, fh, 1, b"b", write_flags=abi.FUSE_WRITE_KILL_SUIDGID, **USER)
    assert mode_of(frontend, "f") == 0o777
    frontend.release(f, fh)


def test_truncate_and_open_with_kill_suidgid_clear_the_bits(frontend):
    """The flags a guest sends with KILLPRIV_V2 (honoured whatever INIT
    negotiated: a guest asking for less privilege is never a risk)."""
    f = suid_file(frontend, "t")
    frontend.setattr(f, size=3, kill_suidgid=True, **USER)
    assert mode_of(frontend, "t") == 0o777 and os.lstat(host(frontend, "t")).st_size == 3
    if frontend.kind == "c":
        return  # the C daemon honours the OPEN flag only with -o killpriv_v2
    o = suid_file(frontend, "o", 0o2777)
    fh = frontend.open(o, os.O_WRONLY | os.O_TRUNC, open_flags=abi.FUSE_OPEN_KILL_SUIDGID).fh
    assert mode_of(frontend, "o") == 0o777 and os.lstat(host(frontend, "o")).st_size == 0
    frontend.release(o, fh)
    suid_file(frontend, "c")
    _e, out = frontend.create(ROOT, "c", flags=os.O_CREAT | os.O_WRONLY | os.O_TRUNC,
                              open_flags=abi.FUSE_OPEN_KILL_SUIDGID)
    assert mode_of(frontend, "c") == 0o777
    frontend.release(_e.nodeid, out.fh)


@pytest.mark.parametrize("option", [(), ("--killpriv-v2",), ("--no-killpriv-v2",)])
def test_killpriv_v2_offered_only_with_the_option(daemon_factory, option):
    """HANDLE_KILLPRIV_V2 is offered only with --killpriv-v2 (off by
    default, as in QEMU 7.2's C virtiofsd and the Rust one 1.13)."""
    from tests.frontend.fuse_client import FuseClient
    from tests.frontend.vhost import start_frontend

    d = daemon_factory("ours", extra_args=option)
    fe = start_frontend(d.socket_path, ram_size=32 << 20, num_request_queues=1, queue_size=64)
    try:
        fc = FuseClient(fe)
        out = fc.init()
        assert bool(out.flags & InitFlag.HANDLE_KILLPRIV_V2) == (option == ("--killpriv-v2",))
        assert not out.flags2 << 32 & InitFlag.CREATE_SUPP_GROUP  # Linux 6.1 does not offer it
        out = fc.init(flags2=LINUX_INIT_FLAGS2 | InitFlag.CREATE_SUPP_GROUP >> 32)  # Linux 6.6+
        assert out.flags2 << 32 & InitFlag.CREATE_SUPP_GROUP
    finally:
        fe.close()


def test_non_owner_clears_suid_with_a_chmod_before_writing(frontend):
    """Issue 20 (a): without KILLPRIV_V2 the guest sends this chmod with the
    writer's uid; the writer does not own the file."""
    f = suid_file(frontend, "f")
    frontend.setattr(f, mode=0o100777, **USER)
    fh = frontend.open(f, os.O_WRONLY, **USER).fh
    frontend.write(f, fh, 0, b"x", **USER)
    assert mode_of(frontend, "f") == 0o777
    frontend.release(f, fh)


def test_owner_chowns_to_a_supplementary_group(frontend):
    """Issue 20 (b): the guest checked that the owner is in 65531."""
    f = suid_file(frontend, "f", 0o6555)
    os.chown(host(frontend, "f"), 65534, 65534)
    with as_user(frontend):
        a = frontend.setattr(f, mode=0o100555, uid=65534, gid=65531).attr
    st = os.lstat(host(frontend, "f"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65531, 0o555)
    assert (a.uid, a.gid) == (65534, 65531)


def test_create_with_the_supp_group_extension(frontend):
    """Linux >= 6.6 layout: the parent's group after the args. The setgid
    file keeps its bit because the creator is in the group."""
    if frontend.kind == "c":  # QEMU 7.2's C virtiofsd predates FUSE_CREATE_SUPP_GROUP
        assert not frontend.init(flags2=LINUX_INIT_FLAGS2 | InitFlag.CREATE_SUPP_GROUP >> 32).flags2
        return
    grp = host(frontend, "grp")
    os.mkdir(grp)
    os.chown(grp, 0, 65531)
    os.chmod(grp, 0o2770)
    g = frontend.lookup(ROOT, "grp").nodeid
    e, out = frontend.create(g, "f", mode=0o102755, ext=supp_group_ext(65531), **USER)
    st = os.lstat(os.path.join(grp, "f"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65531, 0o2755)
    d = frontend.mkdir(g, "d", 0o755, ext=supp_group_ext(65531), **USER)
    assert (d.attr.uid, d.attr.gid) == (65534, 65531) and d.attr.mode & stat.S_ISGID
    frontend.release(e.nodeid, out.fh)


def test_create_in_a_supplementary_group_directory_without_the_extension(frontend):
    """Linux 6.1 sends no extension: the guest checked the parent, so the
    create works (the C daemon creates without override: EACCES there)."""
    grp = host(frontend, "grp")
    os.mkdir(grp)
    os.chown(grp, 0, 65531)
    os.chmod(grp, 0o770)
    g = frontend.lookup(ROOT, "grp").nodeid
    if frontend.kind == "c":
        from tests.frontend.fuse_client import FuseErrorReply
        with pytest.raises(FuseErrorReply):
            frontend.mkdir(g, "d", 0o755, **USER)
        return
    d = frontend.mkdir(g, "d", 0o755, **USER)
    assert (d.attr.uid, d.attr.gid) == (65534, 65534)
    assert os.lstat(os.path.join(grp, "d")).st_uid == 65534
