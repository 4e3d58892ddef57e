"""Run in a guest by test_guest_seclabel_ids.py (Linux 6.1 booted with
security=selinux and no policy loaded; the daemon with --security-label
and --translate-uid/--translate-gid map:1000:2000:1): which LSMs run, new
entries of each kind (their labels are checked on the host), and what a
guest user creates and sees; one ``SECIDS {json}`` line."""
import errno
import json
import os
import subprocess

def as_user(uid, fn):
    """fn() in a child with uid/gid ``uid`` and no groups: 'ok' or errno name."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            fn()
            os._exit(0)
        except OSError as e:
            os._exit(e.errno)
        os._exit(255)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return "ok" if code == 0 else errno.errorcode.get(code, str(code))

out = {}
subprocess.run(["mount", "-t", "securityfs", "none", "/sys/kernel/security"], capture_output=True)
try:
    out["lsm"] = open("/sys/kernel/security/lsm").read()
except OSError as e:
    out["lsm"] = "unreadable: " + str(e)
os.umask(0o022)
open("/mnt/lab_file", "w").close()
os.mkdir("/mnt/lab_dir")
os.mkfifo("/mnt/lab_fifo")
os.symlink("lab_file", "/mnt/lab_link")
out["listing"] = sorted(os.listdir("/mnt"))
os.mkdir("/mnt/users", 0o777)
os.chmod("/mnt/users", 0o777)
out["user_create"] = as_user(1000, lambda: open("/mnt/users/by1000", "w").close())
st = os.stat("/mnt/users/by1000")
out["user_file_ids"] = [st.st_uid, st.st_gid]
st = os.stat("/mnt/host2000")
out["host2000_ids"] = [st.st_uid, st.st_gid]
os.chown("/mnt/lab_file", 1000, 1000)
st = os.stat("/mnt/lab_file")
out["chowned_ids"] = [st.st_uid, st.st_gid]
print("SECIDS " + json.dumps(out), flush=True)
