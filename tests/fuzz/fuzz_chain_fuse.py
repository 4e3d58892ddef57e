"""Coverage-guided fuzz target: chain walking + FUSE request decoding.

One input (format: ``image.py``) becomes a guest memory image with a
descriptor table, an avail ring and request bytes; the target then does
what a request worker does on a kick (``daemon/workers/loop.py``)::

    both VirtQueue paths (differential.py): same chains, errors, used ring?
    VirtQueue(...) → pop() until empty or VirtQueueError
                   → FastOps.serve(chain) (daemon/fuse/_fastops.c), and where
                     it declines (-1) FuseSession.handle(readable, writable,
                     chain) on a temp dir
                   → push(head, written); deferred requests: cancel_all(); publish()

Invariants checked on every input (a violation raises ``AssertionError``,
which the engine reports as a crash and saves the input):

- the compiled virtqueue core (daemon/virtio/_vqcore.c) and the pure
  reference pop the same chains (the same guest bytes), raise the same
  errors and leave the same used ring (when the extension is built; the
  FUSE part then runs on the compiled path, ``PYVIRTIOFSD_PURE=1`` to
  change that). ``--extension FILE`` (repeatable) loads another build of
  an extension (``_vqcore*.so`` or ``_fastops*.so``, by its name): ``make
  fuzz-asan`` passes both built with ASan and UBSan;
- the requests the compiled ops serve (GETATTR, READ, WRITE) get the bytes the
  Python session writes for them: each is answered again by
  ``FuseSession.handle`` on the same buffers (restored first) and both the
  count and the writable bytes must match (the bytes only where the
  guest's writable buffers do not alias each other: there the last write
  wins, and the order of a reply's parts is no contract); where they
  decline, they wrote nothing. A CREATE C served is not answered again (the file exists
  then: Python would open it or answer EEXIST); its reply is checked as
  every reply is below, and counted (``c_creates``);
  tests/unit/test_create_in_c.py compares CREATE with the session; so
  for a MKDIR C served (the directory exists then: Python would answer
  EEXIST; ``c_mkdirs``, tests/unit/test_mkdir_in_c.py);
  nor is a RELEASE C served (the fh is freed then: Python would answer
  EBADF): its reply must be the empty success reply of its unique, its
  fh no longer live in the shared table nor held by the session
  (``c_releases``); tests/unit/test_release_in_c.py compares RELEASE with
  the session; so for a RELEASEDIR C served (``c_releasedirs``,
  tests/unit/test_releasedir_in_c.py); nor is an OPEN or OPENDIR C
  served (Python would open another fh): its reply must be an error
  reply or fuse_open_out naming an fh live in the shared table and held
  by the session, of the opcode's kind (``c_opens``);
  tests/unit/test_open_in_c.py compares them with the session;
  nor is a SETATTR C served (Python's would move the ctime, and *_NOW's
  times): its reply must be an error reply or fuse_attr_out of its
  unique (``c_setattrs``); tests/unit/test_setattr_in_c.py compares
  SETATTR with the session; READLINK, STATFS and the ENOSYS opcodes C
  served (_attrs.h) are answered again like GETATTR and counted
  (``c_readlinks``, ``c_statfs``, ``c_enosys``);
- flags bit 3 of an input (``image.py``'s flags byte): the ring is the
  hiprio queue's, served by a hiprio session and its FastOps (FORGET and
  BATCH_FORGET in C, _forget.h); each FORGET or BATCH_FORGET C served is
  run again by the hiprio session on the inode table as it was before (a
  snapshot of its whole shared memory), and both must leave the same
  table, byte for byte, and write 0 bytes (``c_forgets`` counts them);
- nothing escapes but ``VirtQueueError`` from ``pop`` (``handle`` never raises);
- ``handle`` returns None (deferred) or 0 <= n <= the writable size; n is
  0 or >= 16; the reply's ``out_header.len == n``, its error is 0 or a
  negative errno > -4096, an error reply is exactly 16 bytes, and its
  unique is the request's (0 for a request shorter than its header);
- the device wrote guest memory only inside the writable buffers of the
  chains it answered and the used ring (byte-exact diff of the image);
- the used ring holds exactly the pushed (head, length) elements;
- at most ``num`` chains per ring image, and no hang (libFuzzer -timeout).

Leaks: every ``--reset-every`` inputs the FUSE session is ended (as DESTROY
does: every O_PATH fd and open file closed), the share is rebuilt and INIT
runs again; the process's open fd count must then be exactly what it was
at the first reset (a failure names the fds that are new), and RSS may
grow at most ``--max-rss-growth-mb`` from the first reset after warm-up to
the end. Both figures are printed. Under a sanitizer runtime (``make
fuzz-asan``) the runtime's symbolizer is started before the first count
(``start_symbolizer``): it keeps two pipes open from its first use on,
and libFuzzer first uses it whenever it prints its first NEW_FUNC line.

Engines: atheris (libFuzzer, coverage-guided; ``pip install atheris``, a
manylinux wheel, no clang needed) when importable, else ``--engine random``,
a plain mutation loop over the corpus (not coverage-guided). Usage::

    python -m tests.fuzz.fuzz_chain_fuse --iterations 1000000
    python -m tests.fuzz.fuzz_chain_fuse --time 20          # CI smoke budget
    python -m tests.fuzz.fuzz_chain_fuse --run FILE...      # replay inputs

Host side effects are bounded: the share is a fresh directory on a 64 MiB
tmpfs in the process's own mount namespace (sharefs.py: ENOSPC past it,
whatever the inputs, however many fuzzers run), wiped at every reset, and
RLIMIT_FSIZE caps every file at 4 MiB (WRITE/FALLOCATE/COPY_FILE_RANGE
beyond it are EFBIG). Run as root (the daemon's own credential switching
and the mount need it).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import importlib.util
import mmap
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import procfs  # noqa: E402
from tests.fuzz import differential as differential_helpers  # noqa: E402
from tests.fuzz import image  # noqa: E402
from tests.fuzz import sharefs  # noqa: E402

CORPUS_DIR = HERE / "corpus"
FILE_SIZE_LIMIT = 4 << 20
INODE_CAPACITY = 512
MAX_OPEN_FILES = 64
OUT_HEADER = struct.Struct("<IiQ")
IN_HEADER = struct.Struct("<IIQQIIIHH")
USED_ELEM = struct.Struct("<II")
WRITE_OPCODE = 16
# _meta.h's ops: GETXATTR, UNLINK, RMDIR, FLUSH, RENAME; the three that
# change the tree (not safe to do twice)
RENAME_OPCODE = 12
META_OPCODES = (22, 10, 11, 25, RENAME_OPCODE)
REMOVE_OPCODES = (10, 11, RENAME_OPCODE)
CREATE_OPCODE = 35
MKDIR_OPCODE = 9
RELEASE_OPCODE = 18
RELEASEDIR_OPCODE = 29
RELEASE_OPCODES = (RELEASE_OPCODE, RELEASEDIR_OPCODE)
OPEN_OPCODES = (14, 27)     # OPEN, OPENDIR (_open.h)
SETATTR_OPCODE = 4          # _setattr.h
READLINK_OPCODE, STATFS_OPCODE = 5, 17     # _attrs.h
ENOSYS_OPCODES = (34, 37, 39, 40, 41, 48, 49, 51)   # ops.ENOSYS, answered in C (_attrs.h)
FORGET_OPCODES = (2, 42)
READDIRPLUS_OPCODE = 44
READDIR_OPCODE = 28
ZERO = bytes(image.MEM_SIZE)

# filled by load_daemon() (inside atheris' instrumentation when it is used)
VirtQueue = VirtQueueError = GuestMemory = FuseSession = InodeTable = Config = None
credentials = abi = differential = filetable = fastpath = None
PATH = ""
SHARE_PARENT: str | None = None   # the bounded tmpfs (main: sharefs.bounded)


def load_daemon() -> None:
    global VirtQueue, VirtQueueError, GuestMemory, FuseSession, InodeTable, Config
    global credentials, abi, differential, filetable, fastpath, PATH
    from daemon.config import Config as _Config
    from daemon.fuse import abi as _abi
    from daemon.fuse import filetable as _filetable
    from daemon.fuse import credentials as _credentials
    from daemon.fuse.inodes import InodeTable as _InodeTable
    from daemon.fuse.session import FuseSession as _FuseSession
    from daemon.virtio.memory import GuestMemory as _GuestMemory
    from daemon.virtio import compiled
    from daemon.virtio.compiled import VirtQueue as _VirtQueue
    from daemon.virtio.virtqueue import VirtQueueError as _VirtQueueError
    if compiled.EXTENSION_BUILT:
        from tests.fuzz import differential as _differential
        differential = _differential
    from daemon.fuse import fastpath as _fastpath
    if _fastpath.EXTENSION_BUILT:
        fastpath = _fastpath
    PATH = compiled.PATH
    VirtQueue, VirtQueueError, GuestMemory = _VirtQueue, _VirtQueueError, _GuestMemory
    FuseSession, InodeTable, Config = _FuseSession, _InodeTable, _Config
    credentials, abi, filetable = _credentials, _abi, _filetable


def load_extension(path: str) -> None:
    """Make ``path`` the ``daemon.virtio._vqcore`` that compiled.py imports,
    or the ``daemon.fuse._fastops`` of fastpath.py (a ``_fastops*`` file)."""
    name = "daemon.fuse._fastops" if os.path.basename(path).startswith("_fastops") else "daemon.virtio._vqcore"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"fuzz: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    print(f"fuzz: extension {path}", flush=True)


def fd_count() -> int:
    return procfs.fd_count(os.getpid())


def fd_table() -> dict[int, str]:
    """fd -> what it is (readlink of /proc/self/fd/N), for a leak report."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the listing's own fd, or one closed meanwhile
    return out


def start_symbolizer() -> bool:
    """Symbolize one address now if a sanitizer runtime is loaded (``make
    fuzz-asan`` preloads atheris' ASan runtime); False if none is. The
    runtime starts llvm-symbolizer (or addr2line) on its first use and keeps
    the two pipes to it open until the process exits; libFuzzer first uses
    it when it prints a NEW_FUNC line, which may be 100,000 inputs into a
    run (the first full collection of the cyclic GC reaching
    ``fastops_traverse``, say): the fd check would count those two pipes
    as a leak."""
    try:
        symbolize = ctypes.CDLL(None).__sanitizer_symbolize_pc
    except AttributeError:
        return False
    symbolize.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t)
    symbolize.restype = None
    buf = ctypes.create_string_buffer(256)
    symbolize(ctypes.cast(symbolize, ctypes.c_void_p), b"%p %F %L", buf, len(buf))
    return True


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Target:
    """The per-process fuzzing state: guest memory, a FUSE session on a
    temp share, leak accounting."""

    def __init__(self, reset_every: int = 2000, warmup: int = 20000,
                 max_rss_growth_mb: float = 64.0, verbose: bool = False):
        self.reset_every = reset_every
        self.warmup = warmup
        self.max_rss_growth_kib = int(max_rss_growth_mb * 1024)
        self.verbose = verbose
        self.inputs = 0
        self.chains = 0
        self.broken_rings = 0
        self.replies = 0
        self.ebadf = 0      # EBADF replies: a seed naming an fh it never opened
        self.resets = 0
        self.baseline_fds: int | None = None
        self.baseline_table: dict[int, str] = {}
        self.first_fds = fd_count()
        self.rss_start: int | None = None
        self.rss_first = rss_kib()
        self.started = time.monotonic()
        # host side-effect bounds
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
        self._old_cwd = os.getcwd()
        os.umask(0)
        # guest RAM: one memfd, the harness's own mapping of all of it
        self.memfd = os.memfd_create("fuzz-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, image.MEM_SIZE)
        self.ram = mmap.mmap(self.memfd, image.MEM_SIZE)
        self.mem = GuestMemory.from_regions(list(image.REGIONS),
                                            [os.dup(self.memfd) for _ in image.REGIONS])
        # the daemon's mapping of each region: base address → file offset 0
        self._maps = []
        for region in self.mem._regions:
            base = differential_helpers.address(region.mm)
            self._maps.append((base, base + len(region.mm)))
        self.share = tempfile.mkdtemp(prefix="pyvirtiofsd-fuzz-", dir=SHARE_PARENT)
        os.chmod(self.share, 0o777)
        self._populate()
        self.table = InodeTable(INODE_CAPACITY)
        config = Config(shared_dir=self.share, max_open_files=MAX_OPEN_FILES)
        # a second RAM for the compiled-vs-pure comparison
        self.diff = differential.Image() if differential is not None else None
        self.compared = 0
        self.queue_only = False  # --queue-only: the comparison, no FUSE
        os.chdir("/proc/self/fd")  # the request worker's cwd (INTERNALS.md)
        self.session = FuseSession(config, self.table, "request")
        # the compiled ops (fastpath.py), as the worker loop runs them
        ops = fastpath.make(self.session) if fastpath is not None else None
        self.fast = ops.serve if ops is not None else None
        # stage 3 (flags bit 1 of an input): the batch loop and a progress record
        from daemon.workers.progress import RingProgress
        self.batch = ops.batch if ops is not None and hasattr(VirtQueue, "core") else None
        self.record = RingProgress(1, shared=False).record(0)
        self.fast_served = 0
        self.batch_served = 0
        self.c_writes = 0   # WRITEs the compiled ops served and the session answered alike
        self.c_meta = 0     # GETXATTR, UNLINK, RMDIR, FLUSH, RENAME served in C and checked against the session
        self.c_readdirplus = 0  # READDIRPLUS served in C and checked against the session
        self.c_readdir = 0  # plain READDIR served in C and checked against the session
        self.c_creates = 0  # CREATEs the compiled ops served (not answered again: see the docstring)
        self.c_mkdirs = 0  # MKDIRs the compiled ops served (likewise)
        self.c_releases = 0  # RELEASEs served in C (not answered again: their fh checked freed)
        self.c_releasedirs = 0  # RELEASEDIRs served in C (likewise)
        self.c_opens = 0  # OPENs and OPENDIRs served in C (not answered again: their fh checked live)
        self.c_setattrs = 0  # SETATTRs served in C (not answered again: their reply's shape checked)
        self.c_readlinks = 0  # READLINKs served in C and checked against the session
        self.c_statfs = 0   # STATFSs likewise
        self.c_enosys = 0   # ENOSYS answers C gave, likewise
        # flags bit 3: the hiprio queue's session and FastOps (FORGET, BATCH_FORGET in C)
        self.hiprio = FuseSession(config, self.table, "hiprio")
        hops = fastpath.make(self.hiprio) if fastpath is not None else None
        self._roles = {
            False: (self.session, self.fast, self.batch),
            True: (self.hiprio, hops.serve if hops is not None else None,
                   hops.batch if hops is not None and hasattr(VirtQueue, "core") else None),
        }
        self.c_forgets = 0  # FORGETs and BATCH_FORGETs served in C, each checked against the session
        self._init()

    # -- the share and the session ----------------------------------------------
    def _populate(self) -> None:
        s = self.share
        with open(os.path.join(s, "hello.txt"), "wb") as f:
            f.write(b"hello, world\n" * 300)
        os.mkdir(os.path.join(s, "d"), 0o777)
        for i in range(5):
            with open(os.path.join(s, "d", f"f{i}"), "wb") as f:
                f.write(bytes([i]) * (i * 1000))
        os.symlink("hello.txt", os.path.join(s, "link"))
        os.mkfifo(os.path.join(s, "fifo"), 0o666)
        try:
            os.setxattr(os.path.join(s, "hello.txt"), b"user.k", b"v" * 100)
        except OSError:
            pass

    def _wipe(self) -> None:
        for name in os.listdir(self.share):
            path = os.path.join(self.share, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        os.chmod(self.share, 0o777)

    def _call(self, readable: bytes, out_size: int) -> bytes:
        from daemon.virtio.iovec import IoVec
        rd = IoVec([memoryview(bytearray(readable))])
        out = bytearray(out_size)
        n = self.session.handle(rd, IoVec([memoryview(out)]), None)
        return bytes(out[:n or 0])

    def _init(self) -> None:
        args = abi.INIT_IN.pack(7, 38, 131072, 0x7BFFFFFB, 0xB)
        reply = self._call(IN_HEADER.pack(40 + len(args), 26, 2, 0, 0, 0, 0, 0, 0) + args, 80)
        length, err, _ = OUT_HEADER.unpack_from(reply)
        assert err == 0 and length == 80, f"INIT failed: {err}"
        # a few lookups so that low nodeids name real files (seeds use 2..5)
        self._lookup_base()

    def _fresh_input_state(self) -> None:
        """Each input starts with no open files, and with nodeids 2..5
        naming the base files, so seeds can name them (what a guest would
        have learnt from earlier replies). fhs come from the shared file
        table (generation << 24 | slot), restarted per input, so a seed
        names the fh its own OPEN returned; one it did not open gets EBADF,
        as a guest would."""
        handles = self.session.handles
        if handles is not None:
            handles.reset()
            # and the generation counter too (harness only: the daemon never
            # reuses one), so the n-th file an input opens is always fh
            # n << 24 | n and the seeds can name it (seeds.fh)
            handles.files._hdr[filetable._H_GEN] = 0
        generation = self.table.generation
        if not all(generation(n) for n in (2, 3, 4, 5)):
            # an earlier input forgot one: looking the names up again would
            # hand out the freed nodeids in another order, so start afresh
            self.reset()

    def _lookup_base(self) -> None:
        for name in (b"hello.txt", b"d", b"link", b"fifo"):
            self._call(IN_HEADER.pack(40 + len(name) + 1, 1, 4, 1, 0, 0, 0, 0, 0) + name + b"\0", 144)
        credentials.restore()

    def reset(self) -> None:
        """DESTROY, wipe and rebuild the share, INIT; then account leaks."""
        self.session.cancel_all()
        credentials.restore()
        self.session.end()
        os.chdir(self._old_cwd)
        self._wipe()
        self._populate()
        os.chdir("/proc/self/fd")
        self._init()
        self.resets += 1
        if self.baseline_fds is None:
            self.baseline_fds = fd_count()
            self.baseline_table = fd_table()
        # a helper thread may still hold an fd for a moment: the dup of an
        # FSYNC the reset answered with EINTR (closed when the call returns),
        # or forgotten inodes' fds it is closing (blocking.py)
        fds = procfs.settled_fd_count(os.getpid(), self.baseline_fds, timeout=2.0)
        if fds < self.baseline_fds:
            # the first count, taken unsettled, caught such a transient fd:
            # the baseline is the lower settled count
            self.baseline_fds = fds
            self.baseline_table = fd_table()
        elif fds != self.baseline_fds:
            new = {n: t for n, t in fd_table().items() if self.baseline_table.get(n) != t}
            raise AssertionError(f"fd leak: {fds} open fds after reset {self.resets}, "
                                 f"{self.baseline_fds} after the first; new or changed: {new}")
        if self.rss_start is None and self.inputs >= self.warmup:
            self.rss_start = rss_kib()

    # -- one input ------------------------------------------------------------------
    def _region_of_view(self, view: memoryview) -> tuple[int, int]:
        """(file offset, length) of a view into the daemon's mapping."""
        return differential_helpers.where(self._maps, view)

    def run_one(self, data: bytes) -> None:
        self.inputs += 1
        if self.diff is not None:
            differential.compare(self.diff, data)
            self.compared += 1
            if self.queue_only:
                if self.inputs % self.reset_every == 0:
                    self.reset()
                return
        self._fresh_input_state()
        lay = image.Layout(data)
        ram = self.ram
        ram[:] = ZERO
        image.write(ram, lay)
        before = bytes(ram)

        q = VirtQueue(self.mem, lay.num, image.qva(image.DESC_GPA), image.qva(image.AVAIL_GPA),
                      image.qva(image.USED_GPA), lay.last_avail, lay.event_idx)
        allowed: list[tuple[int, int]] = []
        used_at = image.file_offset(image.USED_GPA)
        allowed.append((used_at, used_at + lay.used_ring_bytes))
        pushed: list[tuple[int, int]] = []
        deferred = []
        # flags bit 1: the worker's batch loop in C (stage 3) first, as
        # WorkerLoop._serve runs it; bit 2 with it: one chain per call, each
        # checked against the Python session (_batch_one)
        flags = data[1] if len(data) > 1 else 0
        self.session, self.fast, self.batch = self._roles[bool(flags & 8)]
        handle = self.session.handle    # the role's own session (hiprio or not)
        batch = self.batch if flags & 2 else None
        one = bool(flags & 4)
        taken = in_c = 0
        try:
            for _ in range(lay.num + 1):
                if batch is not None and taken < lay.num:
                    n = self._batch_one(q, pushed, allowed) if one else batch(q.core, *self.record, lay.num - taken)
                    done = n if n >= 0 else -1 - n
                    taken += done
                    in_c += done
                    if n >= 0 and (not one or n == 0 or taken == lay.num):
                        break
                    if n >= 0:
                        continue
                try:
                    chain = q.pop()
                except VirtQueueError as e:
                    self.broken_rings += 1
                    if self.verbose:
                        print(f"  ring broken: {e}")
                    break
                if chain is None:
                    break
                taken += 1
                self.chains += 1
                wr = chain.writable
                ranges = [self._region_of_view(v) for v in wr.views]
                assert sum(n for _, n in ranges) == wr.size
                rd = chain.readable
                unique = IN_HEADER.unpack(rd.read(0, 40))[2] if rd.size >= 40 else 0
                n = self._fast(chain) if self.fast is not None and batch is None else -1
                if n < 0:
                    n = handle(rd, wr, chain)
                if n is None:
                    deferred.append((chain, ranges, unique))
                    continue
                self._check_reply(n, ranges, unique)
                allowed.extend((o, o + ln) for o, ln in ranges)
                q.push(chain.head, n)
                pushed.append((chain.head, n))
                chain.release()
            else:
                raise AssertionError(f"more than {lay.num} chains popped from a ring of {lay.num}")
            assert taken <= lay.num, f"{taken} chains taken from a ring of {lay.num}"
            if deferred:
                by_chain = {id(c): (c, r, u) for c, r, u in deferred}
                for chain, n in self.session.cancel_all():
                    c, ranges, unique = by_chain.pop(id(chain))
                    self._check_reply(n, ranges, unique)
                    allowed.extend((o, o + ln) for o, ln in ranges)
                    q.push(c.head, n)
                    pushed.append((c.head, n))
                    c.release()
                assert not by_chain, "deferred requests the session forgot"
            q.publish()
        finally:
            q.release()
            credentials.restore()
            self.session, self.fast, self.batch = self._roles[False]
        if in_c and not one:
            # what C answered in a whole batch is not known chain by chain:
            # count its used elements only (make fuzz-asan: memory safety)
            base = image.file_offset(image.USED_GPA)
            used_idx = struct.unpack_from("<H", self.ram, base + 2)[0]
            assert used_idx == (lay.used_idx + in_c + len(pushed)) & 0xFFFF, \
                f"used.idx {used_idx}, started {lay.used_idx}, {in_c} + {len(pushed)} pushed"
            self.batch_served += in_c
        else:
            self._check_memory(before, allowed)
            self._check_used(lay, pushed, allowed)
        if not self.session.inodes.session:
            self._init()  # DESTROY in the input: keep the session useful
        if self.inputs % self.reset_every == 0:
            self.reset()

    def _batch_one(self, q, pushed: list[tuple[int, int]], allowed: list[tuple[int, int]]) -> int:
        """FastOps.batch with limit 1; a chain it served is answered again
        by the Python session on the memory as it was before (a snapshot),
        and the two must leave the same guest memory (but for the used ring),
        the same byte count, and the chain recorded in the progress
        record. Returns batch's result."""
        ram = self.ram
        snap = bytes(ram)
        table = bytes(self.table._mm) if self.session is self.hiprio else None
        u = q._c.used_idx
        n = self.batch(q.core, *self.record, 1)
        if n != 1:
            assert n in (0, -1) and q._c.used_idx == u, f"batch(limit 1) returned {n}"
            assert ram[:] == snap, "batch wrote guest memory for a chain it declined"
            return n
        words, popped = self.record
        slot = image.file_offset(image.USED_GPA) + 4 + 8 * (u % q.num)
        head, written = USED_ELEM.unpack_from(ram, slot)
        last = q.last_avail_idx
        assert words[0] == last and popped[(last - 1) & 1023] == head, "progress record not updated"
        after = bytes(ram)
        ram[:] = snap                  # what C walked and served from
        chain = q.chain_at(head)
        wr, rd = chain.writable, chain.readable
        ranges = [self._region_of_view(v) for v in wr.views]
        used = (image.file_offset(image.USED_GPA), image.file_offset(image.USED_GPA) + 4 + 8 * q.num + 2)
        opcode, unique = IN_HEADER.unpack(rd.read(0, 40))[1:3]
        self.c_writes += opcode == WRITE_OPCODE
        self.c_meta += opcode in META_OPCODES
        self.c_readdirplus += opcode == READDIRPLUS_OPCODE
        self.c_readdir += opcode == READDIR_OPCODE
        self._count_attrs(opcode)
        if opcode in (CREATE_OPCODE, MKDIR_OPCODE, *RELEASE_OPCODES, *OPEN_OPCODES, SETATTR_OPCODE):
            if opcode in RELEASE_OPCODES:
                self._released(opcode, struct.unpack("<Q", rd.read(40, 8))[0], written)
            chain.release()
            ram[:] = after
            if opcode in OPEN_OPCODES:
                reply = b"".join(after[o:o + ln] for o, ln in ranges)
                self._opened(opcode, unique, written, reply, _overlapping(ranges)
                             or any(o < used[1] and used[0] < o + ln for o, ln in ranges))
            if opcode == SETATTR_OPCODE:
                reply = b"".join(after[o:o + ln] for o, ln in ranges)
                self._setattr_done(unique, written, reply, _overlapping(ranges)
                                   or any(o < used[1] and used[0] < o + ln for o, ln in ranges))
            self.c_creates += opcode == CREATE_OPCODE
            self.c_mkdirs += opcode == MKDIR_OPCODE
            if not any(o < used[1] and used[0] < o + ln for o, ln in ranges):
                self._check_reply(written, ranges, unique)
            allowed.extend((o, o + ln) for o, ln in ranges)
            pushed.append((head, written))
            self.fast_served += 1
            self.batch_served += 1
            return n
        forgot = self._forget_again(opcode, table, written, rd, wr, chain)
        again = written if forgot else self.session.handle(rd, wr, chain)
        if opcode in REMOVE_OPCODES:
            _removed_once(b"".join(after[o:o + ln] for o, ln in ranges), wr, again, opcode)
        chain.release()
        python = bytes(ram)
        ram[:] = after
        assert again == written, f"batch wrote {written} bytes, the session {again}"
        assert _overlapping(ranges) or (python[:used[0]] == after[:used[0]]
                                        and python[used[1]:] == after[used[1]:]), \
            "batch and session wrote different guest memory"   # (aliased buffers: see _fast)
        if not any(o < used[1] and used[0] < o + ln for o, ln in ranges):
            self._check_reply(written, ranges, unique)  # (unless the push overwrote it)
        allowed.extend((o, o + ln) for o, ln in ranges)
        pushed.append((head, written))
        self.fast_served += 1
        self.batch_served += 1
        return n

    def _fast(self, chain) -> int:
        """The compiled ops on ``chain``, checked against the Python session
        (see the module docstring); -1 where they decline."""
        views = chain.writable.views
        before = [bytes(v) for v in views]
        table = bytes(self.table._mm) if self.session is self.hiprio else None
        rd = chain.readable
        # the request's fields before C replies: the reply may overwrite
        # its own request where the guest aliased the two
        opcode, unique = IN_HEADER.unpack(rd.read(0, 40))[1:3] if rd.size >= 40 else (-1, 0)
        fh = struct.unpack("<Q", rd.read(40, 8))[0] if opcode in RELEASE_OPCODES and rd.size >= 48 else None
        n = self.fast(chain)
        after = [bytes(v) for v in views]
        if n < 0:
            assert after == before, "the compiled ops wrote a reply they then declined"
            return n
        self.fast_served += 1
        self.c_writes += opcode == WRITE_OPCODE
        self.c_meta += opcode in META_OPCODES
        self.c_readdirplus += opcode == READDIRPLUS_OPCODE
        self.c_readdir += opcode == READDIR_OPCODE
        self._count_attrs(opcode)
        if opcode == CREATE_OPCODE:
            self.c_creates += 1
            return n
        if opcode == MKDIR_OPCODE:
            self.c_mkdirs += 1
            return n
        if opcode in OPEN_OPCODES:
            self._opened(opcode, unique, n, b"".join(after), _overlapping([self._region_of_view(v) for v in views]))
            return n
        if opcode == SETATTR_OPCODE:
            self._setattr_done(unique, n, b"".join(after), _overlapping([self._region_of_view(v) for v in views]))
            return n
        if opcode in RELEASE_OPCODES:
            self._released(opcode, fh, n)
            if not _overlapping([self._region_of_view(v) for v in views]):
                assert b"".join(after)[:16] == OUT_HEADER.pack(16, 0, unique), "C's RELEASE(DIR) reply is not empty"
            return n
        for v, b in zip(views, before):
            v[:] = b
        if self._forget_again(opcode, table, n, chain.readable, chain.writable, chain):
            return n
        again = self.session.handle(chain.readable, chain.writable, chain)
        if opcode in REMOVE_OPCODES:
            _removed_once(b"".join(after), chain.writable, again, opcode)
        assert again == n, f"compiled ops wrote {n} bytes, the session {again}"
        # writable buffers the guest aliased hold whichever write came last:
        # the order C and Python write a reply's parts in is no contract
        if not _overlapping([self._region_of_view(v) for v in views]):
            assert [bytes(v) for v in views] == after, "compiled ops and session wrote different replies"
        return n

    def _count_attrs(self, opcode: int) -> None:
        """Count a READLINK, STATFS or ENOSYS opcode C served (_attrs.h)."""
        self.c_readlinks += opcode == READLINK_OPCODE
        self.c_statfs += opcode == STATFS_OPCODE
        self.c_enosys += opcode in ENOSYS_OPCODES

    def _released(self, opcode: int, fh: int, n: int) -> None:
        """A RELEASE or RELEASEDIR of ``fh`` C served (``n`` bytes): the
        empty reply, its fh freed in the shared table and gone from the
        session's open files."""
        handles = self.session.handles
        assert n == 16, f"C's RELEASE(DIR) wrote {n} bytes"
        assert not handles.files.live(fh) and fh not in handles._handles, "C's RELEASE(DIR) left its fh open"
        self.c_releases += opcode == RELEASE_OPCODE
        self.c_releasedirs += opcode == RELEASEDIR_OPCODE

    def _setattr_done(self, unique: int, n: int, reply: bytes, aliased: bool) -> None:
        """A SETATTR C served (``n`` bytes, ``reply`` the writable bytes):
        an error reply or fuse_attr_out, of its unique (unless the guest
        aliased the buffers)."""
        assert n in (16, 120), f"C's SETATTR wrote {n} bytes"
        self.c_setattrs += 1
        if not aliased:
            length, err, got_unique = OUT_HEADER.unpack_from(reply)
            assert (length, got_unique) == (n, unique) and (err == 0) == (n == 120), "C's SETATTR reply header"

    def _opened(self, opcode: int, unique: int, n: int, reply: bytes, aliased: bool) -> None:
        """An OPEN or OPENDIR C served (``n`` bytes, ``reply`` the writable
        bytes after): an error reply, or fuse_open_out with an fh live in the
        shared table, held by the session, of the opcode's kind (its
        content unless the guest aliased the buffers)."""
        assert n in (16, 32), f"C's OPEN wrote {n} bytes"
        self.c_opens += 1
        if aliased:
            return
        length, err, got_unique = OUT_HEADER.unpack_from(reply)
        assert (length, got_unique) == (n, unique) and (err == 0) == (n == 32), "C's OPEN reply header"
        if n == 32:
            fh = struct.unpack_from("<Q", reply, 16)[0]
            handle = self.session.handles._handles.get(fh)
            assert self.session.handles.files.live(fh) and handle is not None, "C's OPEN fh is not open"
            assert handle.kind == (2 if opcode == 27 else 1), "C's OPEN fh of the other kind"

    def _forget_again(self, opcode: int, table: bytes | None, n: int, rd, wr, chain) -> bool:
        """A FORGET or BATCH_FORGET C served on the hiprio ring: the session
        runs it again on the table as it was (``table``, a snapshot of its
        shared memory), and both must leave the same table and write
        nothing. False for any other chain (the caller answers it again)."""
        if opcode not in FORGET_OPCODES or table is None:
            return False
        mm = self.table._mm
        after = bytes(mm)
        mm[:] = table
        again = self.session.handle(rd, wr, chain)
        assert again == n == 0, f"C's FORGET wrote {n} bytes, the session {again}"
        assert bytes(mm) == after, "C's FORGET and the session left different inode tables"
        self.c_forgets += 1
        return True

    def _check_reply(self, n: int, ranges: list[tuple[int, int]], unique: int) -> None:
        size = sum(ln for _, ln in ranges)
        assert type(n) is int and 0 <= n <= size, f"handle returned {n!r}, writable {size}"
        if n == 0:
            return
        self.replies += 1
        assert n >= 16, f"a {n}-byte reply is shorter than its header"
        if _overlapping(ranges):
            return  # the guest aliased its own buffers: content is its problem
        hdr = bytearray()
        for o, ln in ranges:
            hdr += self.ram[o:o + min(ln, 16 - len(hdr))]
            if len(hdr) == 16:
                break
        length, err, got_unique = OUT_HEADER.unpack(hdr)
        if self.verbose:
            print(f"  reply unique {got_unique}: len {length} error {err}")
        assert length == n, f"out_header.len {length}, {n} bytes written"
        assert -4096 < err <= 0, f"out_header.error {err}"
        self.ebadf += err == -errno.EBADF
        assert not err or n == 16, f"error {err} with a {n}-byte reply"
        assert got_unique in (unique, 0), f"reply unique {got_unique}, request {unique}"

    def _check_memory(self, before: bytes, allowed: list[tuple[int, int]]) -> None:
        ram = self.ram
        if ram[:] == before:
            return
        pos = 0
        for start, end in sorted(allowed) + [(image.MEM_SIZE, image.MEM_SIZE)]:
            if start > pos and ram[pos:start] != before[pos:start]:
                bad = next(i for i in range(pos, start) if ram[i] != before[i])
                raise AssertionError(f"device wrote guest memory at file offset {bad:#x}, "
                                     f"outside every writable buffer and the used ring")
            pos = max(pos, end)

    def _check_used(self, lay: image.Layout, pushed: list[tuple[int, int]],
                    allowed: list[tuple[int, int]]) -> None:
        """used.idx moved by exactly the pushed elements, which hold (head,
        bytes written) — unless a reply buffer overlaps the used ring."""
        base = image.file_offset(image.USED_GPA)
        end = base + lay.used_ring_bytes
        aliased = any(s < end and base < e for s, e in allowed[1:])
        used_idx = struct.unpack_from("<H", self.ram, base + 2)[0]
        assert used_idx == (lay.used_idx + len(pushed)) & 0xFFFF, \
            f"used.idx {used_idx}, started {lay.used_idx}, {len(pushed)} pushed"
        if aliased:
            return  # the guest pointed a reply buffer at its own used ring
        for k, (head, n) in enumerate(pushed):
            slot = (lay.used_idx + k) % lay.num
            got = USED_ELEM.unpack_from(self.ram, base + 4 + 8 * slot)
            assert got == (head, n), f"used elem {k}: {got}, pushed {(head, n)}"

    # -- end --------------------------------------------------------------------------
    def finish(self) -> dict:
        """Final reset and leak checks; the figures for the report."""
        self.reset()
        elapsed = time.monotonic() - self.started
        rss_end = rss_kib()
        stats = {
            "inputs": self.inputs, "chains": self.chains, "replies": self.replies,
            "broken_rings": self.broken_rings, "ebadf": self.ebadf, "resets": self.resets, "compared": self.compared,
            "fast_served": self.fast_served, "batch_served": self.batch_served, "c_writes": self.c_writes,
            "c_meta": self.c_meta, "c_readdirplus": self.c_readdirplus, "c_readdir": self.c_readdir,
            "c_creates": self.c_creates, "c_mkdirs": self.c_mkdirs,
            "c_releases": self.c_releases, "c_releasedirs": self.c_releasedirs,
            "c_opens": self.c_opens, "c_setattrs": self.c_setattrs,
            "c_readlinks": self.c_readlinks, "c_statfs": self.c_statfs, "c_enosys": self.c_enosys,
            "c_forgets": self.c_forgets,
            "seconds": round(elapsed, 1),
            "inputs_per_second": round(self.inputs / elapsed) if elapsed else 0,
            "fds_start": self.first_fds, "fds_after_first_reset": self.baseline_fds,
            "fds_end": fd_count(),
            "rss_kib_start": self.rss_first, "rss_kib_after_warmup": self.rss_start,
            "rss_kib_end": rss_end,
            "share_mib": os.statvfs(self.share).f_blocks * os.statvfs(self.share).f_frsize >> 20,
        }
        if self.rss_start is not None and rss_end - self.rss_start > self.max_rss_growth_kib:
            raise AssertionError(f"memory growth: RSS {self.rss_start} KiB after warm-up, "
                                 f"{rss_end} KiB at the end")
        return stats

    def close(self) -> None:
        if self.diff is not None:
            self.diff.close()
        self.session.close()
        self.hiprio.close()
        self.table.close()
        self._maps.clear()
        self.mem.close()
        self.ram.close()
        os.close(self.memfd)
        os.chdir(self._old_cwd)
        shutil.rmtree(self.share, ignore_errors=True)


def _removed_once(c_reply: bytes, writable, again: int, opcode: int) -> None:
    """An UNLINK, RMDIR or RENAME that C answered is answered again by the
    session after C removed or moved the entry: where C succeeded, the
    session must find the name gone (ENOENT, same unique; a RENAME onto
    itself or onto a hard link of the same inode succeeds again), and its
    reply is then replaced by C's for the byte comparison that follows;
    where C failed, nothing changed and the replies must be the same bytes
    (compared after)."""
    length, err, unique = OUT_HEADER.unpack_from(c_reply)
    if err:
        return
    errs = (-errno.ENOENT, 0) if opcode == RENAME_OPCODE else (-errno.ENOENT,)
    got = OUT_HEADER.unpack(writable.read(0, 16))
    assert again == 16 and got[0] == 16 and got[2] == unique and got[1] in errs, \
        f"a second {opcode} of what C removed or moved was not ENOENT: {got}"
    writable.write(0, c_reply[:16])


def _overlapping(ranges: list[tuple[int, int]]) -> bool:
    spans = sorted((o, o + ln) for o, ln in ranges)
    return any(a_end > b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


# -- engines ------------------------------------------------------------------------------

def corpus_inputs(dirs) -> list[bytes]:
    out = []
    for d in dirs:
        for p in sorted(Path(d).glob("*")):
            if p.is_file():
                out.append(p.read_bytes())
    return out


_INTERESTING = [0, 1, 2, 15, 16, 17, 40, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0xFFFFFFFF,
                0x7FFFFFFF, 0x10000, 0x30000, 0x100000]


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """A few random edits (byte flips, interesting integers, splices)."""
    buf = bytearray(data or b"\0" * image.HEADER.size)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        pos = rng.randrange(len(buf)) if buf else 0
        if kind == 0 and buf:
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1 and buf:
            buf[pos] = rng.randrange(256)
        elif kind == 2:
            v = rng.choice(_INTERESTING)
            width = rng.choice((2, 4, 8))
            buf[pos:pos + width] = (v & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        elif kind == 3 and len(buf) > 1:
            del buf[pos:pos + rng.randint(1, 16)]
        elif kind == 4:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif pool:
            other = rng.choice(pool)
            if other:
                a = rng.randrange(len(other))
                buf[pos:pos + 32] = other[a:a + 32]
    return bytes(buf[:image.HEADER.size + 16 * 256 + 2 * 256 + image.DATA_MAX])


def run_random(target: Target, seeds: list[bytes], iterations: int | None,
               seconds: float | None, seed: int) -> None:
    rng = random.Random(seed)
    pool = list(seeds) or [b""]
    for s in pool:
        target.run_one(s)
    deadline = time.monotonic() + seconds if seconds else None
    while True:
        if iterations is not None and target.inputs >= iterations:
            return
        if deadline is not None and time.monotonic() >= deadline:
            return
        data = mutate(rng, rng.choice(pool), pool)
        target.run_one(data)
        if rng.random() < 0.001 and len(pool) < 5000:
            pool.append(data)


def report(stats: dict) -> None:
    print("fuzz: " + " ".join(f"{k}={v}" for k, v in stats.items()), flush=True)


def cleanup(workdir: str, artifacts: str) -> None:
    """Detach the share's tmpfs; remove ``workdir`` unless it holds a
    saved crash input."""
    if SHARE_PARENT is not None:
        sharefs.release(SHARE_PARENT)
    if not (artifacts.startswith(workdir) and os.path.isdir(artifacts) and os.listdir(artifacts)):
        shutil.rmtree(workdir, ignore_errors=True)


def run_atheris(target_factory, args, workdir: str) -> None:
    import atheris

    state: dict = {}
    deadline = time.monotonic() + args.time if args.time else None

    def test_one_input(data: bytes) -> None:
        target = state.get("t")
        if target is None:
            target = state["t"] = target_factory()
        target.run_one(data)
        done = (args.iterations is not None and target.inputs >= args.iterations) or \
               (deadline is not None and time.monotonic() >= deadline)
        if done:
            stats = target.finish()
            report(stats)
            cleanup(workdir, args.artifacts)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    live = args.keep_corpus or os.path.join(workdir, "corpus")
    os.makedirs(live, exist_ok=True)
    argv = [sys.argv[0], live, str(CORPUS_DIR),
            f"-timeout={args.timeout}", f"-rss_limit_mb={args.rss_limit_mb}",
            f"-artifact_prefix={args.artifacts.rstrip('/')}/",
            f"-max_len={args.max_len}", "-print_final_stats=1"]
    if args.seed is not None:
        argv.append(f"-seed={args.seed}")
    if args.jobs_quiet:
        argv.append("-print_pcs=0")
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, help="stop after this many inputs")
    p.add_argument("--time", type=float, help="stop after this many seconds")
    p.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto")
    p.add_argument("--run", nargs="+", metavar="FILE", help="run these inputs once and exit")
    p.add_argument("--reset-every", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=None,
                   help="inputs before the RSS baseline (default: 10%% of --iterations, max 20000)")
    p.add_argument("--max-rss-growth-mb", type=float, default=64.0)
    p.add_argument("--timeout", type=int, default=10, help="per-input hang limit (s)")
    p.add_argument("--rss-limit-mb", type=int, default=2048)
    p.add_argument("--max-len", type=int, default=16384)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--artifacts", default=None, help="where crashing inputs go (default: a temp dir)")
    p.add_argument("--keep-corpus", metavar="DIR", default=None,
                   help="atheris: keep the inputs it found in DIR (default: a temp dir, removed)")
    p.add_argument("-v", "--verbose", action="store_true", help="with --run: every reply and ring error")
    p.add_argument("--jobs-quiet", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--queue-only", action="store_true",
                   help="only compare the two virtqueue paths (no FUSE): many more inputs per second")
    p.add_argument("--extension", metavar="FILE", action="append", default=[],
                   help="load daemon.virtio._vqcore or daemon.fuse._fastops (a _fastops* file) "
                        "from FILE (make fuzz-asan: the sanitizer builds)")
    args = p.parse_args(argv)
    for path in args.extension:
        load_extension(os.path.abspath(path))
    if args.run:
        args.run = [os.path.abspath(n) for n in args.run]  # the target chdirs to /proc/self/fd
    if os.geteuid() != 0:
        print("fuzz: run as root (the FUSE session switches fsuid/fsgid)", file=sys.stderr)
        return 2
    if args.iterations is None and args.time is None and not args.run:
        args.iterations = 100000
    warmup = args.warmup
    if warmup is None:
        warmup = min(20000, (args.iterations or 10 ** 9) // 10) if args.iterations else 2000
    workdir = tempfile.mkdtemp(prefix="pyvirtiofsd-fuzzrun-")
    if args.artifacts is None:
        args.artifacts = os.path.join(workdir, "artifacts")
    os.makedirs(args.artifacts, exist_ok=True)
    # both before any thread exists (libFuzzer's, the session's helpers)
    global SHARE_PARENT
    SHARE_PARENT = sharefs.bounded(workdir)
    start_symbolizer()

    engine = args.engine
    if engine == "auto":
        engine = "atheris" if importlib.util.find_spec("atheris") else "random"
    if args.run:
        engine = "random"

    def factory() -> Target:
        target = Target(reset_every=args.reset_every, warmup=warmup,
                        max_rss_growth_mb=args.max_rss_growth_mb)
        if args.queue_only:
            if target.diff is None:
                raise SystemExit(f"fuzz: --queue-only needs the extension ({PATH})")
            target.queue_only = True
        return target

    if engine == "atheris":
        import atheris
        if args.queue_only:
            # the C core's own coverage guides (make fuzz-asan builds it with
            # -fsanitize=fuzzer-no-link); Python coverage would cost ~10x
            load_daemon()
        else:
            with atheris.instrument_imports(include=["daemon"]):
                load_daemon()
        print(f"fuzz: engine atheris, artifacts in {args.artifacts}; {PATH}", flush=True)
        run_atheris(factory, args, workdir)
        return 0  # not reached: atheris exits the process
    load_daemon()
    target = factory()
    try:
        if args.run:
            target.verbose = args.verbose
            bad_fh = []   # inputs that got EBADF: they named an fh they did not open
            c_writes = []  # inputs with a WRITE served in C (and checked against the session)
            c_meta = []    # and with a GETXATTR, UNLINK, RMDIR or FLUSH
            for name in args.run:
                if args.verbose:
                    print(os.path.basename(name))
                before, writes, meta = target.ebadf, target.c_writes, target.c_meta
                target.run_one(Path(name).read_bytes())
                if target.c_meta > meta:
                    c_meta.append(os.path.basename(name))
                if target.ebadf > before:
                    bad_fh.append(os.path.basename(name))
                if target.c_writes > writes:
                    c_writes.append(os.path.basename(name))
            print(f"fuzz: {len(args.run)} input(s) ran clean; replies={target.replies} "
                  f"ebadf_inputs={','.join(bad_fh) or '-'} c_write_inputs={','.join(c_writes) or '-'} "
                  f"c_meta_inputs={','.join(c_meta) or '-'} "
                  f"fast_served={target.fast_served} batch_served={target.batch_served} "
                  f"c_creates={target.c_creates} c_mkdirs={target.c_mkdirs} "
                  f"c_releases={target.c_releases} c_releasedirs={target.c_releasedirs} "
                  f"c_opens={target.c_opens} c_setattrs={target.c_setattrs} "
                  f"c_readlinks={target.c_readlinks} c_statfs={target.c_statfs} c_enosys={target.c_enosys} "
                  f"c_forgets={target.c_forgets} "
                  f"c_readdirplus={target.c_readdirplus} c_readdir={target.c_readdir}", flush=True)
            return 0
        print(f"fuzz: engine random (not coverage-guided: install atheris for that); {PATH}", flush=True)
        run_random(target, corpus_inputs([CORPUS_DIR]), args.iterations, args.time,
                   args.seed if args.seed is not None else 1)
        report(target.finish())
        return 0
    finally:
        target.close()
        cleanup(workdir, args.artifacts)


if __name__ == "__main__":
    sys.exit(main())
