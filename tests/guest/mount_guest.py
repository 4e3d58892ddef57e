"""In-guest half of test_guest_mount_options.py (stdlib only; run as root).

Read-only: the same steps on the virtiofs mount (/mnt) and on a tmpfs the
script mounts at /tmp/ref (the local file system it is compared with):
if the mount starts read-only (the boot's ``ro`` mount option) the write
attempts come first, then ``remount,rw``; else a write, ``remount,ro``,
the write attempts, ``remount,rw``; then writes again. Each attempt is
"ok" or its errno's name. One ``MOUNT {json}`` line: {"ref": ..., "vfs": ...}.

atime: for each guest option in ATIME_OPTS, ``remount,OPT`` /mnt and read
``atime/OPT`` (made by the host, atime in 2000) once; one ``ATIME {json}``
line with what the guest's stat says afterwards. The host decides what it
records (test_guest_mount_options.py looks at the host's atimes).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

ATIME_OPTS = ("noatime", "strictatime", "relatime")


def attempt(fn) -> str:
    try:
        fn()
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"


def write(path: str, data: bytes, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read(path: str) -> None:
    with open(path, "rb") as f:
        if f.read() != b"before":
            raise OSError(errno.EIO, "unexpected content")


def is_ro(mnt: str) -> bool:
    for line in open("/proc/self/mounts"):
        f = line.split()
        if f[1] == mnt:
            return "ro" in f[3].split(",")
    raise RuntimeError(f"{mnt} is not mounted")


def remount(mnt: str, opt: str) -> str:
    r = subprocess.run(["mount", "-o", f"remount,{opt}", mnt], capture_output=True, text=True)
    return "ok" if r.returncode == 0 else f"failed: {r.stderr.strip()}"


def refused_writes(mnt: str) -> dict:
    return {
        "create": attempt(lambda: write(f"{mnt}/new", b"x")),
        "open_wronly": attempt(lambda: os.close(os.open(f"{mnt}/ro/before", os.O_WRONLY))),
        "truncate": attempt(lambda: os.truncate(f"{mnt}/ro/before", 0)),
        "mkdir": attempt(lambda: os.mkdir(f"{mnt}/newdir")),
        "unlink": attempt(lambda: os.unlink(f"{mnt}/ro/before")),
        "rename": attempt(lambda: os.rename(f"{mnt}/ro/before", f"{mnt}/ro/renamed")),
        "chmod": attempt(lambda: os.chmod(f"{mnt}/ro/before", 0o600)),
        "utime": attempt(lambda: os.utime(f"{mnt}/ro/before", (0, 0))),
        "setxattr": attempt(lambda: os.setxattr(f"{mnt}/ro/before", "user.x", b"1")),
        "symlink": attempt(lambda: os.symlink("before", f"{mnt}/ro/link")),
        "read": attempt(lambda: read(f"{mnt}/ro/before")),
        "stat": attempt(lambda: os.stat(f"{mnt}/ro/before")),
        "listdir": attempt(lambda: os.listdir(f"{mnt}/ro")),
    }


def read_only_steps(mnt: str) -> dict:
    out = {"started_ro": is_ro(mnt)}
    if not out["started_ro"]:
        os.makedirs(f"{mnt}/ro", exist_ok=True)
        out["write_rw"] = attempt(lambda: write(f"{mnt}/ro/before", b"before"))
        out["remount_ro"] = remount(mnt, "ro")
    out["is_ro"] = is_ro(mnt)
    out["refused"] = refused_writes(mnt)
    out["remount_rw"] = remount(mnt, "rw")
    out["is_ro_after"] = is_ro(mnt)
    out["after"] = {
        "create": attempt(lambda: write(f"{mnt}/ro/after", b"after")),
        "append": attempt(lambda: write(f"{mnt}/ro/before", b"+more",
                                        os.O_WRONLY | os.O_APPEND)),
        "mkdir": attempt(lambda: os.mkdir(f"{mnt}/ro/dir")),
        "unlink": attempt(lambda: os.unlink(f"{mnt}/ro/after")),
    }
    return out


def main() -> None:
    os.makedirs("/tmp/ref", exist_ok=True)
    ref_opts = "ro" if is_ro("/mnt") else "rw"
    if ref_opts == "ro":  # a read-only tmpfs with the same file in it
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "ref", "/tmp/ref"], check=True)
        os.makedirs("/tmp/ref/ro")
        write("/tmp/ref/ro/before", b"before")
        subprocess.run(["mount", "-o", "remount,ro", "/tmp/ref"], check=True)
    else:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "ref", "/tmp/ref"], check=True)
    result = {"ref": read_only_steps("/tmp/ref"), "vfs": read_only_steps("/mnt")}
    sys.stdout.write("MOUNT " + json.dumps(result, sort_keys=True) + "\n")
    atime = {}
    for opt in ATIME_OPTS:
        r = remount("/mnt", opt)
        opts = next(line.split()[3] for line in open("/proc/self/mounts")
                    if line.split()[1] == "/mnt")
        with open(f"/mnt/atime/{opt}", "rb") as f:
            f.read()
        atime[opt] = {"remount": r, "options": opts,
                      "guest_atime": os.stat(f"/mnt/atime/{opt}").st_atime}
    sys.stdout.write("ATIME " + json.dumps(atime, sort_keys=True) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
