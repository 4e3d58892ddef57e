#!/usr/bin/python3
"""In-guest escape checks: nothing the guest does through /mnt reaches
outside the share or harms the host.

Runs inside the test guest under the host's /usr/bin/python3 (stdlib only),
as root, against the virtiofs mount (``--mnt``, default /mnt) and, for the
differential checks, the guest's tmpfs (``--ref``). The host test
(test_guest_escape.py) prepares canary files *outside* the share, under the
host's /tmp, which the guest cannot see any other way (its /tmp is a tmpfs;
its / is the host root over read-only 9p, so /etc/passwd IS readable by the
guest on its own, and a symlink to it proves nothing unless the file it
reaches is the guest's 9p one, not one the daemon opened).

What the guest kernel does itself, and so what these checks can observe:

- symlinks are resolved by the guest kernel, in the guest's namespace: the
  daemon stores the target verbatim and never follows it. A symlink to a
  host canary path reaches whatever the *guest* has at that path (nothing,
  or a decoy the check puts there on its tmpfs).
- ".." at the mount root is the guest's own "/" (the kernel's dcache
  handles it; FUSE has no LOOKUP ".." without EXPORT_SUPPORT).
- link(2)/rename(2) across mounts are EXDEV in the guest VFS.
- device nodes, FIFOs and sockets on a FUSE mount are opened by the *guest*
  kernel (init_special_inode): /mnt/x with rdev 1:1 is the guest's own
  /dev/mem, a FIFO is a guest pipe. No FUSE OPEN is ever sent for them, so
  the daemon's refusal to open non-regular files (EACCES, files.py) is
  defence in depth against a hostile guest kernel, which the frontend
  tests exercise; here the check is that /mnt behaves exactly as the
  guest's tmpfs does (differential), i.e. never like a host device.
- the setgid rules (inheritance, S_ISGID cleared for non-members) are
  applied by the host kernel under the caller's fsuid/fsgid and by the
  guest VFS; differential against tmpfs plus the absolute expectations.

Output: one line per check, ``ESCAPE {json}`` with ``check``, ``ok``,
``detail``, ``ms``; ``ESCAPE-PROGRESS ...`` lines during the long open
loop (keeps the console alive); then ``ESCAPE {"summary": ...}``. Exit
status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import ctypes.util
import errno
import json
import os
import resource
import shutil
import socket
import stat
import struct
import sys
import time
import traceback

PREFIX = "ESCAPE "

DECOY = b"GUEST-DECOY: the guest's own file at this path\n"
GUEST_WROTE = b"written through a symlink by the guest\n"
NONMEMBER = (1234, 1234)   # uid, gid: not a member of SGID_GROUP
MEMBER = (2345, 2345)      # uid, gid with SGID_GROUP as a supplementary group
SGID_GROUP = 4242

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_name_to_handle_at = 303  # x86-64
SYS_open_by_handle_at = 304
AT_FDCWD = -100


# --------------------------------------------------------------------------
# helpers (the same conventions as guest_ops.py)

# the helpers both in-guest programs share (guest_ops.py sits beside this
# file, so it is importable in the guest too)
if __package__:  # imported on the host as tests.guest.guest_escape
    from .guest_ops import E, J, ename, ftype, ok, read_all  # noqa: E402
else:            # run as a script in the guest
    from guest_ops import E, J, ename, ftype, ok, read_all  # noqa: E402


def st(path: str, follow: bool = False) -> dict | str:
    try:
        s = os.stat(path) if follow else os.lstat(path)
    except OSError as e:
        return "E:" + ename(e.errno)
    d = {"type": ftype(s.st_mode), "mode": oct(stat.S_IMODE(s.st_mode)), "uid": s.st_uid,
         "gid": s.st_gid}
    if stat.S_ISCHR(s.st_mode) or stat.S_ISBLK(s.st_mode):
        d["rdev"] = f"{os.major(s.st_rdev)}:{os.minor(s.st_rdev)}"
    return d


def devino(path: str, follow: bool = True):
    s = os.stat(path) if follow else os.lstat(path)
    return [s.st_dev, s.st_ino]


def read_bytes(path: str, n: int = 4096) -> bytes | str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        return "E:" + ename(e.errno)
    try:
        return os.read(fd, n)
    except OSError as e:
        return "E:" + ename(e.errno)
    finally:
        os.close(fd)


def show(data) -> str:
    """A short printable form of what a read returned (never the raw bytes
    of a device: the host test scans the console for the canary tokens)."""
    if isinstance(data, str):
        return data
    if data == DECOY:
        return "DECOY"
    if data == GUEST_WROTE or data == DECOY + GUEST_WROTE:
        return "DECOY+GUEST_WROTE" if data != GUEST_WROTE else "GUEST_WROTE"
    return f"{len(data)} bytes"


def write_file(path: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def create(path: str, mode: int) -> None:
    """O_CREAT without writing: a write by a non-root caller would itself
    clear S_ISGID (kill-priv), hiding what the creation did."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))


def as_user(uid: int, gid: int, groups, fn, *args, umask: int = 0o022):
    """Run fn(*args) in a child with these credentials; its JSON-able value."""
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(res_r)
            os.setgroups(list(groups))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            os.umask(umask)
            out = fn(*args)
        except BaseException as e:  # noqa: BLE001
            tb = traceback.extract_tb(e.__traceback__)[-1]
            out = {"child_exception": f"{type(e).__name__}: {e} at line {tb.lineno}"}
        try:
            os.write(res_w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(res_w)
    data = read_all(res_r)
    os.close(res_r)
    os.waitpid(pid, 0)
    return json.loads(data) if data else "no answer from the child"


def fresh(path: str) -> str:
    if os.path.lexists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


# --------------------------------------------------------------------------
# checks: each returns (ok, detail)

def check_symlink_absolute(a):
    """Absolute symlinks on the share to host paths: the guest resolves them
    in its own namespace; the host canaries are never reached."""
    d = fresh(J(a.mnt, "escape", "abs"))
    mnt_dev = os.stat(a.mnt).st_dev
    r, bad = {}, []
    # /etc/passwd: the guest's own (9p, read-only) file
    os.symlink("/etc/passwd", J(d, "passwd"))
    r["readlink"] = os.readlink(J(d, "passwd"))
    via = read_bytes(J(d, "passwd"), 1 << 20)
    direct = read_bytes("/etc/passwd", 1 << 20)
    r["passwd_same_as_guest_view"] = via == direct
    r["passwd_same_inode_as_guest_view"] = devino(J(d, "passwd")) == devino("/etc/passwd")
    r["passwd_not_on_share"] = os.stat(J(d, "passwd")).st_dev != mnt_dev
    r["passwd_append"] = E(lambda: open(J(d, "passwd"), "ab").close())  # 9p is read-only
    if not (r["readlink"] == "/etc/passwd" and r["passwd_same_as_guest_view"]
            and r["passwd_same_inode_as_guest_view"] and r["passwd_not_on_share"]
            and r["passwd_append"] == "E:EROFS"):
        bad.append("passwd")
    # the host's canaries: not visible to the guest until it makes a decoy
    for i, canary in enumerate(a.canary):
        link = J(d, f"canary{i}")
        c = r[f"canary{i}"] = {}
        os.symlink(canary, link)
        c["readlink_verbatim"] = os.readlink(link) == canary
        c["read_before_decoy"] = show(read_bytes(link))
        c["stat_before_decoy"] = st(link, follow=True)
        c["open_nofollow"] = E(os.open, link, os.O_RDONLY | os.O_NOFOLLOW)
        c["write_before_decoy"] = ok(os.open, link, os.O_WRONLY)
        # the guest's decoy at the same absolute path (guest tmpfs)
        os.makedirs(os.path.dirname(canary), exist_ok=True)
        write_file(canary, DECOY)
        c["read_decoy"] = show(read_bytes(link))
        c["decoy_same_inode"] = devino(link) == devino(canary)
        fd = os.open(link, os.O_WRONLY | os.O_APPEND)
        os.write(fd, GUEST_WROTE)
        os.close(fd)
        c["decoy_after_write"] = show(read_bytes(canary))
        if not (c["readlink_verbatim"] and c["read_before_decoy"] == "E:ENOENT"
                and c["stat_before_decoy"] == "E:ENOENT" and c["open_nofollow"] == "E:ELOOP"
                and c["write_before_decoy"] == "E:ENOENT" and c["read_decoy"] == "DECOY"
                and c["decoy_same_inode"] and c["decoy_after_write"] == "DECOY+GUEST_WROTE"):
            bad.append(f"canary{i}")
    # the share's own root through an absolute symlink is the guest's /mnt
    os.symlink(a.mnt, J(d, "mnt"))
    r["mnt_link_is_guest_mount"] = devino(J(d, "mnt")) == devino(a.mnt)
    if not r["mnt_link_is_guest_mount"]:
        bad.append("mnt")
    r["bad"] = bad
    return not bad, r


def check_symlink_relative(a):
    """Relative symlinks climbing out of the share land in the guest's /."""
    d = fresh(J(a.mnt, "escape", "rel", "a", "b"))
    top = J(a.mnt, "escape", "rel")
    r, bad = {}, []
    root = devino("/")
    guest_root_names = sorted(os.listdir("/"))
    # ../../../../.. from a/b: far above /mnt
    os.symlink("../../../../../../../..", J(d, "up"))
    r["up_is_guest_root"] = devino(J(d, "up")) == root
    r["up_listing_is_guest_root"] = sorted(os.listdir(J(d, "up"))) == guest_root_names
    if not (r["up_is_guest_root"] and r["up_listing_is_guest_root"]):
        bad.append("up")
    # the canary next to the share on the host, by its path relative to the
    # link's *host* location: at the share root, two and four levels down
    for i, rel in enumerate(a.sibling_rel):
        for where, ups in ((a.mnt, 1), (top, 3), (d, 5)):
            link = J(where, f"sib{i}_up{ups}")
            target = "../" * ups + rel
            os.symlink(target, link)
            got = show(read_bytes(link))
            r[link] = {"target": target, "read": got, "stat": st(link, follow=True)}
            if got != "E:ENOENT":
                bad.append(link)
    # the canary's absolute path spelled relatively (lots of ..): the guest's decoy
    for i, canary in enumerate(a.canary):
        link = J(d, f"canary{i}")
        os.symlink("../" * 12 + canary.lstrip("/"), link)
        got = show(read_bytes(link))
        same = E(lambda: devino(link) == devino(canary))  # noqa: B023 - called at once
        r[f"canary{i}"] = {"read": got, "same_inode_as_guest_path": same}
        # the decoy of check_symlink_absolute, or nothing if it did not run
        if got not in ("DECOY+GUEST_WROTE", "DECOY", "E:ENOENT") or same not in (True, "E:ENOENT"):
            bad.append(f"canary{i}")
    # a directory symlink: /mnt/escape/rel/a/b/tmp -> the guest's own /tmp
    os.symlink("../../../../../tmp", J(d, "tmp"))
    r["tmp_is_guest_tmp"] = E(lambda: devino(J(d, "tmp")) == devino("/tmp"))
    r["tmp_listing_is_guest_tmp"] = E(lambda: sorted(os.listdir(J(d, "tmp"))) == sorted(os.listdir("/tmp")))
    if not (r["tmp_is_guest_tmp"] is True and r["tmp_listing_is_guest_tmp"] is True):
        bad.append("tmp")
    r["bad"] = bad
    return not bad, r


def check_dotdot_at_root(a):
    """'..' of the share root and above it is the guest's own tree."""
    r, bad = {}, []
    root = devino("/")
    mnt_parent = devino(os.path.dirname(a.mnt.rstrip("/")) or "/")
    root_names = sorted(os.listdir("/"))
    r["stat_mnt_dotdot"] = devino(J(a.mnt, "..")) == mnt_parent
    r["stat_mnt_dotdot_dotdot"] = devino(J(a.mnt, "..", "..")) == root
    r["list_mnt_dotdot_dotdot"] = sorted(os.listdir(J(a.mnt, "..", ".."))) == root_names
    parent_names = os.listdir(J(a.mnt, ".."))
    r["host_siblings_not_listed"] = [n for n in a.sibling_names if n in parent_names]
    d = fresh(J(a.mnt, "escape", "dotdot", "x", "y"))
    here = os.getcwd()
    try:
        os.chdir(a.mnt)
        os.chdir("..")
        r["cd_mnt_dotdot"] = os.getcwd()
        r["cd_mnt_dotdot_inode"] = devino(".") == mnt_parent
        os.chdir(d)
        r["stat_up5"] = devino("../../../../..") == root
        r["list_up5"] = sorted(os.listdir("../../../../..")) == root_names
        r["openat_dotdot_from_root_fd"] = None
        fd = os.open(a.mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            up = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            r["openat_dotdot_from_root_fd"] = [os.fstat(up).st_dev, os.fstat(up).st_ino] == mnt_parent
            os.close(up)
        finally:
            os.close(fd)
    finally:
        os.chdir(here)
    if not (r["stat_mnt_dotdot"] and r["stat_mnt_dotdot_dotdot"] and r["list_mnt_dotdot_dotdot"]
            and not r["host_siblings_not_listed"] and r["cd_mnt_dotdot_inode"]
            and r["stat_up5"] and r["list_up5"] and r["openat_dotdot_from_root_fd"]):
        bad.append("dotdot")
    r["bad"] = bad
    return not bad, r


def _name_to_handle(path: str):
    buf = ctypes.create_string_buffer(8 + 128)
    struct.pack_into("=Ii", buf, 0, 128, 0)
    mount_id = ctypes.c_int()
    rc = libc.syscall(SYS_name_to_handle_at, AT_FDCWD, os.fsencode(path), buf,
                      ctypes.byref(mount_id), 0)
    if rc < 0:
        raise OSError(ctypes.get_errno(), "name_to_handle_at")
    nbytes, htype = struct.unpack_from("=Ii", buf, 0)
    return htype, buf.raw[8:8 + nbytes]


def _open_by_handle(mount_fd: int, htype: int, blob: bytes, flags: int) -> int:
    buf = ctypes.create_string_buffer(struct.pack("=Ii", len(blob), htype) + blob)
    fd = libc.syscall(SYS_open_by_handle_at, mount_fd, buf, flags)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "open_by_handle_at")
    return fd


def check_forged_handles(a):
    """open_by_handle_at with forged FUSE handles (nodeid 0..299, any
    generation): the guest kernel only resolves nodeids it already holds, and
    whatever opens is on the share."""
    d = fresh(J(a.mnt, "escape", "handles"))
    write_file(J(d, "f"), b"handle")
    r = {}
    mnt_dev = os.stat(a.mnt).st_dev
    try:
        htype, blob = _name_to_handle(J(d, "f"))
    except OSError as e:
        return True, {"name_to_handle_at": "E:" + ename(e.errno), "note": "no handles: nothing to forge"}
    r["handle_type"] = htype
    r["handle_bytes"] = len(blob)
    mount_fd = os.open(a.mnt, os.O_RDONLY | os.O_DIRECTORY)
    outcomes = collections.Counter()
    off_share = []
    try:
        real = _open_by_handle(mount_fd, htype, blob, os.O_RDONLY)
        r["real_handle_reopens"] = os.read(real, 16).decode()
        os.close(real)
        words = list(struct.unpack(f"={len(blob) // 4}I", blob[:len(blob) // 4 * 4]))
        for nodeid in range(0, 300):
            for gen in (0, words[2] if len(words) > 2 else 0, 1):
                w = list(words)
                w[0], w[1] = nodeid >> 32, nodeid & 0xFFFFFFFF
                if len(w) > 2:
                    w[2] = gen
                forged = struct.pack(f"={len(w)}I", *w) + blob[len(w) * 4:]
                try:
                    fd = _open_by_handle(mount_fd, htype, forged, os.O_PATH)
                except OSError as e:
                    outcomes["E:" + ename(e.errno)] += 1
                    continue
                s = os.fstat(fd)
                os.close(fd)
                outcomes["opened"] += 1
                if s.st_dev != mnt_dev:
                    off_share.append([nodeid, gen, s.st_dev, s.st_ino])
    finally:
        os.close(mount_fd)
    r["outcomes"] = dict(outcomes)
    r["opened_off_share"] = off_share
    good = r["real_handle_reopens"] == "handle" and not off_share
    return good, r


def check_hardlink_exdev(a):
    """Hard links (and renames) from outside the mount into the share, or
    through a symlink pointing outside: EXDEV in the guest."""
    d = fresh(J(a.mnt, "escape", "link"))
    src = J(fresh(J(a.ref, "link")), "src")
    write_file(src, b"outside the share")
    r, bad = {}, []
    r["link_tmpfs_to_share"] = E(os.link, src, J(d, "x"))
    r["link_9p_passwd_to_share"] = E(os.link, "/etc/passwd", J(d, "p"))
    r["link_via_mnt_dotdot"] = E(os.link, J(a.mnt, "..", "etc", "passwd"), J(d, "q"))
    write_file(J(d, "in"), b"inside")
    r["link_share_to_tmpfs"] = E(os.link, J(d, "in"), J(a.ref, "link", "out"))
    r["rename_tmpfs_to_share"] = E(os.rename, src, J(d, "r"))
    r["rename_share_to_tmpfs"] = E(os.rename, J(d, "in"), J(a.ref, "link", "out2"))
    for want, k in (("E:EXDEV", "link_tmpfs_to_share"), ("E:EXDEV", "link_9p_passwd_to_share"),
                    ("E:EXDEV", "link_via_mnt_dotdot"), ("E:EXDEV", "link_share_to_tmpfs"),
                    ("E:EXDEV", "rename_tmpfs_to_share"), ("E:EXDEV", "rename_share_to_tmpfs")):
        if r[k] != want:
            bad.append(k)
    # a symlink to the (decoy) canary: linkat(AT_SYMLINK_FOLLOW) resolves in
    # the guest -> EXDEV (tmpfs) or ENOENT; without follow it links the symlink
    for i, canary in enumerate(a.canary):
        link = J(d, f"sym{i}")
        os.symlink(canary, link)
        # with dir fds, os.link is linkat(2) (a bare link(2) never follows)
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fol = E(os.link, f"sym{i}", f"hard_follow{i}", src_dir_fd=dfd, dst_dir_fd=dfd,
                    follow_symlinks=True)
            nofol = E(os.link, f"sym{i}", f"hard_nofollow{i}", src_dir_fd=dfd, dst_dir_fd=dfd,
                      follow_symlinks=False)
        finally:
            os.close(dfd)
        r[f"canary{i}"] = {"follow": fol, "nofollow": nofol,
                           "hard_is_symlink": st(J(d, f"hard_nofollow{i}")),
                           "readlink": E(os.readlink, J(d, f"hard_nofollow{i}")) == canary}
        if fol not in ("E:EXDEV", "E:ENOENT") or nofol is not None \
                or not r[f"canary{i}"]["readlink"]:
            bad.append(f"canary{i}")
    r["listing"] = sorted(os.listdir(d))
    r["bad"] = bad
    return not bad, r


def check_symlink_setattr_nofollow(a):
    """lchown / lutimes / lsetxattr on symlinks act on the link, never on
    its target (one in the share, one the host canary's path)."""
    d = fresh(J(a.mnt, "escape", "lattr"))
    write_file(J(d, "victim"), b"victim")
    os.chmod(J(d, "victim"), 0o644)
    os.utime(J(d, "victim"), (1_000_000_000, 1_000_000_000))
    before = st(J(d, "victim"))
    before_m = os.stat(J(d, "victim")).st_mtime_ns
    r, bad = {"victim_before": before}, []
    links = {"in_share": "victim", "rel_canary": "../../../" + a.sibling_rel[0]}
    links.update({f"abs_canary{i}": c for i, c in enumerate(a.canary)})
    for name, target in links.items():
        p = J(d, name)
        os.symlink(target, p)
        o = r[name] = {}
        o["lchown"] = ok(os.chown, p, 4321, 4322, follow_symlinks=False)
        o["link_owner"] = [os.lstat(p).st_uid, os.lstat(p).st_gid]
        o["lutime"] = ok(os.utime, p, (2_000_000_000, 2_000_000_000), follow_symlinks=False)
        o["link_mtime"] = int(os.lstat(p).st_mtime)
        o["lsetxattr_user"] = ok(os.setxattr, p, "user.x", b"1", follow_symlinks=False)
        o["lgetxattr_user"] = E(os.getxattr, p, "user.x", follow_symlinks=False)
        if isinstance(o["lgetxattr_user"], bytes):
            o["lgetxattr_user"] = o["lgetxattr_user"].decode()
        if not (o["lchown"] == "ok" and o["link_owner"] == [4321, 4322] and o["lutime"] == "ok"
                and o["link_mtime"] == 2_000_000_000
                and o["lsetxattr_user"] in ("E:EPERM", "E:EOPNOTSUPP")):
            bad.append(name)
    r["victim_after"] = st(J(d, "victim"))
    r["victim_mtime_unchanged"] = os.stat(J(d, "victim")).st_mtime_ns == before_m
    if r["victim_after"] != before or not r["victim_mtime_unchanged"]:
        bad.append("victim")
    r["bad"] = bad
    return not bad, r


# device nodes: (name, type, major, minor); 1:1 mem, 1:3 null, 1:5 zero,
# 10:232 kvm (present on the host, no driver in the guest), 7:0 loop0 block,
# 240:7 (an unregistered major)
DEVICES = [("mem", stat.S_IFCHR, 1, 1), ("null", stat.S_IFCHR, 1, 3), ("zero", stat.S_IFCHR, 1, 5),
           ("kvm", stat.S_IFCHR, 10, 232), ("loop0", stat.S_IFBLK, 7, 0),
           ("unreg", stat.S_IFCHR, 240, 7)]


def _devices_outcome(d):
    r = {}
    for name, kind, major, minor in DEVICES:
        p = J(d, name)
        o = r[name] = {"mknod": ok(os.mknod, p, kind | 0o666, os.makedev(major, minor))}
        o["lstat"] = st(p)
        if o["mknod"] != "ok":
            continue
        for how, flags in (("rd", os.O_RDONLY), ("wr", os.O_WRONLY), ("rdwr", os.O_RDWR)):
            try:
                fd = os.open(p, flags | os.O_NONBLOCK | os.O_NOCTTY)
            except OSError as e:
                o[how] = "E:" + ename(e.errno)
                continue
            try:
                if how == "rd":
                    # mem: only the length (never the guest's memory bytes on the console)
                    data = E(os.read, fd, 16)
                    o[how] = data if isinstance(data, str) else (
                        data.hex() if name == "zero" else f"read {len(data)}")
                elif how == "wr" and name in ("null", "zero"):
                    o[how] = E(os.write, fd, b"abc")
                else:
                    o[how] = "opened"
            finally:
                os.close(fd)
        o["truncate"] = E(os.truncate, p, 0)
        o["chmod"] = ok(os.chmod, p, 0o600)
        o["chown"] = ok(os.chown, p, 1234, 1234)
        o["utime"] = ok(os.utime, p, (1_500_000_000, 1_500_000_000))
        o["after"] = st(p)
    return r


def check_device_nodes(a):
    """mknod of char/block devices in /mnt as root works (the host worker
    has CAP_MKNOD), and opening them behaves exactly like the same nodes on
    the guest's tmpfs: they are the *guest's* devices (no FUSE OPEN)."""
    ref = _devices_outcome(fresh(J(a.ref, "dev")))
    tgt = _devices_outcome(fresh(J(a.mnt, "escape", "dev")))
    same = ref == tgt
    d = {"same_as_tmpfs": same, "target": tgt}
    if not same:
        d["ref"] = ref
    # the getxattr/listxattr of a device node reach the daemon (as path ops
    # through /proc/self/fd: never an open); they must answer, not block
    p = J(a.mnt, "escape", "dev", "null")
    d["getxattr_user"] = E(os.getxattr, p, "user.x")
    d["listxattr"] = E(os.listxattr, p)
    return same and d["getxattr_user"] in ("E:ENODATA", "E:EPERM", "E:EOPNOTSUPP"), d


def _fifo_socket_outcome(d):
    r = {}
    p = J(d, "fifo")
    r["mkfifo"] = ok(os.mkfifo, p, 0o666)
    r["stat"] = st(p)
    r["open_wr_no_reader"] = E(os.open, p, os.O_WRONLY | os.O_NONBLOCK)
    rd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    r["open_rd_nonblock"] = "ok"
    r["read_empty"] = E(os.read, rd, 10)
    if isinstance(r["read_empty"], bytes):
        r["read_empty"] = r["read_empty"].decode()
    wr = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
    os.write(wr, b"guest pipe")
    r["read_back"] = os.read(rd, 100).decode()
    os.close(wr)
    os.close(rd)
    r["truncate"] = E(os.truncate, p, 0)
    r["chmod"] = ok(os.chmod, p, 0o600)
    r["utime"] = ok(os.utime, p, (1_500_000_000, 1_500_000_000))
    r["after"] = st(p)
    # a socket node: bind makes it (MKNOD S_IFSOCK), connect stays in the guest
    sp = J(d, "sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(sp)
        srv.listen(1)
        r["sock_stat"] = st(sp)
        cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            r["connect"] = ok(cli.connect, sp)
            if r["connect"] == "ok":
                conn, _ = srv.accept()
                cli.sendall(b"guest socket")
                r["sock_data"] = conn.recv(100).decode()
                conn.close()
        finally:
            cli.close()
    finally:
        srv.close()
    r["sock_open"] = E(os.open, sp, os.O_RDONLY)
    return r


def check_fifo_socket(a):
    """A FIFO and a socket in /mnt are the guest's own pipe and socket
    (differential vs tmpfs); the daemon never opens them."""
    ref = _fifo_socket_outcome(fresh(J(a.ref, "fifo")))
    tgt = _fifo_socket_outcome(fresh(J(a.mnt, "escape", "fifo")))
    d = {"same_as_tmpfs": ref == tgt, "target": tgt}
    if ref != tgt:
        d["ref"] = ref
    d["getxattr_fifo"] = E(os.getxattr, J(a.mnt, "escape", "fifo", "fifo"), "user.x")
    return ref == tgt and d["getxattr_fifo"] in ("E:ENODATA", "E:EPERM", "E:EOPNOTSUPP"), d


def _unpriv_mknod(d):
    return {k: E(os.mknod, J(d, k), t | 0o666, os.makedev(ma, mi)) for k, t, ma, mi in
            (("mem", stat.S_IFCHR, 1, 1), ("loop0", stat.S_IFBLK, 7, 0))} | \
        {"fifo": ok(os.mkfifo, J(d, "fifo"), 0o644)}


def check_unprivileged_mknod(a):
    """A non-root guest user cannot make device nodes in /mnt (EPERM), as on tmpfs."""
    out = {}
    for label, base in (("ref", J(a.ref, "unpriv")), ("target", J(a.mnt, "escape", "unpriv"))):
        fresh(base)
        os.chmod(base, 0o777)
        out[label] = as_user(*NONMEMBER, [], _unpriv_mknod, base)
        out[label + "_listing"] = sorted(os.listdir(base))
    want = {"mem": "E:EPERM", "loop0": "E:EPERM", "fifo": "ok"}
    return out["ref"] == out["target"] == want and out["target_listing"] == ["fifo"], out


def _sgid_child(d):
    r = {}
    r["create"] = ok(write_file, J(d, "f"), b"nonmember", 0o644)
    r["f"] = st(J(d, "f"))
    r["mkdir"] = ok(os.mkdir, J(d, "sub"), 0o755)
    r["sub"] = st(J(d, "sub"))
    r["create_2755"] = ok(create, J(d, "g"), 0o2755)
    r["g"] = st(J(d, "g"))
    r["mknod_2755"] = ok(os.mknod, J(d, "n"), stat.S_IFREG | 0o2755)
    r["n"] = st(J(d, "n"))
    r["mkdir_2755"] = ok(os.mkdir, J(d, "sub2"), 0o2755)
    r["sub2"] = st(J(d, "sub2"))
    r["in_sub_create"] = ok(create, J(d, "sub", "h"), 0o2775)
    r["in_sub"] = st(J(d, "sub", "h"))
    r["chmod_own_2755"] = ok(os.chmod, J(d, "f"), 0o2755)
    r["f_after_chmod"] = st(J(d, "f"))
    r["chown_own_to_self_group"] = ok(os.chown, J(d, "f"), -1, NONMEMBER[1])
    r["f_after_chown"] = st(J(d, "f"))
    r["chown_own_to_4242"] = E(os.chown, J(d, "f"), -1, SGID_GROUP)
    r["chmod_sgid_dir"] = E(os.chmod, d, 0o7777)
    return r


def _sgid_member(d):
    r = {"create_2755": ok(create, J(d, "m"), 0o2755)}
    r["m"] = st(J(d, "m"))
    return r


def _sgid_outcome(base):
    d = fresh(J(base, "sgid"))
    os.chown(d, 0, SGID_GROUP)
    # 2777, not 2775: a non-member is "other" and needs write permission
    os.chmod(d, 0o2777)
    r = {"dir": st(d)}
    r["nonmember"] = as_user(*NONMEMBER, [], _sgid_child, d, umask=0)
    r["member"] = as_user(*MEMBER, [SGID_GROUP], _sgid_member, d, umask=0)
    r["root_created"] = ok(create, J(d, "r"), 0o2755)
    r["r"] = st(J(d, "r"))
    return r


def check_setgid_dir(a):
    """setgid directory 2777 group 4242: a non-member's files get gid 4242,
    its subdirectories keep S_ISGID, and an explicit S_ISGID on a file
    (create or chmod) is dropped (differential + absolute). A member's
    explicit S_ISGID: see the comment below."""
    ref = _sgid_outcome(fresh(J(a.ref, "sg")))
    tgt = _sgid_outcome(fresh(J(a.mnt, "escape", "sg")))
    # A *member* (4242 as a supplementary group) keeps an explicit S_ISGID on
    # tmpfs but not on the share: FUSE 7.38 as Linux 6.1 speaks it carries no
    # supplementary groups (FUSE_CREATE_SUPP_GROUP came later) and the worker
    # drops its own (CVE-2022-0358), so the host kernel sees a non-member and
    # strips the bit. Known, and the safe direction: reported, not failed.
    ref_m, tgt_m = ref.pop("member", None), tgt.pop("member", None)
    d = {"same_as_tmpfs": ref == tgt, "target": tgt}
    if ref != tgt:
        d["ref"] = ref
    d["member"] = {"ref": ref_m, "target": tgt_m}
    d["member_known_deviation"] = ref_m != tgt_m
    bad = []
    nm = tgt.get("nonmember", {})
    if not isinstance(nm, dict) or "child_exception" in nm:
        bad.append("child")
    else:
        def has(entry, bit):
            e = nm.get(entry)
            return isinstance(e, dict) and bool(int(e["mode"], 8) & bit)

        def gid(entry):
            e = nm.get(entry)
            return e.get("gid") if isinstance(e, dict) else e
        if gid("f") != SGID_GROUP:
            bad.append("file gid not inherited")
        if gid("sub") != SGID_GROUP or not has("sub", stat.S_ISGID):
            bad.append("subdir lacks gid 4242 + S_ISGID")
        for e in ("g", "n", "in_sub", "f_after_chmod"):
            if has(e, stat.S_ISGID):
                bad.append(f"non-member kept S_ISGID on {e}")
        if nm.get("chown_own_to_4242") != "E:EPERM":
            bad.append("non-member chgrp to 4242 allowed")
        if nm.get("chmod_sgid_dir") != "E:EPERM":
            bad.append("non-owner chmod of the setgid dir allowed")
    # the member control: S_ISGID kept (as on tmpfs) or dropped (see above);
    # never anything else (a different owner or group would be a bug)
    m = tgt_m if isinstance(tgt_m, dict) else {}
    mm = m.get("m")
    if not (isinstance(mm, dict) and (mm["uid"], mm["gid"]) == (MEMBER[0], SGID_GROUP)
            and int(mm["mode"], 8) & 0o777 == 0o755):
        bad.append("member control: unexpected outcome")
    if ref != tgt:
        bad.append("differs from tmpfs")
    d["bad"] = bad
    return not bad, d


def _suid_child(d):
    r = {}
    fd = os.open(J(d, "s"), os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"x")
    os.close(fd)
    r["after_write"] = st(J(d, "s"))
    r["after_truncate"] = (ok(os.truncate, J(d, "t"), 1), st(J(d, "t")))
    r["chown_own"] = (ok(os.chown, J(d, "c"), -1, NONMEMBER[1]), st(J(d, "c")))
    return r


def _suid_outcome(base):
    d = fresh(J(base, "suid"))
    os.chmod(d, 0o755)
    for n in ("s", "t", "c"):
        write_file(J(d, n), b"#!/bin/sh\n")
        os.chown(J(d, n), NONMEMBER[0], SGID_GROUP)
        os.chmod(J(d, n), 0o6775)
    r = {"before": st(J(d, "s"))}
    r["child"] = as_user(*NONMEMBER, [], _suid_child, d)
    return r


def check_suid_cleared_on_change(a):
    """A non-root owner writing/truncating/chgrp'ing its 6775 file loses
    S_ISUID and S_ISGID (the kernel's kill-priv), as on tmpfs."""
    ref = _suid_outcome(fresh(J(a.ref, "su")))
    tgt = _suid_outcome(fresh(J(a.mnt, "escape", "su")))
    d = {"same_as_tmpfs": ref == tgt, "target": tgt}
    if ref != tgt:
        d["ref"] = ref
    bad = []
    ch = tgt.get("child", {})
    for k in ("after_write",):
        e = ch.get(k) if isinstance(ch, dict) else None
        if not isinstance(e, dict) or int(e["mode"], 8) & (stat.S_ISUID | stat.S_ISGID):
            bad.append(f"{k}: setuid/setgid kept")
    for k in ("after_truncate", "chown_own"):
        e = ch.get(k) if isinstance(ch, dict) else None
        if not (isinstance(e, list) and isinstance(e[1], dict)) or \
                int(e[1]["mode"], 8) & (stat.S_ISUID | stat.S_ISGID):
            bad.append(f"{k}: setuid/setgid kept")
    if ref != tgt:
        bad.append("differs from tmpfs")
    d["bad"] = bad
    return not bad, d


def check_many_open(a):
    """Hold up to --opens files open at once (--files files opened round
    robin): the daemon answers ENFILE/EMFILE at its budget, nothing else
    fails, and after closing them all the mount works. What works while the
    table is full (``while_full``) and whether close(2) reported errors
    (``close_errors``) are recorded; the host test judges them."""
    d = fresh(J(a.mnt, "escape", "many"))
    paths = [J(d, f"f{i:03d}") for i in range(a.files)]
    for p in paths:
        write_file(p, b"x")
    nr_open = int(open("/proc/sys/fs/nr_open").read())
    want = min(nr_open, a.opens + 1024)
    soft0, hard0 = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard0)))
    r = {"rlimit": [want, max(want, hard0)], "was": [soft0, hard0], "nr_open": nr_open,
         "file_max": int(open("/proc/sys/fs/file-max").read()), "files": a.files,
         "asked": a.opens}
    fds = []
    errs = collections.Counter()
    first_err = None
    t0 = time.monotonic()
    attempted = 0
    stopped = None
    for i in range(a.opens):
        attempted += 1
        try:
            fds.append(os.open(paths[i % a.files], os.O_RDONLY))
        except OSError as e:
            errs["E:" + ename(e.errno)] += 1
            if first_err is None:
                first_err = i
                r["first_error_s"] = round(time.monotonic() - t0, 1)
                print(f"ESCAPE-PROGRESS first error at open #{i}: {ename(e.errno)}", flush=True)
            if e.errno not in (errno.ENFILE, errno.EMFILE):
                stopped = f"unexpected {ename(e.errno)}"
                break
        if i % 10_000 == 9_999:
            print(f"ESCAPE-PROGRESS {i + 1} opens, {len(fds)} open, "
                  f"{time.monotonic() - t0:.1f} s", flush=True)
        if time.monotonic() - t0 > a.open_seconds:
            stopped = f"time cap {a.open_seconds} s"
            break
    r["open_s"] = round(time.monotonic() - t0, 1)
    r["attempted"] = attempted
    r["held_open"] = len(fds)
    r["errors"] = dict(errs)
    r["first_error_at"] = first_err
    r["stopped"] = stopped
    # while full: ops that need no new open file should still work (GETATTR,
    # reads on held files); creating ops are recorded (they need a host fd
    # for the new inode when the limit is the worker's RLIMIT_NOFILE)
    full = {}
    if errs:
        full["stat"] = ok(os.stat, paths[0])
        full["read_held"] = E(os.pread, fds[0], 1, 0) if fds else None
        if isinstance(full["read_held"], bytes):
            full["read_held"] = full["read_held"].decode()
        full["mkdir"] = ok(os.mkdir, J(d, "while_full"))
        full["mkdir_exists_after"] = os.path.isdir(J(d, "while_full"))
        full["create"] = E(os.open, J(d, "new_while_full"), os.O_WRONLY | os.O_CREAT, 0o644)
        if isinstance(full["create"], int):
            os.close(full["create"])
            full["create"] = "ok"
        full["create_exists_after"] = os.path.lexists(J(d, "new_while_full"))
    r["while_full"] = full
    # close them all; a close(2) that reports an error still releases the fd
    t1 = time.monotonic()
    close_errs = collections.Counter()
    first_close_err = None
    for i, fd in enumerate(fds):
        try:
            os.close(fd)
        except OSError as e:
            close_errs["E:" + ename(e.errno)] += 1
            if first_close_err is None:
                first_close_err = i
    r["close_s"] = round(time.monotonic() - t1, 1)
    r["close_errors"] = dict(close_errs)
    r["first_close_error_at"] = first_close_err
    fds = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft0, hard0))
    # afterwards (RELEASE may be asynchronous: allow a little time)
    after = {}
    t2 = time.monotonic()
    while True:
        res = E(os.open, paths[1], os.O_RDONLY)
        if isinstance(res, int):
            os.close(res)
            after["reopen"] = "ok"
            break
        if time.monotonic() - t2 > 30:
            after["reopen"] = res
            break
        time.sleep(0.2)
    after["reopen_wait_s"] = round(time.monotonic() - t2, 1)
    after["write"] = ok(write_file, J(d, "after"), b"still works")
    after["read"] = E(lambda: open(J(d, "after"), "rb").read().decode())
    after["listing"] = sorted(n for n in os.listdir(d) if not n.startswith("f"))
    more = []
    for i in range(200):
        res = E(os.open, paths[i % a.files], os.O_RDONLY)
        if isinstance(res, int):
            more.append(res)
    after["open_200_more"] = len(more)
    for fd in more:
        os.close(fd)
    r["after"] = after
    good = (stopped is None and attempted == a.opens
            and set(errs) <= {"E:ENFILE", "E:EMFILE"}
            and after["reopen"] == "ok" and after["write"] == "ok"
            and after["read"] == "still works"
            and after["open_200_more"] == 200)
    return good, r


def check_mount_health(a):
    """After everything: plain ops on the mount still work."""
    d = fresh(J(a.mnt, "escape", "health"))
    r = {"write": ok(write_file, J(d, "f"), b"healthy")}
    r["read"] = E(lambda: open(J(d, "f"), "rb").read().decode())
    r["statvfs"] = ok(os.statvfs, a.mnt)
    r["listdir_escape"] = sorted(os.listdir(J(a.mnt, "escape")))
    r["rename"] = ok(os.rename, J(d, "f"), J(d, "g"))
    r["unlink"] = ok(os.unlink, J(d, "g"))
    return r["read"] == "healthy" and all(r[k] == "ok" for k in ("write", "statvfs", "rename", "unlink")), r


CHECKS = ["symlink_absolute", "symlink_relative", "dotdot_at_root", "forged_handles",
          "hardlink_exdev", "symlink_setattr_nofollow", "device_nodes", "fifo_socket",
          "unprivileged_mknod", "setgid_dir", "suid_cleared_on_change", "many_open",
          "mount_health"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnt", default="/mnt")
    ap.add_argument("--ref", default="/tmp/escape-ref", help="reference dir (the guest's tmpfs)")
    ap.add_argument("--canary", action="append", default=[],
                    help="absolute host path of a canary outside the share")
    ap.add_argument("--sibling-rel", action="append", default=[],
                    help="a canary's path relative to the share's parent (e.g. outside/canary.txt)")
    ap.add_argument("--sibling-name", action="append", default=[],
                    help="names next to the share on the host (must not show up in /mnt/..)")
    ap.add_argument("--opens", type=int, default=100_000)
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--open-seconds", type=float, default=300)
    ap.add_argument("--only", action="append", default=[])
    a = ap.parse_args(argv)
    a.sibling_names = a.sibling_name
    if not a.sibling_rel:
        a.sibling_rel = ["outside/canary.txt"]
    os.umask(0o022)
    fresh(a.ref)
    os.makedirs(J(a.mnt, "escape"), exist_ok=True)
    passed, failed = 0, []
    t_all = time.monotonic()
    for name in CHECKS:
        if a.only and name not in a.only:
            continue
        t0 = time.monotonic()
        try:
            good, detail = globals()["check_" + name](a)
        except Exception as e:  # noqa: BLE001 - an unexpected exception is a failure
            tb = traceback.extract_tb(e.__traceback__)[-1]
            errname = ename(e.errno) if isinstance(e, OSError) and e.errno else ""
            good, detail = False, {"raised": f"{type(e).__name__} {errname} {e} at line {tb.lineno}"}
        line = {"check": name, "ok": bool(good), "ms": round((time.monotonic() - t0) * 1000),
                "detail": detail}
        print(PREFIX + json.dumps(line, default=repr), flush=True)
        if good:
            passed += 1
        else:
            failed.append(name)
    print(PREFIX + json.dumps({"summary": True, "passed": passed, "failed": len(failed),
                               "failed_checks": failed,
                               "seconds": round(time.monotonic() - t_all, 1)}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
