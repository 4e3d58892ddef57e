# Run in the guest by tests/guest/test_guest_idmap.py (host python3 over 9p):
# guest root and guest users create files on a virtiofs export whose daemon
# runs in a user namespace (--uid-map/--gid-map); prints one IDMAP {json} line
# with what the guest saw (ids by stat, errnos).
import json
import os

out = {}


def as_user(uid, gid, fn):
    """Run fn() in a child with these ids; its errno (0: it worked)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            fn()
        except OSError as e:
            code = e.errno or 255
        os.write(w, str(code).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return int(f.read() or "255")


def write(path, data):
    def fn():
        with open(path, "w") as f:
            f.write(data)
    return fn


def ids(path):
    st = os.lstat(path)
    return [st.st_uid, st.st_gid]


out["mnt"] = ids("/mnt")
with open("/mnt/by-root", "w") as f:
    f.write("by-root")
os.mkdir("/mnt/dir-root")
os.mkdir("/mnt/pub")
os.chmod("/mnt/pub", 0o1777)
out["by_user"] = as_user(1000, 1000, write("/mnt/by-user", "by-user"))
out["by_1234"] = as_user(1234, 1234, write("/mnt/pub/by-1234", "by-1234"))
out["dir_1234"] = as_user(1234, 1234, lambda: os.mkdir("/mnt/pub/dir-1234"))
out["unmapped"] = as_user(5000, 5000, write("/mnt/pub/by-5000", "x"))
try:
    os.chown("/mnt/by-root", 1234, 1234)
    out["chown_mapped"] = 0
except OSError as e:
    out["chown_mapped"] = e.errno
try:
    os.chown("/mnt/dir-root", 5000, -1)
    out["chown_unmapped"] = 0
except OSError as e:
    out["chown_unmapped"] = e.errno
out["stat"] = {name: ids("/mnt/" + name) for name in
               ("by-root", "dir-root", "by-user", "pub/by-1234", "pub/dir-1234", "host-root")}
out["host_root_listed"] = "host-root" in os.listdir("/mnt")
print("IDMAP " + json.dumps(out), flush=True)
