"""seccomp allow-lists per role, kept as data in ``policy/<role>.policy``.

File format (one syscall per line)::

    # comment lines and blank lines are ignored
    name  [option ...]  # reason this role needs it (required)

* names are the kernel's syscall names as libseccomp knows them for the
  native architecture (x86_64); an unknown name, or one that is not a
  syscall of this architecture, is a startup error;
* lines are sorted by name (plain byte order) and a name appears once:
  sorting keeps diffs reviewable, and both rules are checked;
* options narrow a rule:
  ``errno=ENOSYS``    the call fails with that errno instead of running
                      (e.g. ``clone3``: glibc then falls back to ``clone``,
                      whose flags *can* be checked; clone3's are in memory);
  ``argN&MASK==VAL``  allowed only if (argument N & MASK) == VAL, e.g.
                      ``clone  arg0&0x10000==0x10000`` = threads only;
                      ``VAL1|VAL2`` allows either value (``ioctl`` requests).

Everything not listed gets the default action chosen by ``--seccomp``:
``kill`` (SCMP_ACT_KILL_PROCESS: the whole worker dies with SIGSYS and the
supervisor logs it), ``log`` (allowed, logged by the kernel's audit: use
it to find a missing line), ``trap`` (SIGSYS delivered to the thread;
Python's default SIGSYS action kills it and dumps core) or ``none`` (no
filter). A syscall from another ABI (i386 ``int 0x80``, x32) always kills.

Filters stack and are inherited across fork: a worker forked by the
supervisor after the supervisor has loaded its filter is bound by *both*.
So the filter installed in the supervisor is ``supervisor.policy`` ∪
``request.policy`` ∪ ``hiprio.policy`` ∪ ``keeper.policy`` (the workers then narrow it with
their own), and ``supervisor.policy`` also lists what a freshly forked
worker needs to confine itself (unshare, mount, pivot_root, capset, ...).

Only the throwaway child of ``programs.build`` imports this module (and
pyseccomp): the long-lived processes load the programs it compiled.
"""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import itertools
import os
import re
import sys
from pathlib import Path

try:
    import pyseccomp  # PyPI: ctypes over libseccomp
except ImportError:
    # Debian's python3-seccomp: libseccomp's own bindings, whose API
    # pyseccomp copies name for name (the Debian package depends on it)
    import seccomp as pyseccomp  # type: ignore[import-not-found]

from daemon.sandbox.namespaces import SandboxError
from daemon.sandbox.programs import ROLES, valid_program

ACTIONS = {
    "kill": pyseccomp.KILL_PROCESS,
    "log": pyseccomp.LOG,
    "trap": pyseccomp.TRAP,
}

def _policy_dir() -> Path:
    """Where the reviewed allow-lists live: $PYVIRTIOFSD_POLICY_DIR, the
    source tree's policy/ (a checkout or an editable install), else where
    the package installs them (<prefix>/share/pyvirtiofsd/policy)."""
    env = os.environ.get("PYVIRTIOFSD_POLICY_DIR")
    if env:
        return Path(env)
    source = Path(__file__).resolve().parent.parent.parent / "policy"
    if source.is_dir():
        return source
    return Path(sys.prefix) / "share" / "pyvirtiofsd" / "policy"


POLICY_DIR = _policy_dir()

_NUM = r"(?:0x[0-9a-fA-F]+|\d+)"
_ARG_RE = re.compile(rf"^arg([0-5])&({_NUM})==({_NUM}(?:\|{_NUM})*)$")
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")


class PolicyError(SandboxError):
    """A policy file is malformed; message: 'path:line: what'."""


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    nr: int
    reason: str
    errno: int | None = None                       # return this errno instead of allowing
    args: tuple[tuple[int, int, tuple[int, ...]], ...] = ()   # (arg index, mask, allowed values)
    line: int = 0


@dataclasses.dataclass(frozen=True)
class Policy:
    role: str
    path: str
    rules: tuple[Rule, ...]

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rules]


def resolve(name: str) -> int:
    """Native syscall number of ``name``; -1 if libseccomp does not know it
    for this architecture."""
    nr = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    return nr if nr >= 0 else -1


def parse_policy(text: str, path: str = "<policy>", role: str = "?") -> Policy:
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    prev = ""
    for lineno, raw in enumerate(text.splitlines(), 1):
        where = f"{path}:{lineno}"
        body, hash_, reason = raw.partition("#")
        body = body.strip()
        if not body:
            continue
        reason = reason.strip()
        if not hash_ or not reason:
            raise PolicyError(f"{where}: {body.split()[0]!r} has no '# reason'")
        fields = body.split()
        name, options = fields[0], fields[1:]
        if not _NAME_RE.match(name):
            raise PolicyError(f"{where}: {name!r} is not a syscall name")
        if name in seen:
            raise PolicyError(f"{where}: duplicate {name!r} (first on line {seen[name]})")
        if name < prev:
            raise PolicyError(f"{where}: {name!r} is out of order (after {prev!r}); keep the list sorted")
        nr = resolve(name)
        if nr < 0:
            raise PolicyError(f"{where}: unknown syscall {name!r} on this architecture")
        err = None
        args = []
        for opt in options:
            if opt.startswith("errno="):
                ename = opt[6:]
                err = getattr(errno_mod, ename, None)
                if not ename.startswith("E") or not isinstance(err, int):
                    raise PolicyError(f"{where}: unknown errno {ename!r}")
                continue
            m = _ARG_RE.match(opt)
            if not m:
                raise PolicyError(f"{where}: bad option {opt!r} (errno=EXXX or argN&MASK==VALUE)")
            values = tuple(sorted({int(v, 0) for v in m.group(3).split("|")}))
            args.append((int(m.group(1)), int(m.group(2), 0), values))
        if err is not None and args:
            raise PolicyError(f"{where}: errno= and argument checks cannot be combined")
        seen[name] = lineno
        prev = name
        rules.append(Rule(name, nr, reason, err, tuple(args), lineno))
    if not rules:
        raise PolicyError(f"{path}: no syscalls")
    return Policy(role, path, tuple(rules))


def load_policy(role: str, policy_dir: str | os.PathLike | None = None) -> Policy:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    path = Path(policy_dir or POLICY_DIR) / f"{role}.policy"
    try:
        text = path.read_text()
    except OSError as e:
        raise PolicyError(f"{path}: {e.strerror}") from None
    return parse_policy(text, str(path), role)


def load_all(policy_dir=None) -> dict[str, Policy]:
    """Parse and validate every role's policy: call at startup so a broken
    file is an error before anything runs."""
    return {role: load_policy(role, policy_dir) for role in ROLES}


def effective_rules(role: str, policies: dict[str, Policy]) -> list[Rule]:
    """The rules of the filter a role installs. The supervisor's is the union
    of every role's allow rules (its children inherit it); a name that is
    conditional or errno'd in one list and plainly allowed in another is
    plainly allowed."""
    if role != "supervisor":
        return list(policies[role].rules)
    by_name: dict[str, list[Rule]] = {}
    for p in (policies["supervisor"], policies["request"], policies["hiprio"], policies["keeper"]):
        for r in p.rules:
            by_name.setdefault(r.name, []).append(r)
    out = []
    for name in sorted(by_name):
        rs = by_name[name]
        plain = [r for r in rs if r.errno is None and not r.args]
        if plain:
            out.append(plain[0])
        elif all((r.errno, r.args) == (rs[0].errno, rs[0].args) for r in rs):
            out.append(rs[0])
        elif all(r.errno is None and len(r.args) == 1 and r.args[0][:2] == rs[0].args[0][:2] for r in rs):
            # the same argument checked everywhere: allow the union of the values
            idx, mask = rs[0].args[0][:2]
            values = tuple(sorted({v for r in rs for v in r.args[0][2]}))
            out.append(dataclasses.replace(rs[0], args=((idx, mask, values),)))
        else:
            out.append(dataclasses.replace(rs[0], errno=None, args=()))
    return out


def build_filter(rules: list[Rule], action: str) -> pyseccomp.SyscallFilter:
    if action not in ACTIONS:
        raise ValueError(f"unknown seccomp action {action!r}")
    f = pyseccomp.SyscallFilter(ACTIONS[action])
    f.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    try:
        f.set_attr(pyseccomp.Attr.CTL_TSYNC, 1)
    except OSError:
        pass
    try:
        # a binary tree over syscall numbers (libseccomp >= 2.5): every
        # syscall the worker makes runs the filter, and a request worker's
        # list is ~100 entries long, so O(log n) beats the default chain
        f.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, 2)
    except OSError:
        pass
    for r in rules:
        try:
            if r.errno is not None:
                f.add_rule(pyseccomp.ERRNO(r.errno), r.nr)
            elif r.args:
                for combo in itertools.product(*[[(i, m, v) for v in vs] for i, m, vs in r.args]):
                    f.add_rule(pyseccomp.ALLOW, r.nr,
                               *[pyseccomp.Arg(i, pyseccomp.MASKED_EQ, m, v) for i, m, v in combo])
            else:
                f.add_rule(pyseccomp.ALLOW, r.nr)
        except OSError as e:
            raise PolicyError(f"seccomp rule for {r.name}: {e.strerror}") from None
    return f


def compile_program(role: str, action: str, policies: dict[str, Policy]) -> tuple[bytes, int]:
    """``role``'s filter as the classic-BPF program libseccomp generates
    (``seccomp_export_bpf``) and its number of rules. Called in the
    throwaway child of ``programs.build``."""
    rules = effective_rules(role, policies)
    f = build_filter(rules, action)
    try:
        # a memfd, not a pipe: export writes the whole program at once
        with open(os.memfd_create(f"pyvirtiofsd-{role}-bpf", os.MFD_CLOEXEC), "w+b") as out:
            f.export_bpf(out)
            out.seek(0)
            prog = out.read()
    except OSError as e:
        raise PolicyError(f"exporting the {role} seccomp filter: {e.strerror}") from None
    if not valid_program(prog):
        raise PolicyError(f"the {role} seccomp filter exported {len(prog)} bytes")
    return prog, len(rules)
