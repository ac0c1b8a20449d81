"""The extractor runner: one buffer's batch through its extractor, results scattered back per video.

:class:`ExtractorRunner` is split in :meth:`~ExtractorRunner.compute` (the network; any inference thread,
several at once) and :meth:`~ExtractorRunner.apply` (scatter into the videos' accumulators; only the
batcher thread), so batches can run concurrently while their results are applied in the order the
batches were taken (see :mod:`worker.engine.pipeline`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from model.extractors import Extractors
from worker.engine.buffers import Batch, Items, VideoAccumulator

log = logging.getLogger(__name__)

#: What an extractor returns for a batch, as NumPy arrays: image ``(features, logits)``, audio
#: ``(features,)``, text ``(token states, mask)``.
Output = tuple[np.ndarray, ...]


def pinned_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An empty NumPy array in page-locked host memory (torch's caching host allocator: blocks are reused
    once the copies that read them have finished), for batches bound for a CUDA device."""
    torch_dtype = torch.from_numpy(np.empty(0, dtype)).dtype
    return torch.empty(shape, dtype=torch_dtype, pin_memory=True).numpy()


class VideoRetry(NamedTuple):
    """One video's share of a batch that failed whole, re-run alone: its ``out`` or its ``error``."""

    video: VideoAccumulator
    out: Output | None
    error: BaseException | None
    seconds: float
    items: int


@dataclass
class BatchResult:
    """A computed batch not yet applied: ``out`` for the whole batch (``elapsed`` seconds), or, after the
    whole batch failed, one :class:`VideoRetry` per video."""

    name: str
    batch: Batch[VideoAccumulator]
    out: Output | None = None
    elapsed: float = 0.0
    per_video: list[VideoRetry] = field(default_factory=list)


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


class ExtractorRunner:
    """Runs one buffer's batch through its extractor and scatters the results to the videos.

    ``image`` batches are ``(N, S, S, 3)`` uint8 frames -> features + ImageNet logits; ``audio`` batches
    are ``(N, 96, 64)`` log-mel patches -> 128-d rows; ``text`` batches are lists of titles' token ids
    (tokenised once per video when it was submitted) -> token states, of which each video keeps its
    unpadded rows. On CUDA, frames and patches are copied from
    pinned host memory with ``non_blocking=True`` (the batcher assembles frame and patch batches straight
    into pinned memory, :func:`pinned_array`). If the batch raises, each video's items are re-run
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

    def __init__(self, extractors: Extractors, device: torch.device, cpu_slices: dict[str, int] | None = None) -> None:
        self.extractors = extractors
        self.device = device
        self.cpu_slices = dict(self.CPU_SLICES if cpu_slices is None else cpu_slices)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            if not tensor.is_pinned():  # batches are assembled in pinned memory (pinned_array); retries are not
                tensor = tensor.pin_memory()
            return tensor.to(self.device, non_blocking=True)
        return tensor

    def extract(self, name: str, items: Items) -> Output:
        step = self.cpu_slices.get(name, 0) if self.device.type == "cpu" else 0
        if step and len(items) > step:
            parts = [self._extract(name, items[i : i + step]) for i in range(0, len(items), step)]
            return tuple(np.concatenate(arrays) for arrays in zip(*parts, strict=True))
        return self._extract(name, items)

    def _extract(self, name: str, items: Items) -> Output:
        ex = self.extractors
        if name == "image":
            features, logits = ex.image(self._to_device(items))
            return _numpy(features), _numpy(logits)
        if name == "audio":
            return (_numpy(ex.audio(self._to_device(items))),)
        states, mask = ex.text.encode_ids(list(items))
        return _numpy(states), _numpy(mask).astype(bool)

    @staticmethod
    def _scatter(name: str, acc: VideoAccumulator, out: Output, a: int, b: int) -> None:
        if name == "image":
            acc.add_image(out[0][a:b], out[1][a:b])
        elif name == "audio":
            acc.add_audio(out[0][a:b])
        else:
            states, mask = out
            for i in range(a, b):
                acc.set_text(states[i][mask[i]])

    def compute(self, name: str, batch: Batch[VideoAccumulator]) -> BatchResult:
        """Run the extractor on ``batch`` (whole, or per video after a failure); touches no video.

        Safe to call from several threads at once (eval-mode networks under ``torch.inference_mode``;
        text batches are token ids, so no tokenizer runs here)."""
        with torch.inference_mode():
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
                    result.per_video.append(VideoRetry(acc, self.extract(name, items), None, time.perf_counter() - t0, k))
                except Exception as exc:  # noqa: BLE001
                    result.per_video.append(VideoRetry(acc, None, exc, 0.0, k))
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
        for retry in result.per_video:
            acc = retry.video
            if acc.finished:
                continue
            if retry.error is not None:
                failed.append((acc, retry.error))
                continue
            acc.charge(name, retry.seconds)
            self._scatter(name, acc, retry.out, 0, retry.items)
        return failed

    def run(self, name: str, batch: Batch[VideoAccumulator]) -> list[tuple[VideoAccumulator, BaseException]]:
        """Extract, scatter, charge time shares; returns the videos that failed (after retries)."""
        return self.apply(self.compute(name, batch))
