"""The supervisor process (daemon/supervisor.py) with stand-in workers.

Each test runs the real Supervisor and ProcessPool in a subprocess whose
``worker_main`` is a tiny fake that speaks the channel protocol (and can be
told to crash or hang), and plays QEMU against it over the real socket.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon import supervisor
from daemon.config import Config
from daemon.vhost_user import messages as m
from daemon.vhost_user.backend import OFFERED_FEATURES
from daemon.vhost_user.messages import Request as R

REPO = Path(__file__).resolve().parents[2]

DRIVER = r"""
import gc, os, signal, sys
from daemon import log, supervisor
from daemon.config import Config
from daemon.workers import channel as ch

mode, socket_path = sys.argv[1], sys.argv[2]

def worker_main(role, index, channel, config, inodes, progress=None, metrics=None, bells=None):
    held = []
    mine = [bells.fd(i) for i in range(1, config.max_request_workers + 1)]
    print(f"fake {role}-{index} bells: {sum(fd >= 0 for fd in mine)}", file=sys.stderr, flush=True)
    for fd in os.listdir("/proc/self/fd"):
        if int(fd) in mine:
            continue                  # its reap bells (bells.py), counted above
        try:
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass                      # the directory listing's own fd
    print(f"fake {role}-{index} holds: {sorted(held)}", file=sys.stderr, flush=True)
    print(f"fake {role}-{index} frozen: {gc.get_freeze_count()}", file=sys.stderr, flush=True)
    channel.send(ch.Msg.READY)
    if mode == "hiprio-exits" and role == "hiprio":
        os._exit(3)
    while True:
        msg, payload, fds = channel.recv()
        ch.close_fds(fds)
        print(f"fake {role}-{index}: {msg.name} fds={len(fds)}", file=sys.stderr, flush=True)
        if msg == ch.Msg.SHUTDOWN:
            os._exit(0)
        if msg == ch.Msg.VRING_START:
            print(f"fake {role}-{index}: flags={ch.VRING_START.unpack(payload)[6]}", file=sys.stderr, flush=True)
        if msg == ch.Msg.VRING_START and mode == "crash-on-start":
            os.kill(os.getpid(), signal.SIGSEGV)
        if msg == ch.Msg.VRING_START and mode == "crash-once-on-start" and not os.path.exists(socket_path + ".crashed"):
            open(socket_path + ".crashed", "w").close()
            os.kill(os.getpid(), signal.SIGSEGV)
        if msg == ch.Msg.VRING_START and mode == "hang-on-start":
            signal.pause()
        channel.answer(0, 7 if msg == ch.Msg.VRING_STOP else 0)

log.setup("debug")
config = Config(shared_dir="/", socket_path=socket_path, max_request_workers=2, sandbox="none", seccomp="none")
pool = supervisor.ProcessPool(config, None, worker_main, answer_timeout=1.0)
sys.exit(supervisor.Supervisor(config, supervisor.open_listener(config), pool).run())
"""

RAM_QVA = 0x7F00_0000_0000
RAM_SIZE = 1 << 20


class Daemon:
    def __init__(self, tmp_path, mode="normal", wait_for_socket=True):
        self.socket_path = str(tmp_path / "vhost.sock")
        self.log_path = tmp_path / "daemon.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, mode, self.socket_path], cwd=REPO,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while wait_for_socket and not os.path.exists(self.socket_path):
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline
            time.sleep(0.01)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait(self, timeout=15) -> int:
        return self.proc.wait(timeout)

    def wait_for_log(self, text, timeout=10):
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert time.monotonic() < deadline, f"{text!r} not in log:\n{self.log()}"
            time.sleep(0.02)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def start(tmp_path):
    daemons = []

    def start(mode="normal", wait_for_socket=True):
        d = Daemon(tmp_path, mode, wait_for_socket)
        daemons.append(d)
        return d

    yield start
    for d in daemons:
        d.kill()


class Qemu:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)

    def send(self, request, payload=b"", fds=(), flags=m.VERSION):
        data = m.HEADER.pack(request, flags, len(payload)) + payload
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
            for fd in fds:
                os.close(fd)
        else:
            self.sock.sendall(data)

    def reply(self) -> bytes:
        data = b""
        while len(data) < 12 or len(data) < 12 + m.HEADER.unpack_from(data)[2]:
            chunk = self.sock.recv(4096)
            assert chunk, "daemon closed the connection"
            data += chunk
        return data

    def start_ring(self, index):
        memfd = os.memfd_create("ram")
        os.ftruncate(memfd, RAM_SIZE)
        self.send(R.SET_FEATURES, m.U64.pack(0x1_5000_0000))
        self.send(R.SET_MEM_TABLE, m.MEMORY_HEADER.pack(1) + m.MEMORY_REGION.pack(0, RAM_SIZE, RAM_QVA, 0),
                  [memfd], flags=0x9)
        assert self.reply() == m.encode_u64_reply(R.SET_MEM_TABLE, 0)
        self.send(R.SET_VRING_NUM, m.VRING_STATE.pack(index, 128))
        self.send(R.SET_VRING_BASE, m.VRING_STATE.pack(index, 0))
        self.send(R.SET_VRING_ADDR, m.VRING_ADDR.pack(index, 0, RAM_QVA, RAM_QVA + 0x2000, RAM_QVA + 0x1000, 0))
        self.send(R.SET_VRING_KICK, m.U64.pack(index), [os.eventfd(0)])
        self.send(R.SET_VRING_ENABLE, m.VRING_STATE.pack(index, 1))

    def close(self):
        self.sock.close()


def test_serves_qemu_then_exits_0_when_it_disconnects(start):
    d = start()
    qemu = Qemu(d.socket_path)
    qemu.send(R.GET_FEATURES)
    assert qemu.reply() == m.encode_u64_reply(R.GET_FEATURES, OFFERED_FEATURES)
    assert not os.path.exists(d.socket_path)       # one connection: the socket file is gone
    qemu.send(R.GET_QUEUE_NUM)
    assert qemu.reply() == m.encode_u64_reply(R.GET_QUEUE_NUM, 3)      # 1 + max_request_workers
    qemu.send(R.SET_VRING_CALL, m.U64.pack(1), [os.eventfd(0)])
    qemu.start_ring(1)
    qemu.send(R.GET_VRING_BASE, m.VRING_STATE.pack(1, 0))
    # the worker's VRING_STOP answer
    assert qemu.reply() == m.encode_reply(m.Request.GET_VRING_BASE, m.VRING_STATE.pack(1, 7))
    # vring 2 gets its worker when it starts
    qemu.start_ring(2)
    qemu.send(R.GET_VRING_BASE, m.VRING_STATE.pack(2, 0))
    assert qemu.reply() == m.encode_reply(m.Request.GET_VRING_BASE, m.VRING_STATE.pack(2, 7))
    qemu.close()
    assert d.wait() == 0, d.log()
    log = d.log()
    for line in ("fake hiprio-0: MEM_TABLE fds=1", "fake request-1: VRING_CALL fds=1",
                 "fake request-1: VRING_START fds=1", "fake request-1: VRING_STOP fds=0",
                 "fake request-2: MEM_TABLE fds=1", "fake request-2: VRING_START fds=1",
                 "fake hiprio-0: SHUTDOWN", "fake request-1: SHUTDOWN", "fake request-2: SHUTDOWN",
                 "QEMU disconnected"):
        assert line in log, log
    # the call fd went to request-1 before its ring started; vring 2 got the memory table first
    assert log.index("fake request-1: VRING_CALL") < log.index("fake request-1: VRING_START")
    assert log.index("fake request-2: MEM_TABLE") < log.index("fake request-2: VRING_START")
    assert re.search(r"pyvirtiofsd\[supervisor \d+\] INFO: QEMU connected", log), log
    assert not os.path.exists(d.socket_path)
    assert "Traceback" not in log
    # a worker forked while QEMU is connected holds none of the supervisor's
    # fds (QEMU's socket, guest RAM, eventfds, other channels): only its own
    # channel and stdio, and reap bells (bells.py): the hiprio worker all
    # of them, a request worker its own
    assert "fake hiprio-0 bells: 2" in log and "fake request-1 bells: 1" in log, log
    assert "fake request-2 bells: 1" in log, log
    for name in ("hiprio-0", "request-1", "request-2"):
        held = re.search(rf"fake {name} holds: (.*)", log).group(1)
        assert "memfd" not in held and "eventfd" not in held and "pipe" not in held, held
        assert held.count("socket:") == 1, held
        # the supervisor's objects reach the worker frozen (gc.freeze): its
        # collections never write to the pages it shares with the supervisor
        assert int(re.search(rf"fake {name} frozen: (\d+)", log).group(1)) > 10_000, log


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_before_qemu_connects_exits_0_and_removes_the_socket(start, sig):
    d = start()
    d.wait_for_log("waiting for QEMU")
    d.proc.send_signal(sig)
    assert d.wait() == 0, d.log()
    assert f"{sig.name} received, shutting down" in d.log()
    assert "fake hiprio-0: SHUTDOWN" in d.log() and "fake request-1: SHUTDOWN" in d.log()
    assert not os.path.exists(d.socket_path)


def test_sigterm_while_connected(start):
    d = start()
    qemu = Qemu(d.socket_path)
    qemu.send(R.GET_FEATURES)
    qemu.reply()
    d.proc.terminate()
    assert d.wait() == 0, d.log()
    assert qemu.sock.recv(16) == b""
    assert not os.path.exists(d.socket_path)


def test_bad_frontend_input_closes_the_connection_and_exits(start):
    d = start()
    qemu = Qemu(d.socket_path)
    qemu.send(R.SET_VRING_NUM, m.VRING_STATE.pack(1, 100))
    assert qemu.sock.recv(16) == b""
    assert d.wait() == 0, d.log()
    errors = [line for line in d.log().splitlines() if " ERROR: " in line]
    assert len(errors) == 1 and "size 100 is not a power of two" in errors[0], d.log()
    assert "Traceback" not in d.log()


def test_worker_crash_is_logged_and_the_worker_replaced(start):
    d = start("crash-once-on-start")
    qemu = Qemu(d.socket_path)
    qemu.start_ring(1)
    qemu.send(R.GET_VRING_BASE, m.VRING_STATE.pack(1, 0))
    # answered by the replacement
    assert qemu.reply() == m.encode_reply(m.Request.GET_VRING_BASE, m.VRING_STATE.pack(1, 7))
    log = d.log()
    assert re.search(r"worker request-1 \(pid \d+\) failed: VRING_START: peer closed the channel "
                     r"\(killed by SIGSEGV\)", log), log
    assert re.search(r"worker request-1 restarted as pid \d+", log), log
    # the first worker died before answering VRING_START: the replacement
    # starts the ring afresh (no chain of it was taken), after the memory table
    assert log.count("fake request-1: flags=0") == 2, log
    tail = log[log.index("restarted as pid"):]
    assert tail.index("fake request-1: MEM_TABLE") < tail.index("fake request-1: VRING_START"), log
    qemu.close()
    assert d.wait() == 0, d.log()


def test_worker_that_keeps_crashing_exits_1_and_names_the_worker_and_signal(start):
    d = start("crash-on-start")
    qemu = Qemu(d.socket_path)
    qemu.start_ring(1)
    assert d.wait() == 1, d.log()
    log = d.log()
    assert re.search(r"worker request-1 \(pid \d+\) failed: VRING_START: peer closed the channel "
                     r"\(killed by SIGSEGV\)", log), log
    assert log.count("fake request-1: VRING_START") == 1 + supervisor.RESTART_LIMIT, log
    assert re.search(r"ERROR: shutting down: worker request-1 died 6 times within 60 s; not restarting it again",
                     log), log
    assert "fake hiprio-0: SHUTDOWN" in log
    assert not os.path.exists(d.socket_path)


def test_worker_that_stops_answering_is_killed_and_replaced(start):
    d = start("hang-on-start")
    qemu = Qemu(d.socket_path)
    qemu.start_ring(1)
    assert d.wait(30) == 1, d.log()
    assert re.search(r"worker request-1 \(pid \d+\) failed: VRING_START: no VRING_START answer within 1 s "
                     r"\(killed by SIGKILL\)", d.log()), d.log()
    assert "worker request-1 died 6 times" in d.log()


def test_worker_dying_while_idle_is_replaced_until_the_budget_is_spent(start):
    d = start("hiprio-exits", wait_for_socket=False)   # it may be gone before we look
    assert d.wait() == 1, d.log()
    log = d.log()
    assert re.search(r"worker hiprio \(pid \d+\) .*exited with status 3", log), log
    assert len(re.findall(r"worker hiprio restarted as pid \d+", log)) == supervisor.RESTART_LIMIT, log
    assert "shutting down: worker hiprio died 6 times within 60 s" in log
    assert not os.path.exists(d.socket_path)


# -- the socket path (in-process) ---------------------------------------------------------

def test_stale_socket_file_is_replaced(tmp_path):
    path = str(tmp_path / "vhost.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()                              # the file stays, nobody listens
    listener = supervisor.open_listener(Config(shared_dir="/", socket_path=path))
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        client.close()
    finally:
        listener.close()
    assert not os.path.exists(path)


def test_the_socket_path_appears_only_once_it_listens(tmp_path):
    """Whoever polls for the path (libvirt, a test) may connect the moment
    it exists: it is bound and set listening under a temporary name first."""
    import threading

    path = str(tmp_path / "vhost.sock")
    refused = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if os.path.exists(path):
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    c.connect(path)
                except ConnectionRefusedError:
                    refused.append(1)
                except FileNotFoundError:
                    pass                        # closed meanwhile
                finally:
                    c.close()
                while os.path.exists(path) and not stop.is_set():
                    pass

    t = threading.Thread(target=watch)
    t.start()
    try:
        for _ in range(200):
            supervisor.open_listener(Config(shared_dir="/", socket_path=path)).close()
    finally:
        stop.set()
        t.join()
    assert not refused
    assert os.listdir(tmp_path) == []           # no temporary name left behind


def test_listener_does_not_remove_a_socket_it_no_longer_owns(tmp_path):
    path = str(tmp_path / "vhost.sock")
    listener = supervisor.open_listener(Config(shared_dir="/", socket_path=path))
    os.unlink(path)
    with open(path, "w"):
        pass
    os.utime(path)
    listener.inode = os.lstat(path).st_ino + 1          # as if a different file
    listener.close()
    assert os.path.exists(path)


def test_describe_exit():
    assert supervisor.describe_exit(3 << 8) == "exited with status 3"
    assert supervisor.describe_exit(signal.SIGSEGV) == "killed by SIGSEGV"
    assert supervisor.describe_exit(signal.SIGSYS, "request").startswith(
        "killed by SIGSYS: a system call outside policy/request.policy (run with --seccomp log")


def test_a_signal_right_after_its_handler_is_installed_reaches_the_loop(monkeypatch):
    """SIGTERM delivered the moment its handler is installed, before the
    other handlers: its number must already go to the wakeup pipe, or the
    supervisor never sees it and waits for QEMU forever. (A clean-clone CI
    run had test_cli's --sandbox none test time out that way: SIGTERM sent,
    "waiting for QEMU" the last line logged; this window is the one way
    found to lose it.)"""
    real_signal = signal.signal

    def signal_then_deliver(sig, handler):
        old = real_signal(sig, handler)
        if sig == signal.SIGTERM and handler is supervisor._note_signal:
            os.kill(os.getpid(), signal.SIGTERM)  # handled before signal.signal returns to us
        return old

    monkeypatch.setattr(signal, "signal", signal_then_deliver)
    sup = supervisor.Supervisor.__new__(supervisor.Supervisor)
    old = sup._install_signals()
    try:
        assert signal.SIGTERM in os.read(sup._wakeup_r, 64)
    finally:
        monkeypatch.setattr(signal, "signal", real_signal)
        sup._restore_signals(old)
    assert signal.getsignal(signal.SIGTERM) is not supervisor._note_signal
