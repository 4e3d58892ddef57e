"""``--security-label``: the guest's security label on each new file, set
before the file's name appears.

With FUSE_SECURITY_CTX granted (INIT, ``--security-label``), the guest
sends the label its LSM chose for a new file (SELinux:
``security.selinux``) as a request extension of CREATE, MKNOD, MKDIR and
SYMLINK (extensions.py). The label is stored as the extended attribute the
guest named, renamed by ``--xattrmap`` when one is given (a name the map
refuses fails the request before anything is created). The host needs no
SELinux: the attribute is stored as any other ``security.*`` one (a host
that runs SELinux checks it like any setxattr of a privileged process).

Atomically: the guest must never see the file without its label, since an
SELinux guest would then treat it as unlabeled. The file is created under a
temporary name in the same directory (``.pyvirtiofsd-label.*``, with the
caller's credentials as always, so ownership, setgid and default ACL
inheritance are those of the final name), its label is set, and only then
is it renamed to its name with ``renameat2(RENAME_NOREPLACE)``, which fails
with EEXIST as the creating call would have if the name exists meanwhile.
On any failure the temporary file is removed and the request fails with
its errno. Why not the alternatives:

- ``/proc/thread-self/attr/fscreate`` (setfscreatecon, what the C virtiofsd
  does on SELinux hosts) only works when the host runs SELinux and only for
  ``security.selinux`` unrenamed; these hosts have no SELinux (the file
  answers EINVAL), and with ``--xattrmap`` the name is another one anyway;
- ``O_TMPFILE`` + ``linkat`` makes only regular files, not directories,
  symlinks or device nodes, and not every file system supports it;
- setting the label after creating the name (the Rust virtiofsd 1.13) leaves
  a window in which the guest can look the file up unlabeled.

The cost: the temporary name can be seen by a READDIR of the directory
running at that moment. ``user.*`` names (``--xattrmap :map::user.virtiofs.:``)
cannot be set on symlinks and special files (EPERM, the host kernel's rule),
so such creates fail, as they do in the Rust daemon.

Without ``--security-label`` a context the guest sends anyway is ignored
(the guest only sends one when we granted it).
"""

from __future__ import annotations

import ctypes
import itertools
import os

from daemon.fuse import extensions
from daemon.fuse.request import Request

RENAME_NOREPLACE = 1
TEMP_PREFIX = ".pyvirtiofsd-label."
_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
_renameat2.restype = ctypes.c_int
_serial = itertools.count()


def renameat2(olddir_fd: int, old: str, newdir_fd: int, new: str, flags: int) -> None:
    """renameat2(2); OSError with its errno."""
    if _renameat2(olddir_fd, os.fsencode(old), newdir_fd, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def label_of(fs, req: Request) -> tuple[bytes, bytes] | None:
    """(host attribute name, value) of the label ``req`` carries, or None
    (no --security-label, or no label sent). FUSEError: a malformed
    extension (EINVAL), a name --xattrmap refuses (EPERM/ENOTSUP)."""
    if not req.ext or not fs.config.security_label:
        return None
    secctx = extensions.parse(req.ext).secctx
    if secctx is None:
        return None
    xattrmap = fs.config.xattrmap
    name = secctx.name if xattrmap is None else xattrmap.to_host(secctx.name)
    return name, secctx.value


class NewEntry:
    """The name to create a new entry under, and the step that gives it its
    label and its real name::

        new = NewEntry(fs, req, parent_fd, name)
        with fs.as_caller(req):
            os.mkdir(new.target, mode, dir_fd=parent_fd)
        new.finish()

    Without a label ``target`` is ``name`` and ``finish`` does nothing."""

    __slots__ = ("parent_fd", "name", "label", "target")

    def __init__(self, fs, req: Request, parent_fd: int, name: str):
        self.parent_fd = parent_fd
        self.name = name
        self.label = label_of(fs, req)
        self.target = name if self.label is None else \
            f"{TEMP_PREFIX}{os.getpid():x}.{req.unique:x}.{next(_serial)}"

    @property
    def labeled(self) -> bool:
        return self.label is not None

    def finish(self) -> None:
        """Label ``target`` and rename it to ``name`` (RENAME_NOREPLACE);
        on failure remove it and raise the error (FileExistsError if the
        name exists). Runs with the worker's own credentials: the caller
        may have created a file it cannot write."""
        if self.label is None:
            return
        parent_fd, target = self.parent_fd, self.target
        try:
            fd = os.open(target, _O_PATH, dir_fd=parent_fd)
            try:
                # the magic link of an O_PATH fd reaches the inode itself,
                # a symlink included (xattrs.py)
                os.setxattr(str(fd), self.label[0], self.label[1])
            finally:
                os.close(fd)
            renameat2(parent_fd, target, parent_fd, self.name, RENAME_NOREPLACE)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Remove the temporary entry (best effort: an error here must not
        hide the one that made us remove it)."""
        try:
            try:
                os.unlink(self.target, dir_fd=self.parent_fd)
            except IsADirectoryError:
                os.rmdir(self.target, dir_fd=self.parent_fd)
        except OSError:
            pass
