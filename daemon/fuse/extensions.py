"""Request extensions: what follows a request's in-args.

Since FUSE 7.38 ``fuse_in_header.total_extlen`` (in units of 8 bytes) says
how many bytes at the end of the request are extensions rather than
arguments. Each is a ``fuse_ext_header {size, type}`` followed by its body,
``size`` bytes in all, a multiple of 8. Linux >= 6.6 sends one with MKNOD,
MKDIR, SYMLINK, CREATE (and TMPFILE) when we accepted
FUSE_CREATE_SUPP_GROUP: type FUSE_EXT_GROUPS, ``fuse_supp_groups
{nr_groups, groups[]}`` with the one supplementary group of the caller that
is the parent directory's group (only when the caller is in that group and
it is not its fsgid). Types 0..31 are a security context (FUSE_SECURITY_CTX,
which we never offer): skipped like any unknown type.

A malformed extension area (a size below 8, not a multiple of 8, or past the
end; a group count that does not fit its extension or exceeds
``credentials.MAX_SUPP_GROUPS``; the groups extension twice) is EINVAL.
"""

from __future__ import annotations

import errno

from daemon.fuse import abi
from daemon.fuse.credentials import MAX_SUPP_GROUPS
from daemon.fuse.request import FUSEError

_HDR = abi.EXT_HEADER.size


def supp_groups(ext: bytes) -> tuple[int, ...]:
    """The supplementary groups named by the extension area ``ext`` (the
    request's last total_extlen * 8 bytes); () when it names none."""
    groups: tuple[int, ...] | None = None
    off, end = 0, len(ext)
    while off < end:
        if end - off < _HDR:
            raise FUSEError(errno.EINVAL)
        size, kind = abi.EXT_HEADER.unpack_from(ext, off)
        if size < _HDR or size % 8 or size > end - off:
            raise FUSEError(errno.EINVAL)
        if kind == abi.FUSE_EXT_GROUPS:
            body = size - _HDR
            if groups is not None or body < abi.SUPP_GROUPS.size:
                raise FUSEError(errno.EINVAL)
            (count,) = abi.SUPP_GROUPS.unpack_from(ext, off + _HDR)
            if count > MAX_SUPP_GROUPS or abi.SUPP_GROUPS.size + abi.SUPP_GROUP.size * count > body:
                raise FUSEError(errno.EINVAL)
            start = off + _HDR + abi.SUPP_GROUPS.size
            groups = tuple(g for (g,) in abi.SUPP_GROUP.iter_unpack(
                ext[start:start + abi.SUPP_GROUP.size * count]))
        off += size
    return groups or ()
