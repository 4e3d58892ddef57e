"""Seccomp programs: built once in a throwaway child, loaded by every process.

The allow-lists in ``policy/`` are compiled by libseccomp (through
pyseccomp, see ``seccomp.py``). Importing pyseccomp pulls ctypes.util,
subprocess, selectors, locale and libseccomp into a process, and building a
filter leaves ~0.8 MiB of malloc heap behind: together ~2 MiB that every
process forked afterwards would carry for nothing, since loading a finished
program is one system call. So the supervisor forks a short-lived child
that parses every policy file, compiles each role's program
(``seccomp_export_bpf``) and sends them back through a pipe; the
long-lived processes (supervisor, hiprio and request workers) never import
pyseccomp and load their program with ``seccomp(2)`` through ctypes.

The child answers with one ``marshal`` record (it is our own code, forked
from us: the record is trusted, only its size is capped):
``("ok", {role: (program bytes, rule count)}, seccomp syscall number)`` or
``("error", message)``. A policy error is reported with the message the
policy parser gave, as before; a child that dies or answers nonsense is a
``SandboxError`` too.
"""

from __future__ import annotations

import ctypes
import errno
import marshal
import os
import select
import signal
import time

from daemon.sandbox.namespaces import SandboxError

ROLES = ("supervisor", "hiprio", "request", "keeper")
SECCOMP_MODES = ("kill", "log", "trap", "none")
MAX_ANSWER = 1 << 20            # three programs of at most 4096 instructions fit many times over
COMPILE_TIMEOUT = 30.0          # seconds; it takes milliseconds
BPF_INSN = 8                    # sizeof(struct sock_filter)
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1


class Programs:
    """Every role's compiled program for one action (empty for ``none``)."""

    __slots__ = ("action", "by_role", "seccomp_nr")

    def __init__(self, action: str, by_role: dict[str, tuple[bytes, int]], seccomp_nr: int):
        self.action = action
        self.by_role = by_role        # role -> (classic BPF program, number of rules)
        self.seccomp_nr = seccomp_nr  # the seccomp(2) syscall number on this architecture


def build(action: str, policy_dir=None) -> Programs:
    """Parse every policy file and compile each role's program for ``action``
    in a forked child. Raises SandboxError (for a bad file with the
    parser's 'path:line: what' message)."""
    if action not in SECCOMP_MODES:
        raise SandboxError(f"--seccomp {action}: expected one of {', '.join(SECCOMP_MODES)}")
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except OSError as e:
        os.close(r)
        os.close(w)
        raise SandboxError(f"forking the seccomp compiler: {e.strerror}") from None
    if pid == 0:  # pragma: no cover - runs in the child, checked through its answer
        os.close(r)
        _compile_and_answer(w, action, policy_dir)
        os._exit(1)  # not reached: it exits itself
    os.close(w)
    try:
        data = _read_capped(r, COMPILE_TIMEOUT)
    except SandboxError:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        os.close(r)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:  # reaped elsewhere: the answer alone decides
            status = 0
    return _decode(data, status, action)


def _compile_and_answer(w: int, action: str, policy_dir) -> None:
    """The child: compile, write the answer, exit without returning."""
    code = 0
    try:
        try:
            from daemon.sandbox import seccomp
            pols = seccomp.load_all(policy_dir)
            by_role = {}
            if action != "none":
                by_role = {role: seccomp.compile_program(role, action, pols) for role in ROLES}
            answer: tuple = ("ok", by_role, seccomp.resolve("seccomp"))
        except SandboxError as e:
            answer = ("error", str(e))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which fails start-up
            answer = ("error", f"{type(e).__name__}: {e}")
        data = marshal.dumps(answer)
        view = memoryview(data)
        while view:
            view = view[os.write(w, view):]
    except BaseException:  # noqa: BLE001 - the parent sees a short answer
        code = 1
    finally:
        os._exit(code)


def _read_capped(fd: int, timeout: float) -> bytes:
    """Everything the child writes until it closes the pipe; SandboxError
    past ``MAX_ANSWER`` bytes or ``timeout`` seconds."""
    chunks: list[bytes] = []
    total = 0
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise SandboxError(f"the seccomp compiler did not answer within {timeout:.0f} s")
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > MAX_ANSWER:
            raise SandboxError(f"the seccomp compiler answered more than {MAX_ANSWER} bytes")
        chunks.append(chunk)


def _decode(data: bytes, status: int, action: str) -> Programs:
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0 or not data:
        raise SandboxError(f"the seccomp compiler failed (wait status {status:#x})")
    try:
        answer = marshal.loads(data)
    except (EOFError, ValueError, TypeError):
        raise SandboxError("the seccomp compiler's answer is malformed") from None
    if isinstance(answer, tuple) and len(answer) == 2 and answer[0] == "error":
        raise SandboxError(str(answer[1]))
    if not (isinstance(answer, tuple) and len(answer) == 3 and answer[0] == "ok"
            and isinstance(answer[1], dict) and isinstance(answer[2], int) and answer[2] >= 0):
        raise SandboxError("the seccomp compiler's answer is malformed")
    by_role = answer[1]
    expected = set(ROLES) if action != "none" else set()
    if set(by_role) != expected:
        raise SandboxError(f"the seccomp compiler answered for {sorted(by_role)}")
    for role, entry in by_role.items():
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], bytes)
                and isinstance(entry[1], int)) or not valid_program(entry[0]):
            raise SandboxError(f"the seccomp compiler's {role} program is malformed")
    return Programs(action, by_role, answer[2])


def valid_program(prog: bytes) -> bool:
    return bool(prog) and len(prog) % BPF_INSN == 0 and len(prog) // BPF_INSN <= 4096


# struct sock_fprog { unsigned short len; /* 6 bytes padding */ struct sock_filter *filter; }
class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


_libc = ctypes.CDLL(None, use_errno=True)


def load(prog: bytes, seccomp_nr: int) -> None:
    """seccomp(SECCOMP_SET_MODE_FILTER, TSYNC, prog): what libseccomp's
    ``seccomp_load`` does with the same program (TSYNC: every thread of the
    process, as our filters set CTL_TSYNC). Through ctypes because the
    stdlib has no binding and pyseccomp only loads filters it built in the
    same process. OSError on refusal."""
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // BPF_INSN, ctypes.cast(buf, ctypes.c_char_p))
    r = _libc.syscall(seccomp_nr, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC,
                      ctypes.byref(fprog))
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    if r > 0:  # TSYNC: the id of a thread that could not be synchronised
        raise OSError(errno.EBUSY, f"thread {r} could not take the filter")


def install(role: str, programs: Programs) -> int:
    """Load ``role``'s program into this process (and its future children);
    nothing with ``none``. no_new_privs must already be set (or
    CAP_SYS_ADMIN held). Returns the number of rules loaded."""
    if programs.action == "none":
        return 0
    prog, rules = programs.by_role[role]
    try:
        load(prog, programs.seccomp_nr)
    except OSError as e:
        raise SandboxError(f"loading the {role} seccomp filter: {e.strerror}") from None
    return rules
