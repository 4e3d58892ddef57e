"""Capability sets per role, applied with python-prctl, and ``--modcaps``.

Sets (every one of bounding, permitted, effective and inheritable is cut to
the role's set; ambient is cleared):

* request worker: what a passthrough file system needs to act for any guest
  uid: CHOWN, DAC_OVERRIDE, FOWNER, FSETID, SETGID, SETUID, MKNOD, SETFCAP,
  plus DAC_READ_SEARCH only when file handles (``open_by_handle_at``) are
  used; then ``--modcaps`` adds/removes (as in the Rust virtiofsd).
* hiprio worker and keeper: nothing at all.
* supervisor after setup: the request set (a worker inherits its parent's
  caps, and request workers are forked later, when QEMU starts their ring,
  or on restart) plus what a fork needs to confine itself: SYS_ADMIN
  (unshare/setns, mount, pivot_root), SYS_CHROOT (``--sandbox chroot``, and
  every setns of a mount namespace: sandbox/sharedns.py) and
  SETPCAP (to shrink the bounding set). Everything else (NET_ADMIN,
  SYS_MODULE, SYS_PTRACE, SYS_RAWIO, ...) goes.

setfsuid and keep-caps: workers switch identity per request with
``setfsuid``/``setfsgid`` only, never ``setresuid``. The kernel then clears
the file-system capabilities (CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER,
FSETID, LINUX_IMMUTABLE, MKNOD, MAC_OVERRIDE) from the *effective* set while
fsuid != 0 and restores them from *permitted* when fsuid goes back to 0.
That is what we want: while serving uid 1000 the permission checks are uid
1000's. ``PR_SET_KEEPCAPS`` only concerns changes of the real/effective/saved
uid, so it is not set (a worker that ever called ``setresuid`` away from 0
would lose its permitted set, which is the safe failure). ``CapEff`` as seen
from outside is therefore the role's set only while the worker is idle
(fsuid 0).
"""

from __future__ import annotations

import os

import prctl

from daemon.sandbox.namespaces import SandboxError

# Linux capability numbers (include/uapi/linux/capability.h)
CAP_NUMBERS: dict[str, int] = {
    "chown": 0, "dac_override": 1, "dac_read_search": 2, "fowner": 3, "fsetid": 4,
    "kill": 5, "setgid": 6, "setuid": 7, "setpcap": 8, "linux_immutable": 9,
    "net_bind_service": 10, "net_broadcast": 11, "net_admin": 12, "net_raw": 13,
    "ipc_lock": 14, "ipc_owner": 15, "sys_module": 16, "sys_rawio": 17,
    "sys_chroot": 18, "sys_ptrace": 19, "sys_pacct": 20, "sys_admin": 21,
    "sys_boot": 22, "sys_nice": 23, "sys_resource": 24, "sys_time": 25,
    "sys_tty_config": 26, "mknod": 27, "lease": 28, "audit_write": 29,
    "audit_control": 30, "setfcap": 31, "mac_override": 32, "mac_admin": 33,
    "syslog": 34, "wake_alarm": 35, "block_suspend": 36, "audit_read": 37,
    "perfmon": 38, "bpf": 39, "checkpoint_restore": 40,
}
CAP_NAMES = {v: k for k, v in CAP_NUMBERS.items()}

REQUEST_CAPS = frozenset({"chown", "dac_override", "fowner", "fsetid", "setgid", "setuid",
                          "mknod", "setfcap"})
FILE_HANDLE_CAPS = frozenset({"dac_read_search"})
SPAWN_CAPS = frozenset({"sys_admin", "sys_chroot", "setpcap"})

PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


class ModcapsError(ValueError):
    pass


def cap_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return max(CAP_NUMBERS.values())


def parse_modcaps(text: str) -> tuple[frozenset[str], frozenset[str]]:
    """'+sys_admin:-mknod' -> ({'sys_admin'}, {'mknod'}). Names are case
    insensitive, with or without 'cap_'. Unknown name, missing sign, empty
    item or a cap both added and removed -> ModcapsError (one line)."""
    add: set[str] = set()
    remove: set[str] = set()
    if not text:
        raise ModcapsError("--modcaps: empty list")
    for item in text.split(":"):
        item = item.strip()
        if len(item) < 2 or item[0] not in "+-":
            raise ModcapsError(f"--modcaps: {item!r}: expected +name or -name")
        name = item[1:].lower()
        if name.startswith("cap_"):
            name = name[4:]
        if name not in CAP_NUMBERS:
            raise ModcapsError(f"--modcaps: unknown capability {item[1:]!r}")
        (add if item[0] == "+" else remove).add(name)
    both = add & remove
    if both:
        raise ModcapsError(f"--modcaps: {', '.join(sorted(both))} both added and removed")
    return frozenset(add), frozenset(remove)


def role_caps(role: str, modcaps: str | None = None, file_handles: bool = False) -> frozenset[str]:
    """The capability names a role keeps."""
    if role in ("hiprio", "keeper"):
        return frozenset()
    base = set(REQUEST_CAPS)
    if file_handles:
        base |= FILE_HANDLE_CAPS
    if modcaps:
        add, remove = parse_modcaps(modcaps)
        base = (base | add) - remove
    if role == "request":
        return frozenset(base)
    if role == "supervisor":
        return frozenset(base | SPAWN_CAPS)
    raise ValueError(f"unknown role {role!r}")


def mask(caps) -> int:
    m = 0
    for c in caps:
        m |= 1 << CAP_NUMBERS[c]
    return m


def current(field: str = "CapEff", pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1], 16)
    raise KeyError(field)


def capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) masks of this thread, via capget(2)
    (works without /proc)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    if libc.capget(hdr, data) != 0:
        e = ctypes.get_errno()
        raise SandboxError(f"capget: {os.strerror(e)}")
    eff = data[0] | data[3] << 32
    prm = data[1] | data[4] << 32
    inh = data[2] | data[5] << 32
    return eff, prm, inh


def apply(caps: frozenset[str] | set[str]) -> None:
    """Cut bounding, inheritable, effective and permitted to ``caps``
    (intersected with what we have), clear ambient. Bounding first: dropping
    from it needs CAP_SETPCAP, which the permitted cut may remove."""
    keep_nums = {CAP_NUMBERS[c] for c in caps}
    last = cap_last_cap()
    try:
        for n in range(last + 1):
            if n not in keep_nums and prctl.capbset_read(n):
                prctl.capbset_drop(n)
    except OSError as e:
        raise SandboxError(f"dropping capabilities from the bounding set: {e.strerror} "
                           f"(need CAP_SETPCAP)") from None
    _clear_ambient()
    drop = [n for n in range(last + 1) if n not in keep_nums and n in prctl.ALL_CAPS]
    try:
        for flag in (prctl.CAP_INHERITABLE, prctl.CAP_EFFECTIVE, prctl.CAP_PERMITTED):
            prctl.set_caps((drop, flag, False))
    except OSError as e:
        raise SandboxError(f"capset: {e.strerror}") from None
    missing = [n for n in range(last + 1) if n not in prctl.ALL_CAPS and n not in keep_nums]
    if missing:
        raise SandboxError(f"python-prctl does not know capabilities {missing}; cannot drop them")


def _clear_ambient() -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    if libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        if e != 22:        # EINVAL: kernel without ambient caps
            raise SandboxError(f"clearing ambient capabilities: {os.strerror(e)}")


def set_no_new_privs() -> None:
    try:
        prctl.set_no_new_privs(1)
    except OSError as e:
        raise SandboxError(f"PR_SET_NO_NEW_PRIVS: {e.strerror}") from None
    if prctl.get_no_new_privs() != 1:
        raise SandboxError("PR_SET_NO_NEW_PRIVS did not stick")
