"""Boot a QEMU guest (TCG) that runs one shell command against virtiofs.

``run_guest(socket_path, command)`` boots platform a (QEMU 7.2, Debian's 6.1
kernel) with our busybox initrd (initrd.py); ``platform="b"`` boots QEMU 10
with Linux 6.12 instead (platforms.py). ``smp=N`` gives the guest N vCPUs and
``num_request_queues=N`` the vhost-user-fs device N request queues (Linux 6.11+
sends a request on the queue of the vCPU it runs on; 6.1 uses the first only).
The guest mounts the host root read-only over
9p, mounts the virtiofs device (backed by the daemon listening on
``socket_path``) at /mnt inside that root, and runs ``command`` with
``/bin/sh -c`` chrooted into it, so the host's python3, fio and coreutils
are available. The run never hangs: QEMU is killed after ``timeout`` s.

KVM does not work on these machines (nested "PVM" KVM), so this always
uses ``-accel tcg,thread=multi -cpu max``.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from .initrd import BEGIN_MARKER, SETUP_FAILED_STATUS, ensure_initrd
from .kernel import ensure_kernel
from .platforms import platform as get_platform
from .platforms import qemu_argv

# the repository's tests/ directory, exported read-only to every guest
HARNESS_DIR = Path(__file__).resolve().parent.parent
GUEST_HARNESS_DIR = "/run/harness"   # where the guest (chrooted in the host root) sees it
SYNC_MNT = "/run/sync"               # where the guest sees run_guest's sync_dir


def guest_path(host_path) -> str:
    """The in-guest path of a file under tests/ (see HARNESS_DIR)."""
    return f"{GUEST_HARNESS_DIR}/{Path(host_path).resolve().relative_to(HARNESS_DIR)}"


QEMU = "qemu-system-x86_64"
EXIT_RE = re.compile(r"@@GUEST-EXIT status=(-?\d+) umount=(-?\d+)@@")
MAX_CMDLINE = 2000  # x86 COMMAND_LINE_SIZE is 2048


@dataclasses.dataclass
class GuestResult:
    exit_status: int | None      # the command's status; None: no end marker (timeout, crash)
    console_text: str            # everything on the serial console
    umount_status: int | None = None
    timed_out: bool = False
    aborted: str | None = None   # why the run was cut short (idle console, abort_if)
    qemu_returncode: int | None = None
    qemu_stderr: str = ""
    duration: float = 0.0

    @property
    def output(self) -> str:
        """The console between the begin marker and the exit marker."""
        text = self.console_text
        i = text.find(BEGIN_MARKER)
        if i >= 0:
            text = text[i + len(BEGIN_MARKER):].lstrip("\n")
        m = None
        for m in EXIT_RE.finditer(text):  # noqa: B007 - the last match is wanted
            pass
        return text[:m.start()] if m else text

    @property
    def setup_failed(self) -> bool:
        return self.exit_status == SETUP_FAILED_STATUS and "@@GUEST-SETUP-FAILED" in self.console_text

    def describe(self, tail: int = 60) -> str:
        lines = self.console_text.splitlines()[-tail:]
        return (f"exit_status={self.exit_status} umount={self.umount_status} "
                f"timed_out={self.timed_out} aborted={self.aborted} qemu_rc={self.qemu_returncode} "
                f"duration={self.duration:.1f}s\nqemu stderr: {self.qemu_stderr.strip()}\n"
                "console tail:\n" + "\n".join(lines))


def _mem_bytes(mem: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", mem.strip().upper())
    if not m:
        raise ValueError(f"bad mem size {mem!r}")
    return int(m.group(1)) << {"": 20, "K": 10, "M": 20, "G": 30}[m.group(2)]


def qemu_command(socket_path: str | None, command: str, *, tag: str, mem: str, smp: int,
                 console_path: str, mount_opts: str = "", mount_point: str = "/mnt",
                 extra_kernel_args=(), queue_size: int = 1024, platform: str = "a",
                 num_request_queues: int = 1,
                 sync_dir: str | os.PathLike | None = None) -> list[str]:
    vmlinuz, _mods = ensure_kernel(get_platform(platform).kernel)
    initrd = ensure_initrd(platform)
    if num_request_queues < 1:
        raise ValueError(f"num_request_queues must be >= 1, not {num_request_queues}")
    mem_b = _mem_bytes(mem)
    cmd_b64 = base64.b64encode(command.encode()).decode()
    append = ["console=ttyS0", "panic=-1", "quiet", "mitigations=off",
              f"vfs_tag={tag if socket_path else 'none'}", f"vfs_mnt={mount_point}",
              f"vfs_cmd={cmd_b64}"]
    if mount_opts:
        if any(c.isspace() for c in mount_opts):
            raise ValueError("mount options may not contain spaces")
        append.append(f"vfs_opts={mount_opts}")
    if sync_dir is not None:
        append.append("vfs_sync=1")
    append.extend(extra_kernel_args)
    append_s = " ".join(append)
    if len(append_s) > MAX_CMDLINE:
        raise ValueError(f"kernel command line too long ({len(append_s)} bytes): put the "
                         "command in a script file the guest can read through /host")
    argv = [
        *qemu_argv(platform), "-accel", "tcg,thread=multi", "-cpu", "max",
        "-m", f"{mem_b >> 20}M", "-smp", str(smp),
        "-nodefaults", "-display", "none", "-no-reboot", "-monitor", "none",
        "-serial", f"file:{console_path}",
        "-object", f"memory-backend-memfd,id=mem,size={mem_b >> 20}M,share=on",
        "-numa", "node,memdev=mem",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        # the harness's own scripts on a tag of their own: the checkout may sit
        # where the guest mounts a tmpfs (/tmp, /run), so never rely on /host
        "-virtfs", f"local,path={HARNESS_DIR},mount_tag=harness,security_model=none,readonly=on",
        "-kernel", str(vmlinuz), "-initrd", str(initrd), "-append", append_s,
    ]
    if sync_dir is not None:  # read-write, uncached: the guest sees host changes at once
        argv += ["-virtfs", f"local,path={sync_dir},mount_tag=sync,security_model=none"]
    if socket_path:
        queues = f",num-request-queues={num_request_queues}" if num_request_queues != 1 else ""
        argv += ["-chardev", f"socket,id=char0,path={socket_path}",
                 "-device", f"vhost-user-fs-pci,queue-size={queue_size}{queues},chardev=char0,tag={tag}"]
    return argv


def kill_qemu(proc: subprocess.Popen) -> None:
    """SIGKILL QEMU's process group (it leads one) unless it has exited; reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_guest(socket_path: str | None, command: str, tag: str = "myfs", timeout: float = 300,
              mem: str = "1G", smp: int = 2, extra_kernel_args=(), mount_opts: str = "",
              mount_point: str = "/mnt", console_log: str | os.PathLike | None = None,
              on_booted=None, queue_size: int = 1024, idle_timeout: float | None = None,
              abort_if=None, platform: str = "a", num_request_queues: int = 1,
              sync_dir: str | os.PathLike | None = None, on_start=None) -> GuestResult:
    """Boot, run ``command`` (``sh -c`` in the chrooted host root, cwd /tmp),
    power off. ``socket_path=None`` boots without a virtiofs device.

    ``platform``: "a" (QEMU 7.2 + Linux 6.1) or "b" (QEMU 10 + Linux 6.12);
    ``smp``: vCPUs; ``num_request_queues``: the device's request queues
    (the daemon must offer that many, or QEMU refuses to start).

    ``on_booted(result_so_far)`` is called once, from this thread, when the
    begin marker appears on the console (the virtiofs mount is up): tests use
    it to look at the daemon while the guest is attached. Its return value is
    ignored; its exceptions are re-raised after the guest is gone.

    ``idle_timeout``: kill QEMU when the console has not grown for that many
    seconds. ``abort_if()``: polled every 0.2 s; a true value (a reason) kills
    QEMU 3 s later (e.g. the daemon died, so the guest's requests would hang).

    ``sync_dir``: a host directory the guest sees read-write at ``SYNC_MNT``
    over 9p without caching, so host and guest (and several guests) can
    signal each other with files there whatever the mount under test caches.
    ``on_start(proc)``: called with QEMU's Popen as soon as it runs (QEMU
    leads its own process group), e.g. to SIGKILL it mid-run.
    """
    if platform == "a" and shutil.which(QEMU) is None:
        raise RuntimeError(f"{QEMU} not found: apt-get install qemu-system-x86")
    tmpdir = tempfile.mkdtemp(prefix="pyvfs-guest-")
    console = Path(console_log) if console_log else Path(tmpdir) / "console.log"
    console.parent.mkdir(parents=True, exist_ok=True)
    console.write_bytes(b"")
    stderr_path = Path(tmpdir) / "qemu.stderr"
    argv = qemu_command(socket_path, command, tag=tag, mem=mem, smp=smp,
                        console_path=str(console), mount_opts=mount_opts,
                        mount_point=mount_point, extra_kernel_args=extra_kernel_args,
                        queue_size=queue_size, platform=platform,
                        num_request_queues=num_request_queues, sync_dir=sync_dir)
    start = time.monotonic()
    timed_out = False
    hook_error: BaseException | None = None
    aborted: str | None = None
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                start_new_session=True)
    try:
        if on_start is not None:
            on_start(proc)
        hook_pending = on_booted is not None
        deadline = start + timeout
        last_size, last_growth = 0, time.monotonic()
        abort_at, abort_reason = None, None
        while True:
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            size = console.stat().st_size
            if size != last_size:
                last_size, last_growth = size, now
            elif idle_timeout and now - last_growth > idle_timeout:
                aborted = f"console idle for {idle_timeout:.0f} s"
                break
            if abort_if is not None and abort_at is None:
                why = abort_if()
                if why:  # QEMU may be exiting anyway (the daemon goes at power-off)
                    abort_reason, abort_at = str(why), now + 3
            if abort_at is not None and now > abort_at:
                aborted = abort_reason
                break
            if hook_pending:
                text = console.read_text(errors="replace")
                if BEGIN_MARKER in text:
                    hook_pending = False
                    try:
                        on_booted(text)
                    except BaseException as e:  # noqa: BLE001 - re-raised after cleanup
                        hook_error = e
            if time.monotonic() > deadline:
                timed_out = True
                break
    finally:
        kill_qemu(proc)
    duration = time.monotonic() - start
    text = console.read_text(errors="replace").replace("\r\n", "\n")
    stderr = stderr_path.read_text(errors="replace")
    m = None
    for m in EXIT_RE.finditer(text):  # noqa: B007 - the last match is wanted
        pass
    result = GuestResult(
        exit_status=int(m.group(1)) if m else None,
        umount_status=int(m.group(2)) if m else None,
        console_text=text, timed_out=timed_out, aborted=aborted, qemu_returncode=proc.returncode,
        qemu_stderr=stderr, duration=duration)
    shutil.rmtree(tmpdir, ignore_errors=True)
    if hook_error is not None:
        raise hook_error
    return result


class BackgroundGuest:
    """``run_guest`` in a thread, for tests that run several guests at once
    or kill one mid-run: ``BackgroundGuest(socket_path, command, **kw)``
    starts it; ``wait_console(text)`` waits for a line of its console;
    ``kill()`` SIGKILLs QEMU; ``result()`` joins and returns the GuestResult
    (or raises what run_guest raised)."""

    def __init__(self, socket_path, command: str, *, console_log, **kw):
        self.console_log = Path(console_log)
        self.console_log.parent.mkdir(parents=True, exist_ok=True)
        self.console_log.write_bytes(b"")
        self.proc: subprocess.Popen | None = None
        self._started = threading.Event()
        self._result: GuestResult | None = None
        self._error: BaseException | None = None

        def on_start(proc):
            self.proc = proc
            self._started.set()

        def body():
            try:
                self._result = run_guest(socket_path, command, console_log=self.console_log,
                                         on_start=on_start, **kw)
            except BaseException as e:  # noqa: BLE001 - re-raised by result()
                self._error = e
            finally:
                self._started.set()

        self._thread = threading.Thread(target=body, daemon=True)
        self._thread.start()

    def console(self) -> str:
        return self.console_log.read_text(errors="replace").replace("\r\n", "\n")

    def wait_console(self, text: str, timeout: float) -> bool:
        """True once ``text`` is on the console; False on timeout or when
        the guest has ended without printing it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.console():
                return True
            if not self._thread.is_alive():
                return text in self.console()
            time.sleep(0.1)
        return False

    def kill(self) -> None:
        """SIGKILL QEMU now (the run then ends with exit_status None)."""
        self._started.wait(60)
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def result(self, timeout: float | None = None) -> GuestResult:
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.kill()
            self._thread.join(60)
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="boot the test guest and run one command")
    ap.add_argument("--socket-path")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--mount-opts", default="")
    ap.add_argument("--platform", choices=("a", "b"), default="a")
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--num-request-queues", type=int, default=1)
    ap.add_argument("command")
    a = ap.parse_args()
    r = run_guest(a.socket_path, a.command, timeout=a.timeout, mount_opts=a.mount_opts,
                  platform=a.platform, smp=a.smp, num_request_queues=a.num_request_queues)
    print(r.output)
    print(r.describe(tail=0) if r.exit_status == 0 else r.describe())
    raise SystemExit(0 if r.exit_status == 0 else 1)
