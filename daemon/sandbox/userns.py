"""The unprivileged run: the whole daemon in a user namespace of its own.

Started by an ordinary host user with ``--uid-map`` / ``--gid-map``, the
supervisor, once its sockets exist (so they belong to that user, who may
connect QEMU to them), moves itself into a new user namespace whose id maps
``newuidmap`` / ``newgidmap`` write, then becomes root of it
(``setresgid``/``setresuid`` 0), and goes on in a child that is PID 1 of a
pid namespace of its own (``_continue_as_pid_namespace_init`` says why; the
process started stays as a keeper with no capabilities that passes
signals on and exits as the child does). It then holds every capability
*in that namespace*, and the sandbox runs unchanged from there: workers are forked
into new pid, mount, net, ipc and uts namespaces owned by it, pivot_root,
cut their capabilities, set no_new_privs and load seccomp. Their
capabilities reach only inodes whose owner and group are mapped; a host
id outside the maps is ``nobody`` to the guest and cannot be given to a
file. A guest's uid N creates files that the host sees as the host id the
map gives N (``stat`` in the guest shows N).

Started by root (libvirt's system mode with ``<idmap>``), the same
happens, except that the helper, root in the host's namespace, writes
``/proc/PID/uid_map`` and ``gid_map`` itself: any host ids may be mapped,
and setgroups stays allowed inside. The daemon is then confined to the
maps: host files of unmapped owners are "other" to it.

Why the id maps need a helper process: ``newuidmap`` is set-uid root and
must run *outside* the new namespace (a set-uid program exec'd inside one
where host root is not mapped runs without its privilege), and the
namespace must exist before it runs. So, as the Rust virtiofsd does, the
supervisor forks a helper first; the helper waits until the supervisor has
called ``unshare(CLONE_NEWUSER)``, runs both programs on the supervisor's
pid and reports. The supervisor waits at most ``MAP_TIMEOUT`` seconds: a
refusal (ids the user does not own in ``/etc/subuid``/``/etc/subgid``), a
missing program or a helper that hangs is one start-up error, never a
hang.

Supplementary groups: ``newgidmap`` leaves ``setgroups`` allowed only when
the user owns every mapped gid range in ``/etc/subgid``; otherwise (only
the user's own gid mapped) it writes ``deny`` and nobody in the namespace
can change them. The daemon then keeps the host user's groups (startup.py
warns), as with ``--sandbox none``; those are the groups the user has
anyway.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import time

from daemon.sandbox import capabilities
from daemon.sandbox.idmap import IdRange, newidmap_args

CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
MAP_TIMEOUT = 10.0       # seconds for newuidmap + newgidmap (they read /etc/sub[ug]id, nothing more)
_OK = b"ok"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = (ctypes.c_int,)


class UsernsError(Exception):
    """The user namespace could not be set up (one line)."""


def setgroups_allowed() -> bool:
    """Whether this process may call setgroups (``/proc/self/setgroups``:
    ``deny`` in a user namespace whose gid map was written without it)."""
    try:
        with open("/proc/self/setgroups") as f:
            return f.read().strip() != "deny"
    except OSError:
        return True


def enter(uid_map: tuple[IdRange, ...], gid_map: tuple[IdRange, ...]) -> None:
    """Move this (single-threaded) process into a new user namespace with
    these maps and become its root. UsernsError otherwise; the process is
    then in a namespace it cannot use and must exit."""
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    done_r, done_w = os.pipe2(os.O_CLOEXEC)
    target = os.getpid()
    pid = os.fork()
    if pid == 0:                                     # the helper
        code = 1
        try:
            os.close(go_w)
            os.close(done_r)
            code = _helper(go_r, done_w, target, uid_map, gid_map)
        finally:
            os._exit(code)
    os.close(go_r)
    os.close(done_w)
    try:
        if _libc.unshare(CLONE_NEWUSER) != 0:
            err = ctypes.get_errno()
            raise UsernsError(f"cannot create a user namespace: unshare(CLONE_NEWUSER): {os.strerror(err)} "
                              f"(is kernel.unprivileged_userns_clone or user.max_user_namespaces 0?)")
        os.write(go_w, b"go")
        report = _read_report(done_r)
        if report != _OK:
            raise UsernsError(report.decode(errors="replace"))
    finally:
        os.close(go_w)
        os.close(done_r)
        _reap(pid)
    try:
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    except OSError as e:
        raise UsernsError(f"cannot become root in the user namespace: {e.strerror}") from None
    _continue_as_pid_namespace_init()


def _continue_as_pid_namespace_init() -> None:
    """Return in a child that is PID 1 of a new pid namespace owned by the
    user namespace; this process stays behind as its keeper.

    Why: a worker is forked after ``unshare(CLONE_NEWPID)``, and the
    supervisor then ``setns``-es back to its own pid namespace
    (sandbox/namespaces.py), which needs CAP_SYS_ADMIN in the user
    namespace that owns it: the host's, for a process that only moved its
    user namespace. In a pid namespace of our own it is ours. (A bonus:
    when the supervisor dies, the kernel kills every worker.)

    The keeper closes every descriptor but 0-2 (the listening socket lives
    on in the child only, so a second client is refused, not left waiting),
    passes SIGTERM, SIGINT and SIGHUP on, and exits as the child did."""
    if _libc.unshare(CLONE_NEWPID) != 0:
        err = ctypes.get_errno()
        raise UsernsError(f"cannot create a pid namespace in the user namespace: {os.strerror(err)}")
    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    signal.pthread_sigmask(signal.SIG_BLOCK, forwarded)      # none lost between fork and handlers
    keeper = os.pidfd_open(os.getpid())
    pid = os.fork()
    if pid == 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)
        _die_with_keeper(keeper)
        return
    try:
        os.closerange(3, 0x7FFFFFFF)
        capabilities.apply(frozenset())          # it only waits and signals its own child
        capabilities.set_no_new_privs()
        for sig in forwarded:
            signal.signal(sig, lambda signum, frame: os.kill(pid, signum))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        for sig in forwarded:
            signal.signal(sig, signal.SIG_IGN)   # the child is reaped: nothing to pass on to
        if os.WIFSIGNALED(status):
            killer = os.WTERMSIG(status)
            signal.signal(killer, signal.SIG_DFL)
            os.kill(os.getpid(), killer)
        code = os.waitstatus_to_exitcode(status)
    except BaseException:   # noqa: BLE001 - the keeper never returns into the daemon's code
        code = 1
    os._exit(code if code >= 0 else 1)


def _die_with_keeper(keeper_pidfd: int) -> None:
    """PR_SET_PDEATHSIG(SIGKILL), then make sure the keeper had not died
    already (getppid says 0 here: the keeper is outside this pid namespace)."""
    import prctl
    prctl.set_pdeathsig(signal.SIGKILL)
    gone = select.select([keeper_pidfd], [], [], 0)[0]
    os.close(keeper_pidfd)
    if gone:
        os._exit(1)


def _read_report(fd: int) -> bytes:
    deadline = time.monotonic() + MAP_TIMEOUT
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return f"newuidmap/newgidmap gave no answer within {MAP_TIMEOUT:g} s".encode()
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks) or b"the id map helper died without a word"
        chunks.append(chunk)


def _reap(pid: int) -> None:
    """The helper has reported (or is late): it must not outlive this call."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def _helper(go: int, done: int, target: int, uid_map, gid_map) -> int:
    """Wait for the namespace, write its maps, report ``ok`` or one line."""
    if os.read(go, 2) != b"go":          # the supervisor failed before unshare: nothing to do
        return 1
    for program, ranges in (("newuidmap", uid_map), ("newgidmap", gid_map)):
        message = _run_map_program(program, target, ranges)
        if message:
            os.write(done, message.encode(errors="replace"))
            return 1
    os.write(done, _OK)
    return 0


def _write_map(program: str, target: int, ranges) -> str | None:
    """Root's way: write ``/proc/TARGET/uid_map`` (``gid_map``) itself, in
    one write as the kernel requires. The helper holds CAP_SETUID and
    CAP_SETGID in the parent namespace, so any host ids may be mapped (and
    setgroups stays allowed inside)."""
    kind = program[3:6]
    text = "".join(f"{r.inside} {r.outside} {r.length}\n" for r in ranges).encode()
    try:
        fd = os.open(f"/proc/{target}/{kind}_map", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text)
        finally:
            os.close(fd)
    except OSError as e:
        return (f"--{kind}-map {' '.join(str(x) for x in ranges)}: writing /proc/{target}/{kind}_map: "
                f"{e.strerror}")
    return None


def _run_map_program(program: str, target: int, ranges) -> str | None:
    if os.geteuid() == 0:
        return _write_map(program, target, ranges)
    # imported here, in the short-lived helper only: the supervisor and its
    # workers never load subprocess (test_long_lived_processes_never_import_pyseccomp)
    import subprocess

    cmd = [program, str(target), *newidmap_args(ranges)]
    option = "--uid-map" if program == "newuidmap" else "--gid-map"
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=MAP_TIMEOUT - 2,
                           close_fds=True)
    except FileNotFoundError:
        return f"{option}: {program} not found (Debian's uidmap package provides it)"
    except subprocess.TimeoutExpired:
        return f"{option}: {program} did not finish within {MAP_TIMEOUT - 2:g} s"
    if r.returncode != 0:
        why = " ".join(r.stderr.decode(errors="replace").split()) or f"exit status {r.returncode}"
        return (f"{option} {' '.join(str(x) for x in ranges)}: {program} refused: {why} "
                f"(the ranges must be this user's own id or in /etc/sub{program[3]}id)")
    return None
