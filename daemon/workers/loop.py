"""The worker event loop, shared by the hiprio and request roles.

One ``epoll`` over the control channel and the kick eventfds of this
worker's running rings. The channel carries the supervisor's requests
(channel.py), each answered exactly once:

==============  ===========================================================
MEM_TABLE       map the new table (``GuestMemory``); rings that are running
                are re-translated into it. A table that cannot be mapped is
                answered with its errno and the previous one stays.
VRING_START     build the ``VirtQueue``, watch its kick fd, answer 0 or an
                errno, then serve whatever the guest already queued. With
                ``VRING_START_RECOVER`` (this worker replaces a dead one)
                first answer EIO to what the dead one had taken
                (``_recover``, progress.py).
VRING_CALL      keep the newest call eventfd (the previous one is closed).
VRING_STOP      answer deferred requests (EINTR), publish, close the kick
                fd; the answer value is the ring's next avail index.
SHUTDOWN        the same for every ring, answer, exit 0.
==============  ===========================================================

A frame that breaks the channel protocol (wrong size, unexpected fds, a
message a worker never receives) ends the worker with exit status 1: the
supervisor replaces it. A malformed ring (``VirtQueueError``) is the
guest's fault and ends only that ring: it is logged (rate-limited) and no
longer watched, while the channel and other rings go on.

A kick: drain the eventfd (before scanning, so no kick is lost), pop every
available chain, hand it to the session, push the used element, publish
once per batch, signal the call eventfd. At most ``num`` chains are taken
per batch so a guest that keeps the ring full cannot starve the channel;
the rest are served on the next turn without waiting for a kick. With the
compiled ops' batch loop (fuse/fastpath.py, stage 3), C pops, serves,
records and pushes the GETATTRs and READs it serves, and the loop pops
only the chains C leaves to it; the count, the cap, the publish and the
call are the loop's either way.

The wait loop (``_wait_in_c``, docs/compiled.md): when this worker watches
one ring and owes nothing else (no deferred request, no ring in
``_again`` or on a coalescing deadline, no metrics meter C does not count
for), the loop waits
in C instead (``FastOps.wait``): epoll_wait on this loop's epoll, and
while the ring's kick is the only fd ready C drains it, runs the batch,
publishes (progress record included) and calls, as ``_serve`` would. It
returns as soon as anything else is ready (the channel, the session's
wakeup fd: level-triggered, so this loop's poll sees them again), a chain
is Python's (the kick already drained: ``_serve`` at once), a signal came,
a reap is due (the shared words ``session.reap`` compares moved) or the
poll's timeout passed.

Deferred requests (a SETLKW that must wait, an fsync running on a helper
thread): the session keeps the chain (the token is the ``Chain`` itself)
and the loop calls ``session.retry()`` every ``RETRY_INTERVAL`` seconds
while it has any (an epoll timeout, so kicks keep being served meanwhile),
and at once when the session's ``wakeup_fd`` (a helper finished) is
readable. VRING_STOP and SHUTDOWN first answer them all with
``session.cancel_all()`` (EINTR), so a stopped ring owes the guest nothing.

Kick coalescing (``coalesce=(chains, seconds)``, the hiprio ring): after a
batch the loop asks the guest (EVENT_IDX's avail_event) to kick only once
``chains`` more wait, and looks by itself ``seconds`` later; a look that
finds nothing asks for a kick per chain again (and serves what slipped in
meanwhile). Without EVENT_IDX the guest kicks for every chain anyway, and
the loop does not coalesce. An idle ring costs no wake-ups and a lone
request is served at once, while a burst of FORGETs wakes the worker about
once per interval instead of once or twice per file.

Reap bells (``bells``, bells.py): a request worker also watches its
vring's bell and closes the fds of forgotten inodes (``session.reap``)
when it rings; the hiprio worker rings every bell after a batch that
moved the inode table's freed cursor, so an idle request worker closes
them while the guest is idle too, not at its next request.

Chains are released (``Chain.release``) once pushed, so a replaced memory
table can actually be unmapped (memory.py on lifetimes).

Every pop and publish also updates the ring's progress record in shared
memory (progress.py: two stores per pop, four per publish), so that the
supervisor can restart this worker's ring, and the replacement answer the
guest, if this process dies.
"""

from __future__ import annotations

import errno
import os
import select
import time
from typing import Callable

from daemon.log import RateLimitedLogger, get_logger
from daemon.virtio.memory import GuestMemory, GuestMemoryError
from daemon.virtio.virtqueue import VIRTIO_RING_F_EVENT_IDX, Chain, VirtQueue, VirtQueueError
from daemon.workers import progress as prog
from daemon.workers.channel import (PEER, PEER_GONE, PEER_KEEPER, PEER_SELF, VRING_CALL, VRING_START,
                                    VRING_START_RECOVER, VRING_STOP, Channel, ChannelError, Msg,
                                    check_request, close_fds, decode_mem_table)

log = get_logger("workers")

# with other request workers: the longest an idle worker keeps copies of
# fds released on another queue (session.reap after an idle poll)
PEER_REAP_INTERVAL = 1.0

RETRY_INTERVAL = 0.010  # seconds between session.retry() calls while requests wait
# without --coalesce: publish (and call the guest) after every PUBLISH_EVERY
# chains of a batch, so the guest reads those replies while the worker serves
# the rest (the C batch loop and the Python one alike)
PUBLISH_EVERY = 16
# FastOps.wait's answers (_fastops.c): another fd is ready (or a signal
# came), the ring is Python's to serve, timed out, a reap is due
WAIT_READY, WAIT_SERVE, WAIT_IDLE, WAIT_WATCH = range(4)


class Ring:
    """What this worker knows about one vring."""

    __slots__ = ("index", "queue", "kick_fd", "call_fd", "num", "addresses", "event_idx",
                 "last_avail_idx", "broken", "words", "popped")

    def __init__(self, index: int, record: tuple[memoryview, memoryview]):
        self.index = index
        self.queue: VirtQueue | None = None  # None while stopped or broken
        self.kick_fd: int | None = None      # set while the ring runs (even broken)
        self.call_fd: int | None = None
        self.num = 0
        self.addresses = (0, 0, 0)           # desc, avail, used QVAs
        self.event_idx = False
        self.last_avail_idx = 0              # the base while no queue exists
        self.broken = False
        self.words, self.popped = record     # its progress record (progress.py)

    @property
    def running(self) -> bool:
        return self.kick_fd is not None


class WorkerLoop:
    """Serves ``ring_indices`` for ``session`` until SHUTDOWN or a channel
    violation; ``run()`` returns the process exit status."""

    def __init__(self, channel: Channel, session, ring_indices, clock=time.monotonic, progress=None,
                 coalesce: tuple[int, float] | None = None, bells=None):
        self.channel = channel
        self.session = session
        # reap bells (bells.py): a request worker watches its own, the
        # hiprio worker rings them all after a batch that freed nodeids
        self._bell_fd = -1
        self._freed_table = None    # the hiprio worker's: whose freed cursor it watches
        self._freed_seen = 0
        if bells is not None:
            if 0 in ring_indices:
                self._freed_table = session.inodes
                self._freed_seen = session.inodes.cursor
            else:
                self._bell_fd = bells.fd(min(ring_indices))
        self._bells = bells
        # worker restart: each ring's progress record, shared with the
        # supervisor (progress.py); private memory when run without one
        if progress is None or max(ring_indices) >= progress.rings:
            progress = prog.RingProgress(max(ring_indices) + 1, shared=False)
        self.rings = {i: Ring(i, progress.record(i)) for i in ring_indices}
        self._deferred_slots: dict[Chain, int] = {}
        self.memory: GuestMemory | None = None
        self._epoll = select.epoll()
        self._by_kick_fd: dict[int, Ring] = {}
        self._deferred: dict[Chain, Ring] = {}
        self._again: list[Ring] = []  # rings whose last batch hit its cap
        self._clock = clock
        # (chains, seconds): after a batch the guest kicks again only once
        # that many chains wait (EVENT_IDX), and the loop looks by itself
        # after that long; a look that finds nothing returns the ring to a
        # kick per chain. For a ring whose requests may wait a little
        # (hiprio: FORGET). None: every chain kicks.
        self._coalesce = coalesce
        self._deadlines: dict[Ring, float] = {}
        self._guest_log = RateLimitedLogger(log)
        self._queue_class = _queue_class()  # compiled or pure (docs/compiled.md)
        self.use_fast_ops(_fast_ops(session))
        self._handlers = {
            Msg.MEM_TABLE: self._on_mem_table,
            Msg.VRING_START: self._on_vring_start,
            Msg.VRING_CALL: self._on_vring_call,
            Msg.VRING_STOP: self._on_vring_stop,
            Msg.SHUTDOWN: self._on_shutdown,
            Msg.PEER: self._on_peer,
        }

    def use_fast_ops(self, fast) -> None:
        """Serve requests whole in C with ``fast`` (fuse/fastpath.py's
        FastOps, None: all in Python): its batch loop (stage 3) or its
        ``serve(chain)`` (stage 2), as fastpath.batch_loop() says."""
        self._fast = fast
        self._fast_serve: Callable[[Chain], int] | None = None
        self._fast_batch: Callable[[object, memoryview, memoryview, int], int] | None = None
        self._fast_wait: Callable[..., tuple[int, int, int]] | None = None
        if fast is not None:
            from daemon.fuse import fastpath    # a worker: see _fast_ops
            if fastpath.batch_loop():
                self._fast_batch = fast.batch
                if fastpath.wait_loop():
                    self._fast_wait = fast.wait
                    self._reap_watch = fastpath.reap_watch
            else:
                self._fast_serve = fast.serve

    # -- the loop ------------------------------------------------------------
    def run(self) -> int:
        channel_fd = self.channel.fileno()
        self._epoll.register(channel_fd, select.EPOLLIN)
        session = self.session
        # readable when a blocking call (fsync) finished on a helper thread
        wakeup_fd = getattr(session, "wakeup_fd", -1)
        if wakeup_fd >= 0:
            self._epoll.register(wakeup_fd, select.EPOLLIN)
        bell_fd = self._bell_fd
        if bell_fd >= 0:
            self._epoll.register(bell_fd, select.EPOLLIN)
        next_retry = 0.0
        peers = getattr(session, "peers", None)
        try:
            while True:
                timeout: float
                if self._again:
                    timeout = 0
                elif session.has_pending():
                    timeout = max(0.0, next_retry - self._clock())
                elif peers is not None and peers.shared:
                    timeout = PEER_REAP_INTERVAL
                else:
                    timeout = -1
                if self._deadlines:
                    due = max(0.0, min(self._deadlines.values()) - self._clock())
                    timeout = due if timeout < 0 else min(timeout, due)
                events = None
                if self._fast_wait is not None and not self._again and not self._deadlines:
                    events = self._wait_in_c(timeout)
                if events is None:
                    events = self._epoll.poll(timeout)
                if not events and peers is not None and peers.shared:
                    session.reap()
                for fd, _events in events:
                    if fd == channel_fd:
                        status = self._on_channel()
                        if status is not None:
                            return status
                    elif fd == wakeup_fd:
                        session.drain_wakeup()
                        self._complete(session.retry())
                    elif fd == bell_fd:
                        _drain(fd)      # the hiprio worker freed nodeids
                        session.reap()
                    else:
                        ring = self._by_kick_fd.get(fd)
                        if ring is not None:
                            _drain(fd)
                            self._serve(ring)
                if self._again:
                    again, self._again = self._again, []
                    for ring in again:
                        self._serve(ring)
                if self._deadlines:
                    self._serve_due()
                if session.has_pending():
                    now = self._clock()
                    if now >= next_retry:
                        self._complete(session.retry())
                        next_retry = now + RETRY_INTERVAL
                elif self._deferred:
                    self._forget_dropped()
        except ChannelError as e:
            log.error("control channel: %s; exiting", e)
            return 1

    # -- the wait loop (docs/compiled.md) -------------------------------------
    def _wait_in_c(self, timeout: float) -> list | None:
        """Wait in C (``FastOps.wait``) while only this worker's one ring
        can need anything: C serves its kicks (batch, publish, call) and
        returns when any other fd is ready, a chain is Python's, a signal
        came, reaping is due or ``timeout`` passed. Entered only when the
        loop owes nothing else: no deferred request, no ring in ``_again``
        or on a coalescing deadline (the caller checks those two), no
        ``--coalesce`` (its ``kick_after`` is ``_serve``'s), no meter but
        one C counts wake-ups for (``FastOps.enable_batches``; a wake-up C
        hands over midway is counted by ``_serve``, with the chains C
        ``carried``). Returns the events
        for the loop (``[]``: nothing more to do) or None: poll as usual
        (whatever made C return is still ready: the epoll is
        level-triggered and C read nothing but the kicks it served)."""
        session = self.session
        if (len(self._by_kick_fd) != 1 or self._deferred or session.has_pending() or self._coalesce is not None
                or (session.meter is not None and not self._fast.counts_batches)):
            return None
        ((kick_fd, ring),) = self._by_kick_fd.items()
        queue = ring.queue
        core = getattr(queue, "core", None)
        if queue is None or core is None or ring.broken:
            return None
        call_fd = -1 if ring.call_fd is None else ring.call_fd
        timeout_ms = -1 if timeout < 0 else int(timeout * 1000)
        limit = min(queue.num, PUBLISH_EVERY)
        assert self._fast_wait is not None
        try:
            code, _served, carried = self._fast_wait(core, ring.words, ring.popped, self._epoll.fileno(), kick_fd,
                                                     call_fd, limit, timeout_ms, self._reap_watch(session))
        except OSError as e:
            # the call eventfd's write, as in _publish (the read of a
            # non-blocking kick fd and epoll_wait on our own fds do not fail)
            self._guest_log.warning("vring %d: wait loop: %s", ring.index, e.strerror)
            return None
        if code == WAIT_SERVE:
            self._serve(ring, carried)
            return []
        if code == WAIT_IDLE:
            return []
        if code == WAIT_WATCH:
            session.reap()
        return None

    # -- rings ---------------------------------------------------------------
    def _serve(self, ring: Ring, carried: int = 0) -> int:
        """One batch: pop, handle, push; publish once; call the guest.
        Returns how many chains it took. ``carried``: chains the wait
        loop in C served in this same wake-up (the meter counts them in
        this batch)."""
        queue = ring.queue
        if queue is None or ring.broken:
            return 0
        handle = self.session.handle
        fast, batch = self._fast_serve, self._fast_batch
        # stage 3: the core the C batch loop runs on (compiled.py), or None
        core = getattr(queue, "core", None)
        if core is None:
            batch = None
        push = queue.push  # bound once: the compiled core's own method (compiled.py)
        deferred = self._deferred
        words, popped = ring.words, ring.popped  # progress record (worker restart)
        num = queue.num
        served = 0
        early = self._coalesce is None   # publish every PUBLISH_EVERY chains
        try:
            while True:
                if batch is not None:
                    # C pops, serves, records and pushes what it can; n < 0:
                    # it served -1 - n and the next chain is Python's
                    limit = num - served
                    if early:
                        limit = min(limit, PUBLISH_EVERY)
                    n = batch(core, words, popped, limit)
                    if n >= 0:
                        served += n
                        if served == num:
                            self._again.append(ring)
                            break
                        if n == limit and early:
                            # answered so far goes to the guest now: it reads
                            # them while C serves the rest
                            self._publish(ring, queue)
                            continue
                        break
                    served += -1 - n
                chain = queue.pop()
                if chain is None:
                    break
                last = queue.last_avail_idx
                popped[(last - 1) & 1023] = chain.head  # progress.POPPED_MASK
                words[0] = last                         # progress.AVAIL
                # the op table's compiled rows first; -1: not one of theirs
                written = -1 if fast is None else fast(chain)
                if written < 0:
                    written = handle(chain.readable, chain.writable, chain)
                if written is None:
                    deferred[chain] = ring
                    self._deferred_slots[chain] = prog.add_deferred(words, chain.head)
                else:
                    push(chain.head, written)
                    chain.release()
                served += 1
                if served == num:
                    self._again.append(ring)
                    break
                if early and not served % PUBLISH_EVERY:
                    self._publish(ring, queue)   # as the C batch does
        except VirtQueueError as e:
            self._break(ring, e)
        if self._coalesce is not None and served and queue.event_idx and not ring.broken:
            # before the publish: a guest woken by this batch's call already
            # sees the new avail_event
            chains, interval = self._coalesce
            queue.kick_after(max(1, min(chains, queue.num // 2)))
            self._deadlines[ring] = self._clock() + interval
        self._publish(ring, queue)
        self.session.reap()
        if self._freed_table is not None:
            self._ring_bells()
        meter = self.session.meter
        if meter is not None and served + carried:
            meter.batch(served + carried, self.session)
        return served

    def _ring_bells(self) -> None:
        """The hiprio worker, after a batch: if it freed nodeids, wake the
        request workers to close their fds now (bells.py)."""
        assert self._freed_table is not None and self._bells is not None
        cursor = self._freed_table.cursor
        if cursor != self._freed_seen:
            self._freed_seen = cursor
            self._bells.ring()

    def _serve_due(self) -> None:
        """Coalescing rings whose interval ran out: serve what waits; if
        nothing does, back to a kick per chain (and serve what slipped in
        before the guest saw that)."""
        now = self._clock()
        for ring, due in list(self._deadlines.items()):
            if now < due:
                continue
            del self._deadlines[ring]
            queue = ring.queue
            if queue is None or ring.broken:
                continue
            if not self._serve(ring) and queue.kick_after(1):
                self._serve(ring)

    def _publish(self, ring: Ring, queue: VirtQueue, answered=()) -> None:
        """Store used.idx (and call the guest), keeping the progress record
        exact at every step (progress.py): ``answered`` are the DEFERRED
        slots of deferred chains this publish answers."""
        words = ring.words
        words[2] = queue.published_idx       # progress.PUB_FROM
        want = queue.publish()
        words[1] = queue.last_avail_idx      # progress.DONE
        for slot in answered:
            words[slot] = prog.EMPTY
        words[2] = queue.published_idx
        if want and ring.call_fd is not None:
            try:
                os.eventfd_write(ring.call_fd, 1)
            except OSError as e:
                self._guest_log.warning("vring %d: call eventfd: %s", ring.index, e.strerror)

    def _break(self, ring: Ring, error: VirtQueueError) -> None:
        """Stop serving a malformed ring; it stays "running" (kick fd open)
        for the supervisor's VRING_STOP, which answers its avail index."""
        self._guest_log.error("vring %d: %s; no longer served", ring.index, error)
        ring.broken = True
        self._deadlines.pop(ring, None)
        self._unwatch(ring)

    def _complete(self, completions) -> None:
        """Push deferred requests the session has finished."""
        touched: dict[Ring, list[int]] = {}
        for chain, written in completions:
            ring = self._deferred.pop(chain, None)
            if ring is None:
                log.warning("session completed a request this loop never deferred")
                continue
            slot = self._deferred_slots.pop(chain, -1)
            if self.session.meter is not None:
                self.session.meter.completed(chain.writable, written)
            if ring.queue is not None and not ring.broken:
                ring.queue.push(chain.head, written)
                answered = touched.setdefault(ring, [])
                if slot >= 0:
                    answered.append(slot)
            elif slot >= 0:
                ring.words[slot] = prog.EMPTY
            chain.release()
        for ring, answered in touched.items():
            assert ring.queue is not None       # touched only while it had one
            self._publish(ring, ring.queue, answered)

    def _forget_dropped(self) -> None:
        """Deferred chains the session no longer owes anything for: let go
        of their memory. A safety net: an ended session (DESTROY, a new
        INIT) answers its deferred requests with EINTR (session.py's
        _drop_local), collected by ``retry`` as any completion, and a ring
        stop answers them first (``_stop``)."""
        for chain, ring in self._deferred.items():
            slot = self._deferred_slots.pop(chain, -1)
            if slot >= 0:
                ring.words[slot] = prog.EMPTY
            chain.release()
        self._deferred.clear()

    def _start_queue(self, ring: Ring, last_avail_idx: int) -> None:
        """(Re)build ring.queue from the current memory; VirtQueueError if
        the ring does not fit in it."""
        if self.memory is None:
            raise VirtQueueError("no memory table")
        desc, avail, used = ring.addresses
        ring.queue = self._queue_class(self.memory, ring.num, desc, avail, used, last_avail_idx, ring.event_idx)

    def _drop_queue(self, ring: Ring) -> None:
        if ring.queue is not None:
            ring.last_avail_idx = ring.queue.last_avail_idx
            ring.queue.release()
            ring.queue = None

    def _watch(self, ring: Ring) -> None:
        assert ring.kick_fd is not None
        self._epoll.register(ring.kick_fd, select.EPOLLIN)
        self._by_kick_fd[ring.kick_fd] = ring

    def _unwatch(self, ring: Ring) -> None:
        if ring.kick_fd is not None and self._by_kick_fd.pop(ring.kick_fd, None) is not None:
            self._epoll.unregister(ring.kick_fd)

    def _stop(self, ring: Ring) -> None:
        """Answer what waits, publish, close the kick fd (ring stopped)."""
        if self._deferred:
            self._complete(self.session.cancel_all())
        if ring.queue is not None:
            self._publish(ring, ring.queue)
        self._drop_queue(ring)
        self._unwatch(ring)
        self._deadlines.pop(ring, None)
        if ring.kick_fd is not None:
            os.close(ring.kick_fd)
            ring.kick_fd = None
        if ring in self._again:
            self._again.remove(ring)

    # -- the channel ---------------------------------------------------------
    def _on_channel(self) -> int | None:
        msg, payload, fds = self.channel.recv()
        check_request(msg, payload, fds)   # size and fd count, for every request
        return self._handlers[msg](payload, fds)

    def _ring(self, index: int) -> Ring | None:
        ring = self.rings.get(index)
        if ring is None:
            log.error("supervisor addressed vring %d, not served here (%s)", index, sorted(self.rings))
        return ring

    def _on_mem_table(self, payload: bytes, fds: list[int]) -> None:
        try:
            regions = decode_mem_table(payload, len(fds))
        except ChannelError:
            close_fds(fds)
            raise
        try:
            memory = GuestMemory.from_regions(regions, fds)  # closes the fds
        except GuestMemoryError as e:
            log.error("memory table refused: %s", e)
            self.channel.answer(errno.EINVAL)
            return None
        running = [ring for ring in self.rings.values() if ring.queue is not None and not ring.broken]
        for ring in self.rings.values():
            self._drop_queue(ring)  # broken rings keep only their avail index
        if self.memory is not None:
            self.memory.close()
        self.memory = memory
        for ring in running:
            try:
                self._start_queue(ring, ring.last_avail_idx)
            except VirtQueueError as e:
                self._break(ring, e)
        self.channel.answer(0)
        return None

    def _on_vring_start(self, payload: bytes, fds: list[int]) -> None:
        index, num, desc, avail, used, last_avail_idx, flags, features = VRING_START.unpack(payload)
        kick_fd = fds[0]
        ring = self._ring(index)
        if ring is None or ring.running:
            os.close(kick_fd)
            self.channel.answer(errno.EINVAL if ring is None else errno.EBUSY)
            return None
        ring.num, ring.addresses = num, (desc, avail, used)
        ring.event_idx = bool(features >> VIRTIO_RING_F_EVENT_IDX & 1)
        try:
            self._start_queue(ring, last_avail_idx)
        except VirtQueueError as e:
            log.error("vring %d: cannot start: %s", index, e)
            os.close(kick_fd)
            self.channel.answer(errno.EINVAL)
            return None
        if flags & VRING_START_RECOVER:
            self._recover(ring)
        prog.reset(ring.words, ring.queue)
        os.set_blocking(kick_fd, False)
        ring.kick_fd = kick_fd
        ring.broken = False
        self._watch(ring)
        self.channel.answer(0)
        self._serve(ring)  # the guest may have queued requests before the start
        return None

    def _recover(self, ring: Ring) -> None:
        """This worker replaces one that died serving ``ring``: answer EIO
        to every chain it had taken and the guest still waits for."""
        queue = ring.queue
        assert queue is not None                # just started
        try:
            heads = prog.in_flight(ring.words, ring.popped, queue)
            for head in heads:
                try:
                    chain = queue.chain_at(head)
                except VirtQueueError as e:
                    self._guest_log.error("vring %d: cannot answer chain %d of the previous worker: %s",
                                          ring.index, head, e)
                    continue
                try:
                    written = prog.fail_chain(chain)
                except Exception as e:  # noqa: BLE001 - IoVecError; the guest's chain, not ours
                    self._guest_log.error("vring %d: chain %d: %s", ring.index, head, e)
                    written = 0
                queue.push(head, written)
                chain.release()
            self._publish(ring, queue, range(prog.DEFERRED, prog.DEFERRED + prog.MAX_DEFERRED))
        except VirtQueueError as e:
            self._guest_log.error("vring %d: answering the previous worker's requests: %s", ring.index, e)
            return
        if heads:
            log.warning("vring %d: answered %d request(s) of the previous worker with EIO",
                        ring.index, len(heads))

    def _on_vring_call(self, payload: bytes, fds: list[int]) -> None:
        index, has_fd = VRING_CALL.unpack(payload)
        if has_fd not in (0, 1) or len(fds) != has_fd:
            close_fds(fds)
            raise ChannelError(f"VRING_CALL has_fd={has_fd} with {len(fds)} fds")
        ring = self._ring(index)
        if ring is None:
            close_fds(fds)
            self.channel.answer(errno.EINVAL)
            return None
        if ring.call_fd is not None:
            os.close(ring.call_fd)
        ring.call_fd = fds[0] if fds else None
        self.channel.answer(0)
        return None

    def _on_vring_stop(self, payload: bytes, fds: list[int]) -> None:
        (index,) = VRING_STOP.unpack(payload)
        ring = self._ring(index)
        if ring is None:
            self.channel.answer(errno.EINVAL)
            return None
        self._stop(ring)
        self.channel.answer(0, ring.last_avail_idx)
        return None

    def _on_peer(self, payload: bytes, fds: list[int]) -> None:
        """Our serial, another request worker's pidfd, or its death; or a
        (new) keeper, which then gets a copy of every open file we hold."""
        peers = getattr(self.session, "peers", None)
        if peers is None:
            close_fds(fds)
            raise ChannelError("PEER to a worker without peers")
        serial, flags = PEER.unpack(payload)
        if flags == PEER_SELF and not fds:
            peers.set_self(serial)
        elif flags == PEER_GONE and not fds:
            peers.remove(serial)
        elif flags == 0 and len(fds) == 1:
            peers.add(serial, fds[0])
        elif flags == PEER_KEEPER and len(fds) == 3:
            peers.set_keeper(serial, fds[0], fds[1], fds[2])
            handles = getattr(self.session, "handles", None)
            if handles is not None:
                handles.resend()
        else:
            close_fds(fds)
            raise ChannelError(f"bad PEER flags {flags}")
        self.channel.answer(0)

    def _on_shutdown(self, payload: bytes, fds: list[int]) -> int:
        for ring in self.rings.values():
            self._stop(ring)
        self.channel.answer(0)
        return 0


def _drain(fd: int) -> None:
    """Reset a kick eventfd's counter (before scanning, so no kick is lost)."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass  # a spurious wakeup: allowed


def _fast_ops(session):
    """fastpath.fast_ops(session) for a request session (the requests served
    whole in C) or the hiprio session (FORGET and BATCH_FORGET in C), None
    otherwise; imported here for the reason ``_queue_class`` gives."""
    if getattr(session, "role", None) not in ("request", "hiprio"):
        return None
    from daemon.fuse import fastpath
    return fastpath.fast_ops(session)


def _queue_class() -> type[VirtQueue]:
    """The VirtQueue this worker builds: daemon.virtio.compiled's choice
    (the C core unless PYVIRTIOFSD_PURE=1 or it is not built), said once
    at start-up. Imported here, in the worker, never at module level: the
    supervisor imports this module and must not load compiled code
    (sandbox.preload imports it before the pivot)."""
    try:
        from daemon.virtio import compiled
    except ImportError as e:  # pragma: no cover - the module is pure Python
        log.info("virtqueue: pure-Python request path (%s)", e)
        return VirtQueue
    compiled.log_path()
    return compiled.VirtQueue
