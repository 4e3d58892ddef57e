"""Run inside a container whose PID 1 is systemd (test_guest_systemd_unit.py).

``python3 unit_driver.py CHECKOUT OUT_JSON``: starts ``pyvirtiofsd@srv-share``
from the unit the package ships, connects to its socket as QEMU would
(tests/frontend/vhost.py), does file work through FUSE requests, looks at
the service's processes from outside, disconnects, waits for the restart,
writes what it saw as JSON and powers the container off. Only the Python
standard library and the checkout's test front-end are used: the
container's python3 is the system's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback

# the shared directory /srv/share, or the one given as a third argument
INSTANCE = "pyvirtiofsd@srv-share.service"
SOCKET = "/run/pyvirtiofsd/srv-share.sock"
# a second share, under /home, when the container has it
HOME_SHARE = "/home/guest/share"
ROOT = 1
S_ISUID = 0o4000


def sh(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def show(*props: str) -> dict[str, str]:
    r = sh("systemctl", "show", INSTANCE, *(f"--property={p}" for p in props))
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def wait_for(cond, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def process_view(pid: int) -> dict:
    """What /proc says about one of the service's processes."""
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            status[k] = v.strip()
    ns = {n: os.readlink(f"/proc/{pid}/ns/{n}") for n in ("mnt", "pid", "net", "ipc", "uts", "user")}
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read().split(b"\0")[:4]
    return {"pid": pid, "uid": status["Uid"].split()[0], "seccomp": status["Seccomp"],
            "nnp": status["NoNewPrivs"], "capeff": int(status["CapEff"], 16),
            "capbnd": int(status["CapBnd"], 16), "ns": ns,
            "cmdline": [c.decode(errors="replace") for c in cmdline]}


def children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended while listed
    return out


def file_work(fc, FuseErrorReply) -> dict:
    """FUSE requests a guest would send; the host side is checked by the test."""
    seen = {}
    e = fc.lookup(ROOT, "hello")
    o = fc.open(e.nodeid)
    seen["read"] = fc.read(e.nodeid, o.fh, 0, 100).decode()
    fc.release(e.nodeid, o.fh)
    # a guest user creates and writes a file: the host file is that user's
    e, o = fc.create(ROOT, "written", mode=0o100644, uid=1000, gid=1000)
    fc.write(e.nodeid, o.fh, 0, b"from the guest\n")
    fc.release(e.nodeid, o.fh)
    d = fc.mkdir(ROOT, "dir", uid=1000, gid=1000)
    # guest root gives it away: CAP_CHOWN in the request worker
    fc.setattr(d.nodeid, uid=1001, gid=1001)
    # RestrictSUIDSGID: a set-id bit is refused
    try:
        fc.setattr(e.nodeid, mode=0o100755 | S_ISUID)
        seen["suid_chmod"] = 0
    except FuseErrorReply as err:
        seen["suid_chmod"] = err.errno
    seen["names"] = sorted(d.name.decode() for d in fc.readdir_all(ROOT) if d.name not in (b".", b".."))
    seen["statfs_bsize"] = fc.statfs().bsize
    return seen


def comm(pid: int) -> str:
    """The process's name, or "" once it is gone: a killed worker can be
    listed as a child and reaped before its comm is read."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def restart_with_a_file_open(fc, main_pid: int) -> dict:
    """SIGKILL the request worker with a file open: its replacement serves
    the same fh, a copy it gets from the keeper by a round trip (the unit
    refuses pidfd_getfd)."""
    e = fc.lookup(ROOT, "hello")
    o = fc.open(e.nodeid)
    victim = next(p for p in children(main_pid) if comm(p) == "vfsd-request-1")
    os.kill(victim, 9)
    replaced = wait_for(lambda: any(p != victim and comm(p) == "vfsd-request-1"
                                    for p in children(main_pid)), timeout=30)
    seen = {"replaced": replaced, "read": fc.read(e.nodeid, o.fh, 0, 100).decode()}
    fc.release(e.nodeid, o.fh)
    return seen


def root_view(pid: int) -> dict:
    """What the service sees of the file system: each top-level directory
    of its root, and the contents of the ones the unit should empty."""
    root = f"/proc/{pid}/root"
    view: dict = {"/": sorted(os.listdir(root))}
    for top in ("etc", "home", "root", "run", "srv", "var", "var/tmp", "tmp"):
        try:
            view[top] = sorted(os.listdir(f"{root}/{top}"))
        except OSError as err:
            view[top] = err.errno
    return view


def home_share(checkout: str) -> dict:
    """A second instance whose share is under /home (ProtectHome=yes)."""
    from tests.frontend.fuse_client import FuseClient
    from tests.frontend.vhost import start_frontend
    name = sh("systemd-escape", "--path", HOME_SHARE).stdout.strip()
    instance, socket_path = f"pyvirtiofsd@{name}.service", f"/run/pyvirtiofsd/{name}.sock"
    seen: dict = {"start": sh("systemctl", "start", instance).returncode}
    seen["socket"] = wait_for(lambda: os.path.exists(socket_path), timeout=30)
    try:
        if not seen["socket"]:
            return seen
        fe = start_frontend(socket_path)
        try:
            fc = FuseClient(fe)
            fc.init()
            e = fc.lookup(ROOT, "inhome")
            o = fc.open(e.nodeid)
            seen["read"] = fc.read(e.nodeid, o.fh, 0, 100).decode()
            fc.release(e.nodeid, o.fh)
            pid = int(sh("systemctl", "show", instance, "--property=MainPID", "--value").stdout)
            seen["home"] = sorted(os.listdir(f"/proc/{pid}/root/home"))
            seen["home_guest"] = sorted(os.listdir(f"/proc/{pid}/root/home/guest"))
        finally:
            fe.close()
    finally:
        seen["journal"] = sh("journalctl", "--no-pager", "-o", "cat", "-u", instance).stdout[-3000:]
        sh("systemctl", "stop", instance)
    return seen


def main(checkout: str, out_path: str) -> None:
    sys.path.insert(0, checkout)
    from tests.frontend.fuse_client import FuseClient, FuseErrorReply
    from tests.frontend.vhost import start_frontend

    result: dict = {"errors": []}
    try:
        r = sh("systemctl", "start", INSTANCE)
        result["start"] = [r.returncode, r.stderr]
        result["socket_appeared"] = wait_for(lambda: os.path.exists(SOCKET))
        main_pid = int(show("MainPID")["MainPID"])
        fe = start_frontend(SOCKET)
        try:
            fc = FuseClient(fe)
            fc.init()
            result["work"] = file_work(fc, FuseErrorReply)
            result["processes"] = [process_view(main_pid)] + [process_view(p) for p in children(main_pid)]
            result["root"] = root_view(main_pid)
            result["restart"] = restart_with_a_file_open(fc, main_pid)
        finally:
            fe.close()
        # one QEMU connection served: the daemon exits 0 and systemd starts the next
        result["restarted"] = wait_for(lambda: show("NRestarts")["NRestarts"] not in ("", "0"))
        result["socket_again"] = wait_for(lambda: os.path.exists(SOCKET))
        result["after"] = show("NRestarts", "ExecMainStatus", "Result", "ActiveState")
        if os.path.isdir(HOME_SHARE):
            result["home_share"] = home_share(checkout)
    except Exception:   # noqa: BLE001 - everything goes into the report
        result["errors"].append(traceback.format_exc())
    result["journal"] = sh("journalctl", "--no-pager", "-o", "cat", "-u", INSTANCE).stdout[-6000:]
    result["security"] = sh("systemd-analyze", "security", "--no-pager", INSTANCE).stdout[-400:]
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    sh("systemctl", "stop", INSTANCE)


if __name__ == "__main__":
    if len(sys.argv) > 3:
        name = sh("systemd-escape", "--path", sys.argv[3]).stdout.strip()
        INSTANCE, SOCKET = f"pyvirtiofsd@{name}.service", f"/run/pyvirtiofsd/{name}.sock"
    try:
        main(sys.argv[1], sys.argv[2])
    finally:
        subprocess.run(["systemctl", "--no-block", "poweroff"])
