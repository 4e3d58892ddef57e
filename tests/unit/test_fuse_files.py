"""Open-file ops (daemon/fuse/files.py, handles.py) driven through FuseSession.handle."""

import errno
import fcntl
import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from daemon.config import CacheMode
from daemon.fuse import abi, files
from daemon.fuse.abi import Opcode
from daemon.fuse.handles import KIND_FILE
from daemon.fuse.request import FUSEError, Request
from daemon.virtio.iovec import IoVec
from tests.unit.fusereq import NUL, chain, FuseClient, in_header, module_handlers, parse_reply, run_handler, without_cap

FILE_HANDLERS = module_handlers(files)  # opcode -> handler (daemon/fuse/ops.py)

MiB = 1 << 20


def host_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- OPEN / CREATE -------------------------------------------------------------------------

def test_create_write_read_round_trip(fuse, share):
    nodeid, fh = fuse.create(1, "data")
    assert nodeid > 1 and fh != 0
    payload = bytes(range(256)) * 64  # 16 KiB
    assert abi.WRITE_OUT.unpack(fuse.write(nodeid, fh, 0, payload).ok()) == (len(payload),)
    assert abi.WRITE_OUT.unpack(fuse.write(nodeid, fh, 100_000, b"tail").ok()) == (4,)
    assert (share / "data").read_bytes()[:len(payload)] == payload
    assert fuse.read(nodeid, fh, 0, len(payload)).ok() == payload
    assert fuse.read(nodeid, fh, 100_000, 4096).ok() == b"tail"  # short read = EOF
    assert fuse.read(nodeid, fh, 200_000, 4096).ok() == b""
    fuse.release(nodeid, fh).ok()


def test_create_takes_one_lookup_and_reports_a_regular_file(fuse):
    nodeid, fh = fuse.create(1, "f", mode=0o640)
    assert fuse.session.inodes.get(nodeid)[3] == 1
    assert fuse.lookup(1, "f") == nodeid
    assert fuse.session.inodes.get(nodeid)[3] == 2
    fuse.release(nodeid, fh).ok()


def test_large_io_is_bounded_by_max_write_and_the_writable_part(fuse, share):
    (share / "big").write_bytes(os.urandom(3 * MiB))
    nodeid = fuse.lookup(1, "big")
    fh, _ = fuse.open(nodeid, os.O_RDONLY)
    # asked for 2 MiB with room for 2 MiB: clipped to max_write (1 MiB)
    assert len(fuse.read(nodeid, fh, 0, 2 * MiB).ok()) == MiB
    # asked for 64 KiB with room for 100 bytes: clipped to the room
    data = fuse.read(nodeid, fh, 10, 65536, out_size=100).ok()
    assert data == (share / "big").read_bytes()[10:110]
    # more than max_write, or a size that is not the data present: EINVAL
    wfh, _ = fuse.open(nodeid, os.O_WRONLY)
    assert fuse.write(nodeid, wfh, 0, bytes(MiB + 1)).error == errno.EINVAL
    assert fuse.write(nodeid, wfh, 0, b"abc", size=4).error == errno.EINVAL
    assert fuse.write(nodeid, wfh, 0, b"abcd", size=3).error == errno.EINVAL
    assert abi.WRITE_OUT.unpack(fuse.write(nodeid, wfh, 0, bytes(MiB)).ok()) == (MiB,)
    # offsets the kernel's loff_t cannot hold
    assert fuse.read(nodeid, fh, 1 << 63, 10).error == errno.EINVAL
    assert fuse.write(nodeid, wfh, 1 << 63, b"x").error == errno.EINVAL


def test_write_data_split_over_many_buffers_lands_in_order(fuse, share):
    nodeid, fh = fuse.create(1, "split")
    data = os.urandom(10000)
    args = abi.WRITE_IN.pack(fh, 5, len(data), 0, 0, 0)
    # data in 7-byte descriptors, as a guest with scattered pages would send it
    request = in_header(Opcode.WRITE, nodeid, 40 + len(data), 99) + args + data
    cuts = tuple(range(80, len(request), 7))
    readable, writable, out = chain(request, 8, (40, *cuts))
    fuse.session.handle(readable, writable)
    assert abi.WRITE_OUT.unpack(parse_reply(out, 99).ok()) == (len(data),)
    assert (share / "split").read_bytes() == bytes(5) + data


def test_open_refuses_special_files_without_opening_them(fuse, share):
    os.mkfifo(share / "fifo")  # opening it O_RDONLY would block the worker
    os.mknod(share / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.symlink("/etc/passwd", share / "link")
    (share / "dir").mkdir()
    for name, err in (("fifo", errno.EACCES), ("null", errno.EACCES), ("link", errno.ELOOP),
                      ("dir", errno.EISDIR)):
        nodeid = fuse.lookup(1, name)
        for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
            reply = fuse.call(Opcode.OPEN, nodeid, abi.OPEN_IN.pack(flags, 0), 16)
            assert reply.error == err, (name, flags)
    assert len(fuse.session.handles) == 0


def test_create_over_an_existing_special_file_is_refused(fuse, share):
    os.mkfifo(share / "fifo")
    os.symlink("/etc/passwd", share / "link")
    for name, err in (("fifo", errno.EACCES), ("link", errno.ELOOP)):
        args = abi.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o100644, 0, 0) + name.encode() + NUL
        assert fuse.call(Opcode.CREATE, 1, args, 144).error == err
        args = abi.CREATE_IN.pack(os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o100644, 0, 0) + name.encode() + NUL
        assert fuse.call(Opcode.CREATE, 1, args, 144).error == errno.EEXIST
    # an existing regular file without O_EXCL is opened (and truncated if asked)
    (share / "old").write_bytes(b"0123456789")
    args = abi.CREATE_IN.pack(os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o100644, 0, 0) + b"old\0"
    fuse.call(Opcode.CREATE, 1, args, 144).ok()
    assert (share / "old").read_bytes() == b""
    # a type other than S_IFREG is EINVAL; access mode 3 is EINVAL
    args = abi.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, stat.S_IFIFO | 0o644, 0, 0) + b"p\0"
    assert fuse.call(Opcode.CREATE, 1, args, 144).error == errno.EINVAL
    args = abi.CREATE_IN.pack(3 | os.O_CREAT, 0o100644, 0, 0) + b"q\0"
    assert fuse.call(Opcode.CREATE, 1, args, 144).error == errno.EINVAL
    assert not (share / "p").exists() and not (share / "q").exists()


@pytest.mark.parametrize("cache, flags", [(CacheMode.NEVER, abi.FOPEN_DIRECT_IO),
                                          (CacheMode.AUTO, 0),
                                          (CacheMode.ALWAYS, abi.FOPEN_KEEP_CACHE)])
def test_open_flags_follow_the_cache_mode(connect, share, cache, flags):
    fuse = connect(cache=cache)
    (share / "f").write_bytes(b"x")
    nodeid = fuse.lookup(1, "f")
    assert fuse.open(nodeid, os.O_RDONLY)[1] == flags


def test_o_append_appends_at_the_host_end_of_file(fuse, share):
    (share / "log").write_bytes(b"first\n")
    nodeid = fuse.lookup(1, "log")
    fh, _ = fuse.open(nodeid, os.O_WRONLY | os.O_APPEND)
    # the guest's offset is stale (another writer grew the file meanwhile)
    with open(share / "log", "ab") as f:
        f.write(b"host\n")
    fuse.write(nodeid, fh, 6, b"guest\n").ok()
    assert (share / "log").read_bytes() == b"first\nhost\nguest\n"


def host_flags(fuse, fh) -> int:
    return fcntl.fcntl(fuse.session.handles.get(fh, KIND_FILE).fd, fcntl.F_GETFL)


def test_writeback_opens_write_only_files_readable_and_without_o_append(connect, share):
    """Under WRITEBACK_CACHE the guest reads a page in before writing part
    of it, on the fh it writes with, and places appends itself."""
    fuse = connect(writeback=True)
    (share / "log").write_bytes(b"first\n")
    nodeid = fuse.lookup(1, "log")
    fh, _ = fuse.open(nodeid, os.O_WRONLY | os.O_APPEND)
    flags = host_flags(fuse, fh)
    assert flags & os.O_ACCMODE == os.O_RDWR and not flags & os.O_APPEND
    assert fuse.read(nodeid, fh, 0, 4096).ok() == b"first\n"
    fuse.write(nodeid, fh, 6, b"guest\n").ok()  # the guest's own end of file
    fuse.write(nodeid, fh, 0, b"F").ok()         # not appended
    assert (share / "log").read_bytes() == b"First\nguest\n"
    # CREATE, new and existing, alike
    new, cfh = fuse.create(1, "new", os.O_WRONLY | os.O_APPEND)
    assert host_flags(fuse, cfh) & (os.O_ACCMODE | os.O_APPEND) == os.O_RDWR
    again = fuse.call(Opcode.CREATE, 1, abi.CREATE_IN.pack(os.O_WRONLY | os.O_CREAT, 0o100644, 0, 0)
                      + b"log" + NUL, 144).ok()
    efh = abi.OPEN_OUT.unpack_from(again, abi.ENTRY_OUT.size)[0]
    assert host_flags(fuse, efh) & os.O_ACCMODE == os.O_RDWR
    # read-only stays read-only
    rfh, _ = fuse.open(nodeid, os.O_RDONLY)
    assert host_flags(fuse, rfh) & os.O_ACCMODE == os.O_RDONLY


def test_writeback_opens_a_file_nobody_may_read_read_write(connect, share):
    """Files are opened with the worker's credentials (the guest checked the
    caller's): under --writeback a write-only open becomes read-write even
    on a mode-0200 file, so the guest can fill the pages it writes part of."""
    fuse = connect(writeback=True)
    (share / "drop").write_bytes(b"x")
    os.chown(share / "drop", 1000, 1000)
    os.chmod(share / "drop", 0o200)
    nodeid = fuse.lookup(1, "drop")
    user = FuseClient(fuse.session, uid=1000, gid=1000)
    fh, _ = user.open(nodeid, os.O_WRONLY | os.O_APPEND)
    flags = host_flags(fuse, fh)
    assert flags & os.O_ACCMODE == os.O_RDWR and not flags & os.O_APPEND
    user.write(nodeid, fh, 0, b"y").ok()
    assert user.read(nodeid, fh, 0, 1).ok() == b"y"


def test_writeback_keeps_a_file_the_worker_cannot_read_write_only(connect, share):
    """Without CAP_DAC_OVERRIDE (--modcaps=-dac_override) the host refuses
    the read-write upgrade of a write-only file: it stays write-only."""
    fuse = connect(writeback=True)
    (share / "drop").write_bytes(b"x")
    os.chmod(share / "drop", 0o200)
    nodeid = fuse.lookup(1, "drop")
    with without_cap(1):  # CAP_DAC_OVERRIDE
        fh, _ = fuse.open(nodeid, os.O_WRONLY | os.O_APPEND)
        flags = host_flags(fuse, fh)
        assert flags & os.O_ACCMODE == os.O_WRONLY and not flags & os.O_APPEND
        fuse.write(nodeid, fh, 0, b"y").ok()
        assert fuse.read(nodeid, fh, 0, 1).error == errno.EBADF
        os.chmod(share / "drop", 0o400)
        assert fuse.call(Opcode.OPEN, nodeid, abi.OPEN_IN.pack(os.O_WRONLY, 0), 16).error == errno.EACCES


def test_without_writeback_write_only_and_o_append_stay(fuse, share):
    (share / "f").write_bytes(b"abc")
    nodeid = fuse.lookup(1, "f")
    fh, _ = fuse.open(nodeid, os.O_WRONLY | os.O_APPEND)
    assert host_flags(fuse, fh) & (os.O_ACCMODE | os.O_APPEND) == os.O_WRONLY | os.O_APPEND


def test_o_direct_is_dropped_on_the_host(fuse, share):
    (share / "f").write_bytes(b"abc")
    nodeid = fuse.lookup(1, "f")
    fh, _ = fuse.open(nodeid, os.O_RDONLY | os.O_DIRECT)
    handle = fuse.session.handles.get(fh, KIND_FILE)
    assert not fcntl.fcntl(handle.fd, fcntl.F_GETFL) & os.O_DIRECT
    assert fuse.read(nodeid, fh, 1, 100).ok() == b"bc"  # unaligned: fine


def test_allow_direct_io_keeps_o_direct_on_the_host(connect, share):
    fuse = connect(allow_direct_io=True)
    (share / "f").write_bytes(b"abc")
    nodeid = fuse.lookup(1, "f")
    fh, _ = fuse.open(nodeid, os.O_RDONLY | os.O_DIRECT)
    assert host_flags(fuse, fh) & os.O_DIRECT
    _, cfh = fuse.create(1, "new", os.O_RDWR | os.O_DIRECT)
    assert host_flags(fuse, cfh) & os.O_DIRECT
    plain, _ = fuse.open(nodeid, os.O_RDONLY)
    assert not host_flags(fuse, plain) & os.O_DIRECT


def test_unknown_and_released_handles_are_ebadf(fuse, share):
    (share / "f").write_bytes(b"abc")
    nodeid = fuse.lookup(1, "f")
    fh, _ = fuse.open(nodeid, os.O_RDONLY)
    dfh = fuse.opendir(1)
    assert fuse.read(nodeid, fh + 1000, 0, 10).error == errno.EBADF
    assert fuse.read(1, dfh, 0, 10).error == errno.EBADF  # a directory handle
    fuse.release(nodeid, fh).ok()
    assert fuse.read(nodeid, fh, 0, 10).error == errno.EBADF
    assert fuse.release(nodeid, fh).error == errno.EBADF


def test_open_file_table_is_bounded(connect, share):
    fuse = connect(max_open_files=3)
    (share / "f").write_bytes(b"abc")
    nodeid = fuse.lookup(1, "f")
    fds_before = host_fds()
    fhs = [fuse.open(nodeid, os.O_RDONLY)[0] for _ in range(3)]
    assert fuse.call(Opcode.OPEN, nodeid, abi.OPEN_IN.pack(os.O_RDONLY, 0), 16).error == errno.ENFILE
    # CREATE checks for room before it looks anything up: no count taken
    args = abi.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o100644, 0, 0) + b"new\0"
    assert fuse.call(Opcode.CREATE, 1, args, 144).error == errno.ENFILE
    assert not (share / "new").exists()
    assert host_fds() == fds_before + 3
    fuse.release(nodeid, fhs.pop()).ok()
    fhs.append(fuse.open(nodeid, os.O_RDONLY)[0])
    assert len(set(fhs)) == 3 and 0 not in fhs


def test_init_and_destroy_close_every_open_file(fuse, share):
    (share / "f").write_bytes(b"abc")
    nodeid = fuse.lookup(1, "f")
    for _ in range(5):
        fuse.open(nodeid, os.O_RDONLY)
    fuse.opendir(1)
    assert len(fuse.session.handles) == 6
    fuse.call(Opcode.DESTROY, 0, b"", 0)
    assert len(fuse.session.handles) == 0


# -- FLUSH / FSYNC / RELEASE ------------------------------------------------------------------

def test_flush_fsync_fdatasync(fuse):
    nodeid, fh = fuse.create(1, "f")
    fuse.write(nodeid, fh, 0, b"data").ok()
    fuse.call(Opcode.FLUSH, nodeid, abi.FLUSH_IN.pack(fh, 7), 0).ok()
    fuse.call(Opcode.FSYNC, nodeid, abi.FSYNC_IN.pack(fh, 0), 0).ok()
    fuse.call(Opcode.FSYNC, nodeid, abi.FSYNC_IN.pack(fh, abi.FUSE_FSYNC_FDATASYNC), 0).ok()
    fuse.call(Opcode.SYNCFS, 1, abi.SYNCFS_IN.pack(), 0).ok()
    assert fuse.call(Opcode.FLUSH, nodeid, abi.FLUSH_IN.pack(fh + 1, 7), 0).error == errno.EBADF


# -- FALLOCATE / LSEEK / COPY_FILE_RANGE -------------------------------------------------------------

def test_lseek_finds_data_and_holes_of_a_sparse_file(fuse, share):
    with open(share / "sparse", "wb") as f:
        f.write(b"a" * 4096)
        f.seek(MiB)
        f.write(b"b" * 4096)
    nodeid = fuse.lookup(1, "sparse")
    fh, _ = fuse.open(nodeid, os.O_RDONLY)

    def lseek(offset, whence):
        reply = fuse.call(Opcode.LSEEK, nodeid, abi.LSEEK_IN.pack(fh, offset, whence), 8)
        return reply.error or abi.LSEEK_OUT.unpack(reply.payload)[0]

    assert lseek(0, files.SEEK_DATA) == 0
    assert lseek(0, files.SEEK_HOLE) == 4096
    assert lseek(8192, files.SEEK_DATA) == MiB
    assert lseek(MiB, files.SEEK_HOLE) == MiB + 4096
    assert lseek(MiB + 4096, files.SEEK_DATA) == errno.ENXIO
    assert lseek(0, os.SEEK_END) == MiB + 4096
    assert lseek(0, 5) == errno.EINVAL
    assert lseek(1 << 63, files.SEEK_DATA) in (errno.EINVAL, errno.ENXIO)  # -2^63 as a loff_t


def test_fallocate_punches_holes_and_preallocates(fuse, share):
    path = share / "f"
    path.write_bytes(b"x" * 65536)
    nodeid = fuse.lookup(1, "f")
    fh, _ = fuse.open(nodeid, os.O_RDWR)
    blocks = os.stat(path).st_blocks
    mode = files.FALLOC_FL_PUNCH_HOLE | files.FALLOC_FL_KEEP_SIZE
    fuse.call(Opcode.FALLOCATE, nodeid, abi.FALLOCATE_IN.pack(fh, 16384, 16384, mode), 0).ok()
    data = path.read_bytes()
    assert len(data) == 65536
    assert data == b"x" * 16384 + bytes(16384) + b"x" * 32768
    assert os.stat(path).st_blocks < blocks
    # plain preallocation grows the file
    fuse.call(Opcode.FALLOCATE, nodeid, abi.FALLOCATE_IN.pack(fh, 65536, 4096, 0), 0).ok()
    assert os.stat(path).st_size == 65536 + 4096
    # modes the FUSE client never sends
    collapse = 0x08
    assert fuse.call(Opcode.FALLOCATE, nodeid, abi.FALLOCATE_IN.pack(fh, 0, 4096, collapse),
                     0).error == errno.EOPNOTSUPP
    # a read-only fh: the host says EBADF
    rfh, _ = fuse.open(nodeid, os.O_RDONLY)
    assert fuse.call(Opcode.FALLOCATE, nodeid, abi.FALLOCATE_IN.pack(rfh, 0, 4096, 0), 0).error == errno.EBADF


def test_copy_file_range_between_two_handles(fuse, share):
    (share / "src").write_bytes(bytes(range(256)) * 40)
    src = fuse.lookup(1, "src")
    dst, dst_fh = fuse.create(1, "dst")
    src_fh, _ = fuse.open(src, os.O_RDONLY)

    def copy(off_in, nodeid_out, fh_out, off_out, length, flags=0):
        args = abi.COPY_FILE_RANGE_IN.pack(src_fh, off_in, nodeid_out, fh_out, off_out, length, flags)
        return fuse.call(Opcode.COPY_FILE_RANGE, src, args, 8)

    assert abi.WRITE_OUT.unpack(copy(100, dst, dst_fh, 10, 5000).ok()) == (5000,)
    assert (share / "dst").read_bytes() == bytes(10) + (share / "src").read_bytes()[100:5100]
    # len beyond u32 is clipped, and ends at EOF anyway
    assert abi.WRITE_OUT.unpack(copy(10000, dst, dst_fh, 0, 1 << 40).ok()) == (240,)
    assert copy(0, src, dst_fh, 0, 10).error == errno.EBADF  # fh_out is not on nodeid_out
    assert copy(0, dst, dst_fh + 99, 0, 10).error == errno.EBADF
    assert copy(0, dst, dst_fh, 0, 10, flags=1).error == errno.EINVAL


# -- hostile arguments --------------------------------------------------------------------

FILE_OPS = sorted(FILE_HANDLERS)


@pytest.fixture
def direct(fuse, share):
    """Call handlers directly, as the session would, with arbitrary args;
    ``state["fh"]`` is an open handle on ``state["nodeid"]``."""
    (share / "f").write_bytes(b"abc")
    nodeid = fuse.lookup(1, "f")
    return fuse.session, {"nodeid": nodeid, "fh": fuse.open(nodeid, os.O_RDWR)[0]}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=st.sampled_from(FILE_OPS), args=st.binary(max_size=80), use_fh=st.booleans(),
       data=st.binary(max_size=64), out_size=st.integers(0, 256))
def test_decoders_raise_only_fuse_errors(direct, op, args, use_fh, data, out_size):
    session, state = direct
    nodeid = state["nodeid"]
    if use_fh and len(args) >= 8:
        args = state["fh"].to_bytes(8, "little") + args[8:]  # reach past the fh check
    out = IoVec([memoryview(bytearray(16 + out_size))])
    req = Request(op, 1, nodeid if op != Opcode.CREATE else 1, 0, 0, 0, args,
                  IoVec([memoryview(bytearray(data))]) if op == Opcode.WRITE else None, out)
    try:
        result = run_handler(session, FILE_HANDLERS[op], req)
    except (FUSEError, OSError):
        result = None
    if isinstance(result, int):
        assert 0 <= result <= out_size
    # keep the table small and the fixture's handle open
    if op == Opcode.OPEN and result is not None:
        session.handles.close(abi.OPEN_OUT.unpack_from(result)[0], KIND_FILE)
    if op == Opcode.CREATE and result is not None:
        session.handles.close(abi.OPEN_OUT.unpack_from(result, abi.ENTRY_OUT.size)[0], KIND_FILE)
    try:
        session.handles.get(state["fh"], KIND_FILE)
    except FUSEError:
        fd = os.open(str(session.cache.fd(nodeid)), os.O_RDWR)
        state["fh"] = session.handles.add(fd, nodeid, KIND_FILE, os.O_RDWR).fh


def test_open_file_budget_is_capped_by_the_fd_limit(share, connect):
    """A guest holding every open file it may must leave fds for the rest:
    the budget is at most half of RLIMIT_NOFILE, and at the budget the
    answer is ENFILE while stat and close still work."""
    import resource
    from tests.unit.fusereq import entry_nodeid

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = len(os.listdir("/proc/self/fd"))
    assert open_now + 32 + 8 <= 64, f"{open_now} fds open before the test: an earlier test leaked them"
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        fuse = connect(max_open_files=1000)
        assert fuse.session.handles.max_open_files == 32
        (share / "f").write_bytes(b"x")
        node = entry_nodeid(fuse.call(Opcode.LOOKUP, 1, b"f\0", abi.ENTRY_OUT.size).ok())
        fhs = [fuse.open(node, os.O_RDONLY)[0] for _ in range(32)]
        assert fuse.call(Opcode.OPEN, node, abi.OPEN_IN.pack(os.O_RDONLY, 0), 16).error == errno.ENFILE
        assert fuse.call(Opcode.GETATTR, node, abi.GETATTR_IN.pack(0, 0, 0), abi.ATTR_OUT.size).error == 0
        fuse.call(Opcode.FLUSH, node, abi.FLUSH_IN.pack(fhs[0], 1), 0).ok()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
