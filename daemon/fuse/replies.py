"""FUSE replies as bytes in the chain's writable part.

Every reply starts with the 16-byte ``fuse_out_header {len, error,
unique}``; ``len`` counts the header. An error reply is the header alone,
``error = -errno``. The session (session.py) decides *what* to answer; this
module is *how* it lands in guest memory:

- ``error(out, unique, err)``: the header alone; an errno outside 1..4095
  becomes EIO (the kernel would take anything else for a length);
- ``payload(out, unique, result)``: the header in front of a handler's
  payload (bytes), or in front of ``n`` bytes the handler already wrote at
  offset 16 (an int); -1 when the payload does not fit, so that the caller
  answers the op's error instead (ops.py: ``too_big``);
- ``Timeouts(seconds)``: the reply structs built from a host stat, which
  carry the entry and attribute timeouts of ``--cache``: ``fuse_attr_out``
  (GETATTR, SETATTR), ``fuse_entry_out`` (LOOKUP, the creating ops,
  READDIRPLUS) and the negative entry. ``attr_out`` is the one
  conversion of a host stat to ``fuse_attr``: GETATTR's reply is that one
  pack call, and ``fuse_entry_out`` is its head followed by those bytes.

The writable part normally comes as the Linux driver lays it out (a
16-byte header buffer and one payload buffer): that case is written with
one ``pack_into`` and one slice store; anything else goes through
``IoVec.write``.
"""

from __future__ import annotations

import errno
import os

from daemon.fuse import abi
from daemon.virtio.iovec import IoVec

_OUT = abi.OUT_HEADER.size
_U64 = (1 << 64) - 1
_U32 = 0xFFFFFFFF
_NS = 1_000_000_000
_pack_out = abi.OUT_HEADER.pack
_pack_out_into = abi.OUT_HEADER.pack_into
_pack_attr_out = abi.ATTR_OUT.pack
_pack_entry = abi.ENTRY_OUT.pack
_pack_entry_head = abi.ENTRY_OUT_HEAD.pack
_ATTR_AT = abi.ATTR_OUT.size - abi.ATTR.size     # where fuse_attr_out's fuse_attr starts


def error(out: IoVec, unique: int, err: int) -> int:
    """Write an error reply; the bytes written (0 without room for one)."""
    if out.size < _OUT:
        return 0
    if not 0 < err < 4096:
        err = errno.EIO
    out.write(0, _pack_out(_OUT, -err, unique))
    return _OUT


def payload(out: IoVec, unique: int, result) -> int:
    """Write a success reply: the header and ``result`` (bytes-like), or the
    header for ``result`` (an int) bytes already written at offset 16.
    Returns the bytes written: 0 for ``None`` (no reply) or a writable part
    without room for a header, -1 (nothing written) for a payload larger
    than the writable part. RuntimeError for an impossible byte count."""
    if result is None or out.size < _OUT:
        return 0
    if type(result) is int:
        n = result
        if n < 0 or _OUT + n > out.size:
            raise RuntimeError(f"handler reported {n} bytes written")
        out.write(0, _pack_out(_OUT + n, 0, unique))
        return _OUT + n
    n = len(result)
    total = _OUT + n
    if total > out.size:
        return -1
    views = out.views
    first = views[0]
    if len(first) >= total:
        _pack_out_into(first, 0, total, 0, unique)
        first[_OUT:total] = result
    elif len(first) == _OUT and len(views[1]) >= n:  # the driver's layout
        _pack_out_into(first, 0, total, 0, unique)
        views[1][:n] = result
    else:
        out.write(_OUT, result)
        out.write(0, _pack_out(total, 0, unique))
    return total


def rdev32(rdev: int) -> int:
    """Host dev_t → the kernel's new_encode_dev() u32 that fuse_attr carries."""
    major, minor = os.major(rdev), os.minor(rdev)
    return ((minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)) & _U32


class Timeouts:
    """The reply structs that carry the entry and attribute timeouts, for a
    session whose ``--cache`` mode keeps names and attributes ``seconds``."""

    __slots__ = ("_sec", "_nsec", "_negative")

    def __init__(self, seconds: float):
        self._sec = int(seconds)
        self._nsec = int(round((seconds - self._sec) * _NS))
        self._negative = _pack_entry(0, 0, self._sec, 0, self._nsec, 0, *(0,) * 16)

    def attr_valid(self) -> tuple[int, int]:
        """(seconds, nanoseconds) of the attribute timeout, for the compiled
        GETATTR (daemon/fuse/fastpath.py), which packs the same struct."""
        return self._sec, self._nsec

    def attr_out(self, st: os.stat_result, flags: int = 0) -> bytes:
        """``fuse_attr_out`` (104 bytes) with the attribute timeout;
        ``flags``: fuse_attr.flags (FUSE_ATTR_SUBMOUNT). The one conversion
        of a host stat to ``fuse_attr``, written out in one call: this is
        GETATTR's whole reply. Times before 1970 wrap as the kernel's u64
        does; an nlink beyond u32 is clipped."""
        a, an = divmod(st.st_atime_ns, _NS)
        m, mn = divmod(st.st_mtime_ns, _NS)
        c, cn = divmod(st.st_ctime_ns, _NS)
        nlink = st.st_nlink
        rdev = st.st_rdev
        return _pack_attr_out(self._sec, self._nsec, 0, st.st_ino, st.st_size, st.st_blocks,
                              a & _U64, m & _U64, c & _U64, an, mn, cn, st.st_mode,
                              nlink if nlink <= _U32 else _U32, st.st_uid, st.st_gid,
                              rdev32(rdev) if rdev else 0, st.st_blksize, flags)

    def entry_out(self, st: os.stat_result, nodeid: int, generation: int, attr_flags: int = 0) -> bytes:
        """``fuse_entry_out`` (128 bytes) with entry and attribute timeouts;
        ``attr_flags``: fuse_attr.flags (FUSE_ATTR_SUBMOUNT). Its fuse_attr
        is ``attr_out``'s."""
        t, tn = self._sec, self._nsec
        return _pack_entry_head(nodeid, generation, t, t, tn, tn) + self.attr_out(st, attr_flags)[_ATTR_AT:]

    def negative_entry(self) -> bytes:
        """``fuse_entry_out`` with nodeid 0: "no such name" cached for the
        entry timeout (no lookup count)."""
        return self._negative
