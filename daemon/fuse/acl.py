"""``--posix-acl``: POSIX ACLs enforced by the guest and kept on the host.

INIT grants FUSE_POSIX_ACL when the guest offers it: the guest kernel then
checks permissions itself (ACLs included: it turns on default_permissions)
and passes ``system.posix_acl_access``/``_default`` through as extended
attributes, which xattrs.py sets on the host file, where the host kernel
keeps the mode bits and the ACL's mask in step on chmod, as it does for
any local process.

Default ACLs are inherited by the host kernel when CREATE, MKDIR and MKNOD
create the file: INIT also grants FUSE_DONT_MASK, so the guest sends the
mode without its umask (and the umask apart), and the request worker makes
that umask its own for the one call (``creating``). The host kernel then
does what POSIX says: the umask applies only when the parent directory has
no default ACL, else the default ACL decides. The worker's umask is 0 at
all other times.

Without ``--posix-acl`` the two ACL names are not extended attributes the
guest may use (ENOTSUP) nor sees in a list, as in the Rust virtiofsd (a
Linux guest never sends them then; a hostile one would otherwise set
host ACLs the guest kernel does not know about).
"""

from __future__ import annotations

import errno
import os

from daemon.fuse.request import FUSEError

ACL_NAMES = frozenset((b"system.posix_acl_access", b"system.posix_acl_default"))


def check_name(fs, name: bytes) -> None:
    """FUSEError(ENOTSUP) for an ACL name without --posix-acl."""
    if name in ACL_NAMES and not fs.config.posix_acl:
        raise FUSEError(errno.ENOTSUP)


def visible(fs, names: list[bytes]) -> list[bytes]:
    """LISTXATTR's host names without the ACL ones unless --posix-acl."""
    if fs.config.posix_acl:
        return names
    return [n for n in names if n not in ACL_NAMES]


class creating:
    """``with creating(fs, umask):`` around the host call that creates a
    file: the guest's umask is ours for it (with --posix-acl), restored to
    0 after."""

    __slots__ = ("umask",)

    def __init__(self, fs, umask: int):
        self.umask = umask & 0o777 if fs.config.posix_acl else None

    def __enter__(self):
        if self.umask is not None:
            os.umask(self.umask)

    def __exit__(self, *exc):
        if self.umask is not None:
            os.umask(0)
        return False
