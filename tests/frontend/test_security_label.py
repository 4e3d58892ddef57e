"""--security-label through the test frontend: FUSE_SECURITY_CTX in INIT, and
the security-context extension (Linux 6.1's layout, extensions.py) on
CREATE, MKNOD, MKDIR and SYMLINK, checked on the host file; --xattrmap
renames the label; malformed contexts are EINVAL with nothing created; no
temporary name is ever left behind. The same requests go to the Rust
virtiofsd 1.13 (``--security-label``), which stores the same attributes.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest

from daemon.fuse import abi
from daemon.fuse.abi import InitFlag
from daemon.fuse.seclabel import TEMP_PREFIX
from tests.frontend.fuse_client import LINUX_INIT_FLAGS, FuseClient
from tests.frontend.test_frontend_ops import expect_errno
from tests.frontend.vhost import start_frontend

ROOT = 1
LABEL = b"system_u:object_r:virt_content_t:s0\0"
USER = {"uid": 1000, "gid": 1000}


def secctx_ext(name: bytes = b"security.selinux", value: bytes = LABEL, count: int = 1) -> bytes:
    """fuse_secctx_header + fuse_secctx + name + value, padded to 8, as Linux's
    get_security_context() builds it (count 0: the 8-byte header alone)."""
    if count == 0:
        return abi.SECCTX_HEADER.pack(abi.SECCTX_HEADER.size, 0)
    record = abi.SECCTX.pack(len(value)) + name + b"\0" + value
    record += bytes(-len(record) % 8)
    return abi.SECCTX_HEADER.pack(abi.SECCTX_HEADER.size + len(record), count) + record


def _client(daemon) -> FuseClient:
    fe = start_frontend(daemon.socket_path, ram_size=64 << 20)
    # a reply-bearing message first: the Rust daemon drops a kick that arrives
    # before it has processed SET_VRING_ENABLE (seen with this frontend)
    fe.get_features()
    fc = FuseClient(fe)
    fc.fe = fe
    return fc


def _label(path) -> dict[str, bytes]:
    return {n: os.getxattr(path, n, follow_symlinks=False)
            for n in os.listxattr(path, follow_symlinks=False)}


def _create_all(fc, ext):
    """One of each creating op with ``ext``; returns the entries."""
    created = {}
    created["file"] = fc.create(ROOT, "file", mode=0o100444, ext=ext, **USER)[0]
    created["dir"] = fc.mkdir(ROOT, "dir", 0o555, ext=ext, **USER)
    created["fifo"] = fc.mknod(ROOT, "fifo", stat.S_IFIFO | 0o644, ext=ext, **USER)
    created["link"] = fc.symlink(ROOT, "link", "file", ext=ext, **USER)
    return created


@pytest.mark.parametrize("kind", ["ours", "rust"])
def test_label_is_stored_on_every_new_entry(daemon_factory, tmp_path, kind):
    share = tmp_path / f"share-{kind}"
    share.mkdir()
    d = daemon_factory(kind, shared_dir=share, extra_args=("--security-label",))
    fc = _client(d)
    try:
        out = fc.init()
        assert out.flags2 & (InitFlag.SECURITY_CTX >> 32)
        created = _create_all(fc, secctx_ext())
        for name in ("file", "dir", "fifo", "link"):
            assert _label(share / name) == {"security.selinux": LABEL}, name
            st = os.lstat(share / name)
            assert (st.st_uid, st.st_gid) == (1000, 1000), name   # created as the caller
            assert created[name].attr.uid == 1000
        assert stat.S_IMODE(os.stat(share / "dir").st_mode) == 0o555
        assert os.readlink(share / "link") == "file"
        # nr_secctx 0 (a guest without a labelling LSM): created, no label
        fc.mkdir(ROOT, "plain", 0o755, ext=secctx_ext(count=0), **USER)
        assert _label(share / "plain") == {}
        assert sorted(os.listdir(share)) == ["dir", "fifo", "file", "link", "plain"]
    finally:
        fc.fe.close()


def test_without_the_option_security_ctx_is_not_granted_and_a_context_is_ignored(frontend):
    fc = frontend
    assert not fc.init_out.flags2 & (InitFlag.SECURITY_CTX >> 32)
    fc.mkdir(ROOT, "d", 0o755, ext=secctx_ext(), **USER)
    assert _label(fc.shared_dir / "d") == {}


@pytest.mark.frontend_opts(extra_args=("--security-label", "--xattrmap", ":map::user.virtiofs.:"))
def test_xattrmap_renames_the_label(frontend):
    fc = frontend
    share = fc.shared_dir
    fc.create(ROOT, "f", ext=secctx_ext(), **USER)
    fc.mkdir(ROOT, "d", 0o700, ext=secctx_ext(), **USER)
    assert _label(share / "f") == {"user.virtiofs.security.selinux": LABEL}
    assert _label(share / "d") == {"user.virtiofs.security.selinux": LABEL}
    assert fc.getxattr(fc.lookup(ROOT, "f").nodeid, "security.selinux", 256) == LABEL
    # user.* cannot be set on a symlink (the host kernel's EPERM): the
    # create fails and leaves nothing behind
    expect_errno(fc.symlink, ROOT, "ln", "f", ext=secctx_ext(), **USER, errnos=errno.EPERM)
    assert sorted(os.listdir(share)) == ["d", "f"]


@pytest.mark.frontend_opts(extra_args=("--security-label", "--xattrmap",
                                       ":ok:all:user.:: :bad:all:::"))
def test_a_label_name_the_map_refuses_fails_before_anything_is_created(frontend):
    expect_errno(frontend.mkdir, ROOT, "d", 0o755, ext=secctx_ext(), errnos=errno.EPERM)
    assert os.listdir(frontend.shared_dir) == []


@pytest.mark.frontend_opts(extra_args=("--security-label",))
def test_existing_names_and_o_excl(frontend):
    fc = frontend
    share = fc.shared_dir
    (share / "f").write_bytes(b"old")
    (share / "d").mkdir()
    expect_errno(fc.mkdir, ROOT, "d", 0o755, ext=secctx_ext(), errnos=errno.EEXIST)
    expect_errno(fc.create, ROOT, "f", flags=os.O_CREAT | os.O_EXCL | os.O_RDWR, ext=secctx_ext(),
                 errnos=errno.EEXIST)
    # without O_EXCL an existing file is opened (the name appeared after the
    # guest's lookup): no label is forced on it
    entry, opened = fc.create(ROOT, "f", flags=os.O_CREAT | os.O_RDWR, ext=secctx_ext())
    assert fc.read(entry.nodeid, opened.fh, 0, 8) == b"old"
    assert _label(share / "f") == {}
    assert sorted(os.listdir(share)) == ["d", "f"]
    assert not [n for n in os.listdir(share) if n.startswith(TEMP_PREFIX)]


@pytest.mark.frontend_opts(extra_args=("--security-label",))
def test_malformed_contexts_are_einval_and_create_nothing(frontend):
    fc = frontend
    hdr = abi.SECCTX_HEADER.pack
    good = secctx_ext()
    bad = {
        "two contexts": secctx_ext(count=2),
        "count 0 with a body": hdr(16, 0) + bytes(8),
        "size past the end": hdr(len(good) + 8, 1) + good[8:],
        "record shorter than fuse_secctx": hdr(8, 1),
        "unterminated name": hdr(24, 1) + abi.SECCTX.pack(4) + b"security",
        "empty name": secctx_ext(name=b""),
        "not security.*": secctx_ext(name=b"trusted.x"),
        "bare security.": secctx_ext(name=b"security."),
        "empty value": hdr(32, 1) + abi.SECCTX.pack(0) + b"security.selinux\0" + bytes(7),
        "value past its record": hdr(32, 1) + abi.SECCTX.pack(64) + b"security.selinux\0" + bytes(7),
        "context twice": good + good,
        "long name": secctx_ext(name=b"security." + b"x" * 250),
    }
    bad["padding too long"] = hdr(len(good) + 8, 1) + good[8:] + bytes(8)
    for what, ext in bad.items():
        assert len(ext) % 8 == 0, what
        expect_errno(fc.mkdir, ROOT, "d", 0o755, ext=ext, errnos=errno.EINVAL)
        assert os.listdir(fc.shared_dir) == [], what
    fc.mkdir(ROOT, "d", 0o755, ext=good)
    assert _label(fc.shared_dir / "d") == {"security.selinux": LABEL}


def test_security_label_always_refuses_a_guest_without_it(daemon_factory):
    d = daemon_factory("ours", extra_args=("--security-label=always",))
    fc = _client(d)
    try:
        expect_errno(fc.init, flags2=0, errnos=errno.EPROTO)
        assert fc.init(flags=LINUX_INIT_FLAGS).flags2 & 1
    finally:
        fc.fe.close()
