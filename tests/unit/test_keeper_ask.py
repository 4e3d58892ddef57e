"""Borrowing an open file from the keeper: the ASK/ANSWER round trip.

A request worker whose fh's opener died asks the keeper for its copy
(``Peers.from_keeper``, fuse/peers.py); the keeper answers with the fd by
SCM_RIGHTS on the socket the ASK carried (``Keeper.answer``,
workers/keeper.py). No ``pidfd_getfd`` on this path, so one request queue
never needs it (``probe_pidfd_getfd`` tells at start whether several can
work). Here both sides run in this process, the keeper's loop on a thread.
"""

from __future__ import annotations

import errno
import gc
import os
import select
import socket
import threading

import pytest

from daemon.fuse import peers as peers_mod
from daemon.fuse.filetable import FileTable
from daemon.fuse.peers import ANSWER, ASK, KEEP, KeeperBroken, Peers, owner_word, probe_pidfd_getfd
from daemon.workers.keeper import Keeper

KEEPER_SERIAL = 9


def _fd_count() -> int:
    gc.collect()                # sockets of earlier tests
    return len(os.listdir("/proc/self/fd"))


def _worker_peers(keep_w: socket.socket) -> Peers:
    """A request worker's Peers, introduced to a keeper as PEER_KEEPER does."""
    peers = Peers()
    peers.set_self(1)
    answers, answer_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    peers.set_keeper(KEEPER_SERIAL, os.dup(keep_w.fileno()), answers.detach(), answer_end.detach())
    return peers


class KeeperThread:
    """The real Keeper's receive loop over a socket pair, on a thread."""

    def __init__(self, files: FileTable):
        self.keep_r, self.keep_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.keep_r.setblocking(False)
        self.keeper = Keeper(self.keep_r, KEEPER_SERIAL, files)
        self._stop_r, self._stop_w = os.pipe()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.keep_r.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._stop_r in ready:
                return
            self.keeper.receive()

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self.thread.join(5)
        self.keeper.close()
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        self.keep_r.close()
        self.keep_w.close()


@pytest.fixture
def files():
    t = FileTable(8)
    yield t
    t.close()


@pytest.fixture
def keeper(files):
    k = KeeperThread(files)
    yield k
    k.close()


def test_the_keeper_answers_with_its_copy_of_the_open_file(files, keeper, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    before = _fd_count()
    peers = _worker_peers(keeper.keep_w)
    fd = os.open(path, os.O_RDONLY)
    fh = files.alloc(7, 1, os.O_RDONLY, owner_word(5, fd))   # opened by worker 5
    peers.keep(fh, fd)
    os.lseek(fd, 3, os.SEEK_SET)
    os.close(fd)                                              # worker 5 died
    copy = peers.from_keeper(fh)
    assert copy >= 0 and files.kept(fh) >> 32 == KEEPER_SERIAL
    try:
        assert os.read(copy, 2) == b"34"                      # the same open file: its offset
        assert os.get_inheritable(copy) is False
    finally:
        os.close(copy)
    assert peers.from_keeper(fh + (1 << 24)) == -1            # a slot the keeper holds nothing of
    other = files.alloc(8, 1, os.O_RDONLY, 0)
    assert peers.from_keeper(other) == -1                     # live, but never kept
    files.free(fh)
    files.free(other)
    peers.close()
    keeper.keeper.reap()
    assert _fd_count() == before


def test_one_queue_never_calls_pidfd_getfd(files, keeper, tmp_path, monkeypatch):
    """The copy from the keeper is the whole path when the opener died:
    borrow() of a dead owner's word makes no system call."""
    calls = []
    real = peers_mod._syscall
    monkeypatch.setattr(peers_mod, "_syscall", lambda *a: calls.append(a) or real(*a))
    peers = _worker_peers(keeper.keep_w)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fh = files.alloc(1, 2, os.O_RDONLY, owner_word(5, fd))
    peers.keep(fh, fd)
    os.close(fd)
    assert peers.borrow(owner_word(5, fd)) == -1              # no pidfd of serial 5
    copy = peers.from_keeper(fh)
    assert copy >= 0
    os.close(copy)
    assert calls == []
    peers.close()


class FakeKeeper:
    """A keeper that answers each ASK with what the test says."""

    def __init__(self):
        self.keep_r, self.keep_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def close(self) -> None:
        self.keep_r.close()
        self.keep_w.close()

    def ask(self) -> tuple[int, int, socket.socket]:
        data, fds, _flags, _addr = socket.recv_fds(self.keep_r, 64, 2)
        assert len(data) == ASK.size and len(fds) == 1
        ident, seq = ASK.unpack(data)
        return ident, seq, socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=fds[0])


def _answer_in_thread(fake: FakeKeeper, replies):
    """Answer the next ASK with ``replies(ident, seq)``: [(bytes, fds)]."""
    def run():
        ident, seq, sock = fake.ask()
        with sock:
            for data, fds in replies(ident, seq):
                socket.send_fds(sock, [data], fds) if fds else sock.send(data)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("case", ["short", "long", "two fds", "other slot", "later seq", "fd with errno",
                                  "no fd without errno"])
def test_an_answer_that_breaks_the_protocol_ends_the_worker(case, tmp_path):
    fake = FakeKeeper()
    peers = _worker_peers(fake.keep_w)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    before = _fd_count()
    replies = {
        "short": lambda i, s: [(ANSWER.pack(i, s, 0)[:-1], [fd])],
        "long": lambda i, s: [(ANSWER.pack(i, s, 0) + b"x", [fd])],
        "two fds": lambda i, s: [(ANSWER.pack(i, s, 0), [fd, fd])],
        "other slot": lambda i, s: [(ANSWER.pack(i + 1, s, 0), [fd])],
        "later seq": lambda i, s: [(ANSWER.pack(i, s + 1, 0), [fd])],
        "fd with errno": lambda i, s: [(ANSWER.pack(i, s, errno.EBADF), [fd])],
        "no fd without errno": lambda i, s: [(ANSWER.pack(i, s, 0), [])],
    }[case]
    t = _answer_in_thread(fake, replies)
    with pytest.raises(KeeperBroken) as e:
        peers.from_keeper(0x1000001)
    assert isinstance(e.value, SystemExit)        # no handler's `except Exception` keeps serving
    assert "protocol" in str(e.value)
    t.join(5)
    assert _fd_count() == before                  # every fd the answer carried is closed
    os.close(fd)
    peers.close()
    fake.close()


def test_a_late_answer_to_an_ask_that_timed_out_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(peers_mod, "ASK_TIMEOUT_S", 0.2)
    fake = FakeKeeper()
    peers = _worker_peers(fake.keep_w)
    assert peers.from_keeper(0x1000001) == -1                  # nobody answers: timed out
    first, first_seq, late_sock = fake.ask()
    path = tmp_path / "f"
    path.write_bytes(b"right")
    fd = os.open(path, os.O_RDONLY)
    t = _answer_in_thread(fake, lambda i, s: [(ANSWER.pack(i, s, 0), [fd])])
    # the late ANSWER to the first ASK arrives before the second's
    with late_sock:
        socket.send_fds(late_sock, [ANSWER.pack(first, first_seq, 0)], [fd])
    copy = peers.from_keeper(0x1000001)
    t.join(5)
    try:
        assert os.read(copy, 5) == b"right"
    finally:
        os.close(copy)
        os.close(fd)
    peers.close()
    fake.close()


def test_the_keeper_survives_what_a_broken_worker_sends(files, keeper, tmp_path):
    """Odd sizes, several fds, an ASK whose fd is no socket: all closed,
    the keeper goes on and answers the next real ASK."""
    before = _fd_count()
    w = keeper.keep_w
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fh = files.alloc(3, 2, os.O_RDONLY, 0)
    socket.send_fds(w, [b"x" * 3], [fd])
    socket.send_fds(w, [KEEP.pack(fh)], [fd, fd])
    socket.send_fds(w, [b"y" * 200], [fd])
    w.send(KEEP.pack(fh))                                    # no fd
    socket.send_fds(w, [ASK.pack(fh, 1)], [fd])              # answers onto a directory: fails, closed
    socket.send_fds(w, [ASK.pack(fh, 1)], [w.fileno()])      # onto its own socket: junk it drops
    peers = _worker_peers(w)
    assert peers.from_keeper(fh) == -1                       # it was never kept
    peers.keep(fh, fd)
    copy = peers.from_keeper(fh)
    assert copy >= 0
    os.close(copy)
    os.close(fd)
    files.free(fh)
    peers.close()
    keeper.keeper.reap()
    assert keeper.thread.is_alive()
    assert _fd_count() == before


def test_probe_pidfd_getfd_tells_allowed_from_refused():
    assert probe_pidfd_getfd() == 0
    for err in (errno.EPERM, errno.ENOSYS):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                from daemon.sandbox.seccomp import pyseccomp
                f = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
                f.add_rule(pyseccomp.ERRNO(err), "pidfd_getfd")
                f.load()
                os.write(w, str(probe_pidfd_getfd()).encode())
            finally:
                os._exit(0)
        os.close(w)
        got = os.read(r, 16)
        os.close(r)
        os.waitpid(pid, 0)
        assert int(got) == err
