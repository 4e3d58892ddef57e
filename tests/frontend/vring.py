"""The driver side of a split virtqueue, as the Linux 6.1 virtio_ring does it.

Layout (``vring_create_virtqueue_split`` with SMP_CACHE_BYTES alignment, as
virtio-pci modern uses): descriptor table at the ring base, avail ring right
after it, used ring at the next 64-byte boundary. The ring lives in guest
memory at GPAs; QEMU tells the backend its QVAs (SET_VRING_ADDR).

Request shapes follow Linux: a request with more than one scatter-gather
element is one INDIRECT head descriptor pointing to a table (when
VIRTIO_RING_F_INDIRECT_DESC was negotiated); a single-element request (hiprio
FORGET) uses one direct descriptor.

Index stores go through a ``memoryview.cast('H')`` so the device never sees a
torn ``avail.idx``. Every wait is bounded: ``TimeoutError`` rather than a hang.

This module is written independently of ``daemon.virtio``: it is part of the
test oracle, so it also checks what the device publishes (used ids must be
in-flight heads, used lengths must fit the writable part, and a completion
must come with a call eventfd signal).
"""

from __future__ import annotations

import dataclasses
import os
import select
import struct
import time

from .guestmem import GuestMemory

DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
RING_ALIGN = 64  # SMP_CACHE_BYTES
PAGE = 4096


class DeviceError(AssertionError):
    """The device (daemon) published something a real driver would choke on."""


def vring_need_event(event_idx: int, new_idx: int, old: int) -> bool:
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old) & 0xFFFF)


@dataclasses.dataclass
class Inflight:
    head: int
    ndesc: int  # direct descriptors used in the ring's table
    block: int  # gpa of the buffer block (and indirect table), 0 if none
    readable: list[tuple[int, int]]  # (gpa, len)
    writable: list[tuple[int, int]]
    indirect: bool
    used_len: int | None = None
    token: object = None

    @property
    def writable_size(self) -> int:
        return sum(n for _, n in self.writable)


class VRing:
    def __init__(self, mem: GuestMemory, index: int, num: int = 128, *,
                 event_idx: bool = False, indirect: bool = True,
                 region_gpa: int | None = None, poison: bool = True):
        if num <= 0 or num & (num - 1) or num > 32768:
            raise ValueError("queue size must be a power of 2 <= 32768")
        self.mem = mem
        self.index = index
        self.num = num
        self.event_idx = event_idx
        self.indirect_ok = indirect
        self.poison = poison
        # region (by gpa) request buffers are allocated from; None = the largest
        self.buffer_region: int | None = None
        desc_size = 16 * num
        avail_size = 6 + 2 * num
        used_off = (desc_size + avail_size + RING_ALIGN - 1) & ~(RING_ALIGN - 1)
        used_size = 6 + 8 * num
        self.ring_bytes = used_off + used_size
        self.base = mem.alloc(self.ring_bytes, PAGE, region_gpa)
        mem.write(self.base, bytes(self.ring_bytes))
        self.desc_gpa = self.base
        self.avail_gpa = self.base + desc_size
        self.used_gpa = self.base + used_off
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # free descriptor list, linked through a Python list like Linux's desc_extra
        self._free = list(range(num - 1, -1, -1))  # pop() -> 0, 1, 2...
        self.avail_idx = 0  # shadow of avail.idx
        self.last_used = 0  # next used index we will consume
        self.inflight: dict[int, Inflight] = {}
        self.calls_seen = 0
        self.completed_total = 0
        self._avail_h, self._avail_idx_i = mem.u16_accessor(self.avail_gpa + 2)
        self._avail_ring_i = self._avail_idx_i + 1
        self._used_h, self._used_idx_i = mem.u16_accessor(self.used_gpa + 2)
        self._used_event_gpa = self.avail_gpa + 4 + 2 * num
        self._avail_event_gpa = self.used_gpa + 4 + 8 * num

    # -- addresses for SET_VRING_ADDR -----------------------------------------
    def addr_payload(self, flags: int = 0, log_guest_addr: int | None = None) -> bytes:
        """vhost_vring_addr: index, flags, desc, used, avail (QVAs), log (GPA of used)."""
        m = self.mem
        return struct.pack(
            "<IIQQQQ", self.index, flags, m.qva(self.desc_gpa), m.qva(self.used_gpa),
            m.qva(self.avail_gpa), self.used_gpa if log_guest_addr is None else log_guest_addr,
        )

    # -- raw access (for hostile tests) -----------------------------------------
    def write_desc(self, i: int, addr: int, length: int, flags: int, next_: int) -> None:
        self.mem.write(self.desc_gpa + 16 * i, DESC.pack(addr, length, flags, next_))

    def publish_head(self, head: int) -> None:
        """Put ``head`` in the avail ring and bump avail.idx (no bookkeeping)."""
        self._avail_h[self._avail_ring_i + (self.avail_idx % self.num)] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._avail_h[self._avail_idx_i] = self.avail_idx

    def set_avail_flags(self, flags: int) -> None:
        self._avail_h[self._avail_idx_i - 1] = flags

    def used_idx(self) -> int:
        return self._used_h[self._used_idx_i]

    def used_flags(self) -> int:
        return self._used_h[self._used_idx_i - 1]

    def avail_event(self) -> int:
        return self.mem.load_u16(self._avail_event_gpa)

    # -- raw mode: hostile-guest tests write whatever they like --------------------
    def take_descs(self, n: int) -> list[int]:
        """Reserve ``n`` descriptor slots of the ring's table for raw writes
        (``write_desc``); ``give_back`` returns them."""
        if len(self._free) < n:
            raise RuntimeError(f"vring {self.index}: {len(self._free)} free descriptors, want {n}")
        return [self._free.pop() for _ in range(n)]

    def give_back(self, descs: list[int]) -> None:
        self._free.extend(reversed(descs))

    def raw_buffer(self, data: bytes | int, align: int = 16) -> int:
        """Guest memory holding ``data`` (or that many 0xA5 bytes); its GPA.
        Not tracked: it stays allocated (hostile tests are short)."""
        if isinstance(data, int):
            data = b"\xa5" * data
        gpa = self.mem.alloc(max(len(data), 1), align, self.buffer_region)
        if data:
            self.mem.write(gpa, data)
        return gpa

    def raw_table(self, entries: list[tuple[int, int, int, int]]) -> int:
        """An indirect table of raw (addr, len, flags, next) entries; its GPA."""
        return self.raw_buffer(b"".join(DESC.pack(*e) for e in entries) or b"\0" * 16)

    def store_avail_idx(self, value: int) -> None:
        """Store any value in avail.idx (a jump), without moving our shadow."""
        self._avail_h[self._avail_idx_i] = value & 0xFFFF

    def quiet(self, timeout: float) -> bool:
        """True if the device published no used entry within ``timeout`` s."""
        time.sleep(timeout)
        self._drain_call()  # a spurious call is allowed; a used entry is not
        return self.used_idx() == self.last_used

    # -- submission --------------------------------------------------------------
    def submit(self, readable: list[bytes], writable: list[int], indirect: bool | None = None,
               token: object = None) -> int:
        """Add one request (not kicked). Returns its head descriptor index."""
        n = len(readable) + len(writable)
        if n == 0:
            raise ValueError("empty request")
        if indirect is None:
            indirect = self.indirect_ok and n > 1
        # one block per request: [indirect table][buffers...]
        layout: list[tuple[int, int]] = []
        off = 16 * n if indirect else 0
        for part in readable:
            off = (off + 7) & ~7
            layout.append((off, len(part)))
            off += len(part)
        for size in writable:
            off = (off + (PAGE - 1 if size >= PAGE else 7)) & ~(PAGE - 1 if size >= PAGE else 7)
            layout.append((off, size))
            off += size
        block = self.mem.alloc(max(off, 1), PAGE if off >= PAGE else 64, self.buffer_region)
        rd = [(block + o, ln) for o, ln in layout[:len(readable)]]
        wr = [(block + o, ln) for o, ln in layout[len(readable):]]
        for (gpa, _), part in zip(rd, readable):
            if part:
                self.mem.write(gpa, part)
        if self.poison:
            for gpa, ln in wr:
                if ln <= 65536:
                    self.mem.fill(gpa, ln, 0xA5)
        chain = [(g, ln, 0) for g, ln in rd] + [(g, ln, VRING_DESC_F_WRITE) for g, ln in wr]
        if indirect:
            table = bytearray()
            for i, (g, ln, fl) in enumerate(chain):
                last = i == n - 1
                table += DESC.pack(g, ln, fl | (0 if last else VRING_DESC_F_NEXT), 0 if last else i + 1)
            self.mem.write(block, table)
            if not self._free:
                self.mem.free(block)
                raise RuntimeError(f"vring {self.index}: no free descriptors")
            head = self._free.pop()
            self.write_desc(head, block, 16 * n, VRING_DESC_F_INDIRECT, 0)
            ndesc = 1
            heads = [head]
        else:
            if len(self._free) < n:
                self.mem.free(block)
                raise RuntimeError(f"vring {self.index}: no free descriptors")
            heads = [self._free.pop() for _ in range(n)]
            for i, (g, ln, fl) in enumerate(chain):
                last = i == n - 1
                self.write_desc(heads[i], g, ln, fl | (0 if last else VRING_DESC_F_NEXT),
                                0 if last else heads[i + 1])
            head = heads[0]
            ndesc = n
        inf = Inflight(head, ndesc, block, rd, wr, indirect, token=token)
        inf._descs = heads  # type: ignore[attr-defined]
        self.inflight[head] = inf
        self.publish_head(head)
        return head

    def repost(self, head: int) -> None:
        """Make a completed request available again as it is (benchmarks)."""
        inf = self.inflight[head]
        if inf.used_len is None:
            raise RuntimeError("repost of a request still in flight")
        inf.used_len = None
        self.publish_head(head)

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    # -- completion ----------------------------------------------------------------
    def harvest(self) -> list[int]:
        """Consume new used entries; returns the completed heads."""
        done = []
        used = self._used_h[self._used_idx_i]
        pending = (used - self.last_used) & 0xFFFF
        outstanding = sum(1 for i in self.inflight.values() if i.used_len is None)
        if pending > outstanding:
            raise DeviceError(
                f"vring {self.index}: used.idx {used} is {pending} ahead of our "
                f"{self.last_used} but only {outstanding} requests are in flight")
        while self.last_used != used:
            slot = self.last_used % self.num
            hid, ln = USED_ELEM.unpack(self.mem.read(self.used_gpa + 4 + 8 * slot, 8))
            inf = self.inflight.get(hid)
            if inf is None or inf.used_len is not None:
                raise DeviceError(f"vring {self.index}: used id {hid} is not an in-flight head")
            if ln > inf.writable_size:
                raise DeviceError(
                    f"vring {self.index}: used len {ln} > writable size {inf.writable_size}")
            inf.used_len = ln
            done.append(hid)
            self.last_used = (self.last_used + 1) & 0xFFFF
        self.completed_total += len(done)
        if self.event_idx:
            self.mem.store_u16(self._used_event_gpa, self.last_used)
        return done

    def _drain_call(self) -> None:
        try:
            os.eventfd_read(self.call_fd)
            self.calls_seen += 1
        except BlockingIOError:
            pass

    def wait_any(self, timeout: float) -> list[int]:
        """Wait until at least one new completion; returns the heads."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.harvest()
            if done:
                return done
            left = deadline - time.monotonic()
            if left <= 0:
                return self._timed_out(timeout, "any request")
            r, _, _ = select.select([self.call_fd], [], [], left)
            if r:
                self._drain_call()

    def wait(self, head: int, timeout: float) -> Inflight:
        """Wait for ``head`` to complete (other completions are kept)."""
        inf = self.inflight[head]
        deadline = time.monotonic() + timeout
        while True:
            if inf.used_len is not None:
                return inf
            self.harvest()
            if inf.used_len is not None:
                return inf
            left = deadline - time.monotonic()
            if left <= 0:
                self.harvest()
                if inf.used_len is not None:
                    raise DeviceError(
                        f"vring {self.index}: head {head} completed but the call "
                        f"eventfd was never signalled within {timeout}s")
                return self._timed_out(timeout, f"head {head}")  # raises
            r, _, _ = select.select([self.call_fd], [], [], left)
            if r:
                self._drain_call()

    def _timed_out(self, timeout: float, what: str) -> list[int]:
        done = self.harvest()
        if done:
            raise DeviceError(
                f"vring {self.index}: {what} completed (used.idx {self.used_idx()}) "
                f"but the call eventfd was never signalled within {timeout}s")
        raise TimeoutError(
            f"vring {self.index}: no completion for {what} within {timeout}s "
            f"(avail.idx {self.avail_idx}, used.idx {self.used_idx()}, "
            f"in flight {sum(1 for i in self.inflight.values() if i.used_len is None)})")

    def read_writable(self, head: int, length: int | None = None) -> bytes:
        """The writable part of a request as one stream (up to ``length`` bytes)."""
        inf = self.inflight[head]
        out = bytearray()
        want = inf.writable_size if length is None else length
        for gpa, ln in inf.writable:
            if len(out) >= want:
                break
            take = min(ln, want - len(out))
            out += self.mem.read(gpa, take)
        return bytes(out)

    def free(self, head: int) -> None:
        inf = self.inflight.pop(head)
        self._free.extend(reversed(inf._descs))  # type: ignore[attr-defined]
        if inf.block:
            self.mem.free(inf.block)

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.kick_fd = self.call_fd = -1
