"""Run inside the test guest by test_guest_multiqueue.py (see its docstring):
``python3 guest_multiqueue.py SECONDS`` with the share at /mnt, 2 vCPUs.
Prints ``MQ-MOUNTED`` and ``MQ-UNMOUNTED`` (the host counts the daemon's
fds at each) and finally one ``MQ {json}`` line."""

import errno
import fcntl
import json
import os
import random
import struct
import sys
import time

from guest_sync import signal as sync_signal
from guest_sync import wait as sync_wait

def pin(cpu):
    os.sched_setaffinity(0, {cpu})

def interrupts():
    """virtio-fs queue name -> interrupts on all CPUs."""
    with open("/proc/interrupts") as f:
        ncpu = len(f.readline().split())
        out = {}
        for line in f:
            parts = line.split()
            if parts and ("requests" in parts[-1] or "hiprio" in parts[-1]):
                out[parts[-1]] = sum(int(x) for x in parts[1:1 + ncpu])
    return out

rec = {"errors": []}
def check(what, ok):
    if not ok:
        rec["errors"].append(what)

print("MQ-MOUNTED", flush=True)
time.sleep(5)                       # the host counts the workers' fds

# -- 1. cross-queue ------------------------------------------------------------------
irq_before = interrupts()
pin(0)
os.mkdir("/mnt/d")
names = {f"entry-with-a-rather-long-name-{i:04d}" for i in range(400)}
for n in names:
    os.close(os.open("/mnt/d/" + n, os.O_CREAT | os.O_WRONLY, 0o644))
fd = os.open("/mnt/x", os.O_CREAT | os.O_RDWR, 0o644)
check("write cpu0", os.write(fd, b"hello") == 5)
listing = os.scandir("/mnt/d")
seen = [next(listing).name for _ in range(40)]
fcntl.lockf(fd, fcntl.LOCK_EX, 5, 0)        # bytes 0..4, SETLK on queue 1
mid = interrupts()

pin(1)
check("pread cpu1", os.pread(fd, 5, 0) == b"hello")
check("pwrite cpu1", os.pwrite(fd, b" world", 5) == 6)
check("fstat cpu1", os.fstat(fd).st_size == 11)
os.fsync(fd)
seen += [e.name for e in listing]
listing.close()
check("readdir continuation", sorted(seen) == sorted(names))

def child(fn):
    pid = os.fork()
    if pid == 0:
        pin(1)
        try:
            os._exit(0 if fn() else 1)
        except BaseException as e:  # noqa: BLE001 - the child reports whatever stopped it
            print("child failed:", repr(e), flush=True)
            os._exit(2)
    return os.waitpid(pid, 0)[1] == 0

parent = os.getpid()
def blocked():
    fd2 = os.open("/mnt/x", os.O_RDWR)
    lk = fcntl.fcntl(fd2, fcntl.F_GETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 1, 0))
    ltype, _, start, length, lpid = struct.unpack("hhqqi", lk)
    try:
        fcntl.lockf(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        refused = False
    except OSError as e:
        refused = e.errno in (errno.EAGAIN, errno.EACCES)
    return ltype == fcntl.F_WRLCK and lpid == parent and (start, length) == (0, 5) and refused
check("getlk/setlk from cpu1 see the lock taken on cpu0", child(blocked))
fcntl.lockf(fd, fcntl.LOCK_UN, 5, 0)        # unlock on queue 2
def free():
    fd2 = os.open("/mnt/x", os.O_RDWR)
    fcntl.lockf(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
    return True
check("lock free after the unlock on cpu1", child(free))
os.close(fd)                                 # FLUSH + RELEASE on queue 2
with open("/mnt/x", "rb") as f:
    check("content", f.read() == b"hello world")
# hard link and rename between inodes the two workers looked up (one mount of
# the share for both: no EXDEV)
pin(0)
os.mkdir("/mnt/la")
with open("/mnt/la/f", "wb") as f:
    f.write(b"linked")
pin(1)
os.mkdir("/mnt/lb")
try:
    os.link("/mnt/la/f", "/mnt/lb/g")             # LINK on queue 2 of request-1's inode
    os.rename("/mnt/lb/g", "/mnt/la/g2")          # RENAME between the two workers' directories
    check("link + rename across queues",
          os.stat("/mnt/la/g2").st_ino == os.stat("/mnt/la/f").st_ino and os.listdir("/mnt/lb") == [])
except OSError as e:
    check(f"link + rename across queues: {e}", False)
irq_after = interrupts()
rec["irq"] = [irq_before, mid, irq_after]

# -- 1b. the request worker of queue 1 killed with a file open on it -------------------
pin(0)
fd = os.open("/mnt/survivor", os.O_CREAT | os.O_RDWR, 0o644)   # CREATE on queue 1 only
check("write before the kill", os.write(fd, b"before") == 6)
os.fsync(fd)
sync_signal("kill-request-1")       # the host SIGKILLs request-1 ...
sync_wait("request-1-replaced", timeout=120)   # ... and says when its replacement serves
check("pread after the kill, cpu0", os.pread(fd, 6, 0) == b"before")
check("pwrite after the kill, cpu0", os.pwrite(fd, b" after", 6) == 6)
check("fstat after the kill, cpu0", os.fstat(fd).st_size == 12)
pin(1)
check("pread after the kill, cpu1", os.pread(fd, 12, 0) == b"before after")
os.close(fd)
os.unlink("/mnt/survivor")

# -- 2. stress -------------------------------------------------------------------------
os.mkdir("/mnt/t")
for i in range(4):
    os.mkdir(f"/mnt/t/{i}")
DEADLINE = time.monotonic() + int(sys.argv[1])
VANISH = (errno.ENOENT,)

def stress(k):
    pin(k % 2)
    rnd = random.Random(k)
    ops = 0
    bad = []
    n = 0
    while time.monotonic() < DEADLINE:
        n += 1
        path = f"/mnt/t/{k}/w{k}-{n}"
        data = rnd.randbytes(rnd.choice((0, 1, 100, 4096, 70000)))
        try:
            with open(path, "wb") as f:
                f.write(data)
            with open(path, "rb") as f:
                if f.read() != data:
                    bad.append("content " + path)
            new = f"/mnt/t/{(k + n) % 4}/r{k}-{n}"
            os.rename(path, new)
            if os.stat(new).st_size != len(data):
                bad.append("size " + new)
            # someone else's files: may vanish under us, nothing else
            other = f"/mnt/t/{rnd.randrange(4)}"
            for name in os.listdir(other)[:5]:
                try:
                    with open(other + "/" + name, "rb") as f:
                        f.read(100)
                except OSError as e:
                    if e.errno not in VANISH:
                        bad.append(f"{name} {e}")
            if n % 3:
                os.unlink(new)
            ops += 1
        except OSError as e:
            bad.append(f"{path}: {e}")
    return ops, bad

pipes = []
for k in range(4):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            ops, bad = stress(k)
        except BaseException as e:  # noqa: BLE001 - a crashed stresser is a reported failure
            ops, bad = 0, [f"crashed: {e!r}"]
        os.write(w, json.dumps({"ops": ops, "bad": bad[:20], "nbad": len(bad)}).encode())
        os._exit(0)
    os.close(w)
    pipes.append((pid, r))
rec["stress"] = []
for pid, r in pipes:
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.waitpid(pid, 0)
    rec["stress"].append(json.loads(b"".join(chunks) or b'{"ops": 0, "bad": ["no report"], "nbad": 1}'))
for d in range(4):
    for name in os.listdir(f"/mnt/t/{d}"):
        os.unlink(f"/mnt/t/{d}/{name}")
    os.rmdir(f"/mnt/t/{d}")
os.rmdir("/mnt/t")

# -- 3. unmount ------------------------------------------------------------------------
rec["umount"] = os.system("umount /mnt")
print("MQ-UNMOUNTED", flush=True)
time.sleep(5)                       # the host counts the workers' fds again
print("MQ " + json.dumps(rec), flush=True)
