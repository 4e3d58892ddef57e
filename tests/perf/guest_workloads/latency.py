"""In-guest round trips: the guest waits for each reply, so these are the
daemon's per-request latency as a TCG guest sees it (stdlib only).

    python3 latency.py DIR [--count N]

Prints ``BENCH {"phase": "lat-getattr"|"lat-lookup"|"lat-read4k", "seconds", "ops"}``
(best of three rounds). Meant for a mount with cache=never, where every
fstat is a GETATTR, every stat of a path a LOOKUP (revalidation) + GETATTR
and every 4 KiB pread a READ (direct I/O).
"""

import argparse
import json
import os
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--count", type=int, default=3000)
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    path = os.path.join(a.dir, "latency-probe")
    with open(path, "wb") as f:
        f.write(b"x" * 4096)
    fd = os.open(path, os.O_RDONLY)
    for phase, fn in (("lat-getattr", lambda: os.fstat(fd)),
                      ("lat-lookup", lambda: os.stat(path)),
                      ("lat-read4k", lambda: os.pread(fd, 4096, 0))):
        best = None
        for _ in range(3):
            t0 = time.monotonic()
            for _ in range(a.count):
                fn()
            took = time.monotonic() - t0
            best = took if best is None else min(best, took)
        print("BENCH " + json.dumps({"phase": phase, "seconds": round(best, 4), "ops": a.count}),
              flush=True)
    os.close(fd)
    os.unlink(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
