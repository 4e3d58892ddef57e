"""Worker-like workloads for the sandbox tests and for measuring the seccomp
lists (``python -m tests.security.workload --measure``, run under strace).

``runtime_work`` does what any worker does around the FUSE ops (epoll over
eventfds and its channel, fds over SCM_RIGHTS, mmap of a memfd, preadv/
pwritev into it, a short-lived thread, logging); ``fuse_work`` drives a real
``FuseSession`` through every op the request worker implements, as root and
as another uid. Both return a list of "op: what went wrong" strings (empty =
fine); under ``--seccomp kill`` the real proof is that the process survives.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import select
import socket
import sys
import threading

from daemon.fuse import abi
from daemon.fuse.abi import Opcode

NUL = b"\0"


def runtime_work(memfd: int, chan: socket.socket, peer: socket.socket, efd: int,
                 threads: bool = True, file_io: bool = True, log_stream=None) -> list[str]:
    """``efd``: an eventfd made by the parent (workers receive theirs)."""
    problems = []
    ep = select.epoll()
    ep.register(efd, select.EPOLLIN)
    ep.register(chan.fileno(), select.EPOLLIN)
    os.eventfd_write(efd, 1)
    if not ep.poll(1.0):
        problems.append("epoll: eventfd not readable")
    os.eventfd_read(efd)
    # an fd over the channel
    # the real control channel: READY, a message with an fd, an ANSWER
    from daemon.workers.channel import Channel, Msg
    wch, sch = Channel(chan), Channel(peer)
    wch.send(Msg.READY)
    sch.recv()
    sch.send(Msg.VRING_CALL, b"\0" * 8, [efd])
    _, _, fds = wch.recv()
    for fd in fds:
        os.close(fd)
    wch.answer(0, 0)
    sch.expect_answer()
    # guest memory: map the memfd, move bytes between a file and it
    mm = mmap.mmap(memfd, 1 << 16, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    view = memoryview(mm)
    if file_io:                      # request workers: file data <-> guest memory
        os.preadv(memfd, [view[8192:12288]], 0)
        os.pwritev(memfd, [view[:4096]], 16384)
    view[:5] = b"hello"
    view.release()
    mm.close()
    # a thread (SETLKW waits in one)
    if threads:
        done = []
        t = threading.Thread(target=lambda: done.append(1))
        t.start()
        t.join()
        if not done:
            problems.append("thread did not run")
    # logging to stderr (the daemon's log handler)
    h = logging.StreamHandler(log_stream or sys.stderr)
    lg = logging.getLogger("sandbox-workload")
    lg.addHandler(h)
    lg.warning("workload log line")
    lg.removeHandler(h)
    ep.close()
    return problems


class _Ops:
    def __init__(self, client):
        self.c = client
        self.problems: list[str] = []

    def call(self, what, opcode, nodeid, args=b"", out_size=4096, data=None, ok=(0,)):
        try:
            reply = self.c.call(opcode, nodeid, args, out_size, data)
        except AssertionError as e:
            self.problems.append(f"{what}: {e}")
            return b""
        if reply.error not in ok:
            self.problems.append(f"{what}: {errno.errorcode.get(reply.error, reply.error)}")
        return reply.payload


def fuse_work(client, uid: int = 0, gid: int = 0, tag: str = "r") -> list[str]:
    """Every op on a fresh subdirectory ``tag`` of the share root."""
    from tests.unit.fusereq import entry_nodeid

    o = _Ops(client)
    client.uid, client.gid = uid, gid
    name = lambda s: os.fsencode(s) + NUL  # noqa: E731
    d = entry_nodeid(o.call("mkdir", Opcode.MKDIR, 1, abi.MKDIR_IN.pack(0o40777, 0) + name(tag), 128) or bytes(128))
    o.call("getattr", Opcode.GETATTR, d, abi.GETATTR_IN.pack(0, 0, 0), 104)
    o.call("access", Opcode.ACCESS, d, abi.ACCESS_IN.pack(os.R_OK), 0, ok=(0, errno.ENOSYS))
    o.call("statfs", Opcode.STATFS, d, b"", abi.STATFS_OUT.size)
    args = abi.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o100644, 0, 0) + name("f")
    p = o.call("create", Opcode.CREATE, d, args, 144)
    if len(p) < abi.ENTRY_OUT.size + 16:
        return o.problems + ["create: no entry"]
    f = entry_nodeid(p)
    fh = abi.OPEN_OUT.unpack_from(p, abi.ENTRY_OUT.size)[0]
    o.call("write", Opcode.WRITE, f, abi.WRITE_IN.pack(fh, 0, 8192, 0, 0, 0), abi.WRITE_OUT.size, b"w" * 8192)
    o.call("read", Opcode.READ, f, abi.READ_IN.pack(fh, 0, 4096, 0, 0, 0), 4096)
    o.call("fsync", Opcode.FSYNC, f, abi.FSYNC_IN.pack(fh, 0), 0)
    o.call("fdatasync", Opcode.FSYNC, f, abi.FSYNC_IN.pack(fh, 1), 0)
    o.call("fallocate", Opcode.FALLOCATE, f, abi.FALLOCATE_IN.pack(fh, 0, 65536, 0), 0,
           ok=(0, errno.EOPNOTSUPP))
    o.call("lseek", Opcode.LSEEK, f, abi.LSEEK_IN.pack(fh, 0, 3), abi.LSEEK_OUT.size, ok=(0, errno.ENXIO))
    o.call("getlk", Opcode.GETLK, f, abi.LK_IN.pack(fh, 7, 0, 100, 1, 0, 0), abi.LK_OUT.size)
    o.call("setlk", Opcode.SETLK, f, abi.LK_IN.pack(fh, 7, 0, 100, 1, 0, 0), 0)
    o.call("setlkw", Opcode.SETLKW, f, abi.LK_IN.pack(fh, 7, 0, 100, 2, 0, 0), 0)
    o.call("flock", Opcode.SETLK, f, abi.LK_IN.pack(fh, 7, 0, 0, 1, 0, abi.FUSE_LK_FLOCK), 0)
    o.call("unlock", Opcode.SETLK, f, abi.LK_IN.pack(fh, 7, 0, 100, 2, 0, 0), 0)
    o.call("flush", Opcode.FLUSH, f, abi.FLUSH_IN.pack(fh, 7), 0)
    # copy_file_range into a second file
    args = abi.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o100644, 0, 0) + name("g")
    p2 = o.call("create g", Opcode.CREATE, d, args, 144)
    if len(p2) >= abi.ENTRY_OUT.size + 16:
        g = entry_nodeid(p2)
        gfh = abi.OPEN_OUT.unpack_from(p2, abi.ENTRY_OUT.size)[0]
        o.call("copy_file_range", Opcode.COPY_FILE_RANGE, f,
               abi.COPY_FILE_RANGE_IN.pack(fh, 0, g, gfh, 0, 4096, 0), abi.WRITE_OUT.size,
               ok=(0, errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP))
        o.call("release g", Opcode.RELEASE, g, abi.RELEASE_IN.pack(gfh, 0, 0, 0), 0)
    # setattr: mode, size (truncate by path and by fh), times, owner
    V = abi.SetattrValid
    def setattr(what, valid, fh_=0, size=0, mode=0, uid_=0, gid_=0, node=f, ok=(0,)):
        a = abi.SETATTR_IN.pack(valid, fh_, size, 0, 1, 2, 0, 0, 0, 0, mode, uid_, gid_)
        o.call(what, Opcode.SETATTR, node, a, 104, ok=ok)
    setattr("chmod", V.MODE, mode=0o100640)
    setattr("truncate", V.SIZE, size=100)
    setattr("ftruncate", V.SIZE | V.FH, fh_=fh, size=50)
    setattr("utimes", V.ATIME | V.MTIME)
    setattr("utimes now", V.ATIME_NOW | V.MTIME_NOW | V.ATIME | V.MTIME)
    setattr("chown", V.UID | V.GID, uid_=uid, gid_=gid)
    # xattrs
    o.call("setxattr", Opcode.SETXATTR, f, abi.SETXATTR_IN.pack(3, 0) + name("user.t") + b"abc", 0,
           ok=(0, errno.EOPNOTSUPP, errno.ENOSYS))
    o.call("getxattr", Opcode.GETXATTR, f, abi.GETXATTR_IN.pack(64) + name("user.t"), 64,
           ok=(0, errno.ENODATA, errno.EOPNOTSUPP, errno.ENOSYS))
    o.call("listxattr", Opcode.LISTXATTR, f, abi.GETXATTR_IN.pack(256), 256,
           ok=(0, errno.EOPNOTSUPP, errno.ENOSYS))
    o.call("removexattr", Opcode.REMOVEXATTR, f, name("user.t"), 0,
           ok=(0, errno.ENODATA, errno.EOPNOTSUPP, errno.ENOSYS))
    o.call("release", Opcode.RELEASE, f, abi.RELEASE_IN.pack(fh, 0, abi.FUSE_RELEASE_FLUSH, 7), 0)
    # open an existing file read-only, read it
    p = o.call("open", Opcode.OPEN, f, abi.OPEN_IN.pack(os.O_RDONLY, 0), 16)
    if len(p) == 16:
        fh = abi.OPEN_OUT.unpack(p)[0]
        o.call("read2", Opcode.READ, f, abi.READ_IN.pack(fh, 0, 4096, 0, 0, 0), 4096)
        o.call("release2", Opcode.RELEASE, f, abi.RELEASE_IN.pack(fh, 0, 0, 0), 0)
    # names
    s = entry_nodeid(o.call("symlink", Opcode.SYMLINK, d, name("s") + name("f"), 128) or bytes(128))
    o.call("readlink", Opcode.READLINK, s, b"", 4096)
    o.call("link", Opcode.LINK, d, abi.LINK_IN.pack(f) + name("h"), 128)
    o.call("mknod fifo", Opcode.MKNOD, d, abi.MKNOD_IN.pack(0o10644, 0, 0) + name("p"), 128)
    o.call("rename", Opcode.RENAME, d, abi.RENAME_IN.pack(d) + name("h") + name("h2"), 0)
    o.call("rename2 exchange", Opcode.RENAME2, d,
           abi.RENAME2_IN.pack(d, abi.RENAME_EXCHANGE) + name("h2") + name("p"), 0,
           ok=(0, errno.EINVAL))
    o.call("lookup", Opcode.LOOKUP, d, name("f"), 128)
    o.call("lookup ..", Opcode.LOOKUP, d, name(".."), 128, ok=(0, errno.ENOENT, errno.EINVAL))
    # directories
    p = o.call("opendir", Opcode.OPENDIR, d, abi.OPEN_IN.pack(os.O_RDONLY | os.O_DIRECTORY, 0), 16)
    if len(p) == 16:
        dh = abi.OPEN_OUT.unpack(p)[0]
        o.call("readdir", Opcode.READDIR, d, abi.READ_IN.pack(dh, 0, 4096, 0, 0, 0), 4096)
        o.call("readdirplus", Opcode.READDIRPLUS, d, abi.READ_IN.pack(dh, 0, 4096, 0, 0, 0), 4096)
        o.call("fsyncdir", Opcode.FSYNCDIR, d, abi.FSYNC_IN.pack(dh, 0), 0)
        o.call("releasedir", Opcode.RELEASEDIR, d, abi.RELEASE_IN.pack(dh, 0, 0, 0), 0)
    o.call("syncfs", Opcode.SYNCFS, d, abi.SYNCFS_IN.pack(), 0, ok=(0, errno.ENOSYS))
    for n in ("s", "h2", "p", "f", "g"):
        o.call(f"unlink {n}", Opcode.UNLINK, d, name(n), 0, ok=(0, errno.ENOENT))
    o.call("rmdir", Opcode.RMDIR, 1, name(tag), 0)
    client.send(Opcode.FORGET, f, abi.FORGET_IN.pack(1), 0)
    client.send(Opcode.BATCH_FORGET, 0, abi.BATCH_FORGET_IN.pack(1) + abi.FORGET_ONE.pack(s, 1), 0)
    client.uid = client.gid = 0
    return o.problems


def all_work(client, memfd, chan, peer, efd) -> list[str]:
    problems = runtime_work(memfd, chan, peer, efd)
    problems += fuse_work(client, 0, 0, "as-root")
    problems += fuse_work(client, 1000, 1000, "as-1000")
    return problems
