"""Supervisor <-> worker control channel, the OpenSSH-monitor way.

One ``SOCK_SEQPACKET`` socketpair per worker, made by the supervisor before it
forks the worker. Every exchange is a request from the supervisor and exactly
one answer from the worker. Frames are size-capped; file descriptors travel
with SCM_RIGHTS in the same frame. A frame that breaks these rules is a
protocol violation: fatal to the worker (it exits), never to the supervisor
(it kills and replaces the worker, see supervisor.py).

Frame: ``FRAME`` header {type u32, payload length u32} + payload.

Supervisor -> worker (requests) and the payload each carries:

===============  ============================================  =============
type             payload                                       fds
===============  ============================================  =============
MEM_TABLE        u32 n, then n x REGION {gpa,size,uaddr,off}   n (one each)
VRING_START      VRING_START struct (see below)                1: kick fd
VRING_CALL       u32 index, u32 has_fd                         0 or 1
VRING_STOP       u32 index                                     0
SHUTDOWN         -                                             0
PEER             u32 serial, u32 flags (request workers only)  0, 1: pidfd, 3
                                                               (PEER_KEEPER)
===============  ============================================  =============

Worker -> supervisor: only ANSWER {status i32 (0 or errno), value u64}.
VRING_STOP's answer value is the ring's next avail index (GET_VRING_BASE).
VRING_START with flag VRING_START_RECOVER is sent to the replacement of a
worker that died with the ring running (supervisor.py, progress.py).
PEER tells a request worker its own serial (flag PEER_SELF, first after
READY), a live request worker's serial and pidfd, or that one is gone
(PEER_GONE): fuse/peers.py, how workers copy each other's fds; or the
keeper's serial with the socket it reads and the worker's own socket pair
for the keeper's answers (PEER_KEEPER, workers/keeper.py).
The first frame a worker sends, unasked, is READY once its sandbox is up;
the supervisor sends nothing before it.
"""

from __future__ import annotations

import enum
import socket
import struct
from typing import Sequence

from daemon.fds import close_fds, recv_with_fds

MAX_FRAME = 4096
MAX_FDS = 8

# struct frame { uint32_t type; uint32_t length; };
FRAME = struct.Struct("<II")
# struct region { uint64_t guest_phys_addr; uint64_t memory_size;
#   uint64_t userspace_addr; uint64_t mmap_offset; };  (vhost-user's own layout)
REGION = struct.Struct("<QQQQ")
COUNT = struct.Struct("<I")
# struct vring_start { uint32_t index; uint32_t num; uint64_t desc_qva;
#   uint64_t avail_qva; uint64_t used_qva; uint32_t last_avail_idx;
#   uint32_t flags; uint64_t features; };
VRING_START = struct.Struct("<IIQQQIIQ")
# VRING_START flags: the ring's previous worker died while serving it; first
# answer EIO to the chains its progress record says the guest still waits
# for (progress.py), then serve from last_avail_idx
VRING_START_RECOVER = 1
# struct vring_call { uint32_t index; uint32_t has_fd; };
VRING_CALL = struct.Struct("<II")
# struct vring_stop { uint32_t index; };
VRING_STOP = struct.Struct("<I")
# struct peer { uint32_t serial; uint32_t flags; };
PEER = struct.Struct("<II")
PEER_SELF = 1
PEER_GONE = 2
PEER_KEEPER = 3
# struct answer { int32_t status; uint32_t padding; uint64_t value; };
ANSWER = struct.Struct("<i4xQ")
assert (FRAME.size, REGION.size, VRING_START.size, VRING_CALL.size, ANSWER.size) == (8, 32, 48, 8, 16)


class Msg(enum.IntEnum):
    READY = 1
    ANSWER = 2
    MEM_TABLE = 10
    VRING_START = 11
    VRING_CALL = 12
    VRING_STOP = 13
    SHUTDOWN = 14
    PEER = 15


class ChannelError(Exception):
    """The peer broke the channel protocol or went away."""


class Channel:
    """One end of a worker's control socketpair."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    @classmethod
    def pair(cls) -> tuple[Channel, Channel]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(a), cls(b)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def send(self, msg: Msg, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        if len(payload) + FRAME.size > MAX_FRAME or len(fds) > MAX_FDS:
            raise ChannelError(f"{msg.name}: frame too large")
        frame = FRAME.pack(msg, len(payload)) + payload
        try:
            if fds:
                socket.send_fds(self.sock, [frame], list(fds))
            else:
                self.sock.sendall(frame)
        except OSError as e:
            raise ChannelError(f"send {msg.name}: {e.strerror}") from None

    def recv(self) -> tuple[Msg, bytes, list[int]]:
        """Receive one frame. Any malformed frame raises ChannelError, with
        every fd that came with it already closed."""
        try:
            data, fds, flags = recv_with_fds(self.sock, MAX_FRAME, MAX_FDS)
        except OSError as e:
            raise ChannelError(f"recv: {e.strerror}") from None
        try:
            if not data:
                raise ChannelError("peer closed the channel")
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ChannelError("frame or fds truncated")
            if len(data) < FRAME.size:
                raise ChannelError("short frame")
            mtype, length = FRAME.unpack_from(data)
            if length != len(data) - FRAME.size:
                raise ChannelError("frame length mismatch")
            try:
                msg = Msg(mtype)
            except ValueError:
                raise ChannelError(f"unknown message type {mtype}") from None
            return msg, data[FRAME.size:], fds
        except ChannelError:
            close_fds(fds)
            raise

    # -- the answer half of a request/answer pair ---------------------------
    def answer(self, status: int = 0, value: int = 0) -> None:
        self.send(Msg.ANSWER, ANSWER.pack(status, value))

    def expect_answer(self) -> tuple[int, int]:
        msg, payload, fds = self.recv()
        if fds:
            close_fds(fds)
            raise ChannelError("answer carried fds")
        if msg != Msg.ANSWER or len(payload) != ANSWER.size:
            raise ChannelError(f"expected ANSWER, got {msg.name}/{len(payload)}")
        return ANSWER.unpack(payload)


def encode_mem_table(regions: list[tuple[int, int, int, int]]) -> bytes:
    return COUNT.pack(len(regions)) + b"".join(REGION.pack(*r) for r in regions)


# What each supervisor request may carry, checked in one place
# (``check_request``) before its handler runs, as OpenSSH's monitor does
# with mm_request_receive_expect: request -> (payload sizes, fd counts).
# MEM_TABLE's size depends on its count (decode_mem_table checks it, and
# that the fds match); VRING_CALL's fd count must equal its has_fd (checked
# by its handler, which decodes has_fd).
REQUESTS: dict[Msg, tuple[range, range]] = {
    Msg.MEM_TABLE: (range(COUNT.size, COUNT.size + MAX_FDS * REGION.size + 1), range(MAX_FDS + 1)),
    Msg.VRING_START: (range(VRING_START.size, VRING_START.size + 1), range(1, 2)),
    Msg.VRING_CALL: (range(VRING_CALL.size, VRING_CALL.size + 1), range(2)),
    Msg.VRING_STOP: (range(VRING_STOP.size, VRING_STOP.size + 1), range(1)),
    Msg.SHUTDOWN: (range(1), range(1)),
    Msg.PEER: (range(PEER.size, PEER.size + 1), range(4)),
}


def check_request(msg: Msg, payload: bytes, fds: list[int]) -> None:
    """ChannelError (the fds closed) unless ``msg`` is a supervisor request
    whose payload size and fd count are in ``REQUESTS``."""
    expect = REQUESTS.get(msg)
    if expect is None:
        close_fds(fds)
        raise ChannelError(f"unexpected {msg.name} from the supervisor")
    sizes, counts = expect
    if len(payload) not in sizes or len(fds) not in counts:
        close_fds(fds)
        raise ChannelError(f"{msg.name} with {len(payload)} bytes and {len(fds)} fds")


def decode_mem_table(payload: bytes, nfds: int) -> list[tuple[int, int, int, int]]:
    if len(payload) < COUNT.size:
        raise ChannelError("MEM_TABLE too short")
    (n,) = COUNT.unpack_from(payload)
    if n > MAX_FDS or len(payload) != COUNT.size + n * REGION.size or nfds != n:
        raise ChannelError("MEM_TABLE malformed")
    return [REGION.unpack_from(payload, COUNT.size + i * REGION.size) for i in range(n)]

