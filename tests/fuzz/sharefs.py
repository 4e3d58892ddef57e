"""The fuzz target's share on a size-limited tmpfs, in a private mount namespace.

The fuzzer writes, creates and FALLOCATEs files in its share; RLIMIT_FSIZE
caps each file (fuzz_chain_fuse.FILE_SIZE_LIMIT), not how many there are
between two resets. So the share is a tmpfs of ``SIZE`` bytes and
``INODES`` inodes: past them a request gets ENOSPC (an ordinary reply),
never a full host disk, whatever the inputs or however many fuzzers run.
The mount lives in a mount namespace of the fuzzing process alone (made
private first, so nothing propagates to the host) and goes with it; the
host only ever sees the empty mount point, which ``release`` removes.

``bounded(parent)`` must run before the process has threads (libFuzzer's
RSS thread, the session's helpers): ``unshare(CLONE_NEWNS)`` gives the new
namespace to the calling thread only. Needs root (CAP_SYS_ADMIN), as the
target does anyway. The library's own ctypes calls, not
daemon.sandbox's: importing that package here would load daemon modules
before atheris instruments them.
"""

from __future__ import annotations

import ctypes
import os

SIZE = 64 << 20        # bytes: ~16 files at the 4 MiB RLIMIT_FSIZE cap
INODES = 8192
CLONE_NEWNS = 0x00020000
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fuzz share: {what}: {os.strerror(e)}")


def bounded(parent: str) -> str:
    """A fresh directory under ``parent`` with a tmpfs of ``SIZE`` bytes
    mounted on it, in this process's own mount namespace; its path."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    point = os.path.join(parent, "share-fs")
    os.mkdir(point, 0o700)
    data = f"size={SIZE},nr_inodes={INODES},mode=0777".encode()
    _check(_libc.mount(b"tmpfs", os.fsencode(point), b"tmpfs", MS_NOSUID | MS_NODEV, data), "mount tmpfs")
    return point


def release(point: str) -> None:
    """Detach the tmpfs (its files go with it) and remove the mount point."""
    _check(_libc.umount2(os.fsencode(point), MNT_DETACH), f"umount {point}")
    os.rmdir(point)


def is_bounded(path: str) -> bool:
    """Whether ``path`` lies on a filesystem of at most ``SIZE`` bytes."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize <= SIZE
