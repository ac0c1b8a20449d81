"""Frame slots: the shared memory through which a decoder process hands its frames to the worker.

One region per :class:`~worker.media.isolation.DecoderProcess`: an anonymous file (``memfd_create``) of
``count`` slots of ``slot_bytes`` each, mapped by the worker (:class:`FrameSlots`) and by the child
(:class:`SlotWriter`, the fd inherited with ``pass_fds``). A slot holds one frame chunk. The default,
:data:`DEFAULT_SLOTS` slots of :data:`DEFAULT_SLOT_BYTES` (one chunk of the default request: 16 frames of
224 x 224 x 3), is 9.6 MB of address space per decoder process in both processes; pages are
allocated when first written, so a decoder that never fills its slots costs less. The pages are shared
(``RssShmem``: they show in both processes' RSS and in the child's peak RSS, ``rss_kb``) and count
against the child's ``RLIMIT_AS``.

Protocol (interpretation of the lock-step ``next``, :mod:`worker.media.wire`): the worker offers a free
slot with each ``next`` (``-1`` when none is free); the child copies the chunk's frames into it and
answers ``frames`` naming that slot, without payload, or sends the frames on the socket (``slot: -1``)
when it was offered none or the chunk does not fit. A slot offered but not filled returns to the free
list at once (:meth:`FrameSlots.withdraw`).

Lifetime: the worker's frames are a zero-copy NumPy view of the slot (:meth:`FrameSlots.view`). The
slot returns to the free list when the last reference to that array *and every view of it* is gone: the
finalizer sits on the array :func:`numpy.frombuffer` made, which is the ``base`` of every view derived
from it (NumPy stops collapsing a view's base at an array whose own base is a buffer object), and
CPython runs it on the last decref, in whichever thread drops it. The engine copies frames out when it
assembles a batch, so slots come back within a batch's wait; a consumer that keeps its frames simply
runs out of slots and gets the rest on the socket, as before slots existed. The region is never
unmapped explicitly: each mapping goes away with the last array that uses it, so a decoder process that
is killed or replaced does not invalidate frames the engine still holds, and a new process always
gets a new region.

Trust: the child can write anywhere in its own region at any time, so frames it delivered stay writable
by it until the worker drops them (the engine copies them into a batch within ``batch_max_wait_s``). A
child subverted by a hostile file could therefore alter not-yet-batched frames of an earlier video it
decoded itself, never memory outside its region. The free list is a plain list (``append``/``pop`` are
atomic under the GIL), so a finalizer can return a slot from any thread, or from the garbage collector
in the middle of :meth:`FrameSlots.offer`, without a lock to deadlock on.
"""

from __future__ import annotations

import math
import mmap
import os
import weakref

import numpy as np

DEFAULT_SLOTS = 4
DEFAULT_SLOT_BYTES = 16 * 224 * 224 * 3


class FrameSlots:
    """The worker's side of one decoder process's region (``count`` 0: no region, every chunk on the socket)."""

    def __init__(self, count: int, slot_bytes: int) -> None:
        if count > 0 and slot_bytes > 0 and hasattr(os, "memfd_create"):
            self.count, self.slot_bytes = count, slot_bytes
            self.fd = os.memfd_create("tagstream-frames", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, count * slot_bytes)
            self._map: mmap.mmap | None = mmap.mmap(self.fd, count * slot_bytes)
        else:
            self.count, self.slot_bytes, self.fd, self._map = 0, 0, -1, None
        self._free = list(range(self.count))
        self._lent: set[int] = set()

    def child_args(self) -> list[str]:
        """The child's command-line options for this region (none without one)."""
        if self.fd < 0:
            return []
        return ["--frames-fd", str(self.fd), "--frame-slots", str(self.count), "--slot-bytes", str(self.slot_bytes)]

    def close_fd(self) -> None:
        """Close the worker's fd once the child has inherited it (the mapping keeps the region alive)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def free(self) -> int:
        """How many slots are free now."""
        return len(self._free)

    def offer(self) -> int:
        """Take a free slot to offer with ``next``; -1 when none is free."""
        try:
            return self._free.pop()
        except IndexError:
            return -1

    def fits(self, shape: tuple[int, ...]) -> bool:
        return self._map is not None and math.prod(shape) <= self.slot_bytes

    def view(self, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        """The uint8 frames the child wrote into ``slot`` (``fits(shape)``), without a copy; the slot is
        lent until the last view of the result is gone."""
        assert self._map is not None and 0 <= slot < self.count
        base = np.frombuffer(self._map, np.uint8, count=math.prod(shape), offset=slot * self.slot_bytes)
        self._lent.add(slot)
        weakref.finalize(base, self._returned, slot)
        return base.reshape(shape)

    def withdraw(self, slot: int) -> None:
        """``slot`` was offered; back to the free list unless its frames were lent out (-1: nothing)."""
        if slot >= 0 and slot not in self._lent:
            self._free.append(slot)

    def _returned(self, slot: int) -> None:
        self._lent.discard(slot)
        self._free.append(slot)


class SlotWriter:
    """The child's side: ``count`` slots of ``slot_bytes`` in the region inherited as ``fd`` (-1: none)."""

    def __init__(self, fd: int, count: int, slot_bytes: int) -> None:
        self.count, self.slot_bytes = (count, slot_bytes) if fd >= 0 else (0, 0)
        self._map = mmap.mmap(fd, count * slot_bytes) if fd >= 0 else None
        if fd >= 0:
            os.close(fd)

    def write(self, slot: int, frames: np.ndarray) -> bool:
        """Copy uint8 ``frames`` into ``slot``; False (nothing written) when no valid slot was offered or
        they do not fit, and the frames go on the socket instead."""
        if self._map is None or not 0 <= slot < self.count or frames.size > self.slot_bytes:
            return False
        out = np.frombuffer(self._map, np.uint8, count=frames.size, offset=slot * self.slot_bytes)
        np.copyto(out.reshape(frames.shape), frames)
        return True
