"""One guest boot that runs the differential suite and the tools script, and
the host-side checks of what the guest left in the shared directory.

Used by test_guest_c_baseline.py, test_guest_ours.py (one boot per cache
mode, module-scoped) and runnable by hand::

    python -m tests.guest.harness --daemon c --cache auto

``python_in_guest`` is the short form for one option's test: a guest that
runs a Python script on the mount and prints one JSON record
(test_guest_submounts.py, test_guest_direct_io.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import stat
import time
from pathlib import Path

from . import guest_ops
from .platforms import KERNEL_KNOWN
from .vm import GuestResult, guest_path, run_guest

HERE = Path(__file__).resolve().parent
GUEST_OPS = HERE / "guest_ops.py"
TOOLS_SH = HERE / "tools.sh"

# Sizes: the brief's full sizes; PYVIRTIOFSD_GUEST_QUICK=1 shrinks them for
# development runs.
QUICK = os.environ.get("PYVIRTIOFSD_GUEST_QUICK") == "1"
BIG_MIB = 32 if QUICK else 256
DIR_ENTRIES = 1000 if QUICK else 10_000


# no console output for this long: the guest is stuck (a lost request...)
IDLE_TIMEOUT = 240
BOOT_TIMEOUT = 900


def guest_command(cache: str, *, tools: bool = True, known=(), big_mib: int = BIG_MIB,
                  dir_entries: int = DIR_ENTRIES, only=()) -> str:
    """The guest's shell command: guest_ops.py (only the ``only`` checks,
    if given), then tools.sh if ``tools``."""
    ops = ["python3", guest_path(GUEST_OPS), "--ref", "/tmp/ops-ref", "--target", "/mnt/ops",
           "--cache", cache, "--big-mib", str(big_mib), "--dir-entries", str(dir_entries)]
    for k in known:
        ops += ["--known", k]
    for name in only:
        ops += ["--only", name]
    cmd = ("export PYTHONDONTWRITEBYTECODE=1; "
           f"{shlex.join(ops)}; echo \"@@STEP ops rc=$?@@\"; rm -rf /tmp/ops-ref; ")
    if tools:
        cmd += f"sh {shlex.quote(guest_path(TOOLS_SH))} /tmp/tools-ref /mnt/tools; echo \"@@STEP tools rc=$?@@\"; "
    cmd += "true"
    return cmd


@dataclasses.dataclass
class Run:
    """Everything one boot produced."""
    kind: str
    cache: str
    shared_dir: Path
    guest: GuestResult
    ops: dict            # check name -> its GUESTOPS line
    ops_info: dict       # info name -> its GUESTOPS info line
    ops_summary: dict | None
    tools: dict          # step name -> its TOOLS line
    tools_summary: dict | None
    step_rc: dict        # "ops"/"tools" -> exit status
    daemon_exit: int | None = None
    daemon_log: str = ""
    process_tree: list | None = None  # [(pid, ppid, comm)] seen while the guest was attached
    confinement: dict | None = None   # pid -> confinement(pid), seen then too
    boot_seconds: float = 0.0
    platform: str = "a"
    num_request_queues: int = 1


def json_record(line: str, prefix: str):
    """The JSON value after ``prefix`` (which the line starts with); None
    if it is not JSON (a record the kernel's own messages cut in two)."""
    try:
        return json.loads(line[len(prefix):])
    except ValueError:
        return None


@dataclasses.dataclass
class ScriptRun:
    record: dict | None       # the JSON of the script's last ``prefix`` line
    guest: GuestResult
    daemon_exit: int | None
    daemon_log: str


def python_in_guest(daemon, script: str, prefix: str, console_log, **guest_opts) -> ScriptRun:
    """Boot a guest on ``daemon``'s export (at /mnt), run ``script`` with its
    python3 and power off; the script prints one ``prefix{json}`` line.
    Waits for the daemon to exit (it does once QEMU is gone). ``guest_opts``:
    more run_guest keywords (platform, smp, num_request_queues)."""
    guest = run_guest(daemon.socket_path, f"python3 -c {shlex.quote(script)}", timeout=300,
                      console_log=console_log, **guest_opts)
    daemon_exit = daemon.wait(15)
    record = None
    for line in guest.output.splitlines():
        if line.startswith(prefix):
            record = json_record(line, prefix)
    return ScriptRun(record, guest, daemon_exit, daemon.log())


def parse_output(text: str):
    ops, info, tools = {}, {}, {}
    ops_summary = tools_summary = None
    step_rc = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(guest_ops.PREFIX):
            obj = json_record(line, guest_ops.PREFIX)
            if obj is None:
                continue
            if obj.get("summary"):
                ops_summary = obj
            elif "check" in obj:
                ops[obj["check"]] = obj
            elif "info" in obj:
                info[obj["info"]] = obj
        elif line.startswith("TOOLS "):
            obj = json_record(line, "TOOLS ")
            if obj is None:
                continue
            if obj.get("summary"):
                tools_summary = obj
            elif "step" in obj:
                tools[obj["step"]] = obj
        elif line.startswith("@@STEP "):
            name, _, rc = line[7:].strip("@").partition(" rc=")
            step_rc[name] = int(rc)
    return ops, info, ops_summary, tools, tools_summary, step_rc


def process_tree(root_pid: int) -> list[tuple[int, int, str]]:
    """root_pid and all its descendants, from /proc/*/stat: [(pid, ppid, comm)]."""
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        if fields[0] == "Z":
            continue
        procs[int(entry)] = (int(fields[1]), comm)
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        if pid in procs:
            out.append((pid, procs[pid][0], procs[pid][1]))
            todo.extend(p for p, (pp, _) in procs.items() if pp == pid)
    return out


def confinement(pid: int) -> dict:
    """What the host sees of one daemon process while a guest is attached:
    its seccomp mode, no_new_privs, effective capabilities, namespaces and
    root (for tests/guest/test_guest_ours.py)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":\t")
        fields[key] = value.strip()
    ns = {kind: os.readlink(f"/proc/{pid}/ns/{kind}") for kind in ("mnt", "pid", "net", "ipc", "uts")}
    root = os.stat(f"/proc/{pid}/root")
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    return {"cmdline": cmdline, "seccomp": fields.get("Seccomp"), "nnp": fields.get("NoNewPrivs"),
            "capeff": int(fields.get("CapEff", "0"), 16), "ns": ns, "root": (root.st_dev, root.st_ino)}


def _wait_exit(daemon, timeout: float) -> int | None:
    if hasattr(daemon, "wait"):
        return daemon.wait(timeout)
    return None


# our daemon from the venv, and as the Debian package installs it
OUR_KINDS = ("ours", "installed")


def boot_and_run(daemon, kind: str, cache: str, shared_dir: Path, *, tools: bool = True,
                 known=(), timeout: float = BOOT_TIMEOUT, console_log=None, only=(),
                 platform: str = "a", smp: int = 2, num_request_queues: int = 1) -> Run:
    """Boot one guest against an already listening daemon and run the suite
    (only the ``only`` checks, if given; ``platform``, ``smp``,
    ``num_request_queues``: as run_guest's). ``known``: checks expected to
    differ from the guest's tmpfs, besides the platform's kernel limits
    (platforms.KERNEL_KNOWN), which every boot expects."""
    known = tuple(dict.fromkeys(tuple(known) + KERNEL_KNOWN[platform]))
    seen_tree: list = []
    seen_confinement: dict = {}

    def on_booted(_text):
        if kind in OUR_KINDS:
            time.sleep(0.5)  # let every worker settle after the mount
            seen_tree.extend(process_tree(daemon.pid))
            for pid, _ppid, comm in seen_tree:
                try:
                    seen_confinement[pid] = dict(confinement(pid), comm=comm)
                except OSError:
                    pass

    def daemon_died():
        proc = getattr(daemon, "proc", None)
        if proc is not None and proc.poll() is not None:
            return f"the daemon exited with {proc.returncode} while the guest was running"
        return None

    t0 = time.monotonic()
    guest = run_guest(daemon.socket_path, guest_command(cache, tools=tools, known=known, only=only),
                      timeout=timeout, console_log=console_log, on_booted=on_booted,
                      idle_timeout=IDLE_TIMEOUT, abort_if=daemon_died, platform=platform, smp=smp,
                      num_request_queues=num_request_queues)
    ops, info, ops_summary, tl, tools_summary, step_rc = parse_output(guest.output)
    run = Run(kind=kind, cache=cache, shared_dir=Path(shared_dir), guest=guest, ops=ops,
              ops_info=info, ops_summary=ops_summary, tools=tl, tools_summary=tools_summary,
              step_rc=step_rc, process_tree=seen_tree if kind in OUR_KINDS else None,
              confinement=seen_confinement if kind in OUR_KINDS else None,
              boot_seconds=time.monotonic() - t0, platform=platform,
              num_request_queues=num_request_queues)
    run.daemon_exit = _wait_exit(daemon, 15)
    try:
        run.daemon_log = daemon.log()
    except Exception:  # noqa: BLE001
        pass
    return run


def describe_failures(run: Run) -> str:
    lines = [f"{run.kind} cache={run.cache} platform={run.platform} queues={run.num_request_queues}: "
             f"guest {run.guest.describe(tail=0)}"]
    for name, obj in run.ops.items():
        if obj["status"] != "pass":
            lines.append(f"  check {name}: {obj['status']}\n    ref:    {json.dumps(obj.get('ref'))}"
                         f"\n    target: {json.dumps(obj.get('target'))}")
    for name, obj in run.tools.items():
        if obj["status"] != "pass":
            lines.append(f"  tools {name}: {json.dumps(obj)}")
    if not run.ops_summary or not run.tools_summary:
        lines.append(run.guest.describe(tail=80))
    if run.daemon_log:
        lines.append("daemon log tail:\n" + "\n".join(run.daemon_log.splitlines()[-30:]))
    return "\n".join(lines)


# --------------------------------------------------------------------------
# host-side checks: what the guest left behind, seen from the host


def host_checks(run: Run) -> dict[str, str | None]:
    """name -> None (ok) or a message. Only for checks the guest ran."""
    ops_dir = run.shared_dir / "ops"
    res: dict[str, str | None] = {}

    def check(name, fn):
        try:
            msg = fn()
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {e}"
        res[name] = msg

    def mmap_bytes():
        data = (ops_dir / "mmap_shared" / "mmap.bin").read_bytes()
        exp = guest_ops.mmap_expected()
        if data != exp:
            bad = next(i for i in range(min(len(data), len(exp))) if data[i] != exp[i]) \
                if len(data) == len(exp) else "length"
            return f"mmap.bin differs from the expected bytes (first difference at {bad})"
        return None

    def owner(path, uid, gid, mode=None):
        s = os.lstat(path)
        if (s.st_uid, s.st_gid) != (uid, gid):
            return f"{path} is owned by {s.st_uid}:{s.st_gid}, expected {uid}:{gid}"
        if mode is not None and stat.S_IMODE(s.st_mode) != mode:
            return f"{path} has mode {oct(stat.S_IMODE(s.st_mode))}, expected {oct(mode)}"
        return None

    def owners():
        c = ops_dir / "credentials"
        return (owner(c / "u1234.txt", 1234, 1234, 0o640) or owner(c / "u1234dir", 1234, 1234, 0o700)
                or owner(ops_dir / "append" / "a", 0, 0, 0o644)
                or owner(ops_dir / "chmod_chown_utime" / "f", 1234, 5678)
                or owner(ops_dir / "chmod_chown_utime" / "l", 42, 43))

    def contents():
        a = (ops_dir / "append" / "a").read_bytes()
        if a != b"one\ntwo\nthree\n":
            return f"append/a holds {a!r}"
        u = (ops_dir / "credentials" / "u1234.txt").read_bytes()
        if u != b"made by 1234":
            return f"credentials/u1234.txt holds {u!r}"
        if os.readlink(ops_dir / "symlink" / "l") != "target.txt":
            return "symlink/l has the wrong target on the host"
        b = ops_dir / "link" / "b"
        if os.lstat(b).st_nlink != 1 or b.read_bytes() != b"linked+more":
            return "link/b: wrong link count or contents on the host"
        if os.getxattr(ops_dir / "xattr" / "f", "user.big") != bytes(range(256)) * 15:
            return "xattr/f user.big differs on the host"
        s = os.stat(ops_dir / "chmod_chown_utime" / "f")
        if stat.S_IMODE(s.st_mode) != 0o600:
            return f"chmod_chown_utime/f mode {oct(s.st_mode)} on the host"
        n = len(os.listdir(ops_dir / "big_dir"))
        if n != DIR_ENTRIES:
            return f"big_dir has {n} entries on the host, expected {DIR_ENTRIES}"
        return None

    def big_file():
        p = ops_dir / "big_file" / "big.bin"
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while True:
                chunk = f.read(1 << 22)
                if not chunk:
                    break
                h.update(chunk)
        exp = guest_ops.big_sha256(BIG_MIB)
        guest_said = run.ops_info.get("big_file", {}).get("sha256")
        if h.hexdigest() != exp:
            return f"big.bin sha256 on the host {h.hexdigest()} != expected {exp}"
        if guest_said != exp:
            return f"guest computed {guest_said}, expected {exp}"
        return None

    def tools_db():
        import sqlite3
        p = run.shared_dir / "tools" / "py" / "test.db"
        db = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        try:
            n, = db.execute("select count(*) from t").fetchone()
            ok, = db.execute("pragma integrity_check").fetchone()
        finally:
            db.close()
        if (n, ok) != (2000, "ok"):
            return f"tools sqlite db on the host: count={n} integrity={ok}"
        return None

    if run.cache not in ("never", "none") and "mmap_shared" in run.ops:
        check("mmap_bytes", mmap_bytes)
    if "credentials" in run.ops:
        check("owners", owners)
    if all(c in run.ops for c in ("append", "credentials", "symlink", "link", "xattr", "big_dir")):
        check("contents", contents)
    if "big_file" in run.ops:
        check("big_file_sha256", big_file)
    if "python" in run.tools:
        check("tools_sqlite", tools_db)
    return res


if __name__ == "__main__":
    import argparse
    import sys
    import tempfile

    sys.path.insert(0, str(HERE.parents[1]))
    from .daemons import Daemon

    ap = argparse.ArgumentParser()
    ap.add_argument("--daemon", choices=("c", "ours", "rust"), default="c")
    ap.add_argument("--cache", default="auto")
    ap.add_argument("--platform", choices=("a", "b"), default="a")
    ap.add_argument("--num-request-queues", type=int, default=1)
    ap.add_argument("--no-tools", action="store_true")
    a = ap.parse_args()
    share = Path(tempfile.mkdtemp(prefix="pyvfs-share-"))
    os.chmod(share, 0o755)
    d = Daemon(a.daemon, str(share), cache=a.cache)
    try:
        r = boot_and_run(d, a.daemon, a.cache, share, tools=not a.no_tools, platform=a.platform,
                         num_request_queues=a.num_request_queues)
    finally:
        d.stop()
    print(describe_failures(r))
    print(json.dumps({"ops": r.ops_summary, "tools": r.tools_summary, "host": host_checks(r),
                      "boot_s": round(r.boot_seconds, 1), "tree": r.process_tree}, indent=1))
