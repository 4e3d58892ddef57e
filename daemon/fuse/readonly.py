"""``--readonly``: the guest may read the shared directory, never change it.

``restrict(handlers)`` rewrites a worker's opcode -> handler map
(session.py, at start): every op whose row in ops.py ``modifies`` the file
system answers EROFS before touching the host, as a read-only mount
answers; OPEN answers EROFS for write access or
O_TRUNC and opens read-only files as usual. Ops that change nothing
(lookups, reads, listings, locks, fsync of a file opened for reading) are
left alone. The request workers' sandbox also mounts the share read-only
(sandbox/mounts.py), so a bug in this list would still meet EROFS from the
host kernel; with ``--sandbox chroot|none`` this table is the only guard.
"""

from __future__ import annotations

import errno
import os

from daemon.fuse import abi, ops
from daemon.fuse.abi import Opcode
from daemon.fuse.request import FUSEError, Request


def _refuse(fs, req: Request):
    """Any modifying op under --readonly: EROFS, nothing done. Lookup count:
    unchanged."""
    raise FUSEError(errno.EROFS)


def _open_for_reading(do_open):
    def do_open_readonly(fs, req: Request):
        """OPEN under --readonly: EROFS for write access or O_TRUNC, else the
        usual OPEN."""
        if len(req.args) >= abi.OPEN_IN.size:
            flags = abi.OPEN_IN.unpack_from(req.args)[0]
            if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
                raise FUSEError(errno.EROFS)
        return do_open(fs, req)
    return do_open_readonly


def restrict(handlers: dict) -> dict:
    """``handlers`` (opcode → handler) with the modifying ops refused; in
    place, and returned."""
    for opcode in ops.MODIFYING:
        if opcode in handlers:
            handlers[opcode] = _refuse
    if int(Opcode.OPEN) in handlers:
        handlers[int(Opcode.OPEN)] = _open_for_reading(handlers[int(Opcode.OPEN)])
    return handlers
