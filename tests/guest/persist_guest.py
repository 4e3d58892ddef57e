"""In-guest half of test_guest_persistence.py (stdlib only).

1. Writes ``files/f00..f{N-1}`` of known content (``file_bytes(i)``, 0 to
   ~300 KiB), fsyncs each and the directory, and prints ``@@FILES-SYNCED@@``.
2. With ``--load``: appends ``record(i)`` for i = 0, 1, ... to ``log``,
   fsyncs after each, and prints ``@@SYNCED i@@`` once fsync returned, until
   the host kills the guest. Without it: prints ``@@IDLE@@`` and waits to
   be killed.

The host SIGKILLs QEMU and the daemon at once, then checks that every
file and every record reported as fsynced is on the host, byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

NFILES = 24
RECORD = 64


def file_bytes(i: int) -> bytes:
    """File i's content: deterministic, 0 to ~300 KiB, not page aligned."""
    size = (i * 12_347) % 300_001
    seed = hashlib.sha256(f"file {i}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def record(i: int) -> bytes:
    """Record i of the log: 64 bytes, its number and a digest of it."""
    return f"{i:08d} {hashlib.sha256(str(i).encode()).hexdigest()[:54]}\n".encode()


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--load", action="store_true")
    a = ap.parse_args()
    files = os.path.join(a.dir, "files")
    os.makedirs(files, exist_ok=True)
    for i in range(NFILES):
        with open(os.path.join(files, f"f{i:02d}"), "wb") as f:
            f.write(file_bytes(i))
            f.flush()
            os.fsync(f.fileno())
    dfd = os.open(files, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    say("@@FILES-SYNCED@@")
    if not a.load:
        say("@@IDLE@@")
        time.sleep(3600)
        return
    fd = os.open(os.path.join(a.dir, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    i = 0
    while True:
        os.write(fd, record(i))
        os.fsync(fd)
        say(f"@@SYNCED {i}@@")
        i += 1


if __name__ == "__main__":
    main()
