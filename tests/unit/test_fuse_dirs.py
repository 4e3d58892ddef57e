"""Directory ops (daemon/fuse/dirs.py) driven through FuseSession.handle."""

import errno
import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from daemon.config import CacheMode
from daemon.fuse import abi, dirs
from daemon.fuse.abi import Opcode
from daemon.fuse.handles import KIND_DIR
from daemon.fuse.request import FUSEError, Request
from daemon.virtio.iovec import IoVec
from tests.unit.fusereq import module_handlers, parse_direntplus, parse_dirents, run_handler, without_cap

DIR_OPS = module_handlers(dirs)  # opcode -> handler (daemon/fuse/ops.py)


def list_all(fuse, nodeid, fh, size=4096, plus=False, cookie=0):
    """Every entry from ``cookie`` on, READDIR after READDIR; (entries, calls)."""
    entries, calls = [], 0
    while True:
        batch = fuse.readdir(nodeid, fh, cookie, size, plus)
        calls += 1
        if not batch:
            return entries, calls
        entries += batch
        cookie = batch[-1].off


def refcount(fuse, nodeid):
    info = fuse.session.inodes.get(nodeid)
    return 0 if info is None else info[3]


# -- READDIR -----------------------------------------------------------------------------

def test_ten_thousand_entries_each_listed_exactly_once(fuse, share):
    names = {f"entry-{i:05d}-{'x' * (i % 40)}" for i in range(10_000)}
    for name in names:
        (share / name).touch()
    fh = fuse.opendir(1)
    entries, calls = list_all(fuse, 1, fh)
    listed = [e.name.decode() for e in entries]
    assert len(listed) == len(set(listed)) == len(names) + 2
    assert set(listed) == names | {".", ".."}
    assert calls > 100  # really many requests, each within 4096 bytes
    by_name = {e.name.decode(): e for e in entries}
    for name in ("entry-00042-xx", "."):
        st_ = os.lstat(share / name)
        assert by_name[name].ino == st_.st_ino
        assert by_name[name].type == stat.S_IFMT(st_.st_mode) >> 12


def test_cookies_stay_valid_across_handles_and_rewind(fuse, share):
    for i in range(500):
        (share / f"f{i}").touch()
    fh = fuse.opendir(1)
    first, _ = list_all(fuse, 1, fh)
    # telldir/seekdir: resume from a cookie in the middle, on a new handle
    middle = first[200].off
    fh2 = fuse.opendir(1)
    rest, _ = list_all(fuse, 1, fh2, cookie=middle)
    assert [e.name for e in rest] == [e.name for e in first[201:]]
    # rewinddir on the first handle gives the same listing again
    again, _ = list_all(fuse, 1, fh)
    assert [e.name for e in again] == [e.name for e in first]
    # and seeking backwards on a handle that is mid-stream
    assert fuse.readdir(1, fh2, first[10].off)[0].name == first[11].name


def test_readdir_never_exceeds_the_size_or_the_writable_part(fuse, share):
    for i in range(50):
        (share / ("n" * 200 + str(i))).touch()
    fh = fuse.opendir(1)
    # room for one long name (or "." and ".." together) per call
    entries, calls = list_all(fuse, 1, fh, size=abi.dirent_size(202))
    assert len(entries) == 52 and calls == 52
    # the request asks for 4096 but the writable part holds only 300 bytes
    reply = fuse.call(Opcode.READDIR, 1, abi.READ_IN.pack(fh, 0, 4096, 0, 0, 0), 300)
    assert 0 < len(reply.ok()) <= 300
    parse_dirents(reply.payload)
    # a record that fits nowhere: empty reply, and nothing lost
    assert fuse.readdir(1, fh, 0, size=abi.DIRENT.size) == []
    assert len(list_all(fuse, 1, fh)[0]) == 52


def test_new_entries_show_up_after_rewind(fuse, share):
    fh = fuse.opendir(1)
    assert {e.name for e in list_all(fuse, 1, fh)[0]} == {b".", b".."}
    (share / "late").touch()
    assert {e.name for e in list_all(fuse, 1, fh)[0]} == {b".", b"..", b"late"}


_NAME = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1,
                max_size=40).filter(lambda n: n not in (".", "..") and len(n.encode()) <= 255)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.sets(_NAME, max_size=120), size=st.integers(min_value=abi.dirent_size(1), max_value=8192))
def test_readdir_and_readdirplus_walk_the_same_stream(connect, share, names, size):
    """READDIR's own loop (_fill_names) and READDIRPLUS's general one
    (_fill) list the same names with the same cookies, each once, within
    any request size."""
    d = share / "d"
    d.mkdir()
    try:
        for name in names:
            (d / name).touch()
        # room for the longest name: a record that fits nowhere ends a listing
        size = max([size] + [abi.dirent_size(len(n.encode())) for n in names])
        fuse = connect()
        nodeid = fuse.lookup(1, "d")
        fh = fuse.opendir(nodeid)
        plain, _ = list_all(fuse, nodeid, fh, size=size)
        plus, _ = list_all(fuse, nodeid, fh, size=max(size, abi.direntplus_size(160)), plus=True)
        assert [(e.name, e.off, e.ino) for e in plain] == [(e.name, e.off, e.ino) for e in plus]
        assert sorted(e.name for e in plain) == sorted([b".", b".."] + [n.encode() for n in names])
    finally:
        for name in names:
            (d / name).unlink()
        d.rmdir()


def test_a_malformed_host_record_is_eio_or_ends_the_reply(fuse, share, monkeypatch):
    """A getdents64 buffer that does not parse (a host bug, or a hostile
    FUSE file system under the share) is EIO before any record and ends
    the reply after some; the next request starts over cleanly."""
    for i in range(3):
        (share / f"f{i}").touch()
    fh = fuse.opendir(1)
    good = dirs._getdents64
    record = dirs.LINUX_DIRENT64.pack(7, 1, 24, 8) + b"ok\0\0\0"
    for bad in (dirs.LINUX_DIRENT64.pack(7, 1, 200, 8) + b"x\0",  # reclen past the end
                dirs.LINUX_DIRENT64.pack(7, 1, 24, 8) + b"nonul"):   # no NUL in the record
        monkeypatch.setattr(dirs, "_getdents64", lambda fd, bad=bad: bad)
        assert fuse.call(Opcode.READDIR, 1, abi.READ_IN.pack(fh, 0, 4096, 0, 0, 0), 4096).error == errno.EIO
        monkeypatch.setattr(dirs, "_getdents64", lambda fd, bad=bad: record + bad)
        got = parse_dirents(fuse.call(Opcode.READDIR, 1, abi.READ_IN.pack(fh, 0, 4096, 0, 0, 0), 4096).ok())
        assert [(e.name, e.ino, e.off) for e in got] == [(b"ok", 7, 1)]
    monkeypatch.setattr(dirs, "_getdents64", good)
    assert {e.name for e in list_all(fuse, 1, fh)[0]} == {b".", b"..", b"f0", b"f1", b"f2"}


def test_opendir_refuses_non_directories(fuse, share):
    (share / "file").touch()
    os.mkfifo(share / "fifo")
    os.mknod(share / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.symlink("/", share / "host-root")  # must not list the host's /
    for name in ("file", "fifo", "null", "host-root"):
        nodeid = fuse.lookup(1, name)
        reply = fuse.call(Opcode.OPENDIR, nodeid, abi.OPEN_IN.pack(os.O_RDONLY, 0), 16)
        assert reply.error == errno.ENOTDIR, name
    assert len(fuse.session.handles) == 0


@pytest.mark.parametrize("cache, flags", [(CacheMode.NEVER, 0), (CacheMode.AUTO, 0),
                                          (CacheMode.ALWAYS, abi.FOPEN_CACHE_DIR | abi.FOPEN_KEEP_CACHE)])
def test_opendir_flags_follow_the_cache_mode(connect, cache, flags):
    fuse = connect(cache=cache)
    reply = fuse.call(Opcode.OPENDIR, 1, abi.OPEN_IN.pack(os.O_RDONLY, 0), 16).ok()
    assert abi.OPEN_OUT.unpack(reply)[1] == flags


def test_releasedir_fsyncdir_and_handle_kinds(fuse, share):
    (share / "f").touch()
    fh = fuse.opendir(1)
    fuse.call(Opcode.FSYNCDIR, 1, abi.FSYNC_IN.pack(fh, 0), 0).ok()
    fuse.call(Opcode.FSYNCDIR, 1, abi.FSYNC_IN.pack(fh, abi.FUSE_FSYNC_FDATASYNC), 0).ok()
    nodeid = fuse.lookup(1, "f")
    ffh, _ = fuse.open(nodeid, os.O_RDONLY)
    assert fuse.call(Opcode.READDIR, 1, abi.READ_IN.pack(ffh, 0, 4096, 0, 0, 0)).error == errno.EBADF
    assert fuse.release(nodeid, fh).error == errno.EBADF  # RELEASE of a dir handle
    fuse.release(1, fh, Opcode.RELEASEDIR).ok()
    assert fuse.call(Opcode.READDIR, 1, abi.READ_IN.pack(fh, 0, 4096, 0, 0, 0)).error == errno.EBADF
    assert fuse.release(1, fh, Opcode.RELEASEDIR).error == errno.EBADF


def test_bad_cookie_is_einval(fuse):
    fh = fuse.opendir(1)
    reply = fuse.call(Opcode.READDIR, 1, abi.READ_IN.pack(fh, 1 << 63, 4096, 0, 0, 0))
    assert reply.error == errno.EINVAL


# -- READDIRPLUS ---------------------------------------------------------------------------

def test_readdirplus_counts_one_lookup_per_entry_and_none_for_dots(fuse, share):
    (share / "sub").mkdir()
    for i in range(300):
        (share / f"file{i}").write_bytes(b"x" * i)
    fh = fuse.opendir(1)
    entries, calls = list_all(fuse, 1, fh, plus=True)
    assert calls > 10
    names = [e.name for e in entries]
    assert len(names) == len(set(names)) == 303
    seen: dict[int, int] = {}
    for e in entries:
        if e.name in (b".", b".."):
            assert e.nodeid == 0 and e.entry[1] == 0  # no nodeid, no generation
            st_ = os.lstat(share / e.name.decode())
            assert e.ino == st_.st_ino and e.type == stat.S_IFMT(st_.st_mode) >> 12
            continue
        assert e.nodeid > 1
        seen[e.nodeid] = seen.get(e.nodeid, 0) + 1
        attr = abi.ATTR.unpack(abi.ENTRY_OUT.pack(*e.entry)[40:])
        st_ = os.lstat(share / e.name.decode())
        assert attr[0] == e.ino == st_.st_ino
        assert attr[1] == st_.st_size and attr[9] == st_.st_mode
        assert e.type == stat.S_IFMT(st_.st_mode) >> 12
    assert len(seen) == 301
    # a second listing counts again: the kernel links every entry it gets
    entries2, _ = list_all(fuse, 1, fh, plus=True)
    for nodeid, count in seen.items():
        assert refcount(fuse, nodeid) == 2 * count
    # FORGET with the counts the kernel would send frees them all
    for nodeid, count in seen.items():
        fuse.forget(nodeid, 2 * count)
    assert len(fuse.session.inodes) == 0


def test_readdirplus_looks_up_only_what_fits(fuse, share):
    for i in range(20):
        (share / f"f{i:02d}").touch()
    fh = fuse.opendir(1)
    # room for exactly one record per call (names are 3 bytes)
    size = abi.direntplus_size(3)
    cookie, got = 0, []
    while True:
        batch = fuse.readdir(1, fh, cookie, size, plus=True)
        if not batch:
            break
        assert len(batch) == 1
        got += batch
        cookie = batch[-1].off
    files = [e for e in got if e.name.startswith(b"f")]
    assert len(files) == 20
    assert all(refcount(fuse, e.nodeid) == 1 for e in files)
    assert len(fuse.session.inodes) == 20
    # too small for any record: nothing looked up
    assert fuse.readdir(1, fh, 0, size - 8, plus=True) == []
    assert len(fuse.session.inodes) == 20


def test_readdirplus_skips_entries_that_vanished(fuse, share):
    for i in range(100):
        (share / f"f{i:03d}").touch()
    fh = fuse.opendir(1)
    first = fuse.readdir(1, fh, 0, plus=True)  # fills the read-ahead buffer
    listed = {e.name for e in first}
    for i in range(100):
        name = f"f{i:03d}".encode()
        if name not in listed and i % 2:
            os.unlink(share / name.decode())
    rest, _ = list_all(fuse, 1, fh, plus=True, cookie=first[-1].off)
    names = [e.name for e in first + rest]
    assert len(names) == len(set(names))
    assert set(names) == {b".", b".."} | {os.fsencode(n) for n in os.listdir(share)}
    assert all(e.nodeid for e in first + rest if e.name not in (b".", b".."))


def test_readdirplus_lists_entries_it_cannot_look_up_without_a_nodeid(connect, share):
    # a directory the worker may read but not search (it runs without
    # CAP_DAC_OVERRIDE here, as with --modcaps=-dac_override, nor the
    # test process's CAP_DAC_READ_SEARCH): names, no
    # attributes
    (share / "locked").mkdir()
    for i in range(5):
        (share / "locked" / f"f{i}").touch()
    os.chmod(share / "locked", 0o644)
    fuse = connect()
    locked = fuse.lookup(1, "locked")
    with without_cap(1), without_cap(2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        fh = fuse.opendir(locked)
        entries, _ = list_all(fuse, locked, fh, plus=True)
    assert sorted(e.name for e in entries) == [b".", b"..", b"f0", b"f1", b"f2", b"f3", b"f4"]
    assert all(e.nodeid == 0 for e in entries)
    assert len(fuse.session.inodes) == 1  # only "locked" itself


def test_readdirplus_out_buffer_smaller_than_size(fuse, share):
    for i in range(40):
        (share / f"f{i}").touch()
    fh = fuse.opendir(1)
    reply = fuse.call(Opcode.READDIRPLUS, 1, abi.READ_IN.pack(fh, 0, 4096, 0, 0, 0), 500)
    entries = parse_direntplus(reply.ok())
    assert len(reply.payload) <= 500 and len(entries) == 500 // abi.direntplus_size(3)


# -- hostile arguments ----------------------------------------------------------------------

@pytest.fixture
def direct(fuse, share):
    for i in range(30):
        (share / f"f{i}").touch()
    return fuse.session, {"fh": fuse.opendir(1)}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=st.sampled_from(sorted(DIR_OPS)), args=st.binary(max_size=48), use_fh=st.booleans(),
       out_size=st.integers(0, 600))
def test_decoders_raise_only_fuse_errors(direct, op, args, use_fh, out_size):
    session, state = direct
    if use_fh and len(args) >= 8:
        args = state["fh"].to_bytes(8, "little") + args[8:]
    out = IoVec([memoryview(bytearray(16 + out_size))])
    req = Request(op, 1, 1, 0, 0, 0, args, None, out)
    try:
        result = run_handler(session, DIR_OPS[op], req)
    except (FUSEError, OSError):
        result = None
    if op in (Opcode.READDIR, Opcode.READDIRPLUS) and result is not None:
        assert len(result) <= out_size
        (parse_dirents if op == Opcode.READDIR else parse_direntplus)(bytes(result))
    if op == Opcode.OPENDIR and result is not None:
        session.handles.close(abi.OPEN_OUT.unpack_from(result)[0], KIND_DIR)
    try:
        session.handles.get(state["fh"], KIND_DIR)
    except FUSEError:
        fd = os.open(str(session.cache.fd(1)), os.O_RDONLY | os.O_DIRECTORY)
        state["fh"] = session.handles.add(fd, 1, KIND_DIR, os.O_RDONLY).fh
