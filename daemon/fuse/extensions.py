"""Request extensions: what follows a request's in-args.

Since FUSE 7.38 ``fuse_in_header.total_extlen`` (in units of 8 bytes) says
how many bytes at the end of the request are extensions rather than
arguments; the session cuts them off into ``req.ext`` and ``parse`` reads
them, for every extension type, in one pass. Each extension is a
``fuse_ext_header {size, type}`` followed by its body, ``size`` bytes in
all, a multiple of 8. Linux sends them with MKNOD, MKDIR, SYMLINK, CREATE
(and TMPFILE):

- types 0..31 (FUSE_MAX_NR_SECCTX), the security context, when we granted
  FUSE_SECURITY_CTX (``--security-label``; Linux 6.1 and later, whatever its
  LSM): the header is a ``fuse_secctx_header {size, nr_secctx}``, so the
  type is the number of contexts. 0 when no LSM of the guest labels new
  files (an 8-byte extension, no body); 1 with SELinux: ``fuse_secctx
  {size}``, the NUL-terminated xattr name (``security.selinux``), then
  ``size`` bytes of context, the whole padded to 8 (FUSE_REC_ALIGN).
- type 32, FUSE_EXT_GROUPS, when we granted FUSE_CREATE_SUPP_GROUP (Linux
  >= 6.6): ``fuse_supp_groups {nr_groups, groups[]}`` with the one
  supplementary group of the caller that is the parent directory's group
  (only when the caller is in that group and it is not its fsgid).
- any other type: skipped (a later kernel's; we never granted it).

Everything is bounds-checked, and a malformed area is EINVAL: a size below 8,
not a multiple of 8, or past the end; an extension of a kind twice; a group
count that does not fit its body or exceeds ``MAX_SUPP_GROUPS``; more than
one security context (Linux sends at most one), a context without a
terminated name, a name not in the ``security.`` namespace or longer than
XATTR_NAME_MAX, a value empty or above XATTR_SIZE_MAX or past its record,
or a record whose padding is not exactly what FUSE_REC_ALIGN gives.
"""

from __future__ import annotations

import errno
from typing import NamedTuple

from daemon.fuse import abi
from daemon.fuse.credentials import MAX_SUPP_GROUPS
from daemon.fuse.request import FUSEError

_HDR = abi.EXT_HEADER.size
_SECCTX = abi.SECCTX.size
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 1 << 16
SECURITY_PREFIX = b"security."


class SecurityContext(NamedTuple):
    name: bytes         # the guest's xattr name, e.g. b"security.selinux"
    value: bytes        # the context, as the guest's LSM gave it (often NUL-terminated)


class Extensions(NamedTuple):
    groups: tuple[int, ...] = ()            # FUSE_EXT_GROUPS
    secctx: SecurityContext | None = None   # a security context (nr_secctx 1)


NONE = Extensions()


def _einval() -> FUSEError:
    return FUSEError(errno.EINVAL)


def _groups(ext: bytes, start: int, body: int) -> tuple[int, ...]:
    if body < abi.SUPP_GROUPS.size:
        raise _einval()
    (count,) = abi.SUPP_GROUPS.unpack_from(ext, start)
    if count > MAX_SUPP_GROUPS or abi.SUPP_GROUPS.size + abi.SUPP_GROUP.size * count > body:
        raise _einval()
    first = start + abi.SUPP_GROUPS.size
    return tuple(g for (g,) in abi.SUPP_GROUP.iter_unpack(ext[first:first + abi.SUPP_GROUP.size * count]))


def _secctx(ext: bytes, start: int, body: int, count: int) -> SecurityContext | None:
    if count == 0:
        if body:
            raise _einval()
        return None
    if count != 1 or body < _SECCTX:
        raise _einval()
    (size,) = abi.SECCTX.unpack_from(ext, start)
    name_at = start + _SECCTX
    end = start + body
    nul = ext.find(b"\0", name_at, min(end, name_at + XATTR_NAME_MAX + 1))
    if nul <= name_at:      # unterminated (or too long), or empty
        raise _einval()
    name = bytes(ext[name_at:nul])
    if not name.startswith(SECURITY_PREFIX) or len(name) == len(SECURITY_PREFIX):
        raise _einval()
    if not 0 < size <= XATTR_SIZE_MAX:
        raise _einval()
    record = _SECCTX + len(name) + 1 + size
    if (record + 7) & ~7 != body:
        raise _einval()
    return SecurityContext(name, bytes(ext[nul + 1:nul + 1 + size]))


def parse(ext: bytes) -> Extensions:
    """The extensions in ``ext`` (the request's last total_extlen * 8
    bytes); FUSEError(EINVAL) for a malformed area (module docstring)."""
    if not ext:
        return NONE
    groups: tuple[int, ...] | None = None
    secctx: SecurityContext | None = None
    seen_secctx = False
    off, end = 0, len(ext)
    while off < end:
        if end - off < _HDR:
            raise _einval()
        size, kind = abi.EXT_HEADER.unpack_from(ext, off)
        if size < _HDR or size % 8 or size > end - off:
            raise _einval()
        body = size - _HDR
        if kind == abi.FUSE_EXT_GROUPS:
            if groups is not None:
                raise _einval()
            groups = _groups(ext, off + _HDR, body)
        elif kind <= abi.FUSE_MAX_NR_SECCTX:
            if seen_secctx:
                raise _einval()
            seen_secctx = True
            secctx = _secctx(ext, off + _HDR, body, kind)
        off += size
    return Extensions(groups or (), secctx)


def supp_groups(ext: bytes) -> tuple[int, ...]:
    """The supplementary groups named by the extension area ``ext``; ()
    when it names none."""
    return parse(ext).groups
