"""Cross-video batching: a size-or-wait buffer and the per-video accumulator its results scatter into.

:class:`SizeOrWaitBuffer` collects items (frames, audio patches, titles' token ids) of many videos. A batch is
*due* when it holds ``max_size`` items, or when its oldest item has waited ``max_wait`` seconds,
whichever comes first; :meth:`SizeOrWaitBuffer.take` then removes up to ``max_size`` items, splitting
a video's segment across two batches when needed. Each batch remembers which slice of it belongs to
which owner (video), so results are scattered back in order: a video's items keep their order across
batches because the buffer is FIFO and batches are run one after another.

:class:`VideoAccumulator` is one in-flight video on the batcher side: its future, the features that
came back so far, how many of its items are still pending in buffers, and the per-stage timings.

Time attribution (documented contract of ``timings_s``): when a batch of ``n`` items takes ``t``
seconds, a video that owns ``k`` of those items is charged ``t * k / n`` for that stage, so the
per-video ``image``/``audio``/``text`` timings add up to the extractor's busy time.

Nothing here starts threads or touches a network; the clock is passed in, so the semantics are
unit-testable. The batches run through the extractors in :mod:`worker.engine.inference`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np

from worker.engine.request import VideoRequest
from worker.media.records import DecodeStats, MediaInfo

Owner = TypeVar("Owner")
#: What a buffer holds: a NumPy array stacked along axis 0 (frames, audio patches) or a list (titles' token ids).
Items = np.ndarray | list[Any]
#: ``allocate(shape, dtype)``: an empty array a batch of NumPy items is assembled into.
Allocate = Callable[[tuple[int, ...], np.dtype], np.ndarray]


class Part(NamedTuple, Generic[Owner]):
    """The slice ``items[start:stop]`` of a batch belongs to ``owner``."""

    owner: Owner
    start: int
    stop: int


@dataclass
class Batch(Generic[Owner]):
    """A batch: ``items`` (a NumPy array concatenated along axis 0, or a list) and ``parts``, the
    slices of ``items`` per owner, in order."""

    items: Items
    parts: list[Part[Owner]]

    def __len__(self) -> int:
        return len(self.items)

    def owners(self) -> list[Owner]:
        seen: dict[int, Owner] = {}
        for owner, _, _ in self.parts:
            seen.setdefault(id(owner), owner)
        return list(seen.values())

    def subset(self, owner: Owner) -> tuple[Items, int]:
        """The items of one owner, and how many there are (for per-video retries)."""
        pieces = [self.items[a:b] for o, a, b in self.parts if o is owner]
        if isinstance(self.items, np.ndarray):
            data = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
        else:
            data = [x for piece in pieces for x in piece]
        return data, len(data)


@dataclass
class _Segment(Generic[Owner]):
    """Pending items of one owner (``items`` shrinks when a batch takes only its front)."""

    owner: Owner
    items: Items
    arrived_at: float  # time.monotonic()


class SizeOrWaitBuffer(Generic[Owner]):
    """FIFO of ``(owner, items)`` segments; a batch is due at ``max_size`` items or after ``max_wait``
    seconds since the oldest pending item arrived, whichever first.

    ``items`` are NumPy arrays (stacked along axis 0) or lists (e.g. token ids). ``now`` arguments are
    ``time.monotonic()`` values; they are parameters so tests control the clock. With ``allocate``, every
    batch of arrays is copied into ``allocate(shape, dtype)`` (the worker passes pinned host memory on
    CUDA, so the batch goes to the device without another copy); without, a batch of one segment is that
    segment itself and several are concatenated into a new array.
    """

    def __init__(self, name: str, max_size: int, max_wait: float, allocate: Allocate | None = None) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        self.name = name
        self.max_size = int(max_size)
        self.max_wait = float(max_wait)
        self.allocate = allocate
        self._segments: deque[_Segment[Owner]] = deque()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, owner: Owner, items: Items, now: float | None = None) -> None:
        if len(items) == 0:
            return
        self._segments.append(_Segment(owner, items, time.monotonic() if now is None else now))
        self._count += len(items)

    def oldest(self) -> float | None:
        return self._segments[0].arrived_at if self._segments else None

    def time_left(self, now: float) -> float | None:
        """Seconds until the pending batch is due (0 when due now), None when empty."""
        if not self._segments:
            return None
        if self._count >= self.max_size:
            return 0.0
        return max(0.0, self._segments[0].arrived_at + self.max_wait - now)

    def due(self, now: float) -> bool:
        left = self.time_left(now)
        return left is not None and left <= 0.0

    def take(self) -> Batch[Owner]:
        """Remove and return up to ``max_size`` items from the front (a segment may be split)."""
        taken: list[tuple[Owner, Items]] = []
        room = self.max_size
        while self._segments and room > 0:
            seg = self._segments[0]
            owner, items = seg.owner, seg.items
            if len(items) <= room:
                self._segments.popleft()
                taken.append((owner, items))
                room -= len(items)
            else:
                taken.append((owner, items[:room]))
                seg.items = items[room:]
                room = 0
        n = self.max_size - room
        self._count -= n
        parts: list[Part[Owner]] = []
        start = 0
        for owner, items in taken:
            parts.append(Part(owner, start, start + len(items)))
            start += len(items)
        if taken and isinstance(taken[0][1], np.ndarray):
            arrays = [items for _, items in taken]
            if self.allocate is not None:  # the batch is assembled in the caller's memory (pinned, on CUDA)
                first = arrays[0]
                data: Items = np.concatenate(arrays, out=self.allocate((n, *first.shape[1:]), first.dtype))
            else:
                data = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        else:
            data = [x for _, items in taken for x in items]
        return Batch(items=data, parts=parts)

    def discard(self, owner: Owner) -> int:
        """Drop every pending item of ``owner`` (a failed video); returns how many were dropped."""
        kept: deque[_Segment[Owner]] = deque()
        dropped = 0
        for seg in self._segments:
            if seg.owner is owner:
                dropped += len(seg.items)
            else:
                kept.append(seg)
        self._segments = kept
        self._count -= dropped
        return dropped


STAGES = ("image", "audio", "text")


@dataclass(eq=False)
class VideoAccumulator:
    """One in-flight video on the batcher side.

    ``pending[stage]`` counts items sent to a buffer whose results have not come back. The video is
    *complete* when its decode has finished and nothing is pending; then fusion may run.
    ``concept_sum`` is the sum over sampled frames of the image backbone's softmax (for ``concepts``).
    """

    request: VideoRequest
    future: Future
    submitted_at: float  # time.monotonic() at submit
    submitted_wall: float = 0.0  # time.time() at submit (queue_wait = submitted_wall - enqueued_at)
    features_only: bool = False
    started_at: float | None = None  # time.monotonic() when a decode thread picked it up
    title_ids: list[int] = field(default_factory=list)  # the title's token ids ([]: no title)
    image: list[np.ndarray] = field(default_factory=list)
    image_times: list[np.ndarray] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)
    text: np.ndarray | None = None
    concept_sum: np.ndarray | None = None
    frames: int = 0
    pending: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))
    timings: dict[str, float] = field(
        default_factory=lambda: {"decode": 0.0, "image": 0.0, "audio": 0.0, "text": 0.0, "fusion": 0.0}
    )
    decode_done: bool = False
    info: MediaInfo | None = None  # set when the decode finished
    stats: DecodeStats | None = None
    finished: bool = False  # future resolved (tagged or failed)

    def expect(self, stage: str, n: int) -> None:
        self.pending[stage] += n

    def charge(self, stage: str, seconds: float) -> None:
        self.timings[stage] += seconds

    def add_image(self, features: np.ndarray, logits: np.ndarray | None) -> None:
        """Image features of the next ``len(features)`` frames (in order) and their class logits."""
        self.image.append(np.asarray(features, dtype=np.float32))
        if logits is not None and len(logits):
            z = np.asarray(logits, dtype=np.float64)
            z = z - z.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            s = p.sum(axis=0)
            self.concept_sum = s if self.concept_sum is None else self.concept_sum + s
        self.frames += len(features)
        self.pending["image"] -= len(features)

    def add_audio(self, features: np.ndarray) -> None:
        self.audio.append(np.asarray(features, dtype=np.float32))
        self.pending["audio"] -= len(features)

    def set_text(self, states: np.ndarray) -> None:
        self.text = np.asarray(states, dtype=np.float32)
        self.pending["text"] -= 1

    def complete(self) -> bool:
        return self.decode_done and not self.finished and all(v <= 0 for v in self.pending.values())

    def deadline_passed(self, now: float) -> bool:
        deadline = self.request.deadline
        return deadline is not None and now > deadline

    def concepts(self, class_names: Sequence[str], top_k: int) -> list[dict[str, str | float]]:
        """Top ``top_k`` classes of the mean softmax over sampled frames, ``{"label", "score"}``."""
        if self.concept_sum is None or top_k <= 0 or not self.frames:
            return []
        mean = self.concept_sum / self.frames
        order = np.argsort(-mean)[:top_k]
        return [{"label": str(class_names[i]), "score": float(mean[i])} for i in order]

    def stacked(self, image_dim: int, audio_dim: int, text_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(image (T, D), image_times (T,), audio (T_a, 128), text (L, D_t))``; empty ones have 0 rows."""
        image = np.concatenate(self.image) if self.image else np.zeros((0, image_dim), np.float32)
        times = np.concatenate(self.image_times) if self.image_times else np.zeros(0, np.float64)
        audio = np.concatenate(self.audio) if self.audio else np.zeros((0, audio_dim), np.float32)
        text = self.text if self.text is not None else np.zeros((0, text_dim), np.float32)
        return image, times, audio, text
