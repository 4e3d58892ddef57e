"""Demo: share a host directory with a real QEMU guest through our daemon.

    python -m tests.guest.demo              # our daemon (python -m daemon)
    python -m tests.guest.demo --baseline   # QEMU's C virtiofsd instead

Makes a demo directory with a few files, starts the daemon on it, boots a
guest (QEMU 7.2, TCG, Debian's 6.1 kernel) that lists, reads and writes
there (demo_guest.sh) and prints what it saw, then shows on the host what
the guest wrote. Exits non-zero if anything did not happen as expected.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .daemons import Daemon
from .kernel import ensure_kernel
from .vm import guest_path, run_guest

HERE = Path(__file__).resolve().parent


def make_demo_dir(path: Path) -> dict:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o755)
    (path / "hello.txt").write_text("Hello from the host! This file lives on the host's disk.\n")
    (path / "notes").mkdir(exist_ok=True)
    (path / "notes" / "todo.md").write_text("# todo\n- [ ] boot a guest\n")
    (path / "notes" / "old-name.txt").write_text("the guest will rename me\n")
    data = bytes((i * 37 + 11) % 256 for i in range(1 << 20))
    (path / "data.bin").write_bytes(data)
    if not (path / "latest").is_symlink():
        os.symlink("notes/todo.md", path / "latest")
    return {"data_sha256": hashlib.sha256(data).hexdigest()}


def section(title: str) -> None:
    print(f"\n\033[1m=== {title}\033[0m" if sys.stdout.isatty() else f"\n=== {title}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", action="store_true", help="use QEMU's C virtiofsd instead of ours")
    ap.add_argument("--dir", help="demo directory (default: a new one under /tmp, kept afterwards)")
    ap.add_argument("--cache", default="auto", choices=("never", "auto", "always"))
    ap.add_argument("--timeout", type=float, default=300)
    a = ap.parse_args(argv)
    kind = "c" if a.baseline else "ours"
    failures: list[str] = []

    if os.geteuid() != 0:
        print("demo: must run as root (QEMU exports / read-only to the guest over 9p)", file=sys.stderr)
        return 2
    section("preparing the guest kernel (cached after the first run)")
    vmlinuz, _ = ensure_kernel()
    print(f"kernel: {vmlinuz}")

    demo = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="pyvirtiofsd-demo-"))
    facts = make_demo_dir(demo)
    section(f"host: the shared directory {demo}")
    for p in sorted(demo.rglob("*")):
        print(f"  {p.relative_to(demo)}{' -> ' + os.readlink(p) if p.is_symlink() else ''}")

    run_dir = Path(tempfile.mkdtemp(prefix="pyvirtiofsd-demo-run-"))
    label = "QEMU's C virtiofsd (baseline)" if a.baseline else "pyvirtiofsd (python -m daemon)"
    section(f"host: starting {label}, cache={a.cache}")
    try:
        daemon = Daemon(kind, str(demo), cache=a.cache, socket_path=str(run_dir / "vfs.sock"),
                        log_path=str(run_dir / "daemon.log"))
    except RuntimeError as e:
        print(f"demo: the daemon did not start: {e}", file=sys.stderr)
        return 1
    print(f"  {' '.join(daemon.argv)}\n  pid {daemon.pid}, socket {daemon.socket_path}")

    section("guest: booting QEMU (TCG) and running demo_guest.sh")
    t0 = time.monotonic()
    try:
        res = run_guest(daemon.socket_path, f"sh {guest_path(HERE / 'demo_guest.sh')} /mnt", timeout=a.timeout)
    finally:
        exit_status = daemon.wait(15)
        daemon.stop()
    print(res.output.rstrip())
    print(f"(guest ran {time.monotonic() - t0:.1f} s, exit status {res.exit_status}, "
          f"unmount status {res.umount_status})")
    if res.exit_status != 0:
        failures.append(f"guest script exit status {res.exit_status}")
        print(res.describe(tail=40))
    if res.timed_out:
        failures.append("guest timed out")
    if facts["data_sha256"] not in res.output:
        failures.append("the guest did not read data.bin correctly")
    if "Hello from the host!" not in res.output:
        failures.append("the guest did not read hello.txt")

    section("host: what the guest wrote")
    greeting = demo / "from-guest" / "greeting.txt"
    if greeting.is_file():
        print(f"  {greeting.relative_to(demo)}:")
        for line in greeting.read_text().splitlines():
            print(f"    {line}")
        if not greeting.read_text().startswith("Hello from the guest!"):
            failures.append("greeting.txt has unexpected contents")
    else:
        failures.append("from-guest/greeting.txt missing on the host")
    todo = (demo / "notes" / "todo.md").read_text()
    print("  notes/todo.md:\n" + "".join(f"    {line}\n" for line in todo.splitlines()), end="")
    if "the guest was here" not in todo:
        failures.append("notes/todo.md was not appended to")
    if not (demo / "notes" / "renamed-by-guest.txt").is_file() or (demo / "notes" / "old-name.txt").exists():
        failures.append("notes/old-name.txt was not renamed")
    eight = demo / "from-guest" / "eight-mib.txt"
    if not eight.is_file() or eight.stat().st_size != 8 << 20 or set(eight.read_bytes()) != {ord("g")}:
        failures.append("from-guest/eight-mib.txt is not 8 MiB of 'g'")
    else:
        print(f"  from-guest/eight-mib.txt: {eight.stat().st_size} bytes of 'g', "
              f"owner {eight.stat().st_uid}:{eight.stat().st_gid}")
    print("  tree now:")
    for p in sorted(demo.rglob("*")):
        print(f"    {p.relative_to(demo)}")
    if exit_status != 0:
        failures.append(f"the daemon exited with {exit_status} after the guest powered off")
        print("daemon log tail:\n" + "\n".join(daemon.log().splitlines()[-20:]))

    section("result")
    if failures:
        for f in failures:
            print(f"  FAILED: {f}")
        print(f"  (demo directory kept at {demo}; daemon log {daemon.log_path})")
        return 1
    print(f"  OK: the guest read and wrote {demo} through {label}.")
    if not a.dir:
        print(f"  (demo directory kept at {demo})")
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
