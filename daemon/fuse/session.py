"""One FUSE session as a worker serves it: decode, dispatch, reply.

``FuseSession.handle(readable, writable, token)`` takes one descriptor
chain's readable and writable parts (``IoVec`` streams over guest memory)
and runs the request they carry. It never raises: every problem becomes a
FUSE error reply, or no reply when the chain has no room for one.

Checks, in order (all answered with ``fuse_out_header`` only):

- the readable part holds at least the 40-byte ``fuse_in_header``
  (else EINVAL, with unique 0: the Linux driver matches replies by chain,
  not by unique);
- ``header.len`` equals the readable part's size exactly (else EINVAL). The
  driver builds the readable part from exactly the request's arguments
  (docs/protocol.md, "Request layout"), so a mismatch is a malformed or hostile request, and
  neither padding it (the C virtiofsd's choice) nor ignoring extra bytes is
  right;
- the in-args of every op but WRITE are at most ``MAX_ARGS`` bytes (EINVAL);
  WRITE's data stays in guest memory (``req.data``);
- request extensions (``total_extlen``: the supplementary group of a
  creating op with FUSE_CREATE_SUPP_GROUP) are cut off the args into
  ``req.ext`` (extensions.py parses them);
- before INIT everything but INIT is EIO (request queues; the hiprio queue
  has no INIT and takes only FORGET, BATCH_FORGET and INTERRUPT: anything
  else there is dropped unanswered, with a rate-limited log line);
- a chain without a writable part, or one shorter than 16 bytes, gets no
  reply (FORGET and BATCH_FORGET never have one); any other op arriving
  like that is dropped *unexecuted* — its effects could not be reported;
- a writable part too small for the op's fixed-size reply (e.g. 16 + 128
  for LOOKUP) is EIO *before* the op runs, so no lookup count is taken for
  an entry the guest would never see; a variable-size payload that does not
  fit is ERANGE for GETXATTR/LISTXATTR and EIO otherwise.
- unknown or unimplemented opcodes: ENOSYS.

What each opcode needs (its handler, reply minimum, queue, no-reply,
ERANGE, caller credentials) is its row in the op table (ops.py). The
handler runs (see request.py for what it returns) with the worker's own
credentials: the guest kernel has checked the caller's permissions
already, and the ops that create inodes switch to the caller themselves
(``fs.as_caller``, which only their rows allow; docs/credentials.md). The
reply bytes are written by replies.py.

INIT (lifecycle.py) starts a new session each time (a remount, or a guest
reset without DESTROY): the inode table is reset (nodeid 1 = the share root), this
worker's O_PATH fds and open files are closed, and deferred requests of
the old session are dropped. DESTROY ends the session the same way and
answers with an empty reply; requests after it are EIO until the next INIT.

Deferred requests (SETLKW): a handler calls ``fs.defer(req, retry)`` and
returns ``DEFERRED``; ``handle`` then returns ``None`` and keeps the chain.
The worker calls ``retry()`` (e.g. on a timer, and after every batch while
``has_pending()``), which re-runs the retry callables and returns
``[(token, bytes written)]`` for every request that completed — including
ones answered EINTR by an INTERRUPT op — to push to the used ring.
``cancel_all()`` answers every pending request with EINTR (ring stop,
shutdown).
"""

from __future__ import annotations

import errno
import os
from stat import S_ISDIR as _S_ISDIR
from typing import Callable

from daemon.fuse import abi, credentials, idtranslate, ops, readonly, replies
from daemon.fuse.abi import Opcode
from daemon.fuse.blocking import BlockingCalls
from daemon.fuse.extensions import supp_groups
from daemon.fuse.fs import Handler
from daemon.fds import close_fds
from daemon.fuse.inodecache import InodeCache, inode_fd_budget
from daemon.fuse.inodes import InodeTable
from daemon.fuse.request import DEFERRED, MAX_ARGS, MAX_DEFERRED, FUSEError, Request
from daemon.virtio.iovec import IoVec

from daemon.fuse.handles import HandleTable, open_file_budget
from daemon.fuse.peers import Peers
from daemon.log import RateLimitedLogger, get_logger

log = get_logger("fuse.session")

_HDR = abi.IN_HEADER.size
_OUT = abi.OUT_HEADER.size
_WRITE = int(Opcode.WRITE)
_INIT = int(Opcode.INIT)
_unpack_in_from = abi.IN_HEADER.unpack_from
_WRITE_IN = abi.WRITE_IN.size
# the op table's columns the request path tests (ops.py)
_HIPRIO_OPS = ops.HIPRIO
_NO_REPLY = ops.NO_REPLY
_REPLY_MIN = ops.reply_needs(_OUT)
_opname = ops.name
_error = replies.error
_payload = replies.payload


class FuseSession:
    """The FUSE state of one worker process (see the module docstring).

    Attributes handlers use: ``config``, ``inodes`` (the shared
    ``InodeTable``), ``cache`` (this worker's ``InodeCache``), ``handles``
    (the open-file table), ``root_fd``, and the reply helpers
    ``attr_reply``, ``entry``, ``entry_reply``, ``negative_entry``: the
    ``FileSystem`` protocol (fs.py) lists them.
    """

    def __init__(self, config, inodes: InodeTable, role: str = "request",
                 root_fd: int | None = None):
        if role not in ("request", "hiprio"):
            raise ValueError(f"unknown role {role!r}")
        self.config = config
        self.inodes = inodes
        self.role = role
        self._hiprio = role == "hiprio"
        # the reply structs with --cache's timeouts (replies.py); bound
        # methods, so a handler's fs.attr_reply(st) is one call
        timeouts = (replies.Timeouts(config.cache.timeout) if config.ids is None or role == "hiprio"
                    else idtranslate.TranslatedTimeouts(config.cache.timeout, config.ids))
        self.attr_reply = timeouts.attr_out
        self.entry_reply = timeouts.entry_out
        self.negative_entry = timeouts.negative_entry
        # the shared session (InodeTable.session) this worker's caches and
        # fhs belong to; 0 = none
        self._session = 0
        self.root_fd = -1
        self._own_root = False
        # set below for the request role; the hiprio session's handlers
        # (FORGET, BATCH_FORGET, INTERRUPT) never touch them (fs.py)
        self.cache: InodeCache = None  # type: ignore[assignment]
        self.handles: HandleTable = None  # type: ignore[assignment]
        self.peers: Peers | None = None
        self._blocking: BlockingCalls | None = None
        self._closer: Callable[[list[int]], None] | None = None   # close_with
        # opcode -> handler (ops.py); the hiprio role has no file system
        # access at all: only reference counts
        self._ops: dict[int, Handler] = ops.handlers(hiprio=self._hiprio)
        if not self._hiprio:
            if config.readonly:
                readonly.restrict(self._ops)
            if root_fd is None:
                root_fd = os.open(config.shared_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                self._own_root = True
            self.root_fd = root_fd
            # fsync's helper threads (started on first use) and their
            # eventfd; they also close forgotten inodes' fds (blocking.py)
            self._blocking = BlockingCalls()
            # the other request workers, whose fds this one copies (peers.py)
            self.peers = Peers()
            self.cache = InodeCache(inodes, use_handles=config.file_handles, close_fds=self._close_later,
                                    max_fds=inode_fd_budget(config.inode_fds), peers=self.peers)
            self.handles = HandleTable(open_file_budget(config.max_open_files),
                                       files=getattr(inodes, "files", None), peers=self.peers)
            self.cache.through_open_file = self.handles.inode_fd
        self._readdirplus = int(Opcode.READDIRPLUS) in self._ops and config.offers_readdirplus
        self._locks = int(Opcode.SETLK) in self._ops
        self._submounts = config.announce_submounts
        # deferred requests: [token, req, retry]; completed: [(token, n)]
        self._pending: list[list] = []
        self._completed: list[tuple[object, int]] = []
        self._token = None
        self._current: Request | None = None
        self._log = RateLimitedLogger(log)
        # --metrics-socket: the worker's counters (daemon/metrics/counters.py)
        self.meter = None

    # -- the request path ------------------------------------------------------------
    def handle(self, readable: IoVec, writable: IoVec, token=None) -> int | None:
        """Run one request; returns the bytes written into ``writable`` (0
        for no reply), or None when the request was deferred."""
        meter = self.meter
        if meter is not None:
            start = meter.clock()
        try:
            written = self._handle(readable, writable, token)
        except Exception:  # noqa: BLE001 - the session never raises
            log.exception("FUSE session: internal error")
            try:
                written = _error(writable, 0, errno.EIO)
            except Exception:  # noqa: BLE001 - e.g. the guest memory went away
                written = 0
        if meter is not None:
            try:
                meter.request(readable, writable, written, meter.clock() - start)
            except Exception:  # noqa: BLE001 - counting never fails a request
                log.exception("metrics: counting failed")
        return written

    def _handle(self, readable: IoVec, writable: IoVec, token) -> int | None:
        size = readable.size
        if size < _HDR:
            self._log.warning("FUSE request shorter than its header (%d bytes)", size)
            return _error(writable, 0, errno.EINVAL)
        views = readable.views
        first = views[0]
        if len(first) >= _HDR:  # the driver's layout: the header is one buffer
            length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = _unpack_in_from(first)
        else:
            length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = \
                _unpack_in_from(readable.read(0, _HDR))
        if length != size:
            self._log.warning("FUSE %s: header.len %d but %d bytes readable",
                              _opname(opcode), length, size)
            return _error(writable, unique, errno.EINVAL)
        if self._hiprio and opcode not in _HIPRIO_OPS:
            self._log.warning("FUSE %s on the hiprio queue: dropped", _opname(opcode))
            return 0
        out_size = writable.size
        if out_size < _OUT and opcode not in _NO_REPLY:
            self._log.warning("FUSE %s without room for a reply: dropped", _opname(opcode))
            return 0
        handler = self._ops.get(opcode)
        if handler is None:
            return _error(writable, unique, errno.ENOSYS)
        session = self._session
        if (not session or session != self.inodes.session) and opcode != _INIT \
                and not self._hiprio:
            if not self._adopt():
                return _error(writable, unique, errno.EIO)
        nargs = length - _HDR
        data = None
        if opcode == _WRITE:
            if nargs < _WRITE_IN:
                return _error(writable, unique, errno.EINVAL)
            args = readable.read(_HDR, _WRITE_IN)
            data = IoVec(readable.slice(_HDR + _WRITE_IN, nargs - _WRITE_IN))
        elif not nargs:
            args = b""
        elif nargs > MAX_ARGS:
            self._log.warning("FUSE %s: %d bytes of arguments", _opname(opcode), nargs)
            return _error(writable, unique, errno.EINVAL)
        elif len(first) == _HDR and len(views[1]) == nargs:
            args = bytes(views[1])  # the driver's layout: the in-args are one buffer
        elif len(first) >= length:
            args = bytes(first[_HDR:length])
        else:
            args = readable.read(_HDR, nargs)
        ext = b""
        if extlen:
            cut = extlen * 8
            if cut > len(args):
                return _error(writable, unique, errno.EINVAL)
            ext = args[len(args) - cut:]
            args = args[:len(args) - cut]
        need = _REPLY_MIN.get(opcode)
        if need is not None and out_size < need:
            return _error(writable, unique, errno.EIO)
        req = Request(opcode, unique, nodeid, uid, gid, pid, args, data, writable, ext)
        self._token = token
        self._current = req
        try:
            result = handler(self, req)
            if result is DEFERRED:
                pending = self._pending
                if pending and pending[-1][1] is req:
                    return None
                raise RuntimeError("handler returned DEFERRED without fs.defer()")
            n = _payload(writable, unique, result)
            return n if n >= 0 else self._too_big(req, result)
        except FUSEError as e:
            return _error(writable, unique, e.errno)
        except OSError as e:
            return _error(writable, unique, e.errno or errno.EIO)
        except Exception:  # noqa: BLE001 - a bug in a handler: EIO, keep serving
            log.exception("FUSE %s (nodeid %d) failed", _opname(opcode), nodeid)
            return _error(writable, unique, errno.EIO)
        finally:
            self._current = None
            self._token = None

    def _reply(self, req: Request, result) -> int:
        """Answer ``req`` with a handler's result (replies.py)."""
        n = _payload(req.out, req.unique, result)
        return n if n >= 0 else self._too_big(req, result)

    def _too_big(self, req: Request, result) -> int:
        """A payload larger than the writable part: the op's error (ops.py:
        ERANGE for GETXATTR/LISTXATTR, which the guest asks again with a
        size; else EIO, logged)."""
        err = ops.too_big(req.opcode)
        if err == errno.EIO:
            self._log.warning("FUSE %s: %d-byte reply, %d-byte buffer",
                              _opname(req.opcode), len(result), req.out.size - _OUT)
        return _error(req.out, req.unique, err)

    # -- deferred requests ---------------------------------------------------------
    def can_defer(self) -> bool:
        """Room for one more deferred request: at most MAX_DEFERRED wait at
        once, as many as a worker restart can answer (progress.py)."""
        return len(self._pending) < MAX_DEFERRED

    def defer(self, req: Request, retry) -> None:
        """Keep ``req`` (the request being handled) for ``retry()``: the
        handler then returns ``DEFERRED``. ``retry`` takes no arguments and
        returns/raises what a handler does; it runs with req's credentials.
        The handler asks ``can_defer()`` first."""
        if req is not self._current:
            raise RuntimeError("defer() outside the request's handler")
        if not self.can_defer():
            raise RuntimeError(f"defer() with {MAX_DEFERRED} requests deferred already")
        self._pending.append([self._token, req, retry])

    def defer_blocking(self, req: Request, fn, *args):
        """Run ``fn(*args)``, a call that may block for long (fsync), on a
        helper thread (blocking.py) and defer ``req``; it is answered with
        an empty reply, or the call's errno, once the call returns. Returns
        ``DEFERRED`` for the handler to return. ``fn`` must not touch the
        session or guest memory. Without a helper thread (none can start),
        or with MAX_DEFERRED requests already deferred (all a worker
        restart could answer), the call runs here and its reply is
        returned instead."""
        call = None
        if self._blocking is not None and self.can_defer():
            try:
                call = self._blocking.submit(fn, *args)
            except RuntimeError:  # no helper thread could start
                pass
        if call is None:
            fn(*args)
            return b""

        def collect():
            if not call.done:
                return DEFERRED
            if call.error:
                raise FUSEError(call.error)
            return b""

        self.defer(req, collect)
        return DEFERRED

    def close_with(self, closer: Callable[[list[int]], None]) -> None:
        """Close forgotten inodes' fds with ``closer`` from now on instead
        of on the helper threads: the compiled ops' ``close_later``
        (fastpath.fast_ops; its thread never takes the GIL, _closer.h)."""
        self._closer = closer

    def _close_later(self, fds: list[int]) -> None:
        """Close ``fds`` (forgotten inodes) off this thread: with the
        ``close_with`` closer if one was given, else on a helper thread;
        here if none can run."""
        if self._closer is not None:
            self._closer(fds)
            return
        assert self._blocking is not None     # the request role's cache calls this
        try:
            self._blocking.submit(close_fds, fds, notify=False)
        except RuntimeError:
            close_fds(fds)

    @property
    def wakeup_fd(self) -> int:
        """An fd that becomes readable when a blocking call finished (the
        loop then calls ``retry()``); -1 in a role without helpers."""
        return -1 if self._blocking is None else self._blocking.wakeup_fd

    def drain_wakeup(self) -> None:
        if self._blocking is not None:
            self._blocking.drain()

    def has_pending(self) -> bool:
        """Deferred requests waiting, or completions not yet collected."""
        return bool(self._pending or self._completed)

    def retry(self) -> list[tuple[object, int]]:
        """Re-run every deferred request; (token, bytes written) for each
        one that completed (and for those an INTERRUPT answered)."""
        done, self._completed = self._completed, []
        if not self._pending:
            return done
        waiting = []
        for entry in self._pending:
            token, req, fn = entry
            try:
                result = fn()
                if result is DEFERRED:
                    waiting.append(entry)
                    continue
                n = self._reply(req, result)
            except FUSEError as e:
                n = _error(req.out, req.unique, e.errno)
            except OSError as e:
                n = _error(req.out, req.unique, e.errno or errno.EIO)
            except Exception:  # noqa: BLE001
                log.exception("FUSE %s retry failed", _opname(req.opcode))
                n = _error(req.out, req.unique, errno.EIO)
            done.append((token, n))
        self._pending = waiting
        return done

    def interrupt(self, unique: int) -> bool:
        """Answer the deferred request ``unique`` with EINTR (collected by
        the next ``retry()``). False if no such request is waiting."""
        for i, (token, req, _fn) in enumerate(self._pending):
            if req.unique == unique:
                del self._pending[i]
                self._completed.append((token, _error(req.out, unique, errno.EINTR)))
                return True
        return False

    def cancel_all(self) -> list[tuple[object, int]]:
        """Answer every deferred request with EINTR; returns all completions
        not yet collected."""
        done, self._completed = self._completed, []
        pending, self._pending = self._pending, []
        for token, req, _fn in pending:
            done.append((token, _error(req.out, req.unique, errno.EINTR)))
        return done

    # -- sessions --------------------------------------------------------------------
    def start(self) -> None:
        """Begin a new session (INIT): fresh inode table, no fds, no fhs.
        Every other request worker adopts it on its next request. The
        shared tables are reset before this worker closes its fds: another
        worker may copy an fd only while its slot lives (fuse/peers.py)."""
        st = os.fstat(self.root_fd)
        self._session = self.inodes.begin_session(st.st_dev, st.st_ino)
        self._drop_local()
        self.cache.reset(self.root_fd)

    def end(self) -> None:
        """End the session (DESTROY, or worker exit); the shared tables
        first, then this worker's fds (see ``start``)."""
        if self._session and self._session == self.inodes.session:
            st = os.fstat(self.root_fd)
            self.inodes.end_session(st.st_dev, st.st_ino)  # frees every nodeid
        self._drop_local()
        self._session = 0

    def _adopt(self) -> bool:
        """Another request worker ran INIT or DESTROY: drop what this worker
        held for the old session and serve the current one, if any."""
        self._drop_local()
        self._session = self.inodes.session
        if not self._session:
            return False
        self.cache.reset(self.root_fd)
        return True

    def _drop_local(self) -> None:
        """Forget this worker's own state: deferred requests, fhs, fds."""
        credentials.restore()
        if self._pending:
            # each still owns its chain: answered (EINTR), never lost, or the
            # guest's request would wait for ever and the worker keep its views
            log.info("answering %d deferred requests of the old FUSE session with EINTR",
                     len(self._pending))
            self._completed = self.cancel_all()
        if self.handles is not None:
            self.handles.reset()
        if self.cache is not None:
            self.cache.clear()

    def close(self) -> None:
        """Release what this worker holds (worker exit, tests). The shared
        session lives on for the other request workers."""
        self._drop_local()
        self._session = 0
        if self._blocking is not None:
            self._blocking.close()
        if self.peers is not None:
            self.peers.close()
        if self._own_root and self.root_fd >= 0:
            os.close(self.root_fd)
        self.root_fd = -1

    def as_caller(self, req: Request):
        """Context for the syscall that creates an inode: the caller's
        fsuid/fsgid and the supplementary group its extension names
        (credentials.as_caller; EINVAL for a malformed extension), translated
        by --translate-uid/--translate-gid (EPERM for a forbidden id). Only
        for the ops whose row in ops.py says ``as_caller``."""
        if req.opcode not in ops.AS_CALLER:
            raise RuntimeError(f"FUSE {_opname(req.opcode)} asked for the caller's credentials")
        groups = supp_groups(req.ext) if req.ext else ()
        ids = self.config.ids
        if ids is not None:     # --translate-uid/--translate-gid (idtranslate.py)
            return credentials.as_caller(*ids.host_ids(req.uid, req.gid, groups))
        return credentials.as_caller(req.uid, req.gid, groups)

    def warn(self, msg: str, *args) -> None:
        """A rate-limited warning, for guest-triggered oddities."""
        self._log.warning(msg, *args)

    def reap(self) -> int:
        """Close the O_PATH fds of nodeids freed by FORGET (in any process).
        The worker loop calls this after each batch is published, and the
        closes themselves run on a helper thread (blocking.py): the last
        close of an unlinked file frees its host inode, which may wait for
        the disk. A stale cached fd is harmless meanwhile, since
        ``InodeCache.fd`` checks the nodeid's generation."""
        cache = self.cache
        if cache is None:
            return 0
        try:
            self.handles.reap()
            return cache.reap()
        except Exception:  # noqa: BLE001 - pragma: no cover
            log.exception("closing forgotten inodes' fds failed")
            return 0

    # -- reply helpers for handlers (attr_reply, entry_reply, negative_entry: __init__) --
    def entry(self, parent_fd: int, name) -> bytes:
        """Look ``name`` up in the parent (O_PATH|O_NOFOLLOW), +1 lookup on
        it, and return its ``fuse_entry_out``. OSError/FUSEError on failure
        (then no count was taken)."""
        nodeid, generation, st = self.cache.lookup(parent_fd, name)
        if self._submounts and _S_ISDIR(st.st_mode) and st.st_dev != os.fstat(parent_fd).st_dev:
            # --announce-submounts: another file system is mounted here; the
            # guest mounts it apart, with a device number of its own
            return self.entry_reply(st, nodeid, generation, abi.FUSE_ATTR_SUBMOUNT)
        return self.entry_reply(st, nodeid, generation)
