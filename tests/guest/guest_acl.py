"""Run in a guest by test_guest_rust_options.py with --posix-acl: setfacl
and getfacl (the host's, over 9p) on /mnt, default ACL inheritance, the
umask where no default ACL applies, and access granted and refused by ACL
entries to two unprivileged users; one ``RUSTOPTS {json}`` line."""
import errno
import json
import os
import subprocess

def run(*argv):
    r = subprocess.run(argv, capture_output=True, text=True)
    return [r.returncode, r.stdout, r.stderr]

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
    status = os.waitpid(pid, 0)[1]
    code = os.waitstatus_to_exitcode(status)
    return "ok" if code == 0 else errno.errorcode.get(code, str(code))

out = {}
os.umask(0o022)
os.mkdir("/mnt/inherit", 0o755)
out["set_default"] = run("setfacl", "-m", "u:1000:rwx,d:u:1000:rwx", "/mnt/inherit")
open("/mnt/inherit/file", "w").close()
os.mkdir("/mnt/inherit/sub")
out["file_acl"] = run("getfacl", "--omit-header", "--numeric", "/mnt/inherit/file")
out["sub_acl"] = run("getfacl", "--omit-header", "--numeric", "/mnt/inherit/sub")
os.mkdir("/mnt/plain")
open("/mnt/plain/file", "w").close()
out["plain_mode"] = oct(os.stat("/mnt/plain/file").st_mode & 0o777)
with open("/mnt/secret", "w") as f:
    f.write("s")
os.chmod("/mnt/secret", 0o600)
out["grant"] = run("setfacl", "-m", "u:1000:r", "/mnt/secret")
out["read_1000"] = as_user(1000, lambda: os.close(os.open("/mnt/secret", os.O_RDONLY)))
out["read_1001"] = as_user(1001, lambda: os.close(os.open("/mnt/secret", os.O_RDONLY)))
out["write_1000"] = as_user(1000, lambda: os.close(os.open("/mnt/secret", os.O_WRONLY)))
out["chmod"] = run("chmod", "0640", "/mnt/secret")
out["secret_acl"] = run("getfacl", "--omit-header", "--numeric", "/mnt/secret")
out["create_in_inherit_1000"] = as_user(
    1000, lambda: os.close(os.open("/mnt/inherit/by1000", os.O_CREAT | os.O_WRONLY, 0o600)))
print("RUSTOPTS " + json.dumps(out), flush=True)
