"""The vhost-user backend: control-protocol state for one QEMU connection.

``Backend.serve_one()`` reads one message, checks it, updates the state QEMU
has configured (features, memory table, per-vring num/base/addresses/
eventfds/enabled) and tells the workers what changed through a ``WorkerPool``.
It never maps guest memory and never sees a FUSE byte: it forwards fds and
addresses, nothing more (see docs/INTERNALS.md, "Supervisor-side rules").

A vring is *running* when it has a memory table, a size, addresses, a kick
fd and is enabled; the worker of vring i (hiprio for 0, request worker i for
i >= 1) then serves it. Every message that changes any of those goes through
``_reconfigure``: a running ring is stopped first (its next avail index is
kept as the base) and started again afterwards if it still can run.

A worker found dead (``WorkerFailure`` from the pool, or the supervisor's
``revive`` call) is replaced on the spot and brought up to date with
everything above; a running ring resumes at the avail index the dead worker
published, and GET_VRING_BASE on it answers that index (after the
replacement has answered the dead worker's requests EIO).

Bad frontend input raises ``VhostUserError`` inside; ``serve_one`` logs it in
one line and closes the connection. Every fd that arrives is either kept in
the state (and closed by ``close()``) or closed before ``serve_one`` returns.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from typing import Any, Callable

from daemon import log
from daemon.fds import close_fds
from daemon.vhost_user import messages as m
from daemon.vhost_user.messages import Request, VhostUserError
from daemon.virtio.virtqueue import EVENT_IDX_SUPPORTED
from daemon.workers.pool import WorkerFailure, WorkerPool

logger = log.get_logger("vhost_user")

# EVENT_IDX (as the C and Rust virtiofsd offer it): the guest then kicks and
# takes interrupts only when the ring's event fields ask for them. It needs
# a store->load fence (docs/protocol.md, "Ordering and Python's hazards"),
# which virtqueue.py has on x86-64 only (a locked instruction through libc);
# elsewhere it is not offered.
OFFERED_FEATURES = (m.F_VERSION_1 | m.F_RING_INDIRECT_DESC | m.F_PROTOCOL_FEATURES
                    | (m.F_RING_EVENT_IDX if EVENT_IDX_SUPPORTED else 0))
assert OFFERED_FEATURES & ~m.F_RING_EVENT_IDX == 0x1_5000_0000
OFFERED_PROTOCOL_FEATURES = m.PF_MQ | m.PF_REPLY_ACK | m.PF_CONFIGURE_MEM_SLOTS
assert OFFERED_PROTOCOL_FEATURES == 0x8009
# With CONFIGURE_MEM_SLOTS QEMU adds and removes regions one at a time; the
# workers still get whole tables, which one channel frame carries.
MAX_MEM_SLOTS = m.MAX_REGIONS

REPLY_ACK_FAILURE = 1


class Vring:
    """What QEMU told us about one vring. fds here belong to the backend."""

    __slots__ = ("index", "enabled", "num", "base", "addr", "kick", "call", "err", "running")

    def __init__(self, index: int, enabled: bool):
        self.index = index
        self.enabled = enabled
        self.num = 0
        self.base = 0                      # next avail index while not running
        self.addr: m.VringAddr | None = None
        self.kick: int | None = None
        self.call: int | None = None
        self.err: int | None = None
        self.running = False

    def __repr__(self) -> str:
        return "Vring(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


class Backend:
    def __init__(self, conn: socket.socket, pool: WorkerPool, queue_count: int,
                 read_timeout: float | None = 10.0, tag: str | None = None):
        """``queue_count``: vrings that can get a worker (1 + max request
        workers), reported by GET_QUEUE_NUM. ``read_timeout``: how long the
        rest of a message may take once its first byte has arrived.
        ``tag`` (--tag): offer protocol feature CONFIG and answer GET_CONFIG
        with it (QEMU 7.2 strips CONFIG for vhost-user-fs: it never asks)."""
        self.tag = tag
        self.offered_protocol_features = OFFERED_PROTOCOL_FEATURES | (m.PF_CONFIG if tag else 0)
        self.conn = conn
        self.conn.settimeout(read_timeout)
        self.pool = pool
        self.queue_count = queue_count
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.has_owner = False
        self.regions: list[m.MemoryRegion] = []
        self.region_fds: list[int] = []
        self.rings: dict[int, Vring] = {}
        self.closed = False
        self._last_request: int | None = None
        self._warned: set[tuple[str, int]] = set()
        self._handlers: dict[int, Callable[[Any, list[int]], Any]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._set_owner,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
        }
        if tag is not None:
            self._handlers[Request.GET_CONFIG] = self._get_config

    def fileno(self) -> int:
        return self.conn.fileno()

    # -- one message ----------------------------------------------------------

    def serve_one(self) -> bool:
        """Read one message from QEMU and act on it. Returns False once the
        connection is over: QEMU hung up, or sent something malformed (logged
        in one line); the connection and every fd it brought are then closed.
        A worker that dies meanwhile is replaced (``revive``); WorkerSpawnError
        (no replacement possible) propagates: the caller must close()."""
        if self.closed:
            return False
        fds: list[int] = []
        try:
            received = self._receive()
            if received is None:
                if self._last_request == Request.GET_QUEUE_NUM and not self.has_owner:
                    # what QEMU does when num-request-queues exceeds what we offer:
                    # "The maximum number of queues supported by the backend is N"
                    logger.error("QEMU disconnected right after asking how many queues we offer "
                                 "(%d request queues, --request-queues): a device with more "
                                 "num-request-queues makes it refuse to start; give the daemon "
                                 "--request-queues at least the device's num-request-queues (the "
                                 "systemd unit: its multi-queue drop-in) or lower the device's",
                                 self.queue_count - 1)
                else:
                    logger.info("QEMU disconnected")
                self.close()
                return False
            header, payload, fds = received
            self._last_request = header.request
            self._dispatch(header, payload, fds)
            return True
        except VhostUserError as e:
            logger.error("vhost-user protocol error, closing the connection: %s", e)
            self.close()
            return False
        finally:
            _close_fds(fds)

    def _receive(self) -> tuple[m.Header, bytes, list[int]] | None:
        try:
            data, fds, msg_flags, _ = socket.recv_fds(self.conn, m.HEADER.size, m.MAX_FDS)
        except OSError as e:
            raise VhostUserError(f"receiving a message header: {_reason(e)}") from None
        try:
            if not data:
                return None
            if msg_flags & socket.MSG_CTRUNC:
                raise VhostUserError(f"a message carried more than {m.MAX_FDS} file descriptors")
            if len(data) < m.HEADER.size:
                data += self._recv_exact(m.HEADER.size - len(data), "the message header")
            header = m.decode_header(data)
            payload = self._recv_exact(header.size, f"the {header.name} payload")
            return header, payload, fds
        except BaseException:
            _close_fds(fds)
            raise

    def _recv_exact(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.conn.recv_into(view[got:])
            except TimeoutError:
                raise VhostUserError(f"timed out after {got} of {n} bytes of {what}") from None
            except OSError as e:
                raise VhostUserError(f"receiving {what}: {_reason(e)}") from None
            if k == 0:
                raise VhostUserError(f"connection closed after {got} of {n} bytes of {what}")
            got += k
        return bytes(buf)

    def _dispatch(self, header: m.Header, payload: bytes, fds: list[int]) -> None:
        handler = self._handlers.get(header.request)
        if handler is None:
            self._unsupported(header, len(fds))
            return
        body = m.decode_payload(header.request, payload, len(fds))
        logger.debug("%s %s%s", header.name, body if body is not None else "",
                     f" +{len(fds)} fd" if fds else "")
        reply = handler(body, fds)
        if reply is not None:
            self._send(header, m.encode_reply(header.request, reply))
        elif header.need_reply:
            self._send(header, m.encode_u64_reply(header.request, 0))

    def _unsupported(self, header: m.Header, nfds: int) -> None:
        self._warn_once("request", header.request,
                        f"ignoring {header.name}: not supported (flags 0x{header.flags:x}, "
                        f"{header.size} bytes, {nfds} fds)")
        if header.need_reply:
            self._send(header, m.encode_u64_reply(header.request, REPLY_ACK_FAILURE))

    def _send(self, header: m.Header, data: bytes) -> None:
        try:
            self.conn.sendall(data)
        except OSError as e:
            raise VhostUserError(f"sending the {header.name} reply: {_reason(e)}") from None

    def close(self) -> None:
        """Close the connection and every fd QEMU gave us. Workers are not
        told: the supervisor shuts them down."""
        if self.closed:
            return
        self.closed = True
        self.conn.close()
        _close_fds(self.region_fds)
        self.region_fds = []
        for ring in self.rings.values():
            _close_fds([fd for fd in (ring.kick, ring.call, ring.err) if fd is not None])
            ring.kick = ring.call = ring.err = None

    # -- feature negotiation ---------------------------------------------------

    def _get_features(self, _body, _fds) -> bytes:
        return m.U64.pack(OFFERED_FEATURES)

    def _set_features(self, features: int, _fds) -> None:
        if features & ~OFFERED_FEATURES:
            raise VhostUserError(f"SET_FEATURES 0x{features:x} acks features never offered "
                                 f"(0x{features & ~OFFERED_FEATURES:x})")
        self.acked_features = features
        # With VHOST_USER_F_PROTOCOL_FEATURES rings start disabled until
        # SET_VRING_ENABLE 1; without it they start enabled (vhost-user spec).
        enabled = self._rings_start_enabled()
        for ring in self.rings.values():
            if ring.enabled != enabled:
                with self._reconfigure(ring):
                    ring.enabled = enabled

    def _get_protocol_features(self, _body, _fds) -> bytes:
        return m.U64.pack(self.offered_protocol_features)

    def _set_protocol_features(self, features: int, _fds) -> None:
        offered = self.offered_protocol_features
        if features & ~offered:
            raise VhostUserError(f"SET_PROTOCOL_FEATURES 0x{features:x} acks protocol features never "
                                 f"offered (0x{features & ~offered:x})")
        self.acked_protocol_features = features

    def _get_config(self, body: tuple[int, int], _fds) -> bytes:
        """GET_CONFIG (--tag only): the virtio-fs config space, tag and
        number of request queues."""
        if not self.acked_protocol_features & m.PF_CONFIG:
            raise VhostUserError("GET_CONFIG without protocol feature CONFIG negotiated")
        offset, size = body
        assert self.tag is not None      # CONFIG is offered only with a tag
        return m.encode_fs_config(self.tag, self.queue_count - 1, offset, size)

    def _get_queue_num(self, _body, _fds) -> bytes:
        return m.U64.pack(self.queue_count)

    def _set_owner(self, _body, _fds) -> None:
        self.has_owner = True

    # -- memory table ------------------------------------------------------------

    def _set_mem_table(self, regions: list[m.MemoryRegion], fds: list[int]) -> None:
        new_fds = fds[:]
        fds.clear()                     # ours now: closed below on error
        try:
            for i, (region, fd) in enumerate(zip(regions, new_fds)):
                _check_region_file(i, region, fd)
        except VhostUserError:
            _close_fds(new_fds)
            raise
        old_fds = self.region_fds
        self._install_mem_table(regions, new_fds)
        _close_fds(old_fds)

    def _get_max_mem_slots(self, _body, _fds) -> bytes:
        return m.U64.pack(MAX_MEM_SLOTS)

    def _add_mem_reg(self, region: m.MemoryRegion, fds: list[int]) -> None:
        """ADD_MEM_REG: one more region (memory hot-plug, or each region of
        the table at DRIVER_OK when CONFIGURE_MEM_SLOTS is negotiated)."""
        fd = fds.pop()                  # ours now: closed below on error
        try:
            if len(self.regions) >= MAX_MEM_SLOTS:
                raise VhostUserError(f"ADD_MEM_REG: already {len(self.regions)} regions, "
                                     f"the most this backend announced")
            regions = self.regions + [region]
            m.check_no_overlap("ADD_MEM_REG", regions)
            _check_region_file(len(self.regions), region, fd, "ADD_MEM_REG")
        except VhostUserError:
            os.close(fd)
            raise
        self._install_mem_table(regions, self.region_fds + [fd])

    def _rem_mem_reg(self, region: m.MemoryRegion, _fds) -> None:
        """REM_MEM_REG: drop the region with the same gpa, QVA and size
        (QEMU's match; mmap_offset is ignored). Removing an unknown region
        is QEMU's bug, not the guest's: the connection ends."""
        for i, r in enumerate(self.regions):  # noqa: B007 - i is used after the loop
            if (r.gpa, r.qva, r.size) == (region.gpa, region.qva, region.size):
                break
        else:
            raise VhostUserError(f"REM_MEM_REG: no region at gpa 0x{region.gpa:x} size 0x{region.size:x}")
        fd = self.region_fds[i]
        self._install_mem_table(self.regions[:i] + self.regions[i + 1:],
                                self.region_fds[:i] + self.region_fds[i + 1:])
        os.close(fd)

    def _install_mem_table(self, regions: list[m.MemoryRegion], fds: list[int]) -> None:
        """Make ``regions`` (with their fds, now owned here) the memory table:
        as INTERNALS.md says, stop the running rings, send every worker the
        new table, restart the rings. The caller closes fds no longer used."""
        for ring in self.rings.values():
            if ring.running:
                self._stop(ring)
        self.regions, self.region_fds = regions, fds
        for index in list(self.pool.live()):
            try:
                self._send_mem_table(index)
            except WorkerFailure:
                self.revive(index)              # the replacement gets the new table
        for ring in self.rings.values():
            self._start_if_ready(ring)

    def _send_mem_table(self, index: int) -> None:
        try:
            self.pool.mem_table(index, [r.as_tuple() for r in self.regions], self.region_fds)
        except OSError as e:
            raise VhostUserError(f"the worker of vring {index} cannot map the memory table: {_reason(e)}") from None

    def _region_of(self, qva: int, length: int) -> m.MemoryRegion | None:
        for r in self.regions:
            if r.qva <= qva and qva + length <= r.qva + r.size:
                return r
        return None

    # -- vrings --------------------------------------------------------------------

    def _ring(self, index: int) -> Vring:
        ring = self.rings.get(index)
        if ring is None:
            ring = self.rings[index] = Vring(index, enabled=self._rings_start_enabled())
        return ring

    def _rings_start_enabled(self) -> bool:
        return not self.acked_features & m.F_PROTOCOL_FEATURES

    def _set_vring_num(self, state: m.VringState, _fds) -> None:
        ring = self._ring(state.index)
        with self._reconfigure(ring):
            ring.num = state.num

    def _set_vring_base(self, state: m.VringState, _fds) -> None:
        ring = self._ring(state.index)
        with self._reconfigure(ring):
            ring.base = state.num

    def _set_vring_addr(self, addr: m.VringAddr, _fds) -> None:
        if not self.regions:
            raise VhostUserError(f"SET_VRING_ADDR for vring {addr.index} before any SET_MEM_TABLE")
        for what, qva in (("descriptor table", addr.desc), ("avail ring", addr.avail), ("used ring", addr.used)):
            if self._region_of(qva, 1) is None:
                raise VhostUserError(f"SET_VRING_ADDR: vring {addr.index} {what} address 0x{qva:x} "
                                     f"is in no memory region")
        ring = self._ring(addr.index)
        with self._reconfigure(ring):
            ring.addr = addr

    def _get_vring_base(self, state: m.VringState, _fds) -> bytes:
        # vhost-user: GET_VRING_BASE stops the ring; the kick fd goes with it.
        ring = self._ring(state.index)
        if ring.running:
            self._stop(ring)
        if ring.kick is not None:
            os.close(ring.kick)
            ring.kick = None
        return m.VRING_STATE.pack(ring.index, ring.base)

    def _set_vring_kick(self, file: m.VringFile, fds: list[int]) -> None:
        if not file.has_fd:
            raise VhostUserError(f"SET_VRING_KICK: vring {file.index} without a kick fd "
                                 f"(polling mode) is not supported")
        _check_eventfd("SET_VRING_KICK", file.index, fds[0])
        ring = self._ring(file.index)
        with self._reconfigure(ring):
            ring.kick = _replace_fd(ring.kick, fds.pop())

    def _set_vring_call(self, file: m.VringFile, fds: list[int]) -> None:
        # Forwarded at once, running or not: QEMU swaps call fds while rings
        # run (masked notifier <-> guest notifier) and workers keep the newest.
        if file.has_fd:
            _check_eventfd("SET_VRING_CALL", file.index, fds[0])
        ring = self._ring(file.index)
        ring.call = _replace_fd(ring.call, fds.pop() if file.has_fd else None)
        if ring.index in self.pool.live():
            try:
                self.pool.set_call(ring.index, ring.call)
            except WorkerFailure:
                self.revive(ring.index)         # the replacement gets the new call fd

    def _set_vring_err(self, file: m.VringFile, fds: list[int]) -> None:
        # Kept for the connection's life; workers do not report ring errors
        # through it (yet).
        if file.has_fd:
            _check_eventfd("SET_VRING_ERR", file.index, fds[0])
        ring = self._ring(file.index)
        ring.err = _replace_fd(ring.err, fds.pop() if file.has_fd else None)

    def _set_vring_enable(self, state: m.VringState, _fds) -> None:
        ring = self._ring(state.index)
        enabled = bool(state.num)
        if ring.enabled != enabled:
            with self._reconfigure(ring):
                ring.enabled = enabled

    @contextlib.contextmanager
    def _reconfigure(self, ring: Vring):
        """Stop ``ring`` if it runs, let the caller change it, then start it
        if it can run (again)."""
        if ring.running:
            self._stop(ring)
        yield
        self._start_if_ready(ring)

    def _stop(self, ring: Vring) -> None:
        while True:
            try:
                ring.base = self.pool.stop_ring(ring.index)
                break
            except WorkerFailure:
                # its replacement answers the dead worker's requests (EIO)
                # and resumes the ring at the published avail index: stop that
                self.revive(ring.index)
                if not ring.running:
                    break
        ring.running = False
        logger.debug("vring %d stopped at avail index %d", ring.index, ring.base)

    def _start_if_ready(self, ring: Vring, recover: bool = False) -> None:
        if ring.running or not (self.regions and ring.num and ring.addr and ring.kick is not None
                                and ring.enabled):
            return
        if ring.index >= self.queue_count:
            self._warn_once("vring", ring.index,
                            f"vring {ring.index} has no worker (at most {self.queue_count - 1} request "
                            f"queues, see --request-queues): requests on it will not be served")
            return
        self._check_ring_layout(ring)
        addr = ring.addr
        while True:
            try:
                if ring.index not in self.pool.live():
                    self.pool.spawn(ring.index)
                    self.bring_up(ring.index)
                self.pool.start_ring(ring.index, ring.num, addr.desc, addr.avail, addr.used, ring.base,
                                     self.acked_features, ring.kick, recover)
                break
            except OSError as e:
                raise VhostUserError(f"the worker of vring {ring.index} cannot start it: {_reason(e)}") from None
            except WorkerFailure:
                # no answer: that worker never served the ring (it answers
                # VRING_START first); a replacement, up to the pool's
                # restart budget (WorkerSpawnError), starts it at the same base
                continue
        ring.running = True
        logger.debug("vring %d started at avail index %d%s", ring.index, ring.base,
                     " (previous worker's requests answered EIO)" if recover else "")

    def revive(self, index: int) -> None:
        """The worker of vring ``index`` died (the pool has reaped it and
        logged why): start a replacement with everything QEMU configured —
        the memory table, the call fd and, if the ring was running, the ring
        itself, resumed at the avail index the dead worker published, its
        unanswered requests answered EIO. A replacement that dies as well is
        replaced in turn; the pool's restart budget ends that with
        ``WorkerSpawnError``, which propagates (fatal)."""
        ring = self.rings.get(index)
        if ring is not None and ring.running:
            ring.running = False
            ring.base = self.pool.published_avail(index)
            logger.info("vring %d: resuming at avail index %d with a new worker", index, ring.base)
            self._start_if_ready(ring, recover=True)
            if ring.running:
                return
        while index not in self.pool.live():
            try:
                self.pool.spawn(index)
                self.bring_up(index)
            except WorkerFailure:
                continue

    def bring_up(self, index: int) -> None:
        """Give a freshly started worker of vring ``index`` everything QEMU
        has configured so far that it needs before VRING_START: the memory
        table and the ring's call fd. (``revive`` reuses this.) WorkerFailure
        propagates."""
        if self.regions:
            self._send_mem_table(index)
        ring = self.rings.get(index)
        if ring is not None and ring.call is not None:
            self.pool.set_call(index, ring.call)

    def _check_ring_layout(self, ring: Vring) -> None:
        """Each ring structure must lie inside one memory region (QVA)."""
        event = 2 if self.acked_features & m.F_RING_EVENT_IDX else 0
        num, addr = ring.num, ring.addr
        assert addr is not None                   # SET_VRING_ADDR came first
        for what, qva, length in (("descriptor table", addr.desc, 16 * num),
                                  ("avail ring", addr.avail, 4 + 2 * num + event),
                                  ("used ring", addr.used, 4 + 8 * num + event)):
            if self._region_of(qva, length) is None:
                raise VhostUserError(f"vring {ring.index}: {what} [0x{qva:x}, +0x{length:x}) "
                                     f"is not inside one memory region")

    def _warn_once(self, kind: str, key: int, message: str) -> None:
        if (kind, key) not in self._warned:
            self._warned.add((kind, key))
            logger.warning("%s", message)


def _check_region_file(i: int, region: m.MemoryRegion, fd: int, what: str = "SET_MEM_TABLE") -> None:
    """A region must not extend past the end of its file: a worker touching
    such a page would die of SIGBUS. (Only regular files have a size to
    check: memfd, hugetlbfs, /dev/shm.)"""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise VhostUserError(f"{what}: region {i} fd: {_reason(e)}") from None
    if stat.S_ISREG(st.st_mode) and st.st_size < region.mmap_offset + region.size:
        raise VhostUserError(f"{what}: region {i} needs 0x{region.mmap_offset + region.size:x} "
                             f"bytes of its file, which has 0x{st.st_size:x}")


def _check_eventfd(what: str, index: int, fd: int) -> None:
    """Kick, call and err notifiers are eventfds (QEMU's event_notifier).
    Anything else breaks a worker: epoll refuses a regular file, a pipe or
    socket at EOF is readable forever, a full pipe blocks the call. Told
    apart by /proc/self/fdinfo (openat/read/close: no extra syscall for the
    supervisor's seccomp policy); without /proc, any anonymous inode passes."""
    try:
        info_fd = os.open(f"/proc/self/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        info = None
    else:
        try:
            info = os.read(info_fd, 4096)
        finally:
            os.close(info_fd)
    if info is not None:
        if b"\neventfd-count:" not in info:
            raise VhostUserError(f"{what}: vring {index} fd is not an eventfd")
        return
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise VhostUserError(f"{what}: vring {index} fd: {_reason(e)}") from None
    if stat.S_IFMT(mode) != 0:
        raise VhostUserError(f"{what}: vring {index} fd is a file of mode 0o{mode:o}, not an eventfd")


def _replace_fd(old: int | None, new: int | None) -> int | None:
    if old is not None:
        os.close(old)
    return new


def _close_fds(fds: list[int]) -> None:
    """Close and forget every fd of the list (it is left empty)."""
    close_fds(fds)
    fds.clear()


def _reason(e: OSError) -> str:
    return e.strerror or str(e)
