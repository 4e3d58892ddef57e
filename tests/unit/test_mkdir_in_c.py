"""MKDIR served in C (daemon/fuse/_mkdir.h) against the Python session.

As tests/unit/test_create_in_c.py (whose two-session set-up and
comparisons this reuses): two sessions, each on its own copy of the share,
the reference (``FuseSession.handle``) and one with the compiled ops;
after every step the reply bytes (ino and times masked), the inode table,
the cached nodeids, the open files, the meters' counters, both trees
(names, types, modes, sizes, links, owners) and the fds opened must be
equal.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import CacheMode
from daemon.fuse import abi, fastpath
from daemon.fuse.abi import Opcode
from tests.unit.fusereq import in_header
from tests.unit.test_create_in_c import (_chain, _close, _declined_until_clear, _lookup, _masked, _pair, _run_steps,
                                         _state, _step, _tree, fresh_pair, shaped_args, shares)
from tests.unit.test_fastops_equivalence import _run

REPLY = 16 + abi.ENTRY_OUT.size        # 144
NEW = ("d0", "d1", "d2", "d3")

__all__ = ["shares"]        # the fixture, imported for the tests below


def mkdir_request(parent: int, name: bytes, mode: int, unique: int, uid: int = 0,
                  variant: str = "ok") -> tuple[bytes, list[int]]:
    arg = name + b"\0"
    if variant == "no-nul":
        arg = name or b"q"
    elif variant == "inner-nul":
        arg = name + b"\0q\0"
    args, extlen = shaped_args(abi.MKDIR_IN.pack(mode, 0o022) + arg, variant, 6)
    request = in_header(Opcode.MKDIR, parent, len(args), unique, uid=uid, gid=uid, extlen=extlen) + args
    if variant == "len":
        request = abi.IN_HEADER.pack(len(request) + 1, *abi.IN_HEADER.unpack_from(request)[1:]) + args
    return request, [16, REPLY - 17] if variant == "short-out" else [16, abi.ENTRY_OUT.size]


def test_plain_mkdirs_are_served_in_c(shares):
    """Linux-shaped MKDIRs of new names (the root and a looked-up
    directory; plain, SGID, sticky and a mode with a type) are all C's,
    with Python's reply, table, modes and owners; an existing name is C's
    EEXIST, as Python's."""
    pair, fast = _pair(shares)
    try:
        sub = _lookup(pair, fast, shares, b"sub")
        cases = [(1, b"d0", 0o755), (1, b"d1", 0o2775), (sub, b"d2", 0o1777), (1, b"d3", 0o40700)]
        replies: list = []
        for k, (parent, name, mode) in enumerate(cases):
            request, wsizes = mkdir_request(parent, name, mode, 10 + k)
            assert _step(pair, fast, shares, request, wsizes, replies), name
        assert all(int.from_bytes(r[4:8], "little") == 0 and len(r) == REPLY for r in replies)
        mask = os.umask(0)
        os.umask(mask)      # this test process's umask applies to both (a worker's is 0)
        for root in shares:
            assert stat.S_IMODE(os.stat(root / "d0").st_mode) == 0o755 & ~mask
            assert stat.S_IMODE(os.stat(root / "sub" / "d2").st_mode) == 0o1777 & ~mask     # sticky kept
            assert stat.S_ISDIR(os.stat(root / "d3").st_mode)
            assert os.stat(root / "d0").st_uid == 0
        for k, name in enumerate((b"d0", b"exists", b"dir")):
            request, wsizes = mkdir_request(1, name, 0o755, 20 + k)
            replies = []
            assert _step(pair, fast, shares, request, wsizes, replies)
            assert -int.from_bytes(replies[0][4:8], "little", signed=True) == errno.EEXIST
        # a new directory is a parent C creates in (its fd is cached)
        d0 = _lookup(pair, fast, shares, b"d0")
        request, wsizes = mkdir_request(d0, b"inner", 0o700, 30)
        assert _step(pair, fast, shares, request, wsizes)
    finally:
        _close(pair)


MKDIR_NAMES = st.sampled_from([*NEW, "exists", "dir", "ln", "fifo", ".", "..", "a/b", "", "x" * 255, "x" * 256])
MODES = st.sampled_from([0o755, 0o40755, 0o2775, 0o1777, 0o7777, 0o100644, 0o0, 0xFFFFFFFF])
MKDIR_STEP = st.one_of(
    st.tuples(st.just("mkdir"), st.sampled_from(["root", "root", "root", "sub", "file", "stale", "unknown"]),
              MKDIR_NAMES, MODES, st.sampled_from([0, 0, 0, 1000]),
              st.sampled_from(["ok", "ok", "ok", "no-nul", "inner-nul", "short-out", "extension", "len",
                               "short-args"])),
    st.tuples(st.just("forget"), MKDIR_NAMES, st.integers(1, 3)),
    st.tuples(st.just("rmdir"), st.sampled_from(NEW)),
    st.tuples(st.just("reap")))

CONFIGS = {"auto": {}, "always": {"cache": CacheMode.ALWAYS}, "never": {"cache": CacheMode.NEVER}}


def _mkdir_of(parent: int, step, unique: int) -> tuple[bytes, list[int]]:
    _kind, _where, name, mode, uid, variant = step
    return mkdir_request(parent, name.encode(), mode, unique, uid, variant)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(MKDIR_STEP, min_size=1, max_size=14), config=st.sampled_from(sorted(CONFIGS)))
def test_mkdirs_are_equivalent(tmp_path_factory, steps, config):
    """Sequences of MKDIRs (new and existing names, a file, a symlink, a
    FIFO, dotted, slashed, empty and too long names; the root, a looked-up
    directory and file, stale and unknown parents; plain, SGID, sticky,
    all-bits, typed and all-ones modes; root and another caller; malformed
    args and short reply room), FORGETs, host rmdirs and reaps, on a table
    of 15 inodes that fills: the same replies, tables, trees, counters and
    fd counts."""
    with fresh_pair(tmp_path_factory, "mkdirs", **CONFIGS[config]) as (pair, fast, shares):
        _run_steps(pair, fast, shares, steps, _mkdir_of)


@pytest.mark.parametrize("case", ["uid", "gid", "extension", "dot", "dotdot", "slash", "long", "stale",
                                  "short-out", "short-args", "dirty", "thread-lock", "unknown-ids"])
def test_what_c_leaves_to_python(shares, case):
    """Each case declined by C before anything was done (no directory
    made), then answered by Python as the reference answers it."""
    pair, fast = _pair(shares)
    try:
        uid, name, parent, variant = 0, b"d0", 1, "ok"
        if case == "uid":
            uid = 1000
        elif case in ("extension", "short-out", "short-args"):
            variant = case
        elif case == "dot":
            name = b"."
        elif case == "dotdot":
            name = b".."
        elif case == "slash":
            name = b"d0/x"
        elif case == "long":
            name = b"d" * 256
        elif case == "stale":
            parent = 3999
        elif case == "dirty":
            from daemon.fuse import inodes
            for session in pair:
                session.inodes._hdr[inodes._H_DIRTY] = 1
        request, wsizes = mkdir_request(parent, name, 0o755, 5, uid, variant)
        if case == "gid":
            request = abi.IN_HEADER.pack(*abi.IN_HEADER.unpack_from(request)[:5], 7, 0, 0, 0) + request[40:]
        if case in ("thread-lock", "unknown-ids"):
            _declined_until_clear(pair, fast, shares, case, request, wsizes, "d0")
            return
        before = fast.served
        assert fast.serve(_chain(request, wsizes)) == -1 and fast.served == before
        assert not (shares[1] / "d0").exists()
        assert not _step(pair, fast, shares, request, wsizes)
    finally:
        _close(pair)


def test_a_full_table_after_the_mkdir_is_answered_as_python_does(shares):
    """A table of 3 inodes: the third and fourth directories are made, and
    C's lookup of each declines (the table full): fastpath.mkdir_rest
    answers as do_mkdir (ENFILE, the directory stays)."""
    pair, fast = _pair(shares, capacity=3)
    try:
        replies: list = []
        for k, name in enumerate(NEW):
            request, wsizes = mkdir_request(1, name.encode(), 0o755, 30 + k)
            assert _step(pair, fast, shares, request, wsizes, replies)     # C answers each
        errors = [-int.from_bytes(r[4:8], "little", signed=True) for r in replies]
        assert errors == [0, 0, errno.ENFILE, errno.ENFILE]
        assert all((shares[1] / n).is_dir() for n in NEW)
    finally:
        _close(pair)


def test_mkdir_rest_answers_as_the_entry_does(shares):
    """fastpath.mkdir_rest: a made directory's entry (as do_mkdir's
    tail), a name gone again ENOENT."""
    pair, _fast = _pair(shares)
    try:
        pure, comp = pair
        request, wsizes = mkdir_request(1, b"d0", 0o755, 9)
        ref = _run(pure, _fast, request, [40], wsizes, False)
        os.mkdir(shares[1] / "d0", 0o755)
        got = fastpath.mkdir_rest(comp, comp.root_fd, b"d0")
        assert isinstance(got, bytes) and _masked(ref[1][:16] + got) == _masked(ref[1])
        assert _state(comp, shares[1]) == _state(pure, shares[0])
        assert _tree(shares[1]) == _tree(shares[0])
        assert fastpath.mkdir_rest(comp, comp.root_fd, b"gone") == errno.ENOENT
    finally:
        _close(pair)


@pytest.mark.parametrize("config,why", [({"posix_acl": True}, "--posix-acl"),
                                        ({"security_label": True}, "--security-label"),
                                        ({"readonly": True}, "MKDIR is not the reference handler"),
                                        ({"announce_submounts": True}, "--announce-submounts"),
                                        ("ids", "translate")])
def test_mkdir_stays_in_python_when_an_option_changes_it(shares, config, why):
    if config == "ids":
        from daemon.fuse.idtranslate import Ids, Translation
        config = {"ids": Ids(Translation.parse(["map:0:1000:1"]), Translation.parse([]))}
    pair, _fast = _pair(shares, **config)
    try:
        assert why in fastpath.mkdir_unsupported(pair[1])
        fast = fastpath.make(pair[1])
        request, wsizes = mkdir_request(1, b"d0", 0o755, 3)
        assert fast.serve(_chain(request, wsizes)) == -1
        assert not (shares[1] / "d0").exists()
    finally:
        _close(pair)
