"""What an op handler may use of the FUSE session: the ``FileSystem`` protocol.

Every handler in the op modules (entries, attrs, files, dirs, xattrs,
locks) has the signature ``do_x(fs: FileSystem, req: Request)``; at run
time ``fs`` is the worker's ``session.FuseSession``. This protocol names
the attributes and methods the handlers reach through ``fs``, so a reader
(and mypy, see pyproject.toml) can follow a call from an op module back to
``session.py`` without the op modules importing the session. A handler
that needs more of the session adds it here first.

Only the request role's session runs handlers that touch the host file
system: there ``cache``, ``handles`` and ``root_fd`` are always set (the
hiprio session, which only runs FORGET/BATCH_FORGET/INTERRUPT, has none).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from daemon.config import Config
    from daemon.fuse.handles import HandleTable
    from daemon.fuse.inodecache import InodeCache
    from daemon.fuse.inodes import InodeTable
    from daemon.fuse.request import Request


class FileSystem(Protocol):
    config: Config
    inodes: InodeTable          # the shared inode table (nodeid -> host inode)
    cache: InodeCache           # this worker's open O_PATH fds of those inodes
    handles: HandleTable        # the guest's open files and directories (fh)
    root_fd: int                # O_PATH fd of the shared directory
    # what INIT negotiated / the options asked for
    _readdirplus: bool
    _locks: bool
    _submounts: bool

    # -- replies (replies.py packs them) --
    def attr_reply(self, st: os.stat_result) -> bytes: ...
    def entry_reply(self, st: os.stat_result, nodeid: int, generation: int, attr_flags: int = 0) -> bytes: ...
    def negative_entry(self) -> bytes: ...
    def entry(self, parent_fd: int, name: str) -> bytes: ...

    # -- requests that wait (locks, fsync) --
    def can_defer(self) -> bool: ...
    def defer(self, req: Request, retry: Callable[[], Any]) -> None: ...
    def defer_blocking(self, req: Request, fn: Callable[..., Any], *args: Any) -> Any: ...
    def interrupt(self, unique: int) -> bool: ...

    # -- credentials: the call that creates an inode runs as the caller --
    def as_caller(self, req: Request) -> AbstractContextManager[Any]: ...

    # -- the FUSE session's life (INIT, DESTROY) --
    def start(self) -> None: ...
    def end(self) -> None: ...

    def warn(self, msg: str, *args: Any) -> None: ...


# an op handler: returns a reply payload, a byte count, None or DEFERRED
# (request.py), or raises FUSEError
Handler = Callable[["FileSystem", "Request"], Any]
