"""In-guest half of test_guest_sharing.py (stdlib only): two guests, each
with its own daemon, on one host directory, run this script at once, one
as ``--role A`` and one as ``--role B``. They take turns through files in
/run/sync (guest_sync.py); B prints what it saw in ``SHARE {json}`` lines.

Data (the host made the ``KEPT`` files in ``data/``, 4 KiB of b"0" each,
and the ``GROWN`` ones, 100 bytes each, before the boot):

1. A writes and fsyncs ``data/new.txt``; B reads it.
2. B reads every KEPT file (into its page cache), keeps those fds open, and
   stats every GROWN file; A overwrites the KEPT files with b"1" in place,
   appends 100 bytes to the GROWN ones, fsyncs each; B then reads one file
   through the fd it kept, opens and reads another, stats a third: at
   once, and (on three other files) 2 s later, beyond cache=auto's 1 s
   timeouts. Each observation is "new", "old" or what it was.

Locks (host-made ``locks/posix``, ``locks/ofd``, ``locks/flock``):

3. A takes a write lock of each kind (fcntl F_SETLK, F_OFD_SETLK, flock);
   B tries each without waiting (expected: EAGAIN/EACCES) and asks F_GETLK.
4. For each kind B waits for it (F_SETLKW, F_OFD_SETLKW, LOCK_EX); A
   releases it 2 s after B said it is about to wait: B records how long it
   waited and whether A had announced the release when it got the lock.
5. B releases everything; A takes all three again and says so; B checks
   they are held against it; the host SIGKILLs A's QEMU, waits for A's
   daemon to exit and creates ``a-dead``; B tries all three again.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import struct
import time

try:  # run in the guest as a script, or imported by the host's test
    from guest_sync import report, signal, wait
except ImportError:
    from .guest_sync import report, signal, wait

PREFIX = "SHARE "
MNT = "/mnt"
KINDS = ("posix", "ofd", "flock")
FLOCK = struct.Struct("hhqqi4x")  # struct flock: l_type, l_whence, l_start, l_len, l_pid
RELEASE_DELAY = 2.0
OLD, NEW = b"0" * 4096, b"1" * 4096
KEPT = ("kept_fd_at_once", "kept_fd_after_2s", "reopen_at_once", "reopen_after_2s")  # 4 KiB of OLD
GROWN = ("size_at_once", "size_after_2s")  # 100 bytes


def classify(data: bytes, old: bytes, new: bytes):
    return "new" if data == new else "old" if data == old else repr(data[:16])


def lock(kind: str, fd: int, wait_for_it: bool) -> None:
    """A write lock on the whole file; raises OSError."""
    if kind == "flock":
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait_for_it else fcntl.LOCK_NB))
        return
    if kind == "posix":
        cmd = fcntl.F_SETLKW if wait_for_it else fcntl.F_SETLK
    else:
        cmd = fcntl.F_OFD_SETLKW if wait_for_it else fcntl.F_OFD_SETLK
    fcntl.fcntl(fd, cmd, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))


def unlock(kind: str, fd: int) -> None:
    if kind == "flock":
        fcntl.flock(fd, fcntl.LOCK_UN)
        return
    cmd = fcntl.F_SETLK if kind == "posix" else fcntl.F_OFD_SETLK
    fcntl.fcntl(fd, cmd, FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))


def try_lock(kind: str, fd: int) -> str:
    """'acquired' (and released again) or the errno's name."""
    try:
        lock(kind, fd, False)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    try:
        unlock(kind, fd)
    except OSError as e:  # QEMU 7.2's C virtiofsd: flock's LOCK_UN is EOPNOTSUPP
        return "acquired, unlock " + errno.errorcode.get(e.errno, str(e.errno))
    return "acquired"


def getlk(fd: int) -> str:
    try:
        got = fcntl.fcntl(fd, fcntl.F_GETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return {fcntl.F_UNLCK: "F_UNLCK", fcntl.F_WRLCK: "F_WRLCK", fcntl.F_RDLCK: "F_RDLCK"}.get(
        FLOCK.unpack(got)[0], "?")


def open_locks() -> dict:
    return {k: os.open(f"{MNT}/locks/{k}", os.O_RDWR) for k in KINDS}


def role_a() -> None:
    with open(f"{MNT}/data/new.txt", "wb") as f:
        f.write(b"written in guest A\n" * 100)
        f.flush()
        os.fsync(f.fileno())
    signal("a-wrote-new")
    wait("b-cached")
    for name in KEPT:
        with open(f"{MNT}/data/{name}", "r+b") as f:
            f.write(NEW)
            f.flush()
            os.fsync(f.fileno())
    for name in GROWN:
        with open(f"{MNT}/data/{name}", "ab") as f:
            f.write(b"g" * 100)
            f.flush()
            os.fsync(f.fileno())
    signal("a-rewrote")

    fds = open_locks()
    took = {}
    for k in KINDS:
        try:
            lock(k, fds[k], False)
            took[k] = "acquired"
        except OSError as e:
            took[k] = errno.errorcode.get(e.errno, str(e.errno))
    report(PREFIX, {"role": "A", "took": took})
    signal("a-locked")
    released = {}
    for k in KINDS:
        wait(f"b-waiting-{k}")
        time.sleep(RELEASE_DELAY)
        signal(f"a-releasing-{k}")
        try:
            unlock(k, fds[k])
            released[k] = "released"
        except OSError as e:  # QEMU 7.2's C virtiofsd: flock's LOCK_UN is EOPNOTSUPP
            released[k] = errno.errorcode.get(e.errno, str(e.errno))
    report(PREFIX, {"role": "A", "released": released})
    wait("b-released-all")
    retook = {k: lock_within(k, fds[k], 60, keep=True) for k in KINDS}
    report(PREFIX, {"role": "A", "retook": retook})
    signal("a-holding")
    wait("never", timeout=3600)  # the host kills this guest


def role_b() -> None:
    out = {"role": "B"}
    wait("a-wrote-new")
    with open(f"{MNT}/data/new.txt", "rb") as f:
        out["new_file"] = classify(f.read(), b"", b"written in guest A\n" * 100)
    # each observation on a file of its own, so that none changes what the
    # guest has cached for another
    kept = {}
    for name in KEPT:
        kept[name] = os.open(f"{MNT}/data/{name}", os.O_RDONLY)
        out[f"{name}_before"] = classify(os.pread(kept[name], 4096, 0), OLD, NEW)
    for name in GROWN:
        out[f"{name}_before"] = os.stat(f"{MNT}/data/{name}").st_size
    signal("b-cached")
    wait("a-rewrote")

    def look(when):
        out[f"kept_fd_{when}"] = classify(os.pread(kept[f"kept_fd_{when}"], 4096, 0), OLD, NEW)
        with open(f"{MNT}/data/reopen_{when}", "rb") as f:
            out[f"reopen_{when}"] = classify(f.read(), OLD, NEW)
        size = os.stat(f"{MNT}/data/size_{when}").st_size
        out[f"size_{when}"] = "new" if size == 200 else "old" if size == 100 else size

    look("at_once")
    time.sleep(2)
    look("after_2s")
    for fd in kept.values():
        os.close(fd)
    report(PREFIX, out)

    fds = open_locks()
    wait("a-locked")
    report(PREFIX, {"role": "B", "try_while_a_holds": {k: try_lock(k, fds[k]) for k in KINDS},
                    "getlk_posix": getlk(fds["posix"])})
    waited = {}
    for k in KINDS:
        signal(f"b-waiting-{k}")
        t0 = time.monotonic()
        try:
            lock(k, fds[k], True)
            got = "acquired"
        except OSError as e:
            got = errno.errorcode.get(e.errno, str(e.errno))
        waited[k] = {"result": got, "seconds": round(time.monotonic() - t0, 2),
                     "after_release": os.path.exists(f"/run/sync/a-releasing-{k}")}
    report(PREFIX, {"role": "B", "wait": waited})
    for k in KINDS:
        if waited[k]["result"] == "acquired":
            unlock(k, fds[k])
    signal("b-released-all")
    wait("a-holding")
    report(PREFIX, {"role": "B", "try_while_a_holds_again":
                    {k: try_lock(k, fds[k]) for k in KINDS}})
    signal("b-checked-held")
    wait("a-dead")
    report(PREFIX, {"role": "B", "after_a_died":
                    {k: lock_within(k, fds[k], 30, keep=False) for k in KINDS}})
    report(PREFIX, {"role": "B", "done": True})


def lock_within(kind: str, fd: int, seconds: float, keep: bool) -> str:
    """Try a write lock without waiting (not every daemon has F_SETLKW)
    until it is granted or ``seconds`` pass: 'acquired' (held if ``keep``)
    or the last errno's name."""
    deadline = time.monotonic() + seconds
    while True:
        if keep:
            try:
                lock(kind, fd, False)
                got = "acquired"
            except OSError as e:
                got = errno.errorcode.get(e.errno, str(e.errno))
        else:
            got = try_lock(kind, fd)
        if got.startswith("acquired") or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", choices=("A", "B"), required=True)
    a = ap.parse_args()
    try:
        role_a() if a.role == "A" else role_b()
    except Exception as e:  # noqa: BLE001 - tell the host, then fail
        report(PREFIX, {"role": a.role, "error": f"{type(e).__name__}: {e}"})
        raise
