"""One decoded FUSE request, and how an op handler answers it.

The session (session.py) decodes the ``fuse_in_header``, builds a
``Request`` and calls the handler registered for the opcode::

    def do_getattr(fs: FileSystem, req: Request): ...   # fs.py: what fs offers

A handler returns one of:

- ``bytes``/``bytearray``/``memoryview``: the reply payload; the session
  writes the ``fuse_out_header`` in front of it;
- ``int`` n: n payload bytes were already written into ``req.out`` at
  offset 16 (READ: ``os.preadv`` straight into guest memory);
- ``None``: no reply at all (FORGET, BATCH_FORGET);
- ``DEFERRED``: the request cannot complete now (SETLKW on a held lock).
  Before returning it the handler registers a retry callable with
  ``fs.defer(req, retry)``; the session keeps the request's chain and calls
  ``retry()`` later, which again returns a payload / int / ``DEFERRED`` or
  raises ``FUSEError``.

Errors: ``raise FUSEError(errno.X)``. That is the only exception a handler
raises on purpose; an ``OSError`` from a host call may propagate and is
answered with its errno; anything else is a bug (logged, answered EIO).
"""

from __future__ import annotations

import errno as _errno

# Largest in-args (everything after the 40-byte header) accepted for any op
# but WRITE: SETXATTR is the largest, 8 + 256 (name) + 65536 (value) bytes.
# WRITE's data (up to max_write = 1 MiB) is not copied: see Request.data.
MAX_ARGS = 1 << 17


class FUSEError(Exception):
    """Answer the request with ``-errno``.

    Deliberately not an ``OSError`` subclass, so an ``except OSError`` around
    a host call never swallows it. Like ``OSError`` it has ``.errno``.
    """

    __slots__ = ("errno",)

    def __init__(self, err: int):
        super().__init__(err)
        self.errno = err

    def __str__(self) -> str:
        return f"FUSEError({_errno.errorcode.get(self.errno, self.errno)})"

    __repr__ = __str__


class _Deferred:
    """The type of ``DEFERRED``: one instance, compared with ``is``."""

    __slots__ = ()
    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DEFERRED"

    def __reduce__(self):
        return "DEFERRED"


DEFERRED = _Deferred()

# Deferred requests a worker's restart record can hold per ring
# (workers/progress.py): a replacement answers exactly those with EIO.
# Work that may be deferred or done at once (FSYNC on a helper thread) is
# done at once past this many; a SETLKW that would wait is refused with
# ENOLCK (locks.py). So no deferred request is ever missing from the record.
MAX_DEFERRED = 64


class Request:
    """The decoded request a handler works on.

    - ``opcode, unique, nodeid, uid, gid, pid``: from ``fuse_in_header``;
    - ``args``: ``bytes``, the in-args after the header, exactly
      ``header.len - 40`` bytes (at most ``MAX_ARGS``). For WRITE only the
      40-byte ``fuse_write_in``;
    - ``data``: WRITE only, an ``IoVec`` over the data bytes in guest
      memory (``data.slice(0, n)`` for ``os.pwritev``); ``None`` otherwise;
    - ``out``: the chain's writable part as an ``IoVec``; a handler that
      writes its payload itself does so from offset 16 on;
    - ``ext``: the request extensions cut off the end of ``args``
      (``total_extlen * 8`` bytes, extensions.py), usually ``b""``.
    """

    __slots__ = ("opcode", "unique", "nodeid", "uid", "gid", "pid", "args", "data", "out", "ext")

    def __init__(self, opcode: int, unique: int, nodeid: int, uid: int, gid: int, pid: int,
                 args: bytes, data, out, ext: bytes = b""):
        self.ext = ext
        self.opcode = opcode
        self.unique = unique
        self.nodeid = nodeid
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.args = args
        self.data = data
        self.out = out

    def __repr__(self) -> str:
        return (f"Request(opcode={self.opcode}, unique={self.unique}, nodeid={self.nodeid}, "
                f"uid={self.uid}, gid={self.gid}, args={len(self.args)}B)")
