"""Whose credentials the host sees, op by op (docs/credentials.md), through
``FuseSession.handle``: creating ops as the caller (with the supplementary
group the guest names, or CAP_DAC_OVERRIDE when it names none), everything
else as the worker, and the KILL_SUIDGID flags without CAP_FSETID."""

from __future__ import annotations

import errno
import os
import stat
import threading

import pytest

from daemon.fuse import abi, credentials
from daemon.fuse.abi import InitFlag, Opcode, SetattrValid
from daemon.fuse.extensions import supp_groups
from daemon.fuse.request import FUSEError
from tests.unit.fusereq import FuseClient, entry_attr, start_session, supp_group_ext

NUL = b"\0"
FSETID = 1 << credentials.CAP_FSETID
DAC_OVERRIDE = 1 << credentials.CAP_DAC_OVERRIDE


@pytest.fixture
def session(share):
    os.umask(0)  # the worker's umask (INTERNALS)
    os.chmod(share, 0o777)
    sess, _root = start_session(share)
    yield sess
    sess.close()
    sess.inodes.close()
    credentials.restore()
    os.umask(0o022)


def client(session, uid=0, gid=0):
    return FuseClient(session, uid=uid, gid=gid)


def mkdir(c, parent, name, mode=0o755, ext=b""):
    return c.call(Opcode.MKDIR, parent, abi.MKDIR_IN.pack(mode, 0) + name + NUL, 128, ext=ext)


def create(c, parent, name, mode=0o644, flags=os.O_RDWR, open_flags=0, ext=b""):
    args = abi.CREATE_IN.pack(flags | os.O_CREAT, stat.S_IFREG | mode, 0, open_flags) + name + NUL
    return c.call(Opcode.CREATE, parent, args, 144, ext=ext)


def setattr_args(valid, size=0, mode=0, uid=0, gid=0, fh=0):
    return abi.SETATTR_IN.pack(int(valid), fh, size, 0, 0, 0, 0, 0, 0, 0, mode, uid, gid)


def back_to_the_worker():
    """After every request: fsuid 0, no groups, the worker's capabilities."""
    eff = credentials.effective_caps()
    return (credentials.current() == (0, 0) and credentials.thread_groups() == []
            and eff & FSETID and eff & DAC_OVERRIDE)


def node(session, name):
    return client(session).lookup(1, name)


# -- creating ops: the caller's ownership -------------------------------------------------
def test_creating_ops_run_as_the_caller(session, share):
    user = client(session, 1000, 1001)
    payload = mkdir(user, 1, b"d").ok()
    assert entry_attr(payload)[11:13] == (1000, 1001)
    user.call(Opcode.SYMLINK, 1, b"sl\0t\0", 128).ok()
    user.call(Opcode.MKNOD, 1, abi.MKNOD_IN.pack(stat.S_IFIFO | 0o600, 0, 0) + b"p\0", 128).ok()
    create(user, 1, b"f").ok()
    assert back_to_the_worker()
    for name in ("d", "sl", "p", "f"):
        st = os.lstat(share / name)
        assert (st.st_uid, st.st_gid) == (1000, 1001), name
    # root stays root
    mkdir(client(session), 1, b"r").ok()
    assert os.lstat(share / "r").st_uid == 0


def test_create_trusts_the_guests_permission_check_without_the_extension(session, share):
    """Linux 6.1 cannot say which supplementary group let the caller write
    the parent: the create keeps CAP_DAC_OVERRIDE (the guest checked)."""
    os.mkdir(share / "grp", 0o770)
    os.chown(share / "grp", 0, 65531)
    grp = node(session, "grp")
    user = client(session, 65534, 65534)
    mkdir(user, grp, b"sub").ok()
    create(user, grp, b"file").ok()
    assert os.lstat(share / "grp" / "sub").st_uid == 65534
    assert os.lstat(share / "grp" / "file").st_gid == 65534
    assert back_to_the_worker()


def test_create_with_the_supp_group_extension_uses_exactly_that_group(session, share):
    """Linux >= 6.6 names the parent's group when the caller is in it: the
    host then checks with it, and without CAP_DAC_OVERRIDE."""
    os.mkdir(share / "grp", 0o2770)
    os.chown(share / "grp", 0, 65531)
    os.chmod(share / "grp", 0o2770)
    os.mkdir(share / "other", 0o770)
    os.chown(share / "other", 0, 65530)
    grp, other = node(session, "grp"), node(session, "other")
    user = client(session, 65534, 65534)
    # setgid directory of the named group: a setgid file keeps its bit
    create(user, grp, b"sgid", mode=0o2755, ext=supp_group_ext(65531)).ok()
    st = os.lstat(share / "grp" / "sgid")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65531, 0o2755)
    assert credentials.thread_groups() == []
    # a group that does not open the parent: the host's EACCES
    assert mkdir(user, other, b"x", ext=supp_group_ext(65531)).error == errno.EACCES
    assert back_to_the_worker()


def test_without_the_extension_a_setgid_file_of_a_supplementary_group_loses_its_bit(session, share):
    """The documented Linux 6.1 limit: the host does not know the caller is
    in the directory's group, so it clears SGID on the new file (the
    Rust virtiofsd does the same; granting CAP_FSETID would let any caller
    make setgid files of any group, CVE-2022-0358's hole)."""
    os.mkdir(share / "grp")
    os.chown(share / "grp", 0, 65531)
    os.chmod(share / "grp", 0o2777)
    grp = node(session, "grp")
    create(client(session, 65534, 65534), grp, b"f", mode=0o2755).ok()
    st = os.lstat(share / "grp" / "f")
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (65531, 0o755)


def test_create_opens_an_existing_file_as_the_worker(session, share):
    (share / "f").write_bytes(b"old")
    os.chmod(share / "f", 0o600)  # root's; the guest allowed the caller (stale cache, ACL...)
    payload = create(client(session, 65534, 65534), 1, b"f", flags=os.O_RDWR).ok()
    assert entry_attr(payload)[11] == 0
    assert back_to_the_worker()


def test_malformed_extensions_are_einval(session, share):
    user = client(session, 65534, 65534)
    hdr = abi.EXT_HEADER.pack
    bad = [
        hdr(4, abi.FUSE_EXT_GROUPS),                       # smaller than its header
        hdr(24, abi.FUSE_EXT_GROUPS) + bytes(8),           # past the end
        hdr(12, 40) + bytes(4),                            # not a multiple of 8 (and the area is 16)
        hdr(16, abi.FUSE_EXT_GROUPS) + abi.SUPP_GROUPS.pack(2) + bytes(4),  # 2 groups in room for 1
        supp_group_ext(*range(33)),                        # more than MAX_SUPP_GROUPS
        supp_group_ext(5) + supp_group_ext(6),             # the groups extension twice
    ]
    for i, ext in enumerate(bad):
        ext += bytes(-len(ext) % 8)
        assert mkdir(user, 1, b"d%d" % i, ext=ext).error == errno.EINVAL, ext.hex()
        assert not (share / f"d{i}").exists()
    assert back_to_the_worker()
    # unknown types are skipped; a zero-group extension names none
    mkdir(user, 1, b"ok1", ext=hdr(16, 99) + bytes(8)).ok()
    mkdir(user, 1, b"ok2", ext=supp_group_ext()).ok()
    assert supp_groups(supp_group_ext(7, 8, 9)) == (7, 8, 9)


def test_an_id_the_host_refuses_is_eperm(session, share):
    assert mkdir(client(session, 0xFFFFFFFF, 0), 1, b"d").error == errno.EPERM
    assert back_to_the_worker()
    assert not (share / "d").exists()


# -- other ops: the worker's credentials ----------------------------------------------------
def test_setattr_runs_as_the_worker(session, share):
    """The guest checked these with the caller's full group list: a
    non-owner's chmod that clears SUID before it writes, a chown to one of
    the owner's supplementary groups (issue 20's two EPERMs)."""
    (share / "suid").write_bytes(b"x")
    os.chmod(share / "suid", 0o4777)
    suid = node(session, "suid")
    user = client(session, 65534, 65534)
    user.call(Opcode.SETATTR, suid, setattr_args(SetattrValid.MODE, mode=0o100777), 104).ok()
    assert stat.S_IMODE(os.lstat(share / "suid").st_mode) == 0o777
    (share / "mine").write_bytes(b"x")
    os.chown(share / "mine", 65534, 65534)
    os.chmod(share / "mine", 0o6555)
    mine = node(session, "mine")
    # chown to a supplementary group, with the bits the guest clears in the same request
    args = setattr_args(SetattrValid.MODE | SetattrValid.UID | SetattrValid.GID, mode=0o100555,
                        uid=65534, gid=65531)
    attr = abi.ATTR_OUT.unpack(user.call(Opcode.SETATTR, mine, args, 104).ok())[3:]
    st = os.lstat(share / "mine")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65531, 0o555)
    assert (attr[11], attr[12]) == (65534, 65531)
    assert back_to_the_worker()


def test_killpriv_v2_offered_only_when_asked_and_supp_group_always(share):
    for killpriv in (None, False, True):
        sess, c = start_session(share, **({} if killpriv is None else {"killpriv_v2": killpriv}))
        try:
            flags = InitFlag.HANDLE_KILLPRIV_V2 | (1 << 30)  # INIT_EXT
            init = abi.INIT_IN.pack(7, 38, 4096, int(flags), InitFlag.CREATE_SUPP_GROUP >> 32)
            out = abi.INIT_OUT.unpack(c.call(Opcode.INIT, 0, init, 64).ok())
            assert bool(out[3] & InitFlag.HANDLE_KILLPRIV_V2) == bool(killpriv)  # default off
            assert out[10] << 32 == InitFlag.CREATE_SUPP_GROUP
        finally:
            sess.close()
            sess.inodes.close()


# -- SUID/SGID: the KILL_SUIDGID flags --------------------------------------------------------
def suid_file(share, name, mode=0o4777):
    (share / name).write_bytes(b"0123456789")
    os.chmod(share / name, mode)


def mode_of(share, name):
    return stat.S_IMODE(os.lstat(share / name).st_mode)


def write(c, nodeid, fh, data, flags=0):
    args = abi.WRITE_IN.pack(fh, 0, len(data), flags, 0, 0)
    return c.call(Opcode.WRITE, nodeid, args, abi.WRITE_OUT.size, data)


@pytest.mark.parametrize("mode,after", [(0o4777, 0o777), (0o2777, 0o777), (0o6777, 0o777),
                                        (0o2767, 0o2767)])  # SGID without group x: a lock mark
def test_write_with_kill_suidgid_clears_the_bits(session, share, mode, after):
    suid_file(share, "f", mode)
    f = node(session, "f")
    user = client(session, 65534, 65534)
    fh, _ = user.open(f, os.O_WRONLY)
    write(user, f, fh, b"a").ok()
    assert mode_of(share, "f") == mode  # no flag: the worker's CAP_FSETID keeps them
    write(user, f, fh, b"b", abi.FUSE_WRITE_KILL_SUIDGID).ok()
    assert mode_of(share, "f") == after
    assert back_to_the_worker()


def test_truncate_with_kill_suidgid_clears_the_bits(session, share):
    suid_file(share, "f")
    f = node(session, "f")
    user = client(session, 65534, 65534)
    user.call(Opcode.SETATTR, f, setattr_args(SetattrValid.SIZE, size=5), 104).ok()
    assert mode_of(share, "f") == 0o4777
    valid = SetattrValid.SIZE | SetattrValid.KILL_SUIDGID
    attr = abi.ATTR_OUT.unpack(user.call(Opcode.SETATTR, f, setattr_args(valid, size=2), 104).ok())[3:]
    assert mode_of(share, "f") == 0o777 and stat.S_IMODE(attr[9]) == 0o777 and attr[1] == 2
    assert back_to_the_worker()


def test_open_o_trunc_clears_the_bits_for_a_non_root_caller_or_when_asked(session, share):
    for name in ("root", "asked", "user"):
        suid_file(share, name)
    root, user = client(session), client(session, 65534, 65534)
    root.open(node(session, "root"), os.O_WRONLY | os.O_TRUNC)
    assert mode_of(share, "root") == 0o4777  # root keeps them, as on a local disk
    args = abi.OPEN_IN.pack(os.O_WRONLY | os.O_TRUNC, abi.FUSE_OPEN_KILL_SUIDGID)
    root.call(Opcode.OPEN, node(session, "asked"), args, 16).ok()
    assert mode_of(share, "asked") == 0o777
    user.open(node(session, "user"), os.O_WRONLY | os.O_TRUNC)
    assert mode_of(share, "user") == 0o777
    assert os.lstat(share / "user").st_size == 0
    assert back_to_the_worker()


def test_create_of_an_existing_file_with_o_trunc_and_the_flag_clears_the_bits(session, share):
    suid_file(share, "f")
    create(client(session), 1, b"f", flags=os.O_WRONLY | os.O_TRUNC).ok()
    assert mode_of(share, "f") == 0o4777
    create(client(session), 1, b"f", flags=os.O_WRONLY | os.O_TRUNC,
           open_flags=abi.FUSE_OPEN_KILL_SUIDGID).ok()
    assert mode_of(share, "f") == 0o777
    assert back_to_the_worker()


# -- the primitives -------------------------------------------------------------------------
class OtherThread:
    """A thread started now (as a worker's helper threads are, before any
    request) that reads ``probe()`` when ``look()`` is called."""

    def __init__(self, probe):
        self.probe, self.value = probe, None
        self._started, self._go = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()
        self._started.wait(5)

    def _run(self):
        self._started.set()
        self._go.wait(5)
        self.value = self.probe()

    def look(self):
        self._go.set()
        self._thread.join()
        return self.value


def test_without_fsetid_is_per_thread_and_undone():
    helper = OtherThread(credentials.effective_caps)
    with credentials.without_fsetid():
        assert not credentials.effective_caps() & FSETID
        assert helper.look() & FSETID
    assert credentials.effective_caps() & FSETID
    with pytest.raises(RuntimeError):
        with credentials.without_fsetid():
            raise RuntimeError("the handler failed")
    assert credentials.effective_caps() & FSETID


def test_as_caller_groups_are_this_threads_only_and_undone():
    helper = OtherThread(credentials.thread_groups)
    with credentials.as_caller(1000, 1000, (4242,)):
        assert credentials.thread_groups() == [4242]
        assert credentials.current() == (1000, 1000)
        assert not credentials.effective_caps() & DAC_OVERRIDE  # the group, no override
        assert helper.look() == []  # a helper thread never sees the request's group
    assert credentials.thread_groups() == [] and credentials.current() == (0, 0)
    with credentials.as_caller(1000, 1000):
        assert credentials.effective_caps() & DAC_OVERRIDE
        assert not credentials.effective_caps() & FSETID
    with pytest.raises(FUSEError):
        with credentials.as_caller(1000, 1000, tuple(range(credentials.MAX_SUPP_GROUPS + 1))):
            pass
    assert back_to_the_worker()


def test_a_credential_change_that_cannot_be_undone_ends_the_worker(monkeypatch):
    exits = []
    monkeypatch.setattr(credentials.os, "_exit", exits.append)

    def refuse(_groups):
        if _groups:
            return None
        raise OSError(errno.EPERM, "refused")

    monkeypatch.setattr(credentials, "_setgroups", refuse)
    with credentials.as_caller(1000, 1000, (5,)):
        pass
    assert exits == [1]
