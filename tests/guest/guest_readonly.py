"""Run in a guest by test_guest_rust_options.py (the guest reads the host's
root over 9p): every modifying system call on /mnt, each result by name
(``ok`` or the errno's name), then reads, then shared and private mmap;
one ``RUSTOPTS {json}`` line."""
import errno
import json
import mmap
import os
results = {}
def attempt(name, fn, *args):
    try:
        fn(*args)
        results[name] = "ok"
    except OSError as e:
        results[name] = errno.errorcode.get(e.errno, str(e.errno))
M = "/mnt"
attempt("open_wronly", lambda: os.close(os.open(M + "/f", os.O_WRONLY)))
attempt("open_rdwr", lambda: os.close(os.open(M + "/f", os.O_RDWR)))
attempt("open_trunc", lambda: os.close(os.open(M + "/f", os.O_RDONLY | os.O_TRUNC)))
attempt("create", lambda: os.close(os.open(M + "/new", os.O_CREAT | os.O_WRONLY, 0o644)))
attempt("mkdir", os.mkdir, M + "/newdir")
attempt("rmdir", os.rmdir, M + "/d")
attempt("unlink", os.unlink, M + "/f")
attempt("rename", os.rename, M + "/f", M + "/g")
attempt("symlink", os.symlink, "f", M + "/ln")
attempt("link", os.link, M + "/f", M + "/hard")
attempt("mkfifo", os.mkfifo, M + "/fifo")
attempt("chmod", os.chmod, M + "/f", 0o600)
attempt("chown", os.chown, M + "/f", 1, 1)
attempt("truncate", os.truncate, M + "/f", 0)
attempt("utime", os.utime, M + "/f", (1, 1))
attempt("setxattr", os.setxattr, M + "/f", "user.y", b"2")
attempt("removexattr", os.removexattr, M + "/f", "user.x")
# reading is allowed
with open(M + "/f", "rb") as f:
    results["read"] = f.read().decode()
results["listdir"] = sorted(os.listdir(M))
results["getxattr"] = os.getxattr(M + "/f", "user.x").decode()
fd = os.open(M + "/f", os.O_RDONLY)
try:
    mmap.mmap(fd, 4, mmap.MAP_SHARED, mmap.PROT_READ).close()
    results["mmap_shared"] = "ok"
except OSError as e:
    results["mmap_shared"] = errno.errorcode.get(e.errno, str(e.errno))
m = mmap.mmap(fd, 4, mmap.MAP_PRIVATE, mmap.PROT_READ)
results["mmap_private"] = m[:4].decode()
m.close()
os.close(fd)
print("RUSTOPTS " + json.dumps(results), flush=True)
