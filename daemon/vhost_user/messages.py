"""vhost-user wire format, as QEMU 7.2 speaks it (see docs/protocol.md, "vhost-user").

Every message is a 12-byte header, ``size`` payload bytes and, attached to
the same ``sendmsg``, up to 8 file descriptors. This module knows the layouts
and what a well-formed message of each kind looks like; it knows nothing of
state (which messages may come when: that is backend.py).

``decode_header`` and ``decode_payload`` accept any bytes and raise only
``VhostUserError``: whatever the frontend sends, the caller gets either a
checked value or one exception with a message fit for the log.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from daemon.virtio.virtqueue import MAX_QUEUE_SIZE

# struct VhostUserHeader { uint32_t request; uint32_t flags; uint32_t size; };
HEADER = struct.Struct("<III")
# uint64_t u64;  (features, protocol features, queue count, kick/call/err index)
U64 = struct.Struct("<Q")
# struct vhost_vring_state { unsigned int index; unsigned int num; };
VRING_STATE = struct.Struct("<II")
# struct vhost_vring_addr { unsigned int index; unsigned int flags;
#   uint64_t desc_user_addr; uint64_t used_user_addr;
#   uint64_t avail_user_addr; uint64_t log_guest_addr; };
VRING_ADDR = struct.Struct("<IIQQQQ")
# struct VhostUserMemory { uint32_t nregions; uint32_t padding;
#   VhostUserMemoryRegion regions[nregions]; };   (QEMU sends only nregions)
MEMORY_HEADER = struct.Struct("<I4x")
# struct VhostUserMemoryRegion { uint64_t guest_phys_addr; uint64_t memory_size;
#   uint64_t userspace_addr; uint64_t mmap_offset; };
MEMORY_REGION = struct.Struct("<QQQQ")
# struct VhostUserMemRegMsg { uint64_t padding; VhostUserMemoryRegion region; };
#   (ADD_MEM_REG / REM_MEM_REG)
SINGLE_REGION = struct.Struct("<8xQQQQ")
assert (HEADER.size, U64.size, VRING_STATE.size, VRING_ADDR.size,
        MEMORY_HEADER.size, MEMORY_REGION.size, SINGLE_REGION.size) == (12, 8, 8, 40, 8, 32, 40)

# header flags
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
REPLY_FLAGS = VERSION | FLAG_REPLY      # QEMU accepts exactly 0x5 on a reply

MAX_FDS = 8                 # VHOST_MEMORY_BASELINE_NREGIONS
MAX_REGIONS = 8
# The largest message QEMU 7.2 can send is GET/SET_CONFIG (12 + 256 bytes);
# a payload above this is a broken or hostile frontend, never a real one.
MAX_PAYLOAD = 4096
MAX_VRINGS = 256            # kick/call/err carry the vring index in 8 bits

# kick/call/err u64 payload
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100

# virtio feature bits (GET_FEATURES / SET_FEATURES)
F_RING_INDIRECT_DESC = 1 << 28
F_RING_EVENT_IDX = 1 << 29
F_PROTOCOL_FEATURES = 1 << 30      # VHOST_USER_F_PROTOCOL_FEATURES
F_VERSION_1 = 1 << 32

# protocol feature bits (GET_PROTOCOL_FEATURES / SET_PROTOCOL_FEATURES)
PF_MQ = 1 << 0
PF_REPLY_ACK = 1 << 3
PF_CONFIG = 1 << 9                 # GET_CONFIG/SET_CONFIG: offered only with --tag
PF_CONFIGURE_MEM_SLOTS = 1 << 15

# GET_CONFIG payload: struct vhost_user_config { u32 offset; u32 size;
# u32 flags; u8 region[size]; } (at most VHOST_USER_MAX_CONFIG_SIZE bytes)
CONFIG_HEADER = struct.Struct("<III")
MAX_CONFIG_SIZE = 256
# virtio-fs config space: struct virtio_fs_config { u8 tag[36];
# le32 num_request_queues; } (packed, 40 bytes)
FS_CONFIG = struct.Struct("<36sI")


class Request(enum.IntEnum):
    """Front-end -> back-end message ids (QEMU 7.2 ``VhostUserRequest``)."""

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


def request_name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


class VhostUserError(Exception):
    """The frontend sent something malformed; the connection cannot go on."""


class Header(NamedTuple):
    request: int        # a Request value, or an id this backend does not know
    flags: int
    size: int

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        return request_name(self.request)


class VringState(NamedTuple):
    index: int  # type: ignore[assignment]  # shadows tuple.index; the protocol names it so
    num: int


class VringAddr(NamedTuple):
    index: int  # type: ignore[assignment]  # shadows tuple.index
    flags: int
    desc: int        # QEMU virtual addresses (QVA): docs/protocol.md, "Memory table and address translation"
    used: int
    avail: int
    log: int


class VringFile(NamedTuple):
    """SET_VRING_KICK/CALL/ERR: which vring, and whether an fd came with it."""

    index: int  # type: ignore[assignment]  # shadows tuple.index
    has_fd: bool


class MemoryRegion(NamedTuple):
    gpa: int
    size: int
    qva: int
    mmap_offset: int

    def as_tuple(self) -> tuple[int, int, int, int]:
        """(gpa, size, uaddr, mmap_offset): the order channel.REGION and
        GuestMemory.from_regions use."""
        return (self.gpa, self.size, self.qva, self.mmap_offset)


def decode_header(data: bytes) -> Header:
    if len(data) != HEADER.size:
        raise VhostUserError(f"message header is {len(data)} bytes, expected {HEADER.size}")
    request, flags, size = HEADER.unpack(data)
    name = request_name(request)
    if flags & VERSION_MASK != VERSION:
        raise VhostUserError(f"{name}: unsupported protocol version {flags & VERSION_MASK} (flags 0x{flags:x})")
    if flags & ~(VERSION_MASK | FLAG_NEED_REPLY):
        raise VhostUserError(f"{name}: unexpected header flags 0x{flags:x}")
    if size > MAX_PAYLOAD:
        raise VhostUserError(f"{name}: payload of {size} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    return Header(request, flags, size)


# Exact payload size of every fixed-size message this backend decodes.
_FIXED_SIZE = {
    Request.GET_FEATURES: 0,
    Request.SET_FEATURES: U64.size,
    Request.SET_OWNER: 0,
    Request.RESET_OWNER: 0,
    Request.SET_VRING_NUM: VRING_STATE.size,
    Request.SET_VRING_ADDR: VRING_ADDR.size,
    Request.SET_VRING_BASE: VRING_STATE.size,
    Request.GET_VRING_BASE: VRING_STATE.size,
    Request.SET_VRING_KICK: U64.size,
    Request.SET_VRING_CALL: U64.size,
    Request.SET_VRING_ERR: U64.size,
    Request.GET_PROTOCOL_FEATURES: 0,
    Request.SET_PROTOCOL_FEATURES: U64.size,
    Request.GET_QUEUE_NUM: 0,
    Request.GET_MAX_MEM_SLOTS: 0,
    Request.SET_VRING_ENABLE: VRING_STATE.size,
}
DECODED = frozenset(_FIXED_SIZE) | {Request.SET_MEM_TABLE, Request.ADD_MEM_REG, Request.REM_MEM_REG,
                                    Request.GET_CONFIG}

Payload = None | int | VringState | VringAddr | VringFile | MemoryRegion | list[MemoryRegion] | tuple[int, int]


def decode_payload(request: int, payload: bytes, nfds: int) -> Payload:
    """Check and decode the payload of one message this backend understands
    (``request in DECODED``), and check that it came with the right number of
    fds. Returns None, an int (u64 messages), a VringState, a VringAddr, a
    VringFile or the list of MemoryRegion for SET_MEM_TABLE."""
    if request not in DECODED:
        raise VhostUserError(f"{request_name(request)}: not a message this backend decodes")
    request = Request(request)
    if request == Request.SET_MEM_TABLE:
        return decode_mem_table(payload, nfds)
    if request in (Request.ADD_MEM_REG, Request.REM_MEM_REG):
        return decode_single_region(request, payload, nfds)
    if request == Request.GET_CONFIG:
        return decode_get_config(payload, nfds)
    expected = _FIXED_SIZE[request]
    if len(payload) != expected:
        raise VhostUserError(f"{request.name}: payload is {len(payload)} bytes, expected {expected}")
    if request in _FILE_REQUESTS:
        return _decode_vring_file(request, payload, nfds)
    if nfds:
        raise VhostUserError(f"{request.name}: {nfds} unexpected file descriptor(s)")
    if request in _STATE_REQUESTS:
        return _decode_vring_state(request, payload)
    if request == Request.SET_VRING_ADDR:
        return _decode_vring_addr(payload)
    if request in _U64_REQUESTS:
        return U64.unpack(payload)[0]
    return None


_FILE_REQUESTS = {Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR}
_STATE_REQUESTS = {Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE,
                   Request.SET_VRING_ENABLE}
_U64_REQUESTS = {Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES}


def _decode_vring_state(request: Request, payload: bytes) -> VringState:
    state = VringState(*VRING_STATE.unpack(payload))
    if state.index >= MAX_VRINGS:
        raise VhostUserError(f"{request.name}: vring index {state.index} out of range")
    if request == Request.SET_VRING_NUM:
        num = state.num
        if not (1 <= num <= MAX_QUEUE_SIZE and num & (num - 1) == 0):
            raise VhostUserError(f"SET_VRING_NUM: vring {state.index} size {num} is not a power of two "
                                 f"in 1..{MAX_QUEUE_SIZE}")
    elif request == Request.SET_VRING_BASE:
        if state.num > 0xFFFF:
            raise VhostUserError(f"SET_VRING_BASE: vring {state.index} base {state.num} is not a 16-bit index")
    elif request == Request.SET_VRING_ENABLE:
        if state.num not in (0, 1):
            raise VhostUserError(f"SET_VRING_ENABLE: vring {state.index} enable value {state.num} is not 0 or 1")
    return state


def _decode_vring_addr(payload: bytes) -> VringAddr:
    addr = VringAddr(*VRING_ADDR.unpack(payload))
    if addr.index >= MAX_VRINGS:
        raise VhostUserError(f"SET_VRING_ADDR: vring index {addr.index} out of range")
    # virtio 1.x §2.7: descriptor table 16-byte, avail 2-byte, used 4-byte aligned
    for what, value, align in (("descriptor table", addr.desc, 16), ("avail ring", addr.avail, 2),
                               ("used ring", addr.used, 4)):
        if value % align:
            raise VhostUserError(f"SET_VRING_ADDR: vring {addr.index} {what} address 0x{value:x} "
                                 f"is not {align}-byte aligned")
    return addr


def _decode_vring_file(request: Request, payload: bytes, nfds: int) -> VringFile:
    (value,) = U64.unpack(payload)
    if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
        raise VhostUserError(f"{request.name}: unknown bits in 0x{value:x}")
    index, has_fd = value & VRING_IDX_MASK, not value & VRING_NOFD_MASK
    if nfds != int(has_fd):
        raise VhostUserError(f"{request.name}: vring {index} came with {nfds} file descriptor(s), "
                             f"expected {int(has_fd)}")
    return VringFile(index, has_fd)


def decode_get_config(payload: bytes, nfds: int) -> tuple[int, int]:
    """GET_CONFIG: (offset, size) of the config space asked for; the
    payload carries ``size`` bytes (ignored) after its 12-byte header."""
    if nfds:
        raise VhostUserError(f"GET_CONFIG: {nfds} unexpected file descriptor(s)")
    if len(payload) < CONFIG_HEADER.size:
        raise VhostUserError(f"GET_CONFIG: payload is {len(payload)} bytes, too short")
    offset, size, _flags = CONFIG_HEADER.unpack_from(payload)
    if size > MAX_CONFIG_SIZE or len(payload) != CONFIG_HEADER.size + size:
        raise VhostUserError(f"GET_CONFIG: size {size} with a {len(payload)}-byte payload")
    return offset, size


def encode_fs_config(tag: str, num_request_queues: int, offset: int, size: int) -> bytes:
    """GET_CONFIG's reply payload: the header, then ``size`` bytes of the
    virtio-fs config space from ``offset`` (zeros past its end)."""
    space = FS_CONFIG.pack(tag.encode("utf-8", "surrogateescape"), num_request_queues)
    region = space[offset:offset + size] if offset < len(space) else b""
    return CONFIG_HEADER.pack(offset, size, 0) + region.ljust(size, b"\0")


def decode_single_region(request: Request, payload: bytes, nfds: int) -> MemoryRegion:
    """ADD_MEM_REG (exactly one fd) and REM_MEM_REG (no fd; libvhost-user
    tolerates one and closes it, so do we): one region of non-zero size that
    does not wrap the address space."""
    if len(payload) != SINGLE_REGION.size:
        raise VhostUserError(f"{request.name}: payload is {len(payload)} bytes, expected {SINGLE_REGION.size}")
    wanted = (1,) if request == Request.ADD_MEM_REG else (0, 1)
    if nfds not in wanted:
        raise VhostUserError(f"{request.name}: {nfds} file descriptor(s), expected {wanted[0]}")
    r = MemoryRegion(*SINGLE_REGION.unpack(payload))
    _check_region(request.name, 0, r)
    return r


def _check_region(what: str, i: int, r: MemoryRegion) -> None:
    if r.size == 0:
        raise VhostUserError(f"{what}: region {i} has size 0")
    if r.gpa + r.size > 1 << 64 or r.qva + r.size > 1 << 64:
        raise VhostUserError(f"{what}: region {i} (size 0x{r.size:x}) wraps the 64-bit address space")
    # each fd is mapped from offset 0 for size + mmap_offset bytes (an off_t)
    if r.mmap_offset + r.size >= 1 << 63:
        raise VhostUserError(f"{what}: region {i} mmap_offset 0x{r.mmap_offset:x} + size is too large")


def check_no_overlap(what: str, regions: list[MemoryRegion]) -> None:
    """No two regions may share a guest-physical or a QEMU virtual address."""
    for space in ("gpa", "qva"):
        spans = sorted((getattr(r, space), r.size, i) for i, r in enumerate(regions))
        for (start_a, size_a, a), (start_b, _, b) in zip(spans, spans[1:]):
            if start_a + size_a > start_b:
                raise VhostUserError(f"{what}: regions {a} and {b} overlap in "
                                     f"{'guest-physical' if space == 'gpa' else 'QEMU virtual'} addresses")


def decode_mem_table(payload: bytes, nfds: int) -> list[MemoryRegion]:
    """SET_MEM_TABLE: 1..8 regions of non-zero size, one fd each, no address
    range past 2**64, no two regions overlapping in guest-physical or in QEMU
    virtual address space."""
    if len(payload) < MEMORY_HEADER.size:
        raise VhostUserError(f"SET_MEM_TABLE: payload is {len(payload)} bytes, too short for the region count")
    (n,) = MEMORY_HEADER.unpack_from(payload)
    if not 1 <= n <= MAX_REGIONS:
        raise VhostUserError(f"SET_MEM_TABLE: {n} regions, expected 1..{MAX_REGIONS}")
    expected = MEMORY_HEADER.size + n * MEMORY_REGION.size
    if len(payload) != expected:
        raise VhostUserError(f"SET_MEM_TABLE: payload is {len(payload)} bytes, expected {expected} for {n} regions")
    if nfds != n:
        raise VhostUserError(f"SET_MEM_TABLE: {n} regions but {nfds} file descriptor(s)")
    regions = [MemoryRegion(*MEMORY_REGION.unpack_from(payload, MEMORY_HEADER.size + i * MEMORY_REGION.size))
               for i in range(n)]
    for i, r in enumerate(regions):
        _check_region("SET_MEM_TABLE", i, r)
    check_no_overlap("SET_MEM_TABLE", regions)
    return regions


def encode_reply(request: int, payload: bytes) -> bytes:
    return HEADER.pack(request, REPLY_FLAGS, len(payload)) + payload


def encode_u64_reply(request: int, value: int) -> bytes:
    """GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM and REPLY_ACK
    (0 = success, anything else = failure)."""
    return encode_reply(request, U64.pack(value))
