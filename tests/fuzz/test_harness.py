"""The fuzz target's own bounds and accounting (fuzz_chain_fuse.py,
sharefs.py): the share cannot fill a disk, and the fd check is not fooled
by the sanitizer runtime's symbolizer. Each runs in a subprocess (a mount
namespace of its own; the ASan runtime preloaded)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz import sharefs

REPO = Path(__file__).resolve().parent.parent.parent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: run as root")

FILL = """
import errno, os, sys
from tests.fuzz import sharefs
point = sharefs.bounded(sys.argv[1])
share = os.path.join(point, "share")
os.mkdir(share)
total, files = 0, 0
try:
    while files < 1000:                       # 4 GiB if nothing stopped it
        fd = os.open(os.path.join(share, f"f{files}"), os.O_CREAT | os.O_WRONLY, 0o600)
        files += 1
        try:
            os.posix_fallocate(fd, 0, 4 << 20)   # what FUSE_FALLOCATE does
            total += 4 << 20
        finally:
            os.close(fd)
    print("no ENOSPC")
except OSError as e:
    print("stopped", errno.errorcode[e.errno], total, files, flush=True)
    # the host (the parent's namespace) sees no files meanwhile
    sys.stdin.readline()
sharefs.release(point)
print("released", os.path.exists(point))
"""


def test_the_share_is_a_bounded_tmpfs_the_host_does_not_see(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", FILL, str(tmp_path)], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline()
    words = line.split()
    assert words[:2] == ["stopped", "ENOSPC"], line + proc.stdout.read()
    total, files = int(words[2]), int(words[3])
    assert total <= sharefs.SIZE and files <= sharefs.SIZE // (4 << 20) + 1
    # the mount is in the child's namespace only: here the point is empty
    assert os.listdir(tmp_path / "share-fs") == []
    out, _ = proc.communicate("\n", timeout=30)
    assert proc.returncode == 0 and out.split() == ["released", "False"], out
    assert os.listdir(tmp_path) == []


SYMBOLIZE = """
import ctypes, sys
from tests.fuzz import fuzz_chain_fuse as f
lib = ctypes.CDLL(None)
symbolize = lib.__sanitizer_symbolize_pc
symbolize.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t)
buf = ctypes.create_string_buffer(256)
before = f.fd_count()
warm = sys.argv[1] == "warm" and f.start_symbolizer()
baseline = f.fd_count()
# what libFuzzer does for a NEW_FUNC line, later in the run
pc = ctypes.cast(lib.__sanitizer_print_stack_trace, ctypes.c_void_p).value + 1  # inside it
symbolize(pc, b"%p %F %L", buf, 256)
print(warm, before, baseline, f.fd_count(), buf.value.decode())
"""


@pytest.mark.parametrize("mode", ["warm", "cold"])
def test_the_symbolizer_is_started_before_the_fd_baseline(mode):
    """Under make fuzz-asan's preload the first symbolization (libFuzzer's
    first NEW_FUNC line) opens two pipes to llvm-symbolizer for good; the
    target starts it before its first count, so the count stays put. Cold:
    the two fds that were once taken for a leak."""
    import atheris
    runtime = os.path.join(atheris.path(), "asan_with_fuzzer.so")
    assert os.path.exists(runtime)
    env = dict(os.environ, LD_PRELOAD=runtime, ASAN_OPTIONS="detect_leaks=0")
    out = subprocess.run([sys.executable, "-c", SYMBOLIZE, mode], cwd=REPO, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60).stdout
    warm, before, baseline, after, *where = out.split()
    assert "__sanitizer_print_stack_trace" in where, out
    if mode == "warm":
        assert warm == "True" and int(baseline) == int(before) + 2 and int(after) == int(baseline), out
    else:
        assert int(after) == int(baseline) + 2, out
    # no runtime, no symbolizer: nothing to start
    plain = subprocess.run([sys.executable, "-c", "from tests.fuzz import fuzz_chain_fuse as f; "
                            "print(f.start_symbolizer())"], cwd=REPO, text=True,
                           stdout=subprocess.PIPE, timeout=60).stdout
    assert plain.split() == ["False"]
