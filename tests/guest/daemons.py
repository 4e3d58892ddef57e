"""Start a virtio-fs daemon for a guest run: ours, QEMU's C virtiofsd or the
Rust virtiofsd (platforms.py unpacks it).

The guest tests use the ``daemon_factory`` fixture of tests/conftest.py when
it exists; this module is the stand-alone equivalent used by the demo, by
``python -m`` runs, and as the fallback. Both daemons serve exactly one
QEMU connection.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
C_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
C_CACHE = {"never": "none", "none": "none", "auto": "auto", "always": "always"}


class Daemon:
    def __init__(self, kind: str, shared_dir: str, cache: str = "auto", socket_path: str | None = None,
                 extra_args=(), log_path: str | None = None):
        self.kind = kind
        self.shared_dir = str(shared_dir)
        self.cache = cache
        self._tmp = None
        if socket_path is None:
            self._tmp = tempfile.mkdtemp(prefix="pyvfs-sock-")
            socket_path = os.path.join(self._tmp, "vfs.sock")
        self.socket_path = socket_path
        self.log_path = log_path or os.path.join(self._tmp or tempfile.gettempdir(),
                                                 f"daemon-{kind}-{os.getpid()}.log")
        if kind == "c":
            argv = [C_VIRTIOFSD, f"--socket-path={socket_path}", "-o", f"source={self.shared_dir}",
                    "-o", f"cache={C_CACHE[cache]}", "-o", "xattr", *extra_args]
        elif kind == "rust":
            from .platforms import rust_virtiofsd_argv
            argv = [*rust_virtiofsd_argv(), f"--socket-path={socket_path}", f"--shared-dir={self.shared_dir}",
                    f"--cache={cache}", "--xattr", *extra_args]
        elif kind == "ours":
            argv = [sys.executable, "-m", "daemon", "--socket-path", socket_path,
                    "--shared-dir", self.shared_dir, "--cache", cache, *extra_args]
        else:
            raise ValueError(kind)
        self.argv = argv
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=str(REPO), stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 30
        while not os.path.exists(socket_path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} daemon exited with {self.proc.returncode} before listening:\n"
                                   + self.log())
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{kind} daemon did not create {socket_path} in 30 s:\n" + self.log())
            time.sleep(0.05)

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def wait(self, timeout: float = 10) -> int | None:
        """The exit status once QEMU has gone (both daemons exit then)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if os.path.exists(self.socket_path):
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
