"""Plain READDIR served in C (daemon/fuse/_readdir.h, fast_readdir) against
the Python session (dirs.do_readdir, _fill_names).

The pair of sessions of test_readdirplus_in_c (the reference and the
compiled one, from the same start on one share): after every request the
reply bytes, the inode table (READDIR looks nothing up: it stays as it
was), the directory handle's stream state (cookie, position, buffered
records, reseek) and the fds the request opened must be equal, and at the
end the meters' counters; the tests also check that C served what it
should. Some tests write the same made-up getdents64 buffer into both
handles' streams (records a real file system does not give: malformed
ones, a cookie below 0) to compare the decoders.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.fuse import abi, dirs, fastpath
from daemon.fuse.abi import Opcode
from tests.unit.fusereq import in_header
from tests.unit.test_fastops_equivalence import _op_words, _table_state
from tests.unit.test_readdirplus_in_c import Pair, _tree, pairs_of, scratch_share
from tests.unit.test_readdirplus_in_c import records as plus_records


def readdir_request(nodeid: int, fh: int, cookie: int, size: int, unique: int = 9, extlen: int = 0,
                    uid: int = 0, opcode: Opcode = Opcode.READDIR) -> bytes:
    args = abi.READ_IN.pack(fh, cookie, size, 0, 0, 0)
    if extlen:
        args += bytes(8 * extlen)
    return in_header(opcode, nodeid, len(args), unique, uid=uid, gid=uid, extlen=extlen) + args


def records(reply: bytes) -> list[tuple[int, bytes, int, int]]:
    """(ino, name, next cookie, type) of each fuse_dirent in a reply; the
    padding after each name is zero."""
    out, at = [], 16
    while at < len(reply):
        ino, off, namelen, dtype = abi.DIRENT.unpack_from(reply, at)
        end = at + abi.DIRENT.size + namelen
        out.append((ino, reply[at + abi.DIRENT.size:end], off, dtype))
        size = abi.dirent_size(namelen)
        assert reply[end:at + size] == bytes(at + size - end)
        at += size
    assert at == len(reply)
    return out


class NamesPair(Pair):
    """Pair, whose step is a READDIR (or, with plus=True, a READDIRPLUS:
    the first buffer of a names-only listing under READDIRPLUS_AUTO)."""

    def step(self, nodeid: int, fh: int, cookie: int, size: int, wsizes: list[int] | None = None,
             python: bool = False, extlen: int = 0, uid: int = 0, plus: bool = False) -> tuple[bytes, bool]:
        self.unique += 1
        request = readdir_request(nodeid, fh, cookie, size, self.unique, extlen, uid,
                                  Opcode.READDIRPLUS if plus else Opcode.READDIR)
        wsizes = wsizes if wsizes is not None else [16, max(size, 0)]
        pure = self._run(self.sessions[0], None, request, wsizes, False)
        served = self.fast.served
        comp = self._run(self.sessions[1], self.fast, request, wsizes, not python)
        assert comp[:2] == pure[:2]
        assert comp[2] == pure[2] == (0 if not plus else comp[2])
        assert _table_state(self.sessions[1]) == _table_state(self.sessions[0])
        assert self.stream(1, fh) == self.stream(0, fh)
        return pure[1][:pure[0]], self.fast.served > served

    def list_all(self, nodeid: int, fh: int, size: int = 4096, python_every: int = 0) -> list:
        out, cookie, i = [], 0, 0
        while True:
            reply, in_c = self.step(nodeid, fh, cookie, size, python=bool(python_every) and i % python_every == 1)
            assert in_c == (not python_every or i % python_every != 1)
            recs = records(reply)
            if not recs:
                return out
            out += recs
            cookie = recs[-1][2]
            i += 1

    def stream(self, i: int, fh: int):
        """Pair.stream, for made-up buffers too: the records from pos on up
        to the first malformed one, then the raw bytes left (Pair.stream's
        walk never ends at a record length of 0)."""
        h = self.sessions[i].handles._handles.get(fh)
        s = None if h is None else h.dir_stream
        if s is None:
            return None
        head = dirs.LINUX_DIRENT64.size
        left, at = [], s.pos
        while at + head <= len(s.buf):
            ino, off, reclen, dtype = dirs.LINUX_DIRENT64.unpack_from(s.buf, at)
            if reclen <= head or at + reclen > len(s.buf):
                break
            left.append((ino, off, dtype, s.buf[at + head:at + reclen].split(b"\0")[0]))
            at += reclen
        return s.cookie, s.pos, len(s.buf), left, s.buf[at:], s.reseek

    def set_streams(self, fh: int, buf: bytes, pos: int = 0, cookie: int = 777) -> None:
        """The same made-up getdents64 buffer in both handles' streams."""
        for s in self.sessions:
            stream = s.handles._handles[fh].dir_stream
            if stream is None:
                stream = s.handles._handles[fh].dir_stream = dirs.DirStream()
            stream.buf, stream.pos, stream.cookie = buf, pos, cookie


@pytest.fixture
def share(tmp_path):
    cwd = os.getcwd()
    os.chdir("/proc/self/fd")
    root = tmp_path / "share"
    root.mkdir()
    yield root
    os.chdir(cwd)


@pytest.fixture
def pair_of(share):
    yield from pairs_of(share, NamesPair)


def dirent64(ino: int, off: int, dtype: int, name: bytes, reclen: int | None = None) -> bytes:
    """One linux_dirent64 record (name NUL-terminated, padded to 8)."""
    body = dirs.LINUX_DIRENT64.size + len(name) + 1
    size = reclen if reclen is not None else (body + 7) & ~7
    rec = struct.pack("<QqHB", ino, off, size, dtype) + name + b"\0"
    return (rec + bytes(max(size - len(rec), 0)))[:max(size, 0)] if reclen is None or reclen >= len(rec) else rec


def test_extension_has_readdir(pair_of):
    p = pair_of()
    assert fastpath.readdir_unsupported(p.sessions[1]) == ""


def test_an_empty_directory(pair_of, share):
    (share / "empty").mkdir()
    p = pair_of()
    d = p.lookup(1, "empty")
    fh = p.opendir(d)
    reply, in_c = p.step(d, fh, 0, 4096)
    assert in_c
    assert sorted(r[1] for r in records(reply)) == [b".", b".."]
    assert all(r[3] == 4 for r in records(reply))       # DT_DIR
    reply, in_c = p.step(d, fh, records(reply)[-1][2], 4096)
    assert in_c and reply == abi.OUT_HEADER.pack(16, 0, p.unique)
    p.releasedir(d, fh)
    p.meters_equal()


@pytest.mark.parametrize("size", [48, 50, 100, 500, 4096, 32768, 1 << 20])
def test_many_entries_over_several_replies(pair_of, share, size):
    names = _tree(share, 700, 20)
    (share / "sub").mkdir()
    (share / "ln").symlink_to("sub")
    os.mkfifo(share / "fifo")
    p = pair_of()
    before = _table_state(p.sessions[1])
    fh = p.opendir()
    listing = p.list_all(1, fh, size)
    got = sorted(r[1] for r in listing)
    assert got == sorted([b".", b".."] + [n.encode() for n in names + ["sub", "ln", "fifo"]])
    types = {r[1]: r[3] for r in listing}
    assert (types[b"sub"], types[b"ln"], types[b"fifo"], types[names[0].encode()]) == (4, 10, 1, 8)
    inos = {r[1]: r[0] for r in listing}
    assert inos[b"sub"] == os.lstat(share / "sub").st_ino
    # nothing looked up: the table is as it was
    assert _table_state(p.sessions[1]) == before and len(p.sessions[1].inodes) == 0
    p.releasedir(1, fh)
    p.meters_equal()


@pytest.mark.parametrize("size", [0, 1, 23, 24, 31])
def test_sizes_too_small_for_one_record(pair_of, share, size):
    _tree(share, 5)
    p = pair_of()
    fh = p.opendir()
    reply, in_c = p.step(1, fh, 0, size)
    assert in_c and len(reply) == 16
    # a writable part smaller than the size
    reply, in_c = p.step(1, fh, 0, 4096, wsizes=[16, 31])
    assert in_c and len(reply) == 16
    reply, in_c = p.step(1, fh, 0, 4096, wsizes=[16, 32])
    assert in_c and len(records(reply)) == 1
    # the reply split over several writable buffers
    reply, in_c = p.step(1, fh, 0, 4096, wsizes=[10, 7, 33, 4000])
    assert in_c and len(records(reply)) == 7
    p.meters_equal()


def test_c_and_python_interleave_on_one_handle(pair_of, share):
    names = _tree(share, 300, 30)
    p = pair_of()
    fh = p.opendir()
    listing = p.list_all(1, fh, 700, python_every=2)
    assert sorted(r[1] for r in listing) == sorted([b".", b".."] + [n.encode() for n in names])
    p.meters_equal()


@pytest.mark.parametrize("plus_in_c", [True, False])
def test_a_names_only_listing_under_readdirplus_auto(pair_of, share, plus_in_c):
    """The kernel's READDIRPLUS_AUTO: the first buffer READDIRPLUS, every
    later one plain READDIR, on one handle's stream."""
    names = _tree(share, 400, 12)
    p = pair_of()
    fh = p.opendir()
    first, in_c = p.step(1, fh, 0, 4096, plus=True, python=not plus_in_c)
    assert in_c == plus_in_c
    listing = [r[1] for r in plus_records(first)]
    cookie = plus_records(first)[-1][2]
    while True:
        reply, in_c = p.step(1, fh, cookie, 4096)
        assert in_c
        recs = records(reply)
        if not recs:
            break
        listing += [r[1] for r in recs]
        cookie = recs[-1][2]
    assert sorted(listing) == sorted([b".", b".."] + [n.encode() for n in names])
    p.meters_equal()


def test_seek_back_to_zero_and_to_a_middle_cookie(pair_of, share):
    _tree(share, 200, 12)
    p = pair_of()
    fh = p.opendir()
    first = records(p.step(1, fh, 0, 1200)[0])
    second = records(p.step(1, fh, first[-1][2], 1200)[0])
    again, in_c = p.step(1, fh, 0, 1200)         # rewinddir
    assert in_c and again[16:] == b"".join([]) + again[16:] and records(again) == first
    mid = first[len(first) // 2][2]             # seekdir
    back, in_c = p.step(1, fh, mid, 1200)
    assert in_c and records(back)[0][1] == first[len(first) // 2 + 1][1]
    p.step(1, fh, second[1][2], 600, python=True)
    _, in_c = p.step(1, fh, second[3][2], 600)
    assert in_c
    # a cookie past the end: an empty reply
    _, in_c = p.step(1, fh, (1 << 62), 600)
    assert in_c
    p.meters_equal()


def test_a_stream_python_advanced_is_continued(pair_of, share):
    _tree(share, 100, 16)
    p = pair_of()
    fh = p.opendir()
    first, in_c = p.step(1, fh, 0, 500, python=True)
    assert not in_c
    stream = p.sessions[1].handles._handles[fh].dir_stream
    assert stream.pos > 0 and stream.cookie == records(first)[-1][2]
    _, in_c = p.step(1, fh, records(first)[-1][2], 500)
    assert in_c
    p.meters_equal()


def test_entries_unlinked_while_listing(pair_of, share):
    names = _tree(share, 300)
    p = pair_of()
    fh = p.opendir()
    first = records(p.step(1, fh, 0, 2000)[0])
    listed = {r[1] for r in first}
    gone = [n for i, n in enumerate(names) if n.encode() not in listed and i % 3 == 0]
    for n in gone:
        os.unlink(share / n)
    cookie, rest = first[-1][2], []
    while recs := records(p.step(1, fh, cookie, 2000)[0]):
        rest += recs
        cookie = recs[-1][2]
    # names still buffered (up to one 32 KiB buffer old) may be listed
    assert {r[1] for r in first + rest} >= {b".", b".."} | {n.encode() for n in names if n not in gone}
    p.meters_equal()


def test_names_of_max_length(pair_of, share):
    names = [c * 255 for c in "abcdefgh"] + ["z" * 254, "y"]
    for n in names:
        (share / n).touch()
    p = pair_of()
    fh = p.opendir()
    for size in (278, 279, 280, 281, 560, 4096):    # 24 + 255 -> 280
        _, in_c = p.step(1, fh, 0, size)
        assert in_c
    listing = p.list_all(1, fh, 600)
    assert {r[1] for r in listing} == {b".", b".."} | {n.encode() for n in names}
    p.meters_equal()


@pytest.mark.parametrize("config", ["auto", "peers", "always"])
def test_listings_in_each_configuration(pair_of, share, config):
    from daemon.config import CacheMode
    names = _tree(share, 150, 10)
    kw = {"peers": {"peers": True}, "always": {"cache": CacheMode.ALWAYS}}.get(config, {})
    p = pair_of(**kw)
    fh = p.opendir()
    listing = p.list_all(1, fh, 900, python_every=3)
    assert len(listing) == len(names) + 2
    if config == "peers":
        assert all(s_.handles._handles[fh].dir_stream.reseek for s_ in p.sessions)
    p.meters_equal()


@pytest.mark.parametrize("case", ["extension", "released", "unknown", "file-fh", "huge-cookie", "short-args"])
def test_declined_requests_are_python_s(pair_of, share, case):
    """Bad fhs (released, never opened, a file's) and malformed requests
    get Python's reply (EBADF, EINVAL...)."""
    _tree(share, 5)
    p = pair_of()
    fh = p.opendir()
    if case == "extension":
        reply, in_c = p.step(1, fh, 0, 4096, extlen=1)
    elif case == "released":
        p.releasedir(1, fh)
        reply, in_c = p.step(1, fh, 0, 4096)
    elif case == "unknown":
        reply, in_c = p.step(1, fh + 77, 0, 4096)
    elif case == "file-fh":
        nodeid = p.lookup(1, "f0000xxx")
        ffh = [abi.OPEN_OUT.unpack_from(r)[0] for r in p.both(Opcode.OPEN, nodeid, abi.OPEN_IN.pack(0, 0),
                                                                abi.OPEN_OUT.size)][0]
        reply, in_c = p.step(1, ffh, 0, 4096)
    elif case == "huge-cookie":
        reply, in_c = p.step(1, fh, abi.OFFSET_MAX + 1, 4096)
    else:
        request = in_header(Opcode.READDIR, 1, 20, 5) + bytes(20)
        outs = [p._run(s, p.fast if i else None, request, [16, 4096], bool(i)) for i, s in enumerate(p.sessions)]
        assert outs[0][:2] == outs[1][:2]
        reply, in_c = outs[0][1][:outs[0][0]], False
    assert not in_c
    if case in ("released", "unknown", "file-fh"):
        assert abi.OUT_HEADER.unpack_from(reply)[1] == -9       # EBADF
    p.meters_equal()


def test_getdents_errors_before_and_after_some_records(pair_of, share):
    _tree(share, 900, 30)
    p = pair_of()
    fh = p.opendir()
    first = records(p.step(1, fh, 0, 2000)[0])
    for s in p.sessions:
        h = s.handles._handles[fh]
        fd = os.open(share / "f0000xxxxxxxxxxxxxxxxxxxxxxxxx", os.O_RDONLY | os.O_CLOEXEC)
        os.dup2(fd, h.fd)
        os.close(fd)
    reply, in_c = p.step(1, fh, first[-1][2], 1 << 20)
    rest = records(reply)
    assert in_c and 0 < len(rest) < 900 - len(first) + 2
    reply, in_c = p.step(1, fh, rest[-1][2], 1 << 20)
    assert in_c and abi.OUT_HEADER.unpack_from(reply)[1] in (-20, -22)
    reply, in_c = p.step(1, fh, 0, 4096)
    assert in_c and abi.OUT_HEADER.unpack_from(reply)[1] == -20     # ENOTDIR
    p.meters_equal()


def test_readdir_is_counted_under_its_opcode(pair_of, share):
    _tree(share, 4)
    p = pair_of()
    fh = p.opendir()
    p.step(1, fh, 0, 4096)
    p.step(1, fh, 0, 4096)
    assert _op_words(p.sessions[1].meter, Opcode.READDIR)[0] == 2
    assert _op_words(p.sessions[1].meter, Opcode.READDIRPLUS)[0] == 0
    p.meters_equal()


@pytest.mark.parametrize("option", ["announce-submounts", "translate-ids"])
def test_readdir_stays_compiled_when_readdirplus_is_not(pair_of, share, option):
    """READDIR looks nothing up: the options that keep LOOKUP and
    READDIRPLUS in Python leave it C's."""
    from daemon.fuse.idtranslate import Ids, Translation
    config = ({"announce_submounts": True} if option == "announce-submounts"
              else {"ids": Ids(Translation.parse(["map:0:1000:1"]), Translation.parse([]))})
    _tree(share, 5)
    p = pair_of(**config)
    assert fastpath.readdirplus_unsupported(p.sessions[1]) != ""
    assert fastpath.readdir_unsupported(p.sessions[1]) == ""
    fh = p.opendir()
    reply, in_c = p.step(1, fh, 0, 4096)
    assert in_c and len(records(reply)) == 7
    p.meters_equal()


def test_a_replaced_readdir_row_is_python_s(pair_of, share):
    p = pair_of()
    for s in p.sessions:
        s._ops[int(Opcode.READDIR)] = lambda fs, req: dirs.do_readdir(fs, req)
    assert fastpath.readdir_unsupported(p.sessions[1]) != ""
    fast = fastpath.make(p.sessions[1])
    p.fast = fast
    _tree(share, 3)
    fh = p.opendir()
    _, in_c = p.step(1, fh, 0, 4096)
    assert not in_c


def test_made_up_records(pair_of, share):
    """Records a real file system does not give, the same bytes in both
    streams: a name with '/', an empty name, a cookie below 0 (Python's
    struct refuses it: EIO, the stream back where the peek left it; a
    record left out with one is passed), a malformed record after some
    good ones (the good ones go out, the stream is dropped)."""
    (share / "real").touch()
    p = pair_of()
    fh = p.opendir()
    good = [dirent64(100 + i, 1000 + i, 8, f"g{i}".encode()) for i in range(3)]
    cases = [
        b"".join(good),
        good[0] + dirent64(7, 5, 8, b"a/b") + dirent64(8, 6, 8, b"") + good[1],
        good[0] + dirent64(9, -5, 8, b"neg") + good[1],
        good[0] + dirent64(9, -5, 8, b"x/y") + good[1],
        good[0] + good[1] + struct.pack("<QqHB", 1, 2, 5, 8) + b"zz",     # reclen below the head
        good[0] + struct.pack("<QqHB", 1, 2, 400, 8) + b"long",           # past the buffer
        good[0] + struct.pack("<QqHB", 1, 2, 24, 8) + b"nonulxxx",        # no NUL
        good[0] + b"short",
        dirent64(9, -5, 8, b"neg"),
    ]
    for i, buf in enumerate(cases):
        for size, at in ((4096, 0), (40, 0), (4096, len(good[0]))):
            cookie = 777 + i
            p.set_streams(fh, buf, at, cookie)
            _, in_c = p.step(1, fh, cookie, size)
            assert in_c, (i, size)
    p.meters_equal()


_RECORD = st.tuples(st.integers(0, 2**64 - 1), st.integers(-3, 2**63 - 1), st.integers(0, 15),
                    st.binary(min_size=0, max_size=40), st.sampled_from([None, None, None, 0, 5, 19, 20, 64, 300]))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_RECORD, max_size=12), st.integers(0, 600), st.integers(0, 2), st.booleans())
def test_hypothesis_over_made_up_buffers(recs, size, at_record, truncate):
    with scratch_share() as (root, opened):
        open(os.path.join(root, "real"), "w").close()
        p = opened(NamesPair(root))
        fh = p.opendir()
        parts = [dirent64(ino, off, dtype, name.replace(b"\0", b"n"), reclen)
                 for ino, off, dtype, name, reclen in recs]
        buf = b"".join(parts)
        if truncate and buf:
            buf = buf[:-3]
        pos = min(sum(len(x) for x in parts[:at_record]), len(buf))
        p.set_streams(fh, buf, pos, 4242)
        reply, in_c = p.step(1, fh, 4242, size)
        assert in_c
        p.step(1, fh, 4242, 4096)
        p.meters_equal()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.integers(1, 255), max_size=60),
       st.lists(st.tuples(st.integers(0, 3000),
                          st.sampled_from(["next", "next", "zero", "mid", "python", "plus"]),
                          st.integers(0, 5)), min_size=1, max_size=12))
def test_hypothesis_over_sizes_and_trees(namelens, steps):
    with scratch_share() as (root, opened):
        names = []
        for i, n in enumerate(namelens):
            name = (f"{i:03d}" + "n" * 255)[:max(n, 3)]
            path = os.path.join(root, name)
            if i % 7 == 3:
                os.mkdir(path)
            elif i % 11 == 5:
                os.symlink("target", path)
            else:
                open(path, "w").close()
            names.append(name)
        p = opened(NamesPair(root))
        fh = p.opendir()
        cookie, seen = 0, []
        for size, how, unlink in steps:
            if how == "zero":
                cookie = 0
            elif how == "mid" and seen:
                cookie = seen[len(seen) // 2]
            for name in names[:unlink]:
                path = os.path.join(root, name)
                if os.path.lexists(path):
                    if os.path.isdir(path) and not os.path.islink(path):
                        os.rmdir(path)
                    else:
                        os.unlink(path)
            reply, in_c = p.step(1, fh, cookie, size, python=how == "python", plus=how == "plus")
            assert in_c == (how != "python")
            recs = plus_records(reply) if how == "plus" else records(reply)
            seen += [r[2] for r in recs]
            if recs:
                cookie = recs[-1][2]
        p.meters_equal()
