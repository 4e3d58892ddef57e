"""Guest-supplied names: the only strings from the guest that reach a path.

A name arrives NUL-terminated in the in-args. Every op that takes one uses
it as exactly one path component relative to a directory O_PATH fd (``*at``
calls), so it must be a component and nothing more:

- terminated by a NUL, and the NUL is the last byte of the arg it occupies
  (trailing bytes after the NUL are a malformed request: EINVAL);
- 1..255 bytes (NAME_MAX): empty → EINVAL, longer → ENAMETOOLONG (what the
  host would answer);
- no '/' (EINVAL): it would make the host walk several components;
- not "." or ".." (EINVAL): they name another directory, not an entry.
  LOOKUP alone accepts them (``parse_lookup_name``) and resolves them
  itself without ever walking above the share root (entries.py).

Names are decoded with ``os.fsdecode`` (surrogateescape), so non-UTF-8
bytes survive the round trip to the host unchanged.

Symlink targets (``parse_two(buf, target=True)``) are different: stored
verbatim, never resolved by the daemon, so they may contain '/' and be up
to PATH_MAX - 1 bytes; only NUL-termination and non-emptiness are checked.
"""

from __future__ import annotations

import errno
import os

from daemon.fuse.abi import NAME_MAX
from daemon.fuse.request import FUSEError

PATH_MAX = 4096  # a symlink target is at most PATH_MAX - 1 bytes


def _component(raw: bytes, dots_ok: bool = False) -> str:
    n = len(raw)
    if n == 0:
        raise FUSEError(errno.EINVAL)
    if n > NAME_MAX:
        raise FUSEError(errno.ENAMETOOLONG)
    if b"/" in raw:
        raise FUSEError(errno.EINVAL)
    if not dots_ok and (raw == b"." or raw == b".."):
        raise FUSEError(errno.EINVAL)
    return os.fsdecode(raw)


def parse_name_at(buf, offset: int = 0, dots_ok: bool = False) -> tuple[str, int]:
    """The name starting at ``offset`` and the offset just past its NUL
    (for args with more after the name)."""
    if not 0 <= offset <= len(buf):
        raise FUSEError(errno.EINVAL)
    data = bytes(buf[offset:offset + NAME_MAX + 2])
    nul = data.find(b"\0")
    if nul < 0:
        raise FUSEError(errno.ENAMETOOLONG if len(data) > NAME_MAX else errno.EINVAL)
    return _component(data[:nul], dots_ok), offset + nul + 1


def parse_name(buf, dots_ok: bool = False) -> str:
    """The one name that fills ``buf`` (``name\\0``)."""
    if not isinstance(buf, bytes):
        buf = bytes(buf)
    if len(buf) < 2 or buf[-1] != 0:
        raise FUSEError(errno.EINVAL)
    raw = buf[:-1]
    if b"\0" in raw:
        raise FUSEError(errno.EINVAL)
    return _component(raw, dots_ok)


def parse_lookup_name(buf) -> str:
    """As ``parse_name``, but "." and ".." are returned (LOOKUP only)."""
    return parse_name(buf, dots_ok=True)


def parse_two(buf, target: bool = False) -> tuple[str, str]:
    """``a\\0b\\0`` filling ``buf``: RENAME's old and new names, or with
    ``target=True`` SYMLINK's name and its target (not a component)."""
    if not isinstance(buf, bytes):
        buf = bytes(buf)
    if len(buf) < 3 or buf[-1] != 0:
        raise FUSEError(errno.EINVAL)
    first = buf.find(b"\0")
    if first == len(buf) - 1:
        raise FUSEError(errno.EINVAL)  # only one string
    a = _component(buf[:first])
    raw = buf[first + 1:-1]
    if b"\0" in raw:
        raise FUSEError(errno.EINVAL)
    if not target:
        return a, _component(raw)
    if not raw:
        raise FUSEError(errno.ENOENT)  # symlink(2) with an empty target
    if len(raw) >= PATH_MAX:
        raise FUSEError(errno.ENAMETOOLONG)
    return a, os.fsdecode(raw)
