"""A stand-in for QEMU 7.2's vhost-user-fs-pci front-end.

``VhostUserFrontend`` connects to a backend's UNIX socket as QEMU does (QEMU
is the client) and speaks the message sequence QEMU 7.2 sends
(docs/protocol.md, "Message order, QEMU 7.2"):

realize():
    GET_FEATURES, [bit 30] GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES
    (offered & 0x1FFFF & ~CONFIG), [MQ] GET_QUEUE_NUM, [CONFIGURE_MEM_SLOTS]
    GET_MAX_MEM_SLOTS, [SLAVE_REQ] SET_SLAVE_REQ_FD, SET_OWNER, GET_FEATURES,
    SET_VRING_CALL{i} + SET_VRING_ERR{i} for every vq
start()  (the guest driver sets DRIVER_OK):
    SET_VRING_CALL ×n, SET_FEATURES(acked | bit 30), SET_MEM_TABLE (NEED_REPLY
    with REPLY_ACK; ADD_MEM_REG per region instead with CONFIGURE_MEM_SLOTS),
    per vq SET_VRING_NUM/BASE/ADDR/KICK, SET_VRING_ENABLE 1 ×n, SET_VRING_CALL ×n
stop():
    SET_VRING_ENABLE 0 ×n, GET_VRING_BASE ×n, SET_VRING_CALL ×n (masked notifiers)
disconnect(): close the socket.

Every reply is checked: flags exactly 0x5, the request id, the size. The
low-level ``send_raw``/``recv_reply`` let hostile tests send anything.

Written independently of ``daemon.vhost_user``: this is the test oracle.
"""

from __future__ import annotations

import enum
import os
import select
import socket
import struct
import time

from .guestmem import GuestMemory
from .vring import VRing

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
STATE = struct.Struct("<II")
FLAG_VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
VRING_NOFD = 0x100
MAX_FDS = 8


class Req(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_SLAVE_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class PF(enum.IntFlag):
    """VHOST_USER_PROTOCOL_F_* bits."""
    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    SLAVE_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    SLAVE_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


QEMU_PROTOCOL_FEATURE_MASK = (1 << 17) - 1

F_NOTIFY_ON_EMPTY = 1 << 24
F_LOG_ALL = 1 << 26
F_ANY_LAYOUT = 1 << 27
F_RING_INDIRECT_DESC = 1 << 28
F_RING_EVENT_IDX = 1 << 29
F_PROTOCOL_FEATURES = 1 << 30
F_VERSION_1 = 1 << 32
F_ACCESS_PLATFORM = 1 << 33
F_RING_PACKED = 1 << 34
F_RING_RESET = 1 << 40
# What a Linux 6.1 virtiofs driver acks when QEMU offers it (transport bits in
# vring_transport_features(); virtio_fs has an empty feature table).
LINUX_61_DRIVER_FEATURES = F_RING_INDIRECT_DESC | F_RING_EVENT_IDX | F_VERSION_1
# QEMU 7.2 vhost-user-fs user_feature_bits: bits the guest sees only if offered.
QEMU_72_FS_FEATURE_BITS = (F_VERSION_1 | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX
                           | F_NOTIFY_ON_EMPTY | F_RING_PACKED | F_ACCESS_PLATFORM | F_RING_RESET)


class VhostUserError(Exception):
    """The backend broke the vhost-user protocol (bad reply, NACK, EOF...)."""


class Reply:
    __slots__ = ("request", "flags", "payload", "fds")

    def __init__(self, request: int, flags: int, payload: bytes, fds: list[int]):
        self.request, self.flags, self.payload, self.fds = request, flags, payload, fds

    def __repr__(self) -> str:
        return (f"Reply(request={self.request}, flags={self.flags:#x}, "
                f"payload={self.payload.hex()}, fds={self.fds})")


def start_frontend(socket_path: str, **options) -> VhostUserFrontend:
    """A VhostUserFrontend (``options`` as for its constructor) connected,
    realized and started, as QEMU is once the guest driver is up; closed
    again if any step fails."""
    fe = VhostUserFrontend(socket_path, **options)
    try:
        fe.realize()
        fe.start()
    except BaseException:
        fe.close()
        raise
    return fe


class VhostUserFrontend:
    """QEMU 7.2 vhost-user-fs-pci, as seen by the backend."""

    def __init__(self, socket_path: str, *, memory: GuestMemory | None = None,
                 ram_size: int | None = None, num_request_queues: int = 1, queue_size: int = 128,
                 timeout: float = 10.0, driver_features: int = LINUX_61_DRIVER_FEATURES,
                 protocol_mask: int = QEMU_PROTOCOL_FEATURE_MASK,
                 connect_timeout: float = 10.0):
        self.socket_path = socket_path
        self.timeout = timeout
        self.num_request_queues = num_request_queues
        self.nvqs = 1 + num_request_queues
        self.queue_size = queue_size
        self.driver_features = driver_features
        self.protocol_mask = protocol_mask
        # ``memory`` is the caller's (kept open by close()); without it the
        # frontend makes its own of ``ram_size`` bytes and closes it
        if memory is None:
            memory = GuestMemory(ram_size) if ram_size else GuestMemory()
            self._own_mem = True
        else:
            self._own_mem = False
        self.mem = memory
        self.sent: list[tuple[str, int, bytes]] = []  # (name, flags, payload) log
        self.features = 0  # offered by the backend
        self.protocol_features = 0  # negotiated (what we sent back)
        self.offered_protocol_features = 0
        self.acked_features = 0  # what SET_FEATURES carried
        self.queue_num: int | None = None
        self.max_mem_slots: int | None = None
        self.vrings: list[VRing] = []
        self.bases: list[int] = [0] * self.nvqs
        self.running = False
        self._slave_sock: socket.socket | None = None
        self._masked_call: list[int] = []  # QEMU's masked notifiers (realize)
        self._err_fds: list[int] = []
        self._mem_regions_sent: list[bytes] = []  # for CONFIGURE_MEM_SLOTS diffs
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.sock.connect(socket_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.sock.settimeout(timeout)

    # == low level ===========================================================
    def send_raw(self, request: int, payload: bytes = b"", fds: list[int] | tuple = (),
                 flags: int = FLAG_VERSION, size: int | None = None) -> None:
        """Send one message as QEMU does: header+payload in one sendmsg, fds
        as SCM_RIGHTS. ``size`` overrides the header's size field (hostile)."""
        hdr = HEADER.pack(request, flags, len(payload) if size is None else size)
        try:
            name = Req(request).name
        except ValueError:
            name = str(request)
        self.sent.append((name, flags, payload))
        data = hdr + payload
        if fds:
            n = socket.send_fds(self.sock, [data], list(fds))
        else:
            n = self.sock.send(data)
        if n != len(data):
            self.sock.sendall(data[n:])

    def send_bytes(self, data: bytes, fds: list[int] | tuple = ()) -> None:
        """Raw mode: any bytes (half a message, several messages) with any
        fds as SCM_RIGHTS on the first sendmsg."""
        n = socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.send(data)
        if n != len(data):
            self.sock.sendall(data[n:])

    def reset_vring(self, index: int) -> VRing:
        """A guest-side device reset of one ring: stop the device, give vring
        ``index`` a fresh ring (new memory, new eventfds, base 0), start
        again. Returns the new ring."""
        self.stop()
        old = self.vrings[index]
        fresh = VRing(self.mem, index, old.num, event_idx=old.event_idx, indirect=old.indirect_ok)
        self.vrings[index] = fresh
        self.bases[index] = 0
        self.start()
        old.close()
        return fresh

    def recv_reply(self, timeout: float | None = None) -> Reply:
        """Read one message from the backend (header, then exactly size bytes)."""
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, HEADER.size, MAX_FDS)
        except TimeoutError:
            raise TimeoutError("no reply from the backend") from None
        if not data:
            raise VhostUserError("backend closed the connection")
        while len(data) < HEADER.size:
            more = self.sock.recv(HEADER.size - len(data))
            if not more:
                raise VhostUserError("EOF inside a reply header")
            data += more
        request, flags, size = HEADER.unpack(data)
        if size > 4096 + 64:
            raise VhostUserError(f"reply size {size} is implausible")
        payload = b""
        while len(payload) < size:
            more = self.sock.recv(size - len(payload))
            if not more:
                raise VhostUserError("EOF inside a reply payload")
            payload += more
        return Reply(request, flags, payload, list(fds))

    def _expect_reply(self, request: int, size: int | None = 8) -> bytes:
        r = self.recv_reply()
        for fd in r.fds:
            os.close(fd)
        if r.fds:
            raise VhostUserError(f"reply to {Req(request).name} carried fds")
        if r.flags != FLAG_VERSION | FLAG_REPLY:
            raise VhostUserError(f"reply to {Req(request).name}: flags {r.flags:#x}, want 0x5")
        if r.request != request:
            raise VhostUserError(f"reply id {r.request} to request {Req(request).name}({request})")
        if size is not None and len(r.payload) != size:
            raise VhostUserError(f"reply to {Req(request).name}: size {len(r.payload)}, want {size}")
        return r.payload

    def _get_u64(self, request: Req) -> int:
        self.send_raw(request)
        return U64.unpack(self._expect_reply(request))[0]

    def _set(self, request: Req, payload: bytes, fds=(), need_reply: bool = False) -> None:
        self.send_raw(request, payload, fds, FLAG_VERSION | (FLAG_NEED_REPLY if need_reply else 0))
        if need_reply:
            v = U64.unpack(self._expect_reply(request))[0]
            if v != 0:
                raise VhostUserError(f"{request.name} NACKed with {v}")

    def no_reply_pending(self, wait: float = 0.05) -> bool:
        """True if the backend sent nothing unsolicited (within ``wait`` s)."""
        r, _, _ = select.select([self.sock], [], [], wait)
        return not r

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & PF.REPLY_ACK)

    # == single messages =========================================================
    def get_features(self) -> int:
        return self._get_u64(Req.GET_FEATURES)

    def set_features(self, value: int) -> None:
        self._set(Req.SET_FEATURES, U64.pack(value))

    def get_protocol_features(self) -> int:
        return self._get_u64(Req.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, value: int) -> None:
        self._set(Req.SET_PROTOCOL_FEATURES, U64.pack(value))

    def get_queue_num(self) -> int:
        return self._get_u64(Req.GET_QUEUE_NUM)

    def get_max_mem_slots(self) -> int:
        return self._get_u64(Req.GET_MAX_MEM_SLOTS)

    def set_owner(self) -> None:
        self._set(Req.SET_OWNER, b"")

    def set_vring_fd(self, request: Req, index: int, fd: int | None) -> None:
        if fd is None:
            self._set(request, U64.pack(index | VRING_NOFD))
        else:
            self._set(request, U64.pack(index), [fd])

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self.set_vring_fd(Req.SET_VRING_CALL, index, fd)

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self.set_vring_fd(Req.SET_VRING_KICK, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self.set_vring_fd(Req.SET_VRING_ERR, index, fd)

    def set_vring_num(self, index: int, num: int) -> None:
        self._set(Req.SET_VRING_NUM, STATE.pack(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self._set(Req.SET_VRING_BASE, STATE.pack(index, base))

    def set_vring_addr(self, vring: VRing) -> None:
        self._set(Req.SET_VRING_ADDR, vring.addr_payload())

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._set(Req.SET_VRING_ENABLE, STATE.pack(index, 1 if enable else 0))

    def get_vring_base(self, index: int) -> int:
        self.send_raw(Req.GET_VRING_BASE, STATE.pack(index, 0))
        idx, num = STATE.unpack(self._expect_reply(Req.GET_VRING_BASE))
        if idx != index:
            raise VhostUserError(f"GET_VRING_BASE reply for vring {idx}, asked {index}")
        return num

    def set_mem_table(self) -> None:
        """SET_MEM_TABLE (or ADD_MEM_REG/REM_MEM_REG with CONFIGURE_MEM_SLOTS)."""
        if self.protocol_features & PF.CONFIGURE_MEM_SLOTS:
            want = [r.packed() for r in self.mem.regions]
            for old in list(self._mem_regions_sent):
                if old not in want:
                    self._set(Req.REM_MEM_REG, bytes(8) + old, need_reply=self.reply_ack)
                    self._mem_regions_sent.remove(old)
            for r in self.mem.regions:
                p = r.packed()
                if p not in self._mem_regions_sent:
                    self._set(Req.ADD_MEM_REG, bytes(8) + p, [r.fd], need_reply=self.reply_ack)
                    self._mem_regions_sent.append(p)
            return
        payload, fds = self.mem.table()
        self._set(Req.SET_MEM_TABLE, payload, fds, need_reply=self.reply_ack)

    # == QEMU sequences ==============================================================
    def realize(self) -> None:
        """Device realize: everything QEMU sends at startup."""
        self.features = self.get_features()
        if self.features & F_PROTOCOL_FEATURES:
            self.offered_protocol_features = self.get_protocol_features()
            pf = self.offered_protocol_features & QEMU_PROTOCOL_FEATURE_MASK & ~PF.CONFIG
            pf &= self.protocol_mask
            self.protocol_features = pf
            self.set_protocol_features(pf)
            if pf & PF.MQ:
                self.queue_num = self.get_queue_num()
            if pf & PF.CONFIGURE_MEM_SLOTS:
                self.max_mem_slots = self.get_max_mem_slots()
            if pf & PF.SLAVE_REQ:
                mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                self._slave_sock = mine
                try:
                    self._set(Req.SET_SLAVE_REQ_FD, b"", [theirs.fileno()], need_reply=self.reply_ack)
                finally:
                    theirs.close()
        self.set_owner()
        second = self.get_features()
        if second != self.features:
            raise VhostUserError(f"GET_FEATURES changed: {self.features:#x} then {second:#x}")
        for i in range(self.nvqs):
            masked = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._masked_call.append(masked)
            self._err_fds.append(err)
            self.set_vring_call(i, masked)
            self.set_vring_err(i, err)

    def guest_features(self) -> int:
        """What the guest acks: QEMU hides fs feature bits the backend didn't
        offer, then Linux keeps only the transport bits it knows."""
        visible = self.features & QEMU_72_FS_FEATURE_BITS
        return visible & self.driver_features

    def _make_vrings(self) -> None:
        event_idx = bool(self.acked_features & F_RING_EVENT_IDX)
        indirect = bool(self.acked_features & F_RING_INDIRECT_DESC)
        self.vrings = [VRing(self.mem, i, self.queue_size, event_idx=event_idx, indirect=indirect)
                       for i in range(self.nvqs)]

    def start(self) -> None:
        """The guest set DRIVER_OK: QEMU starts the device (vuf_start)."""
        guest = self.guest_features()
        if not guest & F_VERSION_1:
            raise VhostUserError("backend does not offer VIRTIO_F_VERSION_1")
        self.acked_features = guest | (self.features & F_PROTOCOL_FEATURES)
        if not self.vrings:
            self._make_vrings()
        # virtio-pci set_guest_notifiers -> MSI-X unmask -> SET_VRING_CALL
        for v in self.vrings:
            self.set_vring_call(v.index, v.call_fd)
        self.set_features(self.acked_features)
        self.set_mem_table()
        for v in self.vrings:
            self.set_vring_num(v.index, v.num)
            self.set_vring_base(v.index, self.bases[v.index])
            self.set_vring_addr(v)
            self.set_vring_kick(v.index, v.kick_fd)
        if self.acked_features & F_PROTOCOL_FEATURES:
            for v in self.vrings:
                self.set_vring_enable(v.index, True)
        for v in self.vrings:
            self.set_vring_call(v.index, v.call_fd)
        self.running = True

    def stop(self) -> list[int]:
        """vuf_stop: disable, fetch the bases, mask the notifiers. Returns the bases."""
        if self.acked_features & F_PROTOCOL_FEATURES:
            for v in self.vrings:
                self.set_vring_enable(v.index, False)
        for v in self.vrings:
            self.bases[v.index] = self.get_vring_base(v.index)
        for v in self.vrings:
            self.set_vring_call(v.index, self._masked_call[v.index])
        self.running = False
        return list(self.bases)

    def connect_and_start(self) -> VhostUserFrontend:
        self.realize()
        self.start()
        return self

    def disconnect(self) -> None:
        if self.sock.fileno() >= 0:
            self.sock.close()
        if self._slave_sock is not None:
            self._slave_sock.close()
            self._slave_sock = None

    def close(self) -> None:
        self.disconnect()
        for v in self.vrings:
            v.close()
        for fd in self._masked_call + self._err_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._masked_call.clear()
        self._err_fds.clear()
        if self._own_mem:
            self.vrings = []
            self.mem.close()

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
