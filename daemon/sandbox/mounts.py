"""A worker's file system view: pivot_root into the shared directory (request
worker) or into an empty read-only tmpfs (hiprio worker), or chroot(2) when
new namespaces are not available (``--sandbox chroot``).

The request worker sequence is the Rust virtiofsd's ``setup_mounts``:

1. ``mount(NULL, "/", NULL, MS_SLAVE|MS_REC)``: nothing we mount leaks back
   into the host's namespace (host mounts still propagate in).
2. mount a fresh ``proc`` on /proc: it belongs to the worker's new pid
   namespace, so ``/proc/self`` is the worker (PID 1), and open
   ``/proc/self/fd`` as ``O_PATH|O_DIRECTORY``. This fd is all of /proc the
   worker keeps: after the pivot the proc mount is gone from its tree, but
   the fd pins it, and the worker ``fchdir``s into it so ``str(fd)`` paths
   re-open its O_PATH fds (via the magic links) as usual.
3. bind-mount the shared dir onto itself (pivot_root needs a mount point),
   ``fchdir`` into it, ``pivot_root(".", ".")``: the old root is now stacked
   under the new one; ``fchdir`` to the old root, make it MS_SLAVE|MS_REC and
   ``umount2(".", MNT_DETACH)`` it: nothing of the host is reachable.

The hiprio worker gets a tmpfs mounted read-only (``size=4k, mode 0555``,
nosuid/nodev/noexec) as its root, and no /proc.

``chroot`` mode (containers): ``/proc/self/fd`` of the host's proc is opened
first, then ``chroot(shared_dir)``. The hiprio worker chroots into a
directory that was created empty and then removed: nothing can ever be
created in a deleted directory, so it stays empty without any mount.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import NamedTuple

from daemon.sandbox.namespaces import CLONE_NEWNS, SandboxError, setns

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MNT_DETACH = 2
SYS_pivot_root = 155          # x86_64

O_PATH = getattr(os, "O_PATH", 0o10000000)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.syscall.restype = ctypes.c_long


def _b(s: str | bytes | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(source, target, fstype, flags: int, data: str | None = None, what: str = "") -> None:
    d = _b(data)
    ret = _libc.mount(_b(source), _b(target), _b(fstype), flags, d)
    if ret != 0:
        e = ctypes.get_errno()
        raise SandboxError(f"{what or 'mount ' + str(target)}: {os.strerror(e)} (errno {e})")


def umount2(target, flags: int, what: str = "") -> None:
    if _libc.umount2(_b(target), flags) != 0:
        e = ctypes.get_errno()
        raise SandboxError(f"{what or 'umount ' + str(target)}: {os.strerror(e)} (errno {e})")


def pivot_root(new_root, put_old, what: str = "pivot_root") -> None:
    if _libc.syscall(ctypes.c_long(SYS_pivot_root), _b(new_root), _b(put_old)) != 0:
        e = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(e)} (errno {e})")


def _step(what: str, fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except OSError as e:
        raise SandboxError(f"{what}: {e.strerror or e} (errno {e.errno})") from None


class RootInfo(NamedTuple):
    root_fd: int            # O_PATH|O_DIRECTORY fd of the worker's new root ("/"), -1 for hiprio
    proc_self_fd: int       # O_PATH fd of /proc/self/fd (request worker; -1 for hiprio)


def _open_proc_self_fd() -> int:
    return _step("open /proc/self/fd", os.open, "/proc/self/fd",
                 O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _pivot_into(new_root: str) -> None:
    """Make ``new_root`` (already a mount point) our root and detach the old one."""
    old = _step("open /", os.open, "/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        new = _step(f"open {new_root}", os.open, new_root, os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
        try:
            _step("fchdir to the new root", os.fchdir, new)
            pivot_root(".", ".", f"pivot_root into {new_root}")
            _step("fchdir to the old root", os.fchdir, old)
            mount(None, ".", None, MS_SLAVE | MS_REC, what="make the old root a slave")
            umount2(".", MNT_DETACH, what="detach the old root")
            _step("fchdir to the new root", os.fchdir, new)
            _step("chdir /", os.chdir, "/")
        finally:
            os.close(new)
    finally:
        os.close(old)


# statvfs f_flag bits that are per-mount flags of the same value (ST_* ==
# MS_* for these), kept when the bind mount is remounted read-only: a bind
# remount replaces them all, and must not lift nosuid/nodev/noexec
_KEPT_MOUNT_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC | 1024 | 2048   # | MS_NOATIME | MS_NODIRATIME
ST_RELATIME = 4096


def _remount_readonly(path: str) -> None:
    """--readonly: make the bind mount of the share read-only (not its
    submounts: the op table refuses changes there, fuse/readonly.py)."""
    flags = _step(f"statvfs {path}", os.statvfs, path).f_flag
    keep = flags & _KEPT_MOUNT_FLAGS | (MS_RELATIME if flags & ST_RELATIME else 0)
    mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep,
          what=f"remount {path} read-only")


def make_root_slave() -> None:
    """Make "/" of this (new) mount namespace a recursive slave: nothing
    mounted here propagates back to the namespace it was copied from."""
    mount(None, "/", None, MS_SLAVE | MS_REC, what="make / a recursive slave mount")


def setup_request_root(shared_dir: str, readonly: bool = False, shared_ns: int = -1) -> RootInfo:
    """In a fresh mount + pid namespace: the shared dir becomes "/" (a
    read-only mount with ``readonly``). With ``shared_ns`` (an fd of the
    namespace sharedns.make built) the worker joins that namespace instead
    of mounting the share itself, after its proc is mounted and open."""
    make_root_slave()
    mount("proc", "/proc", "proc", MS_NODEV | MS_NOEXEC | MS_NOSUID | MS_RELATIME,
          what="mount a proc for the worker's pid namespace on /proc")
    if shared_ns >= 0:
        return _enter_request_root(lambda: _join_share_root(shared_ns))
    return _enter_request_root(lambda: setup_share_root(shared_dir, readonly))


def _join_share_root(ns_fd: int) -> None:
    """Join the namespace sharedns.make built: root and cwd become the
    share. The caller is single-threaded and holds CAP_SYS_ADMIN and
    CAP_SYS_CHROOT."""
    setns(ns_fd, CLONE_NEWNS, "setns into the request workers' mount namespace")
    _step("chdir / in the request workers' mount namespace", os.chdir, "/")


def setup_share_root(shared_dir: str, readonly: bool = False) -> None:
    """In a mount namespace of our own whose "/" is a slave: bind-mount
    the shared dir onto itself (read-only with ``readonly``) and pivot_root
    into it."""
    mount(shared_dir, shared_dir, None, MS_BIND | MS_REC, what=f"bind-mount {shared_dir} onto itself")
    if readonly:
        _remount_readonly(shared_dir)
    _pivot_into(shared_dir)


def setup_empty_root() -> RootInfo:
    """In a fresh mount namespace: an empty read-only tmpfs becomes "/".
    (It is mounted over /proc only because /proc is a directory that exists
    everywhere; the mount is private to this namespace and gone after the pivot.)"""
    make_root_slave()
    target = "/proc"
    mount("pyvirtiofsd-empty", target, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
          "size=4k,nr_inodes=1,mode=0555", what="mount an empty read-only tmpfs")
    _pivot_into(target)
    return RootInfo(-1, -1)


def chroot_request_root(shared_dir: str) -> RootInfo:
    def enter():
        _step(f"chroot {shared_dir}", os.chroot, shared_dir)
        _step("chdir /", os.chdir, "/")

    return _enter_request_root(enter)


def _enter_request_root(enter) -> RootInfo:
    """/proc/self/fd opened while /proc is still reachable, then ``enter()``
    makes the shared directory "/", then an O_PATH fd of it: the request
    worker's RootInfo (nothing left open if a step fails)."""
    proc_self_fd = _open_proc_self_fd()
    try:
        enter()
        root_fd = _step("open the new root", os.open, "/", O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except BaseException:
        os.close(proc_self_fd)
        raise
    return RootInfo(root_fd, proc_self_fd)


def _make_private_dir(prefix: str) -> str:
    """A new 0700 directory with an unguessable name under $TMPDIR or /tmp,
    as tempfile.mkdtemp makes, without importing tempfile: with shutil,
    random, bz2 and lzma it would add ~0.5 MiB to every process of the
    daemon for this one call."""
    base = os.environ.get("TMPDIR") or "/tmp"
    for _ in range(100):
        path = os.path.join(base, prefix + os.urandom(8).hex())
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "every name tried exists", base)


def chroot_empty_root() -> RootInfo:
    """chroot into a deleted empty directory: no mount needed, nothing can be
    created in it."""
    path = _step("create an empty directory", _make_private_dir, "pyvirtiofsd-empty-")
    fd = _step(f"open {path}", os.open, path, os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        _step(f"chmod {path}", os.fchmod, fd, 0o555)
        _step(f"rmdir {path}", os.rmdir, path)
        _step("fchdir to the empty directory", os.fchdir, fd)
        _step("chroot into the empty directory", os.chroot, ".")
        _step("chdir /", os.chdir, "/")
    finally:
        os.close(fd)
    return RootInfo(-1, -1)


def no_root_change(shared_dir: str, role: str) -> RootInfo:
    """--sandbox none: nothing changes; the request worker still gets the
    same fds so the rest of the code does not care."""
    if role != "request":
        return RootInfo(-1, -1)
    proc_self_fd = _open_proc_self_fd()
    root_fd = _step(f"open {shared_dir}", os.open, shared_dir, O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return RootInfo(root_fd, proc_self_fd)
