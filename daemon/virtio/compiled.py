"""The request workers' virtqueue: compiled core, or the pure-Python reference.

``VirtQueue`` here is what a worker's loop builds. It is the C core of
``_vqcore.c`` (pop, the chain walk, push, publish) wrapped in the
interface of ``virtqueue.VirtQueue`` when the extension is built, and
``virtqueue.VirtQueue`` itself when it is not or when the environment says
``PYVIRTIOFSD_PURE=1``. Both return the same ``Chain``/``IoVec`` objects
(memoryview slices of guest memory) and raise the same ``VirtQueueError``
with the same message for every malformed ring or chain: the pure path is
the reference (tests/unit/test_compiled_equivalence.py compares them).

Only worker processes import this module (the supervisor imports
virtqueue.py for ``EVENT_IDX_SUPPORTED``, never this): compiled code that
reads guest bytes runs only inside a confined worker. ``PATH`` names the path
in use; the worker logs it once at start-up (``log_path``).
"""

from __future__ import annotations

import os
from typing import Any

from daemon.config import PURE_ENV, pure_requested
from daemon.log import get_logger
from daemon.virtio import virtqueue as _pure
from daemon.virtio.iovec import IoVec
from daemon.virtio.memory import GuestMemoryError
from daemon.virtio.virtqueue import Chain, VirtQueueError

log = get_logger("virtio")



try:
    from daemon.virtio import _vqcore as _ext  # type: ignore[attr-defined]  # C, no stubs
    _ext_error = ""
except ImportError as e:  # not built: no compiler or headers at install time
    _ext = None
    _ext_error = str(e)


def _choose():
    """(the _vqcore module or None, why)."""
    if pure_requested():
        return None, f"{PURE_ENV}={os.environ[PURE_ENV]}"
    if _ext is None:
        return None, f"extension not built: {_ext_error}"
    return _ext, "extension daemon.virtio._vqcore"


_core, _why = _choose()
EXTENSION_BUILT = _ext is not None


class CompiledVirtQueue(_pure.VirtQueue):
    """``virtqueue.VirtQueue`` with pop/walk/push/publish in C. The base
    class checks the parameters and makes the ring views; the core holds
    buffer exports of them (``release`` drops those first)."""

    __slots__ = ("_c",)
    _c: Any          # the _vqcore.Core (None until made)

    def __init__(self, mem, num, desc_qva, avail_qva, used_qva, last_avail_idx, event_idx):
        self._c = None
        super().__init__(mem, num, desc_qva, avail_qva, used_qva, last_avail_idx, event_idx)
        hot_start, hot_end, hot_view = self._hot
        # the core exports a slice of the region's view, never the view
        # itself: GuestMemory.close() must be able to release that one
        try:
            self._c = _ext.Core(self._desc, self._avail, self._used_elems, num, self.event_idx,
                                 last_avail_idx, self._used_idx, hot_start, hot_end, hot_view[:],
                                 mem.gpa_views, Chain, IoVec, VirtQueueError)
        except BaseException:
            super().release()
            raise

    # the core owns these indexes; the base class's __init__ sets the first
    # before the core exists
    @property
    def last_avail_idx(self) -> int:
        return self._c.last_avail_idx

    @last_avail_idx.setter
    def last_avail_idx(self, value: int) -> None:
        if self._c is not None:
            self._c.last_avail_idx = value

    def pop(self) -> Chain | None:
        try:
            return self._c.pop()
        except GuestMemoryError as e:
            raise VirtQueueError(f"chain {self._c.last_head}: {e}") from None

    def chain_at(self, head: int) -> Chain:
        try:
            return self._c.chain_at(head)
        except GuestMemoryError as e:
            raise VirtQueueError(f"chain {head}: {e}") from None

    @property
    def core(self):
        """The ``_vqcore.Core`` itself: the batch loop of the compiled FUSE
        ops (fuse/fastpath.py, stage 3) pops, serves and pushes on it in C."""
        return self._c

    @property
    def push(self):
        """The core's own ``push(head, written)`` (no Python frame per call:
        the worker loop binds it once per batch)."""
        return self._c.push

    def publish(self) -> bool:
        return self._c.publish()

    @property
    def pending(self) -> int:
        return (self._c.used_idx - self._c.published_idx) & 0xFFFF

    @property
    def published_idx(self) -> int:
        return self._c.published_idx

    def release(self) -> None:
        if self._c is not None:
            self._c.release()
        super().release()


VirtQueue = _pure.VirtQueue if _core is None else CompiledVirtQueue
PATH = ("compiled" if _core is not None else "pure-Python") + f" request path ({_why})"
_logged = False


def log_path() -> None:
    """Say once per process (info) which path this worker runs."""
    global _logged
    if not _logged:
        _logged = True
        log.info("virtqueue: %s", PATH)
