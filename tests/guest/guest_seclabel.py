"""Run in a guest by test_guest_seclabel_ids.py (Linux 6.1 booted with
security=selinux and no policy loaded; the daemon with --security-label
and --translate-uid/--translate-gid map:1000:2000:1): which LSMs run, new
entries of each kind (their labels are checked on the host), and what a
guest user creates and sees; one ``SECIDS {json}`` line."""
import json
import os
import subprocess

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
r = subprocess.run(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "touch", "/mnt/users/by1000"],
                   capture_output=True, text=True)
out["user_create"] = "ok" if r.returncode == 0 else r.stderr
# in a setgid directory of group 3000, which user 1000 has only as a
# supplementary group: Linux >= 6.6 sends that group (FUSE_EXT_GROUPS) and
# the label in the same request
r = subprocess.run(["setpriv", "--reuid=1000", "--regid=1000", "--groups=3000", "python3", "-c",
                    "import os; os.umask(0o022); "
                    "os.close(os.open('/mnt/grp/by1000', os.O_CREAT | os.O_WRONLY, 0o2755))"],
                   capture_output=True, text=True)
out["group_create"] = "ok" if r.returncode == 0 else r.stderr
st = os.stat("/mnt/grp/by1000")
out["group_file"] = [st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)]
st = os.stat("/mnt/users/by1000")
out["user_file_ids"] = [st.st_uid, st.st_gid]
st = os.stat("/mnt/host2000")
out["host2000_ids"] = [st.st_uid, st.st_gid]
os.chown("/mnt/lab_file", 1000, 1000)
st = os.stat("/mnt/lab_file")
out["chowned_ids"] = [st.st_uid, st.st_gid]
print("SECIDS " + json.dumps(out), flush=True)
