"""Build FUSE requests as bytes in IoVecs and parse the replies (unit tests).

A request is laid out as the Linux driver sends it: a readable part split
into the 40-byte in-header, the in-args (and WRITE data as its own buffer),
and a writable part of a 16-byte out-header buffer plus one payload buffer.
``FuseClient`` drives a ``FuseSession`` through ``FuseSession.handle`` with
such chains and decodes what the session wrote back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import os
import select
import time

from daemon.fuse import abi
from daemon.fuse.abi import Opcode
from daemon.fuse.request import DEFERRED
from daemon.virtio.iovec import IoVec

NUL = b"\0"


def in_header(opcode: int, nodeid: int, args_len: int, unique: int,
              uid: int = 0, gid: int = 0, pid: int = 0, extlen: int = 0) -> bytes:
    """``args_len`` counts the extensions too; ``extlen`` is their size in
    units of 8 bytes (total_extlen)."""
    return abi.IN_HEADER.pack(abi.IN_HEADER.size + args_len, opcode, unique, nodeid,
                              uid, gid, pid, extlen, 0)


def supp_group_ext(*groups: int) -> bytes:
    """The FUSE_EXT_GROUPS request extension as Linux >= 6.6 lays it out
    (it sends one group): fuse_ext_header + fuse_supp_groups, 8-aligned."""
    body = abi.SUPP_GROUPS.pack(len(groups)) + b"".join(g.to_bytes(4, "little") for g in groups)
    body += bytes(-(abi.EXT_HEADER.size + len(body)) % 8)
    return abi.EXT_HEADER.pack(abi.EXT_HEADER.size + len(body), abi.FUSE_EXT_GROUPS) + body


@contextlib.contextmanager
def without_cap(cap: int):
    """This thread without one capability in its effective set (as a
    worker started with --modcaps=-cap would be)."""
    from daemon.fuse import credentials
    dropped = credentials._set_effective(cap, False)
    try:
        yield
    finally:
        if dropped:
            credentials._set_effective(cap, True)


def chain(request: bytes, out_size: int, split_at: tuple[int, ...] = ()) -> tuple[IoVec, IoVec, bytearray]:
    """(readable, writable, reply buffer): ``request`` cut into buffers at
    the given offsets; the writable part is a 16-byte header buffer and one
    ``out_size`` payload buffer over a single bytearray (returned)."""
    cuts = [0, *sorted(c for c in split_at if 0 < c < len(request)), len(request)]
    readable = IoVec([memoryview(bytearray(request[a:b])) for a, b in zip(cuts, cuts[1:]) if b > a])
    out = bytearray(abi.OUT_HEADER.size + out_size)
    view = memoryview(out)
    parts = [view[:abi.OUT_HEADER.size]]
    if out_size:
        parts.append(view[abi.OUT_HEADER.size:])
    return readable, IoVec(parts), out


@dataclasses.dataclass
class Reply:
    error: int  # positive errno, 0 for success
    payload: bytes
    unique: int

    def ok(self) -> bytes:
        assert self.error == 0, f"unexpected error {errno.errorcode.get(self.error, self.error)}"
        return self.payload


def parse_reply(out: bytes, unique: int) -> Reply | None:
    """The reply written into ``out``, None if the session wrote nothing."""
    length, error, got_unique = abi.OUT_HEADER.unpack_from(out, 0)
    if length == 0:
        return None
    assert got_unique == unique, (got_unique, unique)
    assert abi.OUT_HEADER.size <= length <= len(out), length
    assert error <= 0
    if error:
        assert length == abi.OUT_HEADER.size, "an error reply carries no payload"
    return Reply(-error, bytes(out[abi.OUT_HEADER.size:length]), got_unique)


# -- reply decoders ----------------------------------------------------------
@dataclasses.dataclass
class Dirent:
    ino: int
    off: int
    type: int
    name: bytes
    nodeid: int = 0  # READDIRPLUS only
    entry: tuple | None = None  # READDIRPLUS: the fuse_entry_out fields


def parse_dirents(payload: bytes) -> list[Dirent]:
    out, pos = [], 0
    while pos < len(payload):
        ino, off, namelen, dtype = abi.DIRENT.unpack_from(payload, pos)
        assert 1 <= namelen <= abi.FUSE_NAME_MAX
        start = pos + abi.DIRENT.size
        out.append(Dirent(ino, off, dtype, payload[start:start + namelen]))
        size = abi.dirent_size(namelen)
        assert payload[start + namelen:pos + size] == bytes(size - abi.DIRENT.size - namelen)
        pos += size
    assert pos == len(payload)
    return out


def parse_direntplus(payload: bytes) -> list[Dirent]:
    out, pos = [], 0
    while pos < len(payload):
        fields = abi.DIRENTPLUS.unpack_from(payload, pos)
        entry, (ino, off, namelen, dtype) = fields[:22], fields[22:]
        assert 1 <= namelen <= abi.FUSE_NAME_MAX
        start = pos + abi.DIRENTPLUS.size
        out.append(Dirent(ino, off, dtype, payload[start:start + namelen], entry[0], entry))
        size = abi.direntplus_size(namelen)
        assert payload[start + namelen:pos + size] == bytes(size - abi.DIRENTPLUS.size - namelen)
        pos += size
    assert pos == len(payload)
    return out


def entry_nodeid(payload: bytes) -> int:
    return abi.ENTRY_OUT.unpack_from(payload, 0)[0]


def entry_attr(payload: bytes) -> tuple:
    """The fuse_attr fields of a fuse_entry_out."""
    return abi.ATTR.unpack_from(payload, 40)


# -- a client ------------------------------------------------------------------
INIT_FLAGS_LINUX_6_1 = 0x7BFFFFFB  # what Debian's 6.1 sends (docs/protocol.md, "Version and INIT")
INIT_FLAGS2_LINUX_6_1 = 0xB


def start_session(shared_dir, capacity: int = 1 << 12, **config):
    """A request-worker FuseSession on ``shared_dir`` after INIT, and its
    client. The caller closes ``session`` and ``session.inodes``; handlers
    reopen fds relative to the cwd /proc/self/fd (tests chdir there)."""
    from daemon.config import Config
    from daemon.fuse.inodes import InodeTable
    from daemon.fuse.session import FuseSession

    inodes = InodeTable(capacity)
    session = FuseSession(Config(shared_dir=str(shared_dir), **config), inodes)
    client = FuseClient(session)
    init = abi.INIT_IN.pack(7, 38, 131072, INIT_FLAGS_LINUX_6_1, INIT_FLAGS2_LINUX_6_1)
    client.call(Opcode.INIT, 0, init, abi.INIT_OUT.size).ok()
    return session, client


def run_handler(session, handler, req):
    """``handler(session, req)`` called straight (decoder tests), with the
    request made current as ``FuseSession.handle`` does, so a handler may
    defer it; a deferred request (FSYNC on a helper thread) is cancelled
    again and gives None."""
    session._current = req
    try:
        result = handler(session, req)
    finally:
        session._current = None
    if result is DEFERRED:
        session.cancel_all()
        return None
    return result


class Pending:
    """A request the session may answer later (a deferred SETLKW)."""

    def __init__(self, out: bytearray, unique: int):
        self.out = out
        self.unique = unique

    def reply(self) -> Reply | None:
        return parse_reply(self.out, self.unique)


class FuseClient:
    """Sends requests to a FuseSession the way the Linux driver lays them out."""

    def __init__(self, session, uid: int = 0, gid: int = 0):
        self.session = session
        self.uid = uid
        self.gid = gid
        self._unique = itertools.count(2)

    def submit(self, opcode: int, nodeid: int, args: bytes = b"", out_size: int = 4096,
               data: bytes | None = None, ext: bytes = b"") -> Pending:
        """Hand one request to the session; its reply may come later.
        ``ext``: request extensions after the args (a multiple of 8 bytes)."""
        unique = next(self._unique)
        args += ext
        body = args + (data or b"")
        request = in_header(opcode, nodeid, len(body), unique, self.uid, self.gid, os.getpid(),
                            len(ext) // 8) + body
        split = (abi.IN_HEADER.size, abi.IN_HEADER.size + len(args))
        readable, writable, out = chain(request, out_size, split)
        self.session.handle(readable, writable, unique)
        return Pending(out, unique)

    def send(self, opcode: int, nodeid: int, args: bytes = b"", out_size: int = 4096,
             data: bytes | None = None) -> Reply | None:
        """One request; the reply, or None when the session sent none (yet)."""
        return self.submit(opcode, nodeid, args, out_size, data).reply()

    def call(self, opcode: int, nodeid: int, args: bytes = b"", out_size: int = 4096,
             data: bytes | None = None, ext: bytes = b"") -> Reply:
        """One request and its reply; one that went to a helper thread
        (FSYNC) is waited for as the worker loop would."""
        pending = self.submit(opcode, nodeid, args, out_size, data, ext)
        reply = pending.reply()
        if reply is None and self.session.wakeup_fd >= 0:
            reply = self.wait(pending)
        assert reply is not None, f"no reply to {Opcode(opcode).name}"
        return reply

    def wait(self, pending: Pending, timeout: float = 10.0) -> Reply | None:
        """Wait for the session's wakeup fd and collect, until ``pending``
        is answered (or ``timeout``); its reply, or None."""
        deadline = time.monotonic() + timeout
        # epoll, as the worker loop waits (the request seccomp list has no
        # select/poll: tests/security runs this under it)
        with select.epoll() as ep:
            ep.register(self.session.wakeup_fd, select.EPOLLIN)
            while True:
                reply = pending.reply()
                left = deadline - time.monotonic()
                if reply is not None or left <= 0 or not self.session.has_pending():
                    return reply
                ep.poll(left)
                self.session.drain_wakeup()
                self.session.retry()

    # -- conveniences ------------------------------------------------------------
    def lookup(self, parent: int, name: str) -> int:
        return entry_nodeid(self.call(Opcode.LOOKUP, parent, os.fsencode(name) + NUL, 128).ok())

    def open(self, nodeid: int, flags: int = os.O_RDWR) -> tuple[int, int]:
        """(fh, open_flags) of a successful OPEN."""
        payload = self.call(Opcode.OPEN, nodeid, abi.OPEN_IN.pack(flags, 0), 16).ok()
        return abi.OPEN_OUT.unpack(payload)

    def create(self, parent: int, name: str, flags: int = os.O_RDWR, mode: int = 0o644) -> tuple[int, int]:
        """(nodeid, fh) of a successful CREATE."""
        args = abi.CREATE_IN.pack(flags | os.O_CREAT, 0o100000 | mode, 0, 0) + os.fsencode(name) + NUL
        payload = self.call(Opcode.CREATE, parent, args, 144).ok()
        return entry_nodeid(payload), abi.OPEN_OUT.unpack_from(payload, abi.ENTRY_OUT.size)[0]

    def opendir(self, nodeid: int) -> int:
        payload = self.call(Opcode.OPENDIR, nodeid, abi.OPEN_IN.pack(os.O_RDONLY | os.O_DIRECTORY, 0), 16).ok()
        return abi.OPEN_OUT.unpack(payload)[0]

    def read(self, nodeid: int, fh: int, offset: int, size: int, out_size: int | None = None) -> Reply:
        args = abi.READ_IN.pack(fh, offset, size, 0, 0, 0)
        return self.call(Opcode.READ, nodeid, args, size if out_size is None else out_size)

    def write(self, nodeid: int, fh: int, offset: int, data: bytes, size: int | None = None) -> Reply:
        args = abi.WRITE_IN.pack(fh, offset, len(data) if size is None else size, 0, 0, 0)
        return self.call(Opcode.WRITE, nodeid, args, abi.WRITE_OUT.size, data)

    def release(self, nodeid: int, fh: int, opcode: int = Opcode.RELEASE, release_flags: int = 0,
                owner: int = 0) -> Reply:
        return self.call(opcode, nodeid, abi.RELEASE_IN.pack(fh, 0, release_flags, owner), 0)

    def readdir(self, nodeid: int, fh: int, cookie: int, size: int = 4096,
                plus: bool = False) -> list[Dirent]:
        opcode = Opcode.READDIRPLUS if plus else Opcode.READDIR
        payload = self.call(opcode, nodeid, abi.READ_IN.pack(fh, cookie, size, 0, 0, 0), size).ok()
        assert len(payload) <= size
        return parse_direntplus(payload) if plus else parse_dirents(payload)

    def forget(self, nodeid: int, nlookup: int) -> None:
        assert self.send(Opcode.FORGET, nodeid, abi.FORGET_IN.pack(nlookup), 0) is None


def module_handlers(module) -> dict:
    """opcode -> handler of the op table's rows (daemon/fuse/ops.py) whose
    handler lives in ``module`` (an op module such as fuse.files)."""
    from daemon.fuse import ops
    return {op: row.handler for op, row in ops.TABLE.items() if row.handler.__module__ == module.__name__}
