"""The events decode threads send the batcher thread (one bounded queue; see :mod:`worker.engine.pipeline`).

Each names the video (its :class:`~worker.engine.buffers.VideoAccumulator`) it belongs to, except
:class:`BatchDone`, which only wakes the batcher when an inference batch finished. A video's events
arrive in this order: :class:`Started`, then :class:`Frames` and :class:`AudioPatches` interleaved by
time, then :class:`Decoded` or :class:`DecodeFailed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.engine.buffers import VideoAccumulator
from worker.errors import TagstreamError
from worker.media.records import DecodeStats, MediaInfo


@dataclass(frozen=True, slots=True)
class Started:
    """A decode thread picked the video up (its title can be batched now)."""

    video: VideoAccumulator


@dataclass(frozen=True, slots=True)
class Frames:
    """Sampled frames: ``(n,)`` seconds and ``(n, S, S, 3)`` uint8 RGB."""

    video: VideoAccumulator
    timestamps: np.ndarray
    frames: np.ndarray


@dataclass(frozen=True, slots=True)
class AudioPatches:
    """``(n, 96, 64)`` log-mel patches, 0.96 s each, in order."""

    video: VideoAccumulator
    patches: np.ndarray


@dataclass(frozen=True, slots=True)
class Decoded:
    """The decode finished: what the container said, what the decoder did, and the decode's wall time
    (excluding time blocked on the event queue)."""

    video: VideoAccumulator
    info: MediaInfo
    stats: DecodeStats
    decode_s: float


@dataclass(frozen=True, slots=True)
class DecodeFailed:
    """The decode failed; the video fails with ``error``."""

    video: VideoAccumulator
    error: TagstreamError


@dataclass(frozen=True, slots=True)
class BatchDone:
    """An inference batch finished (wakes the batcher; it applies finished batches in order)."""


Event = Started | Frames | AudioPatches | Decoded | DecodeFailed | BatchDone
