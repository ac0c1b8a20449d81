"""Cross-video batching: a size-or-wait buffer and the per-video accumulation it scatters into.

:class:`SizeOrWaitBuffer` collects items (frames, audio patches, titles) of many videos. A batch is
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

Nothing here starts threads; the clock is passed in, so the semantics are unit-testable.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import torch

log = logging.getLogger(__name__)

Owner = TypeVar("Owner")


@dataclass
class Batch(Generic[Owner]):
    """A batch: ``items`` (a NumPy array concatenated along axis 0, or a list) and ``parts``:
    ``(owner, start, stop)`` slices of ``items`` in order."""

    items: Any
    parts: list[tuple[Owner, int, int]]

    def __len__(self) -> int:
        return len(self.items)

    def owners(self) -> list[Owner]:
        seen: dict[int, Owner] = {}
        for owner, _, _ in self.parts:
            seen.setdefault(id(owner), owner)
        return list(seen.values())

    def subset(self, owner: Owner) -> tuple[Any, int]:
        """The items of one owner, and how many there are (for per-video retries)."""
        pieces = [self.items[a:b] for o, a, b in self.parts if o is owner]
        if isinstance(self.items, np.ndarray):
            data = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
        else:
            data = [x for piece in pieces for x in piece]
        return data, len(data)


class SizeOrWaitBuffer(Generic[Owner]):
    """FIFO of ``(owner, items)`` segments; a batch is due at ``max_size`` items or after ``max_wait``
    seconds since the oldest pending item arrived, whichever first.

    ``items`` are NumPy arrays (stacked along axis 0) or lists (e.g. titles). ``now`` arguments are
    ``time.monotonic()`` values; they are parameters so tests control the clock.
    """

    def __init__(self, name: str, max_size: int, max_wait: float) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        self.name = name
        self.max_size = int(max_size)
        self.max_wait = float(max_wait)
        self._segments: deque[list[Any]] = deque()  # [owner, items, arrived_at]
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, owner: Owner, items: Sequence[Any] | np.ndarray, now: float | None = None) -> None:
        if len(items) == 0:
            return
        self._segments.append([owner, items, time.monotonic() if now is None else now])
        self._count += len(items)

    def oldest(self) -> float | None:
        return self._segments[0][2] if self._segments else None

    def time_left(self, now: float) -> float | None:
        """Seconds until the pending batch is due (0 when due now), None when empty."""
        if not self._count:
            return None
        if self._count >= self.max_size:
            return 0.0
        return max(0.0, self.oldest() + self.max_wait - now)  # type: ignore[operator]

    def due(self, now: float) -> bool:
        left = self.time_left(now)
        return left is not None and left <= 0.0

    def take(self) -> Batch[Owner]:
        """Remove and return up to ``max_size`` items from the front (a segment may be split)."""
        taken: list[tuple[Owner, Any]] = []
        room = self.max_size
        while self._segments and room > 0:
            seg = self._segments[0]
            owner, items = seg[0], seg[1]
            if len(items) <= room:
                self._segments.popleft()
                taken.append((owner, items))
                room -= len(items)
            else:
                taken.append((owner, items[:room]))
                seg[1] = items[room:]
                room = 0
        n = self.max_size - room
        self._count -= n
        parts: list[tuple[Owner, int, int]] = []
        start = 0
        for owner, items in taken:
            parts.append((owner, start, start + len(items)))
            start += len(items)
        if taken and isinstance(taken[0][1], np.ndarray):
            data: Any = np.concatenate([items for _, items in taken]) if len(taken) > 1 else taken[0][1]
        else:
            data = [x for _, items in taken for x in items]
        return Batch(items=data, parts=parts)

    def discard(self, owner: Owner) -> int:
        """Drop every pending item of ``owner`` (a failed video); returns how many were dropped."""
        kept: deque[list[Any]] = deque()
        dropped = 0
        for seg in self._segments:
            if seg[0] is owner:
                dropped += len(seg[1])
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

    request: Any
    future: Future
    submitted_at: float  # time.monotonic() at submit
    submitted_wall: float = 0.0  # time.time() at submit (queue_wait = submitted_wall - enqueued_at)
    features_only: bool = False
    started_at: float | None = None  # time.monotonic() when a decode thread picked it up
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
    info: Any = None  # decoder MediaInfo
    stats: Any = None  # decoder DecodeStats
    finished: bool = False  # future resolved (tagged or failed)

    def expect(self, stage: str, n: int) -> None:
        self.pending[stage] += n

    def charge(self, stage: str, seconds: float) -> None:
        self.timings[stage] += seconds

    def add_image(self, features: np.ndarray, logits: np.ndarray) -> None:
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
        deadline = getattr(self.request, "deadline", None)
        return deadline is not None and now > deadline

    def concepts(self, class_names: Sequence[str], top_k: int) -> list[dict[str, Any]]:
        """Top ``top_k`` classes of the mean softmax over sampled frames, ``{"label", "score"}``."""
        if self.concept_sum is None or top_k <= 0 or not self.frames:
            return []
        mean = self.concept_sum / self.frames
        order = np.argsort(-mean)[:top_k]
        return [{"label": str(class_names[i]), "score": float(mean[i])} for i in order]

    def stacked(self, image_dim: int, audio_dim: int, text_dim: int) -> tuple[np.ndarray, ...]:
        """``(image (T, D), image_times (T,), audio (T_a, 128), text (L, D_t))``; empty ones have 0 rows."""
        image = np.concatenate(self.image) if self.image else np.zeros((0, image_dim), np.float32)
        times = np.concatenate(self.image_times) if self.image_times else np.zeros(0, np.float64)
        audio = np.concatenate(self.audio) if self.audio else np.zeros((0, audio_dim), np.float32)
        text = self.text if self.text is not None else np.zeros((0, text_dim), np.float32)
        return image, times, audio, text


@dataclass
class BatchResult:
    """A computed batch not yet applied: ``out`` for the whole batch (``elapsed`` seconds), or, after the
    whole batch failed, ``per_video`` entries ``(video, out | None, exception | None, seconds, items)``."""

    name: str
    batch: Batch
    out: tuple | None = None
    elapsed: float = 0.0
    per_video: list[tuple[Any, tuple | None, BaseException | None, float, int]] = field(default_factory=list)


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


class ExtractorRunner:
    """Runs one buffer's batch through its extractor and scatters the results to the videos.

    ``image`` batches are ``(N, S, S, 3)`` uint8 frames -> features + ImageNet logits; ``audio`` batches
    are ``(N, 96, 64)`` log-mel patches -> 128-d rows; ``text`` batches are lists of titles -> token
    states, of which each video keeps its unpadded rows. On CUDA, frames and patches are copied from
    pinned host memory with ``non_blocking=True``. If the batch raises, each video's items are re-run
    alone; the videos that still fail are returned with their exception (nothing else is affected).

    :meth:`compute` (the network; any thread, several at once) and :meth:`apply` (scatter into the
    videos; the one thread that owns the accumulators) are split so batches can run concurrently while
    their results are still applied in order; :meth:`run` does both.

    On CPU, batches of the extractors named in ``cpu_slices`` run through the network in slices of at
    most that many items (default: audio, 32 patches), results concatenated: a CPU gains nothing from
    larger batches while activation memory grows with them. Image batches are not sliced here:
    :class:`model.image.ImageExtractor` runs CPU batches in micro-batches of 4 frames itself (the
    fastest size per frame measured, and the smallest activations). Batches are still built across
    videos up to the configured sizes.
    """

    CPU_SLICES = {"audio": 32}

    def __init__(self, extractors: Any, device: torch.device, cpu_slices: dict[str, int] | None = None) -> None:
        self.extractors = extractors
        self.device = device
        self.cpu_slices = dict(self.CPU_SLICES if cpu_slices is None else cpu_slices)
        self._locks = {"text": threading.Lock()}

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def extract(self, name: str, items: Any) -> tuple:
        step = self.cpu_slices.get(name, 0) if self.device.type == "cpu" else 0
        if step and len(items) > step:
            parts = [self._extract(name, items[i : i + step]) for i in range(0, len(items), step)]
            return tuple(np.concatenate(arrays) for arrays in zip(*parts, strict=True))
        return self._extract(name, items)

    def _extract(self, name: str, items: Any) -> tuple:
        ex = self.extractors
        if name == "image":
            features, logits = ex.image(self._to_device(items))
            return _numpy(features), _numpy(logits)
        if name == "audio":
            return (_numpy(ex.audio(self._to_device(items))),)
        states, mask = ex.text(list(items))
        return _numpy(states), _numpy(mask).astype(bool)

    @staticmethod
    def _scatter(name: str, acc: VideoAccumulator, out: tuple, a: int, b: int) -> None:
        if name == "image":
            acc.add_image(out[0][a:b], out[1][a:b])
        elif name == "audio":
            acc.add_audio(out[0][a:b])
        else:
            states, mask = out
            for i in range(a, b):
                acc.set_text(states[i][mask[i]])

    def compute(self, name: str, batch: Batch) -> BatchResult:
        """Run the extractor on ``batch`` (whole, or per video after a failure); touches no video.

        Safe to call from several threads at once (eval-mode networks under ``torch.inference_mode``;
        text batches, whose tokenizer is not thread-safe, take a lock)."""
        with self._locks.get(name, contextlib.nullcontext()), torch.inference_mode():
            n = len(batch)
            t0 = time.perf_counter()
            try:
                return BatchResult(name, batch, self.extract(name, batch.items), time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 - isolate the video(s) that break the batch
                log.warning("%s batch of %d items failed (%s); retrying per video", name, n, exc)
            result = BatchResult(name, batch)
            for acc in batch.owners():
                if acc.finished:
                    continue
                items, k = batch.subset(acc)
                t0 = time.perf_counter()
                try:
                    result.per_video.append((acc, self.extract(name, items), None, time.perf_counter() - t0, k))
                except Exception as exc:  # noqa: BLE001
                    result.per_video.append((acc, None, exc, 0.0, k))
            return result

    def apply(self, result: BatchResult) -> list[tuple[VideoAccumulator, BaseException]]:
        """Scatter a computed batch into its videos and charge their time shares (on the thread that owns
        the accumulators); returns the videos that failed even alone."""
        name, batch = result.name, result.batch
        if result.out is not None:
            n = len(batch)
            for acc, a, b in batch.parts:
                if not acc.finished:
                    self._scatter(name, acc, result.out, a, b)
                    acc.charge(name, result.elapsed * (b - a) / n)
            return []
        failed: list[tuple[VideoAccumulator, BaseException]] = []
        for acc, out, exc, elapsed, k in result.per_video:
            if acc.finished:
                continue
            if exc is not None:
                failed.append((acc, exc))
                continue
            acc.charge(name, elapsed)
            self._scatter(name, acc, out, 0, k)
        return failed

    def run(self, name: str, batch: Batch) -> list[tuple[VideoAccumulator, BaseException]]:
        """Extract, scatter, charge time shares; returns the videos that failed (after retries)."""
        return self.apply(self.compute(name, batch))
