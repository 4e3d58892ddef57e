"""In the guest (stdlib only): the steps of test_guest_dead_lock_holder.py.

1. Make /mnt/t with FILES small files (each holding its own number), open
   one of them read-write and keep it open (an fh from before), and look
   at every file once (its inode in the shared inode table).
2. Signal ``ready``; the host then makes the shared tables' locks the
   locks of processes that died mid-update, and signals ``held``.
3. Drop the dentry and inode caches and ``stat`` every file again (cold
   LOOKUPs: the inode table's lock), check their contents, create and
   write NEW files and read them back (CREATE, OPEN, RELEASE: the
   open-file table's lock), write and read through the fh from step 1,
   list the directory, and unlink the new files.

Reports one ``LOCKHOLDER {json}`` line: the counts of what worked, every
error (step, errno name), and how long step 3 took.
"""

from __future__ import annotations

import errno
import os
import sys
import time

try:  # run in the guest as a script, or imported by the host's test
    from guest_sync import report, signal, wait
except ImportError:
    from .guest_sync import report, signal, wait

PREFIX = "LOCKHOLDER "
MNT = "/mnt"
FILES = 200
NEW = 50


def main() -> int:
    d = os.path.join(MNT, "t")
    errors: list[str] = []
    os.mkdir(d)
    for i in range(FILES):
        with open(os.path.join(d, f"f{i}"), "w") as f:
            f.write(str(i))
    kept = os.open(os.path.join(d, "f0"), os.O_RDWR)
    for i in range(FILES):
        os.stat(os.path.join(d, f"f{i}"))
    signal("ready")
    wait("held", 120)
    t0 = time.monotonic()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")
    looked = 0
    for i in range(FILES):
        path = os.path.join(d, f"f{i}")
        try:
            os.stat(path)
            with open(path) as f:
                looked += f.read() == str(i)
        except OSError as e:
            errors.append(f"stat f{i}: {errno.errorcode.get(e.errno, e.errno)}")
    made = 0
    for i in range(NEW):
        path = os.path.join(d, f"n{i}")
        try:
            with open(path, "w") as f:
                f.write("x" * (i + 1))
            with open(path) as f:
                made += f.read() == "x" * (i + 1)
        except OSError as e:
            errors.append(f"create n{i}: {errno.errorcode.get(e.errno, e.errno)}")
    try:
        os.pwrite(kept, b"kept", 0)
        kept_ok = os.pread(kept, 4, 0) == b"kept"
        os.close(kept)
    except OSError as e:
        kept_ok = False
        errors.append(f"the fh from before: {errno.errorcode.get(e.errno, e.errno)}")
    listed = len(os.listdir(d))
    for i in range(NEW):
        try:
            os.unlink(os.path.join(d, f"n{i}"))
        except OSError as e:
            errors.append(f"unlink n{i}: {errno.errorcode.get(e.errno, e.errno)}")
    report(PREFIX, {"looked": looked, "made": made, "kept": kept_ok, "listed": listed,
                    "left": len(os.listdir(d)), "errors": errors, "seconds": round(time.monotonic() - t0, 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
