"""The session's own ops: INIT, DESTROY and INTERRUPT.

INIT negotiates the protocol version and the flags (what the options ask
for and the guest offers) and starts a new FUSE session (``fs.start()``);
DESTROY ends it (``fs.end()``); INTERRUPT answers a deferred request
(``fs.interrupt``). What a session start and end do to the shared tables is
in session.py.
"""

from __future__ import annotations

import errno

from daemon.fuse.files import MAX_IO_SIZE
from daemon.fuse import abi
from daemon.fuse.abi import InitFlag
from daemon.fuse.fs import FileSystem
from daemon.fuse.request import FUSEError, Request
from daemon.log import get_logger

log = get_logger("fuse.session")

# INIT reply
MAX_WRITE = MAX_IO_SIZE
MAX_PAGES = MAX_WRITE // 4096  # 256; the guest caps it at its ring size - 4
MAX_BACKGROUND = 64  # async requests in flight (readahead, writeback)
CONGESTION_THRESHOLD = 48  # 3/4 of it, as the kernel's defaults (12/9)
TIME_GRAN = 1  # we report nanoseconds
# always offered to the kernel when it offers them
INIT_FLAGS = (InitFlag.ASYNC_READ | InitFlag.ATOMIC_O_TRUNC | InitFlag.BIG_WRITES
              | InitFlag.AUTO_INVAL_DATA | InitFlag.PARALLEL_DIROPS | InitFlag.MAX_PAGES
              | InitFlag.INIT_EXT | InitFlag.CREATE_SUPP_GROUP)
# offered only when the op table implements them
INIT_FLAGS_READDIRPLUS = InitFlag.DO_READDIRPLUS | InitFlag.READDIRPLUS_AUTO

_U32 = 0xFFFFFFFF


def do_init(fs: FileSystem, req: Request):
    """INIT: negotiate the protocol and start a new session. Reply
    fuse_init_out; EPROTO for major < 7 or 7.x with x < 27. A major > 7 gets
    only our version (the kernel may retry with 7). Lookup counts: all
    reset (nodeid 1 = root)."""
    args = req.args
    if len(args) < abi.INIT_IN_COMPAT.size:
        raise FUSEError(errno.EINVAL)
    major, minor, max_readahead, flags = abi.INIT_IN_COMPAT.unpack_from(args)
    flags2 = abi.INIT_IN.unpack_from(args)[4] if len(args) >= abi.INIT_IN.size else 0
    if major > abi.FUSE_KERNEL_VERSION:
        return abi.INIT_OUT.pack(abi.FUSE_KERNEL_VERSION, abi.FUSE_KERNEL_MINOR_VERSION,
                                 0, 0, 0, 0, 0, 0, 0, 0, 0)
    if major < abi.FUSE_KERNEL_VERSION or minor < abi.FUSE_MIN_MINOR_VERSION:
        log.error("guest speaks FUSE %d.%d; %d.%d or newer is needed", major, minor,
                  abi.FUSE_KERNEL_VERSION, abi.FUSE_MIN_MINOR_VERSION)
        raise FUSEError(errno.EPROTO)
    offered = flags
    if flags & InitFlag.INIT_EXT:
        offered |= flags2 << 32
    wanted = INIT_FLAGS
    if fs._readdirplus:
        wanted |= INIT_FLAGS_READDIRPLUS
    if fs._locks:
        if fs.config.posix_lock:
            wanted |= InitFlag.POSIX_LOCKS
        if fs.config.flock:
            wanted |= InitFlag.FLOCK_LOCKS
    if fs.config.writeback:
        wanted |= InitFlag.WRITEBACK_CACHE
    if fs.config.killpriv_v2:
        wanted |= InitFlag.HANDLE_KILLPRIV_V2
    if fs._submounts:
        wanted |= InitFlag.SUBMOUNTS
    if fs.config.posix_acl:
        # --posix-acl (acl.py): the guest enforces ACLs, sends modes unmasked
        if not offered & InitFlag.POSIX_ACL and fs.config.posix_acl_required:
            log.error("--posix-acl=always: the guest does not offer FUSE_POSIX_ACL")
            raise FUSEError(errno.EPROTO)
        wanted |= InitFlag.POSIX_ACL | InitFlag.DONT_MASK
    if fs.config.security_label:
        # --security-label (seclabel.py): CREATE, MKNOD, MKDIR, SYMLINK carry the label
        if not offered & InitFlag.SECURITY_CTX and fs.config.security_label_required:
            log.error("--security-label=always: the guest does not offer FUSE_SECURITY_CTX")
            raise FUSEError(errno.EPROTO)
        wanted |= InitFlag.SECURITY_CTX
    if fs.config.allow_mmap and fs.config.cache.value in ("never", "metadata"):
        # --allow-mmap: shared mmap of files opened with FOPEN_DIRECT_IO
        wanted |= InitFlag.DIRECT_IO_ALLOW_MMAP
    ours = int(offered & wanted)
    fs.start()
    log.info("FUSE session: guest %d.%d, replying 7.%d flags %#x", major, minor,
             min(minor, abi.FUSE_KERNEL_MINOR_VERSION), ours)
    return abi.INIT_OUT.pack(abi.FUSE_KERNEL_VERSION, min(minor, abi.FUSE_KERNEL_MINOR_VERSION),
                             max_readahead, ours & _U32, MAX_BACKGROUND, CONGESTION_THRESHOLD,
                             MAX_WRITE, TIME_GRAN, MAX_PAGES, 0, ours >> 32)


def do_destroy(fs: FileSystem, req: Request):
    """DESTROY: end the session (every nodeid and fh forgotten). Reply:
    empty. Lookup counts: all dropped."""
    fs.end()
    return b""


def do_interrupt(fs: FileSystem, req: Request):
    """INTERRUPT: answer the deferred request it names with EINTR (if this
    worker holds it; Linux 6.1 virtiofs never sends INTERRUPT). No reply of
    its own. Lookup count: unchanged."""
    if len(req.args) >= abi.INTERRUPT_IN.size:
        fs.interrupt(abi.INTERRUPT_IN.unpack_from(req.args)[0])
    return None
