"""A FUSE client over virtio-fs request queues, shaped like Linux 6.1's.

Requests are laid out as ``virtio_fs_enqueue_req`` does (docs/protocol.md, "Request layout"):

    readable: in_header(40) | in-args (one argbuf) | WRITE data in pages
    writable: out_header(16) | out-args (one argbuf) | READ/READDIR/... data in pages

and submitted as one INDIRECT head when there is more than one element
(hiprio FORGET is a single direct 48-byte descriptor with no writable part).
``unique`` values are even and step by 2, as the kernel's fuse_get_unique.

Every op method returns a parsed reply or raises ``FuseErrorReply(errno)``.
The reply is checked like a careful kernel would: out_header.unique must
match, out_header.len must fit the writable part and equal 16 + payload, the
used length the device published must equal out_header.len.

Wire structs come from ``daemon.fuse.abi`` (the one place they are spelled).
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import os
import struct
from collections import namedtuple

from daemon.fuse import abi
from daemon.fuse.abi import Opcode

from .vring import DeviceError, VRing

PAGE = 4096
LINUX_INIT_FLAGS = 0x7BFFFFFB
LINUX_INIT_FLAGS2 = 0xB
LINUX_MAX_READAHEAD = 131072

Attr = namedtuple("Attr", "ino size blocks atime mtime ctime atimensec mtimensec ctimensec "
                          "mode nlink uid gid rdev blksize flags")
Entry = namedtuple("Entry", "nodeid generation entry_valid attr_valid entry_valid_nsec "
                            "attr_valid_nsec attr")
AttrOut = namedtuple("AttrOut", "attr_valid attr_valid_nsec attr")
OpenOut = namedtuple("OpenOut", "fh open_flags")
InitOut = namedtuple("InitOut", "major minor max_readahead flags max_background "
                                "congestion_threshold max_write time_gran max_pages "
                                "map_alignment flags2 raw")
Dirent = namedtuple("Dirent", "ino off type name")
DirentPlus = namedtuple("DirentPlus", "entry ino off type name")
Statfs = namedtuple("Statfs", "blocks bfree bavail files ffree bsize namelen frsize")
Lock = namedtuple("Lock", "start end type pid")
Reply = namedtuple("Reply", "error payload used_len")

F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
OFFSET_MAX = 0x7FFFFFFFFFFFFFFF


class FuseErrorReply(Exception):
    def __init__(self, errno: int, opcode: int | None = None):
        self.errno = errno
        self.opcode = opcode
        name = errno_mod.errorcode.get(errno, str(errno))
        op = Opcode(opcode).name if opcode in Opcode._value2member_map_ else opcode
        super().__init__(f"{op}: {name} ({os.strerror(errno)})")


def reply_errno(fn, *args, **kw) -> int:
    """The errno of the error reply ``fn(*args, **kw)`` gets; AssertionError
    if it succeeds."""
    try:
        result = fn(*args, **kw)
    except FuseErrorReply as e:
        return e.errno
    raise AssertionError(f"expected an error reply, got {result!r}")


def _name(s: str | bytes) -> bytes:
    b = os.fsencode(s) if isinstance(s, str) else s
    return b + b"\0"


def _pages(n: int) -> list[int]:
    out = [PAGE] * (n // PAGE)
    if n % PAGE:
        out.append(n % PAGE)
    return out


def _attr(buf: bytes, off: int = 0) -> Attr:
    return Attr(*abi.ATTR.unpack_from(buf, off))


def parse_entry(buf: bytes, off: int = 0) -> Entry:
    v = abi.ENTRY_OUT.unpack_from(buf, off)
    return Entry(*v[:6], Attr(*v[6:]))


class Pending:
    """A request submitted but not yet completed."""
    __slots__ = ("vring", "head", "unique", "opcode", "noreply")

    def __init__(self, vring: VRing, head: int, unique: int, opcode: int, noreply: bool):
        self.vring, self.head, self.unique, self.opcode, self.noreply = vring, head, unique, opcode, noreply


class FuseClient:
    def __init__(self, vhost, request_queue: int = 1, timeout: float = 10.0,
                 uid: int = 0, gid: int = 0, pid: int = 0, strict_used_len: bool = True):
        self.vhost = vhost
        self.rq: VRing = vhost.vrings[request_queue]
        self.hq: VRing = vhost.vrings[0]
        self.timeout = timeout
        self.uid, self.gid, self.pid = uid, gid, pid
        self.strict_used_len = strict_used_len
        self._unique = 0
        self.init_out: InitOut | None = None
        self.setxattr_ext = False

    # == plumbing ================================================================
    def next_unique(self) -> int:
        self._unique += 2
        return self._unique

    def header(self, opcode: int, nodeid: int, arglen: int, unique: int,
               uid=None, gid=None, pid=None, extlen: int = 0) -> bytes:
        return abi.IN_HEADER.pack(
            abi.IN_HEADER.size + arglen, opcode, unique, nodeid,
            self.uid if uid is None else uid, self.gid if gid is None else gid,
            self.pid if pid is None else pid, extlen, 0)

    def send(self, opcode: int, nodeid: int = 0, args: bytes = b"", out: list[int] = (),
             data: bytes = b"", *, vring: VRing | None = None, uid=None, gid=None, pid=None,
             kick: bool = True, single: bool = False, ext: bytes = b"") -> Pending:
        """Submit one request. ``out`` are the writable element sizes after the
        16-byte out header; an empty ``out`` with ``noreply`` semantics (FORGET)
        means no writable part at all. ``single`` puts header+args in one
        readable descriptor (hiprio FORGET shape). ``ext``: request extensions
        (a multiple of 8 bytes), sent after the args in the same buffer as
        Linux does, and counted in total_extlen."""
        vring = vring or self.rq
        unique = self.next_unique()
        args += ext
        hdr = self.header(opcode, nodeid, len(args) + len(data), unique, uid, gid, pid, len(ext) // 8)
        if single:
            readable = [hdr + args + data]
        else:
            readable = [hdr] + ([args] if args else [])
            if data:
                readable += [data[i:i + PAGE] for i in range(0, len(data), PAGE)]
        noreply = opcode in (Opcode.FORGET, Opcode.BATCH_FORGET)
        writable = [] if noreply else [abi.OUT_HEADER.size] + [n for n in out if n]
        head = vring.submit(readable, writable)
        if kick:
            vring.kick()
        return Pending(vring, head, unique, opcode, noreply)

    def send_raw(self, readable: list[bytes], writable: list[int], *, vring: VRing | None = None,
                 indirect: bool | None = None) -> int:
        """Raw mode: any request bytes (no header is built) and any writable
        sizes (none at all too); kicked. Returns the head for ``raw_reply``."""
        vring = vring or self.rq
        head = vring.submit(readable, writable, indirect)
        vring.kick()
        return head

    def raw_reply(self, head: int, vring: VRing | None = None,
                  timeout: float | None = None) -> tuple[int, int, int, int, bytes]:
        """Wait for a raw request; (used len, out_header.len, error, unique,
        payload), checked only against the writable size."""
        vring = vring or self.rq
        inf = vring.wait(head, self.timeout if timeout is None else timeout)
        used, cap = inf.used_len, inf.writable_size
        raw = vring.read_writable(head, max(used, abi.OUT_HEADER.size)) if cap >= 16 else b""
        vring.free(head)
        if used == 0:
            return 0, 0, 0, 0, b""
        olen, err, uniq = abi.OUT_HEADER.unpack_from(raw)
        if not abi.OUT_HEADER.size <= olen <= cap or used != olen:
            raise DeviceError(f"raw reply: used len {used}, out_header.len {olen}, writable {cap}")
        if err > 0 or err < -4095 or (err and olen != abi.OUT_HEADER.size):
            raise DeviceError(f"raw reply: error {err} with out_header.len {olen}")
        return used, olen, err, uniq, bytes(raw[abi.OUT_HEADER.size:olen])

    def complete(self, p: Pending, timeout: float | None = None) -> Reply:
        v = p.vring
        try:
            inf = v.wait(p.head, self.timeout if timeout is None else timeout)
        except TimeoutError as e:
            raise TimeoutError(f"{Opcode(p.opcode).name} unique {p.unique}: {e}") from None
        used = inf.used_len
        if p.noreply:
            v.free(p.head)
            if used != 0:
                raise DeviceError(f"{Opcode(p.opcode).name}: used len {used} for a no-reply request")
            return Reply(0, b"", 0)
        cap = inf.writable_size
        raw = v.read_writable(p.head, max(used, abi.OUT_HEADER.size))
        v.free(p.head)
        olen, err, uniq = abi.OUT_HEADER.unpack_from(raw)
        name = Opcode(p.opcode).name
        if uniq != p.unique:
            raise DeviceError(f"{name}: reply unique {uniq}, request had {p.unique}")
        if olen < abi.OUT_HEADER.size or olen > cap:
            raise DeviceError(f"{name}: out_header.len {olen} outside 16..{cap}")
        if self.strict_used_len and used != olen:
            raise DeviceError(f"{name}: used len {used} != out_header.len {olen}")
        if err > 0 or err < -4095:
            raise DeviceError(f"{name}: out_header.error {err} is not 0 or -errno")
        if err and olen != abi.OUT_HEADER.size:
            raise DeviceError(f"{name}: error reply with payload (len {olen})")
        if len(raw) < olen:
            raw = raw  # used len < olen tolerated only when not strict
        return Reply(err, bytes(raw[abi.OUT_HEADER.size:olen]), used)

    def call(self, opcode: int, nodeid: int = 0, args: bytes = b"", out: list[int] = (),
             data: bytes = b"", **kw) -> bytes:
        timeout = kw.pop("timeout", None)
        r = self.complete(self.send(opcode, nodeid, args, out, data, **kw), timeout)
        if r.error:
            raise FuseErrorReply(-r.error, opcode)
        return r.payload

    def _expect_len(self, opcode, payload: bytes, n: int) -> bytes:
        if len(payload) != n:
            raise DeviceError(f"{Opcode(opcode).name}: reply payload {len(payload)} bytes, want {n}")
        return payload

    # == session =================================================================
    def init(self, major: int = 7, minor: int = 38, max_readahead: int = LINUX_MAX_READAHEAD,
             flags: int = LINUX_INIT_FLAGS, flags2: int = LINUX_INIT_FLAGS2) -> InitOut:
        args = struct.pack("<5I44x", major, minor, max_readahead, flags, flags2)
        # INIT has force/nocreds: uid/gid/pid 0
        p = self.call(Opcode.INIT, 0, args, [64], uid=0, gid=0, pid=0)
        if len(p) < 8:
            raise DeviceError(f"INIT reply too short: {len(p)}")
        full = p + bytes(64 - len(p)) if len(p) < 64 else p
        v = abi.INIT_OUT.unpack_from(full)
        self.init_out = InitOut(*v, raw=p)
        self.setxattr_ext = bool(v[3] & abi.InitFlag.SETXATTR_EXT)
        return self.init_out

    def destroy(self) -> None:
        self.call(Opcode.DESTROY, 0, uid=0, gid=0, pid=0)

    # == entries =================================================================
    def lookup(self, parent: int, name, **kw) -> Entry:
        return parse_entry(self._expect_len(Opcode.LOOKUP, self.call(
            Opcode.LOOKUP, parent, _name(name), [abi.ENTRY_OUT.size], **kw), 128))

    def forget(self, nodeid: int, nlookup: int = 1, wait: bool = True) -> Pending | None:
        """FORGET on the hiprio queue: one direct 48-byte readable descriptor."""
        p = self.send(Opcode.FORGET, nodeid, abi.FORGET_IN.pack(nlookup), vring=self.hq, single=True)
        if wait:
            self.complete(p)
            return None
        return p

    def batch_forget(self, items: list[tuple[int, int]], wait: bool = True) -> Pending | None:
        args = abi.BATCH_FORGET_IN.pack(len(items)) + b"".join(abi.FORGET_ONE.pack(n, c) for n, c in items)
        p = self.send(Opcode.BATCH_FORGET, 0, args, vring=self.hq, single=True)
        if wait:
            self.complete(p)
            return None
        return p

    def _entry_op(self, opcode, parent, args, **kw) -> Entry:
        return parse_entry(self._expect_len(opcode, self.call(opcode, parent, args, [128], **kw), 128))

    def symlink(self, parent: int, name, target, **kw) -> Entry:
        return self._entry_op(Opcode.SYMLINK, parent, _name(name) + _name(target), **kw)

    def mknod(self, parent: int, name, mode: int, rdev: int = 0, umask: int = 0, **kw) -> Entry:
        return self._entry_op(Opcode.MKNOD, parent, abi.MKNOD_IN.pack(mode, rdev, umask) + _name(name), **kw)

    def mkdir(self, parent: int, name, mode: int = 0o755, umask: int = 0, **kw) -> Entry:
        return self._entry_op(Opcode.MKDIR, parent, abi.MKDIR_IN.pack(mode, umask) + _name(name), **kw)

    def link(self, oldnodeid: int, newparent: int, newname, **kw) -> Entry:
        return self._entry_op(Opcode.LINK, newparent, abi.LINK_IN.pack(oldnodeid) + _name(newname), **kw)

    def unlink(self, parent: int, name, **kw) -> None:
        self.call(Opcode.UNLINK, parent, _name(name), **kw)

    def rmdir(self, parent: int, name, **kw) -> None:
        self.call(Opcode.RMDIR, parent, _name(name), **kw)

    def rename(self, olddir: int, old, newdir: int, new, **kw) -> None:
        self.call(Opcode.RENAME, olddir, abi.RENAME_IN.pack(newdir) + _name(old) + _name(new), **kw)

    def rename2(self, olddir: int, old, newdir: int, new, flags: int, **kw) -> None:
        self.call(Opcode.RENAME2, olddir, abi.RENAME2_IN.pack(newdir, flags) + _name(old) + _name(new), **kw)

    # == attributes ===============================================================
    def getattr(self, nodeid: int, fh: int | None = None, **kw) -> AttrOut:
        args = abi.GETATTR_IN.pack(abi.FUSE_GETATTR_FH if fh is not None else 0, 0, fh or 0)
        p = self._expect_len(Opcode.GETATTR, self.call(Opcode.GETATTR, nodeid, args, [104], **kw), 104)
        v = abi.ATTR_OUT.unpack(p)
        return AttrOut(v[0], v[1], Attr(*v[3:]))

    def setattr(self, nodeid: int, *, mode=None, uid=None, gid=None, size=None, atime=None,
                mtime=None, atime_now=False, mtime_now=False, fh=None, lock_owner=None,
                kill_suidgid=False, valid_extra: int = 0, **kw) -> AttrOut:
        V = abi.SetattrValid
        valid = valid_extra
        a_s = a_ns = m_s = m_ns = 0
        if mode is not None:
            valid |= V.MODE
        if uid is not None:
            valid |= V.UID
        if gid is not None:
            valid |= V.GID
        if size is not None:
            valid |= V.SIZE
        if fh is not None:
            valid |= V.FH
        if lock_owner is not None:
            valid |= V.LOCKOWNER
        if kill_suidgid:
            valid |= V.KILL_SUIDGID
        if atime_now:
            valid |= V.ATIME | V.ATIME_NOW
        elif atime is not None:
            valid |= V.ATIME
            a_s, a_ns = atime
        if mtime_now:
            valid |= V.MTIME | V.MTIME_NOW
        elif mtime is not None:
            valid |= V.MTIME
            m_s, m_ns = mtime
        args = abi.SETATTR_IN.pack(int(valid), fh or 0, size or 0, lock_owner or 0, a_s, m_s, 0,
                                   a_ns, m_ns, 0, mode or 0, uid or 0, gid or 0)
        p = self._expect_len(Opcode.SETATTR, self.call(Opcode.SETATTR, nodeid, args, [104], **kw), 104)
        v = abi.ATTR_OUT.unpack(p)
        return AttrOut(v[0], v[1], Attr(*v[3:]))

    def readlink(self, nodeid: int, **kw) -> bytes:
        return self.call(Opcode.READLINK, nodeid, b"", [PAGE - 1], **kw)

    def statfs(self, nodeid: int = 1, **kw) -> Statfs:
        p = self._expect_len(Opcode.STATFS, self.call(Opcode.STATFS, nodeid, b"", [80], **kw), 80)
        return Statfs(*abi.STATFS_OUT.unpack(p))

    # == files =====================================================================
    def open(self, nodeid: int, flags: int = os.O_RDONLY | os.O_LARGEFILE, open_flags: int = 0, **kw) -> OpenOut:
        p = self._expect_len(Opcode.OPEN,
                             self.call(Opcode.OPEN, nodeid, abi.OPEN_IN.pack(flags, open_flags), [16], **kw), 16)
        return OpenOut(*abi.OPEN_OUT.unpack(p))

    def create(self, parent: int, name, flags: int = os.O_CREAT | os.O_RDWR | os.O_LARGEFILE,
               mode: int = 0o100644, umask: int = 0, open_flags: int = 0, **kw) -> tuple[Entry, OpenOut]:
        args = abi.CREATE_IN.pack(flags, mode, umask, open_flags) + _name(name)
        p = self._expect_len(Opcode.CREATE, self.call(Opcode.CREATE, parent, args, [128, 16], **kw), 144)
        return parse_entry(p), OpenOut(*abi.OPEN_OUT.unpack_from(p, 128))

    def read_args(self, fh: int, offset: int, size: int, lock_owner: int | None = None,
                  flags: int = os.O_RDONLY | os.O_LARGEFILE) -> bytes:
        rf = 2 if lock_owner is not None else 0
        return abi.READ_IN.pack(fh, offset, size, rf, lock_owner or 0, flags)

    def send_read(self, nodeid: int, fh: int, offset: int, size: int, **kw) -> Pending:
        return self.send(Opcode.READ, nodeid, self.read_args(fh, offset, size), _pages(size), **kw)

    def read(self, nodeid: int, fh: int, offset: int, size: int, *, lock_owner=None, **kw) -> bytes:
        p = self.call(Opcode.READ, nodeid, self.read_args(fh, offset, size, lock_owner), _pages(size), **kw)
        if len(p) > size:
            raise DeviceError(f"READ returned {len(p)} bytes for size {size}")
        return p

    def write(self, nodeid: int, fh: int, offset: int, data: bytes, *, write_flags: int = 0,
              lock_owner: int = 0, flags: int = os.O_RDWR | os.O_LARGEFILE, **kw) -> int:
        args = abi.WRITE_IN.pack(fh, offset, len(data), write_flags, lock_owner, flags)
        p = self._expect_len(Opcode.WRITE, self.call(Opcode.WRITE, nodeid, args, [8], data, **kw), 8)
        return abi.WRITE_OUT.unpack(p)[0]

    def flush(self, nodeid: int, fh: int, lock_owner: int = 0, **kw) -> None:
        self.call(Opcode.FLUSH, nodeid, abi.FLUSH_IN.pack(fh, lock_owner), **kw)

    def release(self, nodeid: int, fh: int, flags: int = 0, release_flags: int = 0,
                lock_owner: int = 0, **kw) -> None:
        self.call(Opcode.RELEASE, nodeid, abi.RELEASE_IN.pack(fh, flags, release_flags, lock_owner), **kw)

    def fsync(self, nodeid: int, fh: int, datasync: bool = False, **kw) -> None:
        self.call(Opcode.FSYNC, nodeid, abi.FSYNC_IN.pack(fh, 1 if datasync else 0), **kw)

    def fallocate(self, nodeid: int, fh: int, offset: int, length: int, mode: int = 0, **kw) -> None:
        self.call(Opcode.FALLOCATE, nodeid, abi.FALLOCATE_IN.pack(fh, offset, length, mode), **kw)

    def lseek(self, nodeid: int, fh: int, offset: int, whence: int, **kw) -> int:
        p = self._expect_len(Opcode.LSEEK,
                             self.call(Opcode.LSEEK, nodeid, abi.LSEEK_IN.pack(fh, offset, whence), [8], **kw), 8)
        return abi.LSEEK_OUT.unpack(p)[0]

    def copy_file_range(self, nodeid_in: int, fh_in: int, off_in: int, nodeid_out: int,
                        fh_out: int, off_out: int, length: int, flags: int = 0, **kw) -> int:
        args = abi.COPY_FILE_RANGE_IN.pack(fh_in, off_in, nodeid_out, fh_out, off_out, length, flags)
        p = self._expect_len(Opcode.COPY_FILE_RANGE, self.call(Opcode.COPY_FILE_RANGE, nodeid_in, args, [8], **kw), 8)
        return abi.WRITE_OUT.unpack(p)[0]

    def syncfs(self, **kw) -> None:
        self.call(Opcode.SYNCFS, 1, abi.SYNCFS_IN.pack(), **kw)

    # == directories ===============================================================
    def opendir(self, nodeid: int, flags: int = 0x18800, **kw) -> OpenOut:
        p = self._expect_len(Opcode.OPENDIR,
                             self.call(Opcode.OPENDIR, nodeid, abi.OPEN_IN.pack(flags, 0), [16], **kw), 16)
        return OpenOut(*abi.OPEN_OUT.unpack(p))

    def releasedir(self, nodeid: int, fh: int, flags: int = 0x18800, **kw) -> None:
        self.call(Opcode.RELEASEDIR, nodeid, abi.RELEASE_IN.pack(fh, flags, 0, 0), **kw)

    def fsyncdir(self, nodeid: int, fh: int, datasync: bool = False, **kw) -> None:
        self.call(Opcode.FSYNCDIR, nodeid, abi.FSYNC_IN.pack(fh, 1 if datasync else 0), **kw)

    def readdir(self, nodeid: int, fh: int, offset: int = 0, size: int = PAGE, **kw) -> list[Dirent]:
        p = self.call(Opcode.READDIR, nodeid, self.read_args(fh, offset, size, flags=0x18800), _pages(size), **kw)
        return parse_dirents(p, size)

    def readdirplus(self, nodeid: int, fh: int, offset: int = 0, size: int = PAGE, **kw) -> list[DirentPlus]:
        p = self.call(Opcode.READDIRPLUS, nodeid, self.read_args(fh, offset, size, flags=0x18800), _pages(size), **kw)
        return parse_direntplus(p, size)

    def readdir_all(self, nodeid: int, plus: bool = False, max_calls: int = 100000) -> list:
        """OPENDIR, READDIR(PLUS) until an empty reply, RELEASEDIR."""
        fh = self.opendir(nodeid).fh
        out: list = []
        off = 0
        try:
            for _ in range(max_calls):
                recs = (self.readdirplus if plus else self.readdir)(nodeid, fh, off)
                if not recs:
                    return out
                out.extend(recs)
                off = recs[-1].off
            raise DeviceError("READDIR never reached the end")
        finally:
            self.releasedir(nodeid, fh)

    # == xattrs =====================================================================
    def setxattr(self, nodeid: int, name, value: bytes, flags: int = 0, **kw) -> None:
        if self.setxattr_ext:
            head = struct.pack("<IIII", len(value), flags, 0, 0)
        else:
            head = abi.SETXATTR_IN.pack(len(value), flags)
        self.call(Opcode.SETXATTR, nodeid, head + _name(name) + value, **kw)

    def getxattr(self, nodeid: int, name, size: int, **kw) -> bytes | int:
        """size 0: returns the needed size (int); else the value bytes."""
        args = abi.GETXATTR_IN.pack(size) + _name(name)
        if size == 0:
            p = self._expect_len(Opcode.GETXATTR, self.call(Opcode.GETXATTR, nodeid, args, [8], **kw), 8)
            return abi.GETXATTR_OUT.unpack(p)[0]
        p = self.call(Opcode.GETXATTR, nodeid, args, _pages(size), **kw)
        if len(p) > size:
            raise DeviceError(f"GETXATTR returned {len(p)} > {size}")
        return p

    def listxattr(self, nodeid: int, size: int, **kw) -> list[bytes] | int:
        args = abi.GETXATTR_IN.pack(size)
        if size == 0:
            p = self._expect_len(Opcode.LISTXATTR, self.call(Opcode.LISTXATTR, nodeid, args, [8], **kw), 8)
            return abi.GETXATTR_OUT.unpack(p)[0]
        p = self.call(Opcode.LISTXATTR, nodeid, args, _pages(size), **kw)
        if p and not p.endswith(b"\0"):
            raise DeviceError("LISTXATTR list not NUL-terminated")
        names = p.split(b"\0")[:-1] if p else []
        if any(not n for n in names):
            raise DeviceError("LISTXATTR contains an empty name")
        return names

    def removexattr(self, nodeid: int, name, **kw) -> None:
        self.call(Opcode.REMOVEXATTR, nodeid, _name(name), **kw)

    # == locks ==========================================================================
    def _lk(self, fh, owner, start, end, type_, pid, flock=False) -> bytes:
        return abi.LK_IN.pack(fh, owner, start, end, type_, pid, abi.FUSE_LK_FLOCK if flock else 0)

    def getlk(self, nodeid: int, fh: int, owner: int, start: int = 0, end: int = OFFSET_MAX,
              type_: int = F_WRLCK, pid: int = 0, **kw) -> Lock:
        lk = self._lk(fh, owner, start, end, type_, pid)
        p = self._expect_len(Opcode.GETLK, self.call(Opcode.GETLK, nodeid, lk, [24], **kw), 24)
        return Lock(*abi.LK_OUT.unpack(p))

    def setlk(self, nodeid: int, fh: int, owner: int, start: int = 0, end: int = OFFSET_MAX,
              type_: int = F_WRLCK, pid: int = 0, flock: bool = False, **kw) -> None:
        self.call(Opcode.SETLK, nodeid, self._lk(fh, owner, start, end, type_, pid, flock), **kw)

    def setlkw(self, nodeid: int, fh: int, owner: int, start: int = 0, end: int = OFFSET_MAX,
               type_: int = F_WRLCK, pid: int = 0, flock: bool = False, **kw) -> None:
        self.call(Opcode.SETLKW, nodeid, self._lk(fh, owner, start, end, type_, pid, flock), **kw)

    def send_setlkw(self, nodeid: int, fh: int, owner: int, start: int = 0, end: int = OFFSET_MAX,
                    type_: int = F_WRLCK, pid: int = 0) -> Pending:
        return self.send(Opcode.SETLKW, nodeid, self._lk(fh, owner, start, end, type_, pid))

    def check(self, p: Pending, timeout: float | None = None) -> bytes:
        """Complete a Pending and raise FuseErrorReply on error."""
        r = self.complete(p, timeout)
        if r.error:
            raise FuseErrorReply(-r.error, p.opcode)
        return r.payload


def parse_dirents(buf: bytes, size: int = PAGE) -> list[Dirent]:
    if len(buf) > size:
        raise DeviceError(f"READDIR returned {len(buf)} > {size}")
    out = []
    off = 0
    while off + abi.DIRENT.size <= len(buf):
        ino, noff, namelen, typ = abi.DIRENT.unpack_from(buf, off)
        reclen = abi.dirent_size(namelen)
        if namelen == 0 or namelen > abi.FUSE_NAME_MAX or off + reclen > len(buf):
            raise DeviceError(f"bad dirent at {off}: namelen {namelen}")
        name = bytes(buf[off + 24:off + 24 + namelen])
        if b"/" in name or b"\0" in name:
            raise DeviceError(f"bad dirent name {name!r}")
        out.append(Dirent(ino, noff, typ, name))
        off += reclen
    if off != len(buf):
        raise DeviceError(f"READDIR reply has {len(buf) - off} trailing bytes")
    return out


def parse_direntplus(buf: bytes, size: int = PAGE) -> list[DirentPlus]:
    if len(buf) > size:
        raise DeviceError(f"READDIRPLUS returned {len(buf)} > {size}")
    out = []
    off = 0
    while off + abi.DIRENTPLUS.size <= len(buf):
        entry = parse_entry(buf, off)
        ino, noff, namelen, typ = abi.DIRENT.unpack_from(buf, off + 128)
        reclen = abi.direntplus_size(namelen)
        if namelen == 0 or namelen > abi.FUSE_NAME_MAX or off + reclen > len(buf):
            raise DeviceError(f"bad direntplus at {off}: namelen {namelen}")
        name = bytes(buf[off + 152:off + 152 + namelen])
        if b"/" in name or b"\0" in name:
            raise DeviceError(f"bad direntplus name {name!r}")
        out.append(DirentPlus(entry, ino, noff, typ, name))
        off += reclen
    if off != len(buf):
        raise DeviceError(f"READDIRPLUS reply has {len(buf) - off} trailing bytes")
    return out


@contextlib.contextmanager
def client_without_event_idx(socket_path: str, **options):
    """A FuseClient after INIT on a frontend that offers Linux 6.1's
    features but VIRTIO_RING_F_EVENT_IDX (so it kicks unless
    VRING_USED_F_NO_NOTIFY, and every publish is called); ``options`` as
    for start_frontend. Closed on the way out."""
    from .vhost import F_RING_EVENT_IDX, LINUX_61_DRIVER_FEATURES, start_frontend

    fe = start_frontend(socket_path, driver_features=LINUX_61_DRIVER_FEATURES & ~F_RING_EVENT_IDX, **options)
    try:
        fc = FuseClient(fe)
        fc.init()
        assert not fc.rq.event_idx
        yield fc
    finally:
        fe.close()
