"""A descriptor chain's readable or writable part as one byte stream.

The virtio rule is that descriptor boundaries carry no meaning: a FUSE request
is the concatenation of the chain's device-readable buffers, its reply goes
into the concatenation of the device-writable ones. ``IoVec`` is that view: a
list of ``memoryview`` slices of guest memory (already bounds-checked by
``GuestMemory``) with stream-style access that copies only what a caller asks
for, and hands out sub-lists of views for ``os.preadv``/``os.pwritev`` so file
data never passes through a Python ``bytes`` object.
"""

from __future__ import annotations


class IoVecError(Exception):
    """An access past the end of the stream."""


class IoVec:
    __slots__ = ("views", "size")

    def __init__(self, views: list[memoryview]):
        self.views = views
        self.size = sum(len(v) for v in views)

    def __len__(self) -> int:
        return self.size

    # -- reading -----------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Copy ``length`` bytes starting at ``offset``; IoVecError if short."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise IoVecError(f"read {offset}+{length} beyond {self.size}")
        views = self.views
        first = views[0] if views else None
        if first is not None and offset + length <= len(first):
            return bytes(first[offset:offset + length])
        return b"".join(bytes(v) for v in self.slice(offset, length))

    # -- writing -----------------------------------------------------------
    def write(self, offset: int, data) -> int:
        """Copy ``data`` in at ``offset``; IoVecError if it does not fit."""
        length = len(data)
        if offset < 0 or offset + length > self.size:
            raise IoVecError(f"write {offset}+{length} beyond {self.size}")
        src = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data
        pos = 0
        for v in self.slice(offset, length):
            n = len(v)
            v[:] = src[pos:pos + n]
            pos += n
        return length

    # -- scatter lists -----------------------------------------------------
    def slice(self, offset: int, length: int) -> list[memoryview]:
        """The views covering ``[offset, offset+length)``, for preadv/pwritev.

        The result may be shorter than ``length`` only if the stream is;
        callers that need the exact length check ``len`` against ``size``.
        """
        out: list[memoryview] = []
        if length <= 0:
            return out
        for v in self.views:
            n = len(v)
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, length)
            out.append(v[offset:offset + take] if (offset or take != n) else v)
            length -= take
            offset = 0
            if length == 0:
                break
        return out

    def release(self) -> None:
        """Drop every view so the guest memory mapping can be closed."""
        for v in self.views:
            v.release()
        self.views = []
        self.size = 0
