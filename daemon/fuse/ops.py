"""The op table: one row per FUSE opcode the daemon serves.

Each ``Op`` row says everything the session (session.py), the worker roles
and the restart path (workers/progress.py) need to know about an opcode:

- ``handler``: ``do_x(fs, req)`` in its op module (request.py says what it
  returns);
- ``in_struct``: the fixed-size in-args the handler decodes (abi.py), the
  least it accepts; ``None`` for ops whose args are only names or empty;
- ``reply``: the fixed reply payload (after the 16-byte ``fuse_out_header``)
  the writable part must hold *before* the op runs, else EIO, so that no
  lookup count is taken for an entry the guest would never see; 0 for
  variable-size or empty replies;
- ``as_caller``: its creating call runs with the caller's fsuid/fsgid
  (``fs.as_caller``; docs/credentials.md); every other op runs with the
  worker's credentials, and ``as_caller`` refuses them;
- ``hiprio``: served by the hiprio worker, which takes only these (the
  Linux driver puts them on queue 0; they may arrive on a request queue
  too, where the request worker serves them);
- ``no_reply``: never answered, so a chain without room for a reply still
  runs (FORGET, BATCH_FORGET, INTERRUPT), and a dead worker's successor
  does not answer it EIO either;
- ``too_big``: the errno when the reply payload outgrows the writable part
  (ERANGE for GETXATTR/LISTXATTR, which the guest then asks again with a
  size; EIO otherwise);
- ``modifies``: it changes the file system (``--readonly`` answers EROFS,
  readonly.py).

Adding an op is one row here plus its handler. The opcodes of abi.Opcode
without a row are answered ENOSYS on purpose: ``ENOSYS`` lists them and
why.
"""

from __future__ import annotations

import errno
import struct
from typing import NamedTuple

from daemon.fuse import abi, attrs, dirs, entries, files, lifecycle, locks, xattrs
from daemon.fuse.abi import Opcode
from daemon.fuse.fs import Handler


class Op(NamedTuple):
    opcode: Opcode
    handler: Handler
    in_struct: struct.Struct | None = None
    reply: int = 0
    as_caller: bool = False
    hiprio: bool = False
    no_reply: bool = False
    too_big: int = errno.EIO
    modifies: bool = False


_ENTRY = abi.ENTRY_OUT.size

ROWS = (
    # the session's own (lifecycle.py)
    Op(Opcode.INIT, lifecycle.do_init, abi.INIT_IN_COMPAT, abi.INIT_OUT.size),
    Op(Opcode.DESTROY, lifecycle.do_destroy),
    Op(Opcode.INTERRUPT, lifecycle.do_interrupt, abi.INTERRUPT_IN, hiprio=True, no_reply=True),
    # names (entries.py)
    Op(Opcode.LOOKUP, entries.do_lookup, None, _ENTRY),
    Op(Opcode.FORGET, entries.do_forget, abi.FORGET_IN, hiprio=True, no_reply=True),
    Op(Opcode.BATCH_FORGET, entries.do_batch_forget, abi.BATCH_FORGET_IN, hiprio=True, no_reply=True),
    Op(Opcode.MKNOD, entries.do_mknod, abi.MKNOD_IN, _ENTRY, as_caller=True, modifies=True),
    Op(Opcode.MKDIR, entries.do_mkdir, abi.MKDIR_IN, _ENTRY, as_caller=True, modifies=True),
    Op(Opcode.SYMLINK, entries.do_symlink, None, _ENTRY, as_caller=True, modifies=True),
    Op(Opcode.LINK, entries.do_link, abi.LINK_IN, _ENTRY, modifies=True),
    Op(Opcode.UNLINK, entries.do_unlink, modifies=True),
    Op(Opcode.RMDIR, entries.do_rmdir, modifies=True),
    Op(Opcode.RENAME, entries.do_rename, abi.RENAME_IN, modifies=True),
    Op(Opcode.RENAME2, entries.do_rename2, abi.RENAME2_IN, modifies=True),
    # attributes (attrs.py)
    Op(Opcode.GETATTR, attrs.do_getattr, abi.GETATTR_IN, abi.ATTR_OUT.size),
    Op(Opcode.SETATTR, attrs.do_setattr, abi.SETATTR_IN, abi.ATTR_OUT.size, modifies=True),
    Op(Opcode.READLINK, attrs.do_readlink),
    Op(Opcode.STATFS, attrs.do_statfs, None, abi.STATFS_OUT.size),
    # open files (files.py)
    Op(Opcode.OPEN, files.do_open, abi.OPEN_IN, abi.OPEN_OUT.size),
    Op(Opcode.CREATE, files.do_create, abi.CREATE_IN, _ENTRY + abi.OPEN_OUT.size,
       as_caller=True, modifies=True),
    Op(Opcode.READ, files.do_read, abi.READ_IN),
    Op(Opcode.WRITE, files.do_write, abi.WRITE_IN, abi.WRITE_OUT.size, modifies=True),
    Op(Opcode.FLUSH, files.do_flush, abi.FLUSH_IN),
    Op(Opcode.RELEASE, files.do_release, abi.RELEASE_IN),
    Op(Opcode.FSYNC, files.do_fsync, abi.FSYNC_IN),
    Op(Opcode.FALLOCATE, files.do_fallocate, abi.FALLOCATE_IN, modifies=True),
    Op(Opcode.LSEEK, files.do_lseek, abi.LSEEK_IN, abi.LSEEK_OUT.size),
    Op(Opcode.COPY_FILE_RANGE, files.do_copy_file_range, abi.COPY_FILE_RANGE_IN, abi.WRITE_OUT.size,
       modifies=True),
    Op(Opcode.SYNCFS, files.do_syncfs, abi.SYNCFS_IN),
    # directories (dirs.py)
    Op(Opcode.OPENDIR, dirs.do_opendir, abi.OPEN_IN, abi.OPEN_OUT.size),
    Op(Opcode.READDIR, dirs.do_readdir, abi.READ_IN),
    Op(Opcode.READDIRPLUS, dirs.do_readdirplus, abi.READ_IN),
    Op(Opcode.RELEASEDIR, dirs.do_releasedir, abi.RELEASE_IN),
    Op(Opcode.FSYNCDIR, dirs.do_fsyncdir, abi.FSYNC_IN),
    # extended attributes (xattrs.py)
    Op(Opcode.SETXATTR, xattrs.do_setxattr, abi.SETXATTR_IN, modifies=True),
    Op(Opcode.GETXATTR, xattrs.do_getxattr, abi.GETXATTR_IN, too_big=errno.ERANGE),
    Op(Opcode.LISTXATTR, xattrs.do_listxattr, abi.GETXATTR_IN, too_big=errno.ERANGE),
    Op(Opcode.REMOVEXATTR, xattrs.do_removexattr, modifies=True),
    # locks (locks.py)
    Op(Opcode.GETLK, locks.do_getlk, abi.LK_IN, abi.LK_OUT.size),
    Op(Opcode.SETLK, locks.do_setlk, abi.LK_IN),
    Op(Opcode.SETLKW, locks.do_setlkw, abi.LK_IN),
)

# abi.Opcode members without a row: ENOSYS, and why
ENOSYS = {
    Opcode.ACCESS: "virtiofs mounts with default_permissions: the guest checks access itself",
    Opcode.BMAP: "sent for block-device (fuseblk) mounts only",
    Opcode.IOCTL: "not implemented",
    Opcode.POLL: "not implemented",
    Opcode.NOTIFY_REPLY: "answers a notification, and the daemon sends none",
    Opcode.SETUPMAPPING: "DAX window, which the daemon does not offer",
    Opcode.REMOVEMAPPING: "DAX window, which the daemon does not offer",
    Opcode.TMPFILE: "not implemented",
}


def _index(rows) -> dict[int, Op]:
    table: dict[int, Op] = {}
    for row in rows:
        if int(row.opcode) in table:
            raise AssertionError(f"{row.opcode.name} has two rows")
        table[int(row.opcode)] = row
    return table


# opcode (a plain int: cheaper to hash than the IntEnum) -> row
TABLE = _index(ROWS)
# the columns the request path tests per request, as sets of plain ints
HIPRIO = frozenset(op for op, row in TABLE.items() if row.hiprio)
NO_REPLY = frozenset(op for op, row in TABLE.items() if row.no_reply)
AS_CALLER = frozenset(op for op, row in TABLE.items() if row.as_caller)
MODIFYING = frozenset(op for op, row in TABLE.items() if row.modifies)


def handlers(hiprio: bool = False) -> dict[int, Handler]:
    """opcode -> handler: every row, or only the hiprio rows (a fresh dict
    the caller may change, as readonly.restrict does)."""
    return {op: row.handler for op, row in TABLE.items() if row.hiprio or not hiprio}


def reply_needs(out_header: int) -> dict[int, int]:
    """opcode -> bytes the writable part must hold before the op runs
    (``out_header`` + the row's ``reply``), for the rows that have one."""
    return {op: out_header + row.reply for op, row in TABLE.items() if row.reply}


def too_big(opcode: int) -> int:
    """The errno for a reply payload larger than the writable part."""
    row = TABLE.get(opcode)
    return errno.EIO if row is None else row.too_big


def name(opcode: int) -> str:
    """The opcode's name, or its number if abi.Opcode has none."""
    try:
        return Opcode(opcode).name
    except ValueError:
        return str(opcode)
