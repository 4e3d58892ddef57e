"""The keeper reads its socket in bursts (workers/keeper.py, SETTLE_S).

After a wake-up that took messages the keeper stops listening to its
socket for SETTLE_S and then takes everything that came meanwhile at
once, recording the KEEPs under one table lock. A KEEP is safe from the
moment its ``sendmsg`` returns: the fd waits in the socket's queue, so a
worker that dies right after handing an open file over (and before the
keeper read it) loses nothing, and an ASK sent after a KEEP is answered
with that KEEP's copy. Here the real ``Keeper.run`` loop runs on a
thread; the workers are this process and forked children.
"""

from __future__ import annotations

import gc
import os
import socket
import threading
import time

import pytest

from daemon.fuse.filetable import FileTable
from daemon.fuse.peers import Peers
from daemon.workers import keeper as keeper_mod
from daemon.workers.channel import Msg
from daemon.workers.keeper import Keeper

KEEPER_SERIAL = 9
SETTLE = 0.4


class _Channel:
    """What ``Keeper.run`` reads from the supervisor: SHUTDOWN once the
    pipe is written to."""

    def __init__(self):
        self.r, self.w = os.pipe()

    def fileno(self) -> int:
        return self.r

    def recv(self):
        os.read(self.r, 1)
        return Msg.SHUTDOWN, b"", []


class RunningKeeper:
    """``Keeper.run`` on a thread; ``drains`` lists how many messages
    each of its drains took (only those that took some)."""

    def __init__(self, files: FileTable):
        self.keep_r, self.keep_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.keep_r.setblocking(False)
        self.keeper = Keeper(self.keep_r, KEEPER_SERIAL, files)
        self.drains: list[int] = []
        real = self.keeper.drain

        def drain():
            n = real()
            if n:
                self.drains.append(n)
            return n
        self.keeper.drain = drain
        self.channel = _Channel()
        self.status: list[int] = []
        self.thread = threading.Thread(target=lambda: self.status.append(self.keeper.run(self.channel)),
                                       daemon=True)
        self.thread.start()

    def worker(self, serial: int = 1) -> Peers:
        peers = Peers()
        peers.set_self(serial)
        answers, answer_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        peers.set_keeper(KEEPER_SERIAL, os.dup(self.keep_w.fileno()), answers.detach(), answer_end.detach())
        return peers

    def stop(self) -> None:
        os.write(self.channel.w, b"x")
        self.thread.join(5)
        assert self.status == [0]
        os.close(self.channel.r)
        os.close(self.channel.w)
        self.keep_r.close()
        self.keep_w.close()


def _fd_count() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def _wait(cond, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def running(monkeypatch):
    """The keeper's loop (SETTLE_S made SETTLE) on a table of 128 slots."""
    monkeypatch.setattr(keeper_mod, "SETTLE_S", SETTLE)
    k = RunningKeeper(FileTable(128))
    yield k
    k.stop()
    k.keeper.files.close()


@pytest.fixture
def files(running):
    return running.keeper.files


def _open_kept(files, peers, path, node: int) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY)
    fh = files.alloc(node, 1, os.O_RDONLY, peers.mine(fd))
    peers.keep(fh, fd)
    return fh, fd


def _one_kept(files, running, tmp_path):
    """A worker's first open file, kept (the keeper settles from here):
    (its Peers, the file's path, the fh)."""
    path = tmp_path / "f"
    path.write_bytes(b"x")
    peers = running.worker()
    fh, fd = _open_kept(files, peers, path, 1)
    os.close(fd)
    _wait(lambda: files.kept(fh))
    return peers, path, fh


def test_keeps_sent_while_the_keeper_settles_are_taken_in_one_drain(files, running, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"data")
    before = _fd_count()
    peers = running.worker()
    first, fd = _open_kept(files, peers, path, 1)
    os.close(fd)
    _wait(lambda: files.kept(first))                  # the wake-up: the keeper settles now
    t0 = time.monotonic()
    fhs = []
    for node in range(2, 22):
        fh, fd = _open_kept(files, peers, path, node)
        os.close(fd)
        fhs.append(fh)
    assert not any(files.kept(fh) for fh in fhs)     # nobody read them yet
    _wait(lambda: all(files.kept(fh) for fh in fhs))
    assert time.monotonic() - t0 >= SETTLE * 0.5
    assert running.drains == [1, 20]                  # two wake-ups for 21 KEEPs
    assert {files.kept(fh) >> 32 for fh in fhs + [first]} == {KEEPER_SERIAL}
    for fh in fhs + [first]:
        files.free(fh)
    peers.close()
    _wait(lambda: not running.keeper.fds)             # the copies of freed slots closed
    assert _fd_count() == before


def test_a_worker_dead_right_after_its_keep_loses_no_open_file(files, running, tmp_path):
    """A forked worker opens a file, hands it over while the keeper
    settles, and dies at once: its own fd is gone, the keeper has read
    nothing yet, and still another worker's ASK, sent after the KEEP,
    gets the same open file description (offset included)."""
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    peers = running.worker(serial=2)
    warm, fd = _open_kept(files, peers, path, 1)
    os.close(fd)
    _wait(lambda: files.kept(warm))                   # settling from here
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            dying = running.worker(serial=3)
            fh, fd = _open_kept(files, dying, path, 2)
            os.lseek(fd, 6, os.SEEK_SET)
            os.write(w, fh.to_bytes(8, "little"))
        finally:
            os._exit(0)                              # killed between its KEEP and anything else
    os.close(w)
    fh = int.from_bytes(os.read(r, 8), "little")
    os.close(r)
    os.waitpid(pid, 0)
    assert files.live(fh) and files.lookup(fh)[3] >> 32 == 3
    assert files.kept(fh) == 0                        # still in the socket's queue
    assert peers.borrow(files.lookup(fh)[3]) == -1     # its opener is gone
    t0 = time.monotonic()
    copy = peers.from_keeper(fh)
    assert copy >= 0, "the open file was lost"
    assert time.monotonic() - t0 < SETTLE + 1.0       # answered at the end of the settling
    try:
        assert os.read(copy, 2) == b"67"
    finally:
        os.close(copy)
    assert files.kept(fh) >> 32 == KEEPER_SERIAL
    files.free(fh)
    files.free(warm)
    peers.close()


def test_an_idle_keeper_answers_an_ask_at_once(files, running, tmp_path):
    """Settling follows only a wake-up that took messages: an ASK to an
    idle keeper is answered without waiting SETTLE_S."""
    peers, path, fh = _one_kept(files, running, tmp_path)
    time.sleep(SETTLE * 2.5)                          # the settling after the KEEP is over
    t0 = time.monotonic()
    copy = peers.from_keeper(fh)
    assert copy >= 0 and time.monotonic() - t0 < SETTLE * 0.75
    os.close(copy)
    files.free(fh)
    peers.close()


def test_asks_in_a_row_are_answered_at_once(files, running, tmp_path):
    """A wake-up that answered an ASK is not followed by settling: a
    restarted worker asks for one fh after another, and each answer comes
    without waiting out a window (the second one would wait SETTLE_S)."""
    peers, path, first = _one_kept(files, running, tmp_path)
    second, fd = _open_kept(files, peers, path, 2)
    os.close(fd)
    _wait(lambda: files.kept(second))
    time.sleep(SETTLE * 2.5)                          # no window open
    for fh in (first, second) * 3:
        t0 = time.monotonic()
        copy = peers.from_keeper(fh)
        assert copy >= 0 and time.monotonic() - t0 < SETTLE * 0.5, time.monotonic() - t0
        os.close(copy)
    files.free(first)
    files.free(second)
    peers.close()


def test_the_window_shrinks_under_a_large_burst_and_grows_back(files, running, tmp_path):
    """A drain of BATCH or more KEEPs halves the settling window (a burst
    must stay inside the socket's queue, not make the workers wait for
    room); drains of a few double it again up to SETTLE_S."""
    peers, path, fh = _one_kept(files, running, tmp_path)
    assert running.keeper.settle_ms == int(SETTLE * 1000)
    fhs = [fh]
    for node in range(2, 2 + keeper_mod.BATCH + 10):      # one burst while it settles
        one, fd = _open_kept(files, peers, path, node)
        os.close(fd)
        fhs.append(one)
    _wait(lambda: all(files.kept(f) for f in fhs))
    _wait(lambda: running.keeper.settle_ms == int(SETTLE * 1000) // 2)
    assert running.drains[-1] >= keeper_mod.BATCH
    for node in range(100, 103):                        # a few: back to the full window
        one, fd = _open_kept(files, peers, path, node)
        os.close(fd)
        fhs.append(one)
        _wait(lambda one=one: files.kept(one))
    _wait(lambda: running.keeper.settle_ms == int(SETTLE * 1000))
    for f in fhs:
        files.free(f)
    peers.close()


@pytest.fixture
def quick(monkeypatch):
    """The keeper's loop with a 1 ms settling window and REAP_GAP_S 0.3:
    a wake-up every few ms under a stream of KEEPs and RELEASEs."""
    monkeypatch.setattr(keeper_mod, "SETTLE_S", 0.001)
    monkeypatch.setattr(keeper_mod, "REAP_GAP_S", 0.3)
    k = RunningKeeper(FileTable(128))
    scans: list[float] = []
    real = k.keeper.reap

    def reap():
        if k.keeper.files.released != k.keeper._released:
            scans.append(time.monotonic())
        return real()
    k.keeper.reap = reap
    k.scans = scans
    yield k
    k.stop()
    k.keeper.files.close()


def test_released_copies_are_looked_for_at_most_every_reap_gap(quick, tmp_path):
    """While KEEPs and RELEASEs alternate (dpkg -i), every wake-up finds the
    released count moved; the keeper scans its copies at most once per
    REAP_GAP_S, and still closes every released copy within about a second
    once the guest goes quiet."""
    files = quick.keeper.files
    path = tmp_path / "f"
    path.write_bytes(b"x")
    peers = quick.worker()
    before = _fd_count()
    t0 = time.monotonic()
    node = 2
    while time.monotonic() - t0 < 1.2:
        fh, fd = _open_kept(files, peers, path, node)
        os.close(fd)
        _wait(lambda fh=fh: files.kept(fh))            # one wake-up each
        files.free(fh)                                 # the released count moves
        node += 1
    elapsed = time.monotonic() - t0
    assert len(quick.drains) >= 40, quick.drains      # many wake-ups...
    assert len(quick.scans) <= elapsed / keeper_mod.REAP_GAP_S + 2, quick.scans   # ...few scans
    gaps = [b - a for a, b in zip(quick.scans, quick.scans[1:])]
    assert all(g >= keeper_mod.REAP_GAP_S * 0.99 for g in gaps), gaps
    quiet = time.monotonic()
    _wait(lambda: not quick.keeper.fds, seconds=3.0)  # every copy of a freed slot closed...
    assert time.monotonic() - quiet < keeper_mod.IDLE_REAP_S + keeper_mod.REAP_GAP_S + 0.5   # ...soon
    peers.close()
    assert _fd_count() <= before
