"""The in-process tagging engine: decode threads -> cross-video batcher -> fusion -> futures.

Threads (docs/ARCHITECTURE.md, "Threads and processes"):

* :attr:`Pipeline.decode_threads` **decode threads** (:class:`~worker.engine.decoding.DecodeThreads`; the CPU
  budget in software, at least 8 NVDEC sessions, or ``decode_threads``).
  Each takes one :class:`~worker.engine.request.VideoRequest` at a time from a bounded request queue,
  decodes it, and pushes typed :mod:`worker.engine.events` (frame chunks, audio patches, the end of the
  decode) into the bounded event queue. A full event queue blocks only the decode thread that pushes
  (backpressure); the time it spends blocked is *not* counted as decode time.
* One **batcher thread** owns every :class:`~worker.engine.buffers.VideoAccumulator`. It fills three
  :class:`~worker.engine.buffers.SizeOrWaitBuffer` s with the items of *all* in-flight videos (frames: up to
  ``resolved_image_batch_size()``, audio patches: ``audio_batch_size``, titles: ``text_batch_size``; each is due
  when full or when its oldest item has waited ``batch_max_wait_s``), hands due batches to the
  **inference threads**, scatters their results back per video *in the order the batches were taken*
  (so a video's frames stay in order), and runs the fusion ``Tagger`` over up to ``fusion_batch_size``
  videos whose decode has finished and whose features are all in. Then it resolves the video's future.
* ``settings.resolved_inference_threads()`` **inference threads** run up to that many extractor
  batches at once under ``torch.inference_mode`` through :class:`~worker.engine.inference.ExtractorRunner` (on
  CUDA from pinned host memory with non-blocking copies). While they are all busy, due items wait in
  their buffers, so batches grow towards their maximum instead of queueing. On CPU with more than one
  inference thread, torch's intra-op threads are set to 1 for the pipeline's lifetime (process-wide;
  restored by :meth:`Pipeline.stop`): independent batches on single-threaded kernels keep every core
  busy without OpenMP teams of several threads competing for cores with each other and with the
  decoders (measured on 2 cores: intra-op parallelism stalls whenever a decoder holds a core).

Decoder isolation (``decode_isolation``, default on): each decode thread decodes through a
supervised child process of a :class:`~worker.media.isolation.DecodePool` (one child per thread), so a
native crash or hang in FFmpeg fails that one video (``decoder_crash`` / ``timeout``) and the child is
replaced; off, ``VideoSource`` runs in the decode thread itself. Either way the decode request carries
the worker's :class:`~worker.media.open.OpenPolicy` (redirect targets pass the URI policy).

Isolation: a decode error fails that video only. If an extractor or the fusion model raises on a
batch, the batch is re-run per video, so only the video(s) that still fail are failed.

Timings per video (``timings_s`` of the result): ``decode`` = wall time of the video's decode in its
thread (open to last chunk, including audio patching, excluding time blocked by backpressure);
``image``/``audio``/``text``/``fusion`` = the video's share of each batch's time, proportional to its
items in the batch; ``total`` = submit to result; ``queue_wait`` = submit time minus the request's
``enqueued_at`` (epoch seconds; 0 when unknown). The result document is built by
:func:`worker.engine.document.video_document`.

Metrics (when a :class:`~worker.metrics.Metrics` is given): stage histograms, sampled frames, decoded
frames, audio and video seconds (for tagged videos), batch sizes per extractor and the in-flight gauge.
Outcome and error counters are the caller's (it decides about retries and hand-backs).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch

from model.features import VideoFeatures
from worker.config import Settings
from worker.engine.buffers import Batch, SizeOrWaitBuffer, VideoAccumulator
from worker.engine.decoding import POLL_S, DecodeThreads, as_error
from worker.engine.document import Document, video_document
from worker.engine.events import AudioPatches, BatchDone, Decoded, DecodeFailed, Event, Frames, Started
from worker.engine.inference import BatchResult, ExtractorRunner, pinned_array
from worker.engine.models import LoadedModels
from worker.engine.request import VideoRequest
from worker.errors import MediaTimeoutError, ShutdownError, TagstreamError
from worker.media.isolation import DecodePool
from worker.metrics import Metrics

__all__ = ["Pipeline"]

log = logging.getLogger(__name__)


class _Running(NamedTuple):
    """An extractor batch handed to an inference thread (kept in the order batches were taken)."""

    name: str
    batch: Batch[VideoAccumulator]
    future: Future[BatchResult]


class Pipeline:
    """Decode threads + cross-video batcher + fusion, shared by every video a worker has in flight.

    ``submit`` returns a future resolved with the result document (status ``"tagged"``), or with
    ``features_only=True`` with the video's :class:`~model.features.VideoFeatures`; failures resolve it
    with a :class:`~worker.errors.TagstreamError` carrying ``timings_s`` (the stages that ran).
    """

    def __init__(self, settings: Settings, models: LoadedModels, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.models = models
        self.metrics = metrics
        self.device = models.device
        ex = models.extractors
        self._dims = (int(ex.image.feature_dim), int(ex.audio.feature_dim), int(ex.text.feature_dim))
        self._stopping = threading.Event()
        self._decoders = DecodeThreads(
            settings, device_type=self.device.type, crop_size=int(ex.image.input_size),
            resize_short=int(ex.image.resize_short), emit=self._emit, forget=self._forget, stopping=self._stopping,
        )  # fmt: skip
        self._decode_pool: DecodePool | None = None  # the decoder processes once started (None: in-thread)
        self._events: queue.Queue[Event] = queue.Queue(maxsize=2 * self._decoders.count + 8)
        wait = settings.batch_max_wait_s
        pinned = pinned_array if self.device.type == "cuda" else None  # batches bound for the GPU: one copy
        self._buffers: dict[str, SizeOrWaitBuffer[VideoAccumulator]] = {
            "image": SizeOrWaitBuffer("image", settings.resolved_image_batch_size(self.device.type), wait, pinned),
            "audio": SizeOrWaitBuffer("audio", settings.audio_batch_size, wait, pinned),
            "text": SizeOrWaitBuffer("text", settings.text_batch_size, wait),
        }
        self._runner = ExtractorRunner(models.extractors, self.device)
        self._inference_n = settings.resolved_inference_threads(self.device.type)
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: deque[_Running] = deque()  # taken order = apply order
        self._torch_threads: int | None = None  # torch's intra-op threads before start(), if changed
        self._lock = threading.Lock()
        self._active: set[VideoAccumulator] = set()
        self._threads: list[threading.Thread] = []
        self._started = False

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._threads += self._decoders.start()
        self._decode_pool = self._decoders.pool
        if self.device.type == "cpu" and self._inference_n > 1:
            self._torch_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        self._executor = ThreadPoolExecutor(self._inference_n, thread_name_prefix="tagstream-infer")
        t = threading.Thread(target=self._batch_loop, name="tagstream-batcher", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, timeout: float | None = None) -> None:
        """Stop all threads; every pending or in-flight future fails with ShutdownError."""
        self._stopping.set()
        with self._lock:
            active = list(self._active)
        for acc in active:
            self._fail(acc, ShutdownError("the pipeline stopped before the video was finished"))
        end = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.warning("pipeline threads still running after stop: %s", alive)
        self._decoders.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._torch_threads is not None:
            torch.set_num_threads(self._torch_threads)
            self._torch_threads = None

    def __enter__(self) -> Pipeline:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(timeout=30.0)

    @property
    def decode_threads(self) -> int:
        """Decode threads (decoder processes) this engine runs: ``settings.resolved_decode_threads`` for the
        hwaccel it chose (at least 8 NVDEC sessions when that is ``cuda``)."""
        return self._decoders.count

    def in_flight(self) -> int:
        with self._lock:
            return len(self._active)

    def submit(self, request: VideoRequest, *, features_only: bool = False) -> Future[Any]:
        """Queue a video. Blocks while the request queue is full (backpressure on the caller). The future
        holds the result document, or the VideoFeatures with ``features_only`` (hence ``Any``). The title
        is tokenised here, once, on the caller's thread (text batches then carry token ids)."""
        if not self._started:
            raise RuntimeError("Pipeline.start() was not called")
        future: Future[Any] = Future()
        acc = VideoAccumulator(request=request, future=future, submitted_at=time.monotonic(),
                               submitted_wall=time.time(), features_only=features_only,
                               title_ids=self.models.extractors.text.token_ids(request.title))
        if self._stopping.is_set():
            future.set_exception(ShutdownError("the pipeline is stopping"))
            return future
        with self._lock:
            self._active.add(acc)
            self._set_in_flight()
        while not self._decoders.put(acc):
            if self._stopping.is_set():
                self._fail(acc, ShutdownError("the pipeline is stopping"))
                break
        return future

    # --- helpers shared by threads -----------------------------------------------------------------
    def _set_in_flight(self) -> None:
        if self.metrics is not None:
            self.metrics.in_flight.set(len(self._active))

    def _emit(self, event: Event) -> float:
        """Push an event to the batcher, waiting while the queue is full; returns seconds blocked."""
        t0 = time.perf_counter()
        while True:
            try:
                self._events.put(event, timeout=POLL_S)
                break
            except queue.Full:
                if self._stopping.is_set():
                    break
        return time.perf_counter() - t0

    def _forget(self, acc: VideoAccumulator) -> None:
        """A video its caller cancelled: no longer in flight, nothing to resolve."""
        self._resolve(acc, lambda: None)

    def _timings(self, acc: VideoAccumulator) -> dict[str, float]:
        enqueued = acc.request.enqueued_at
        queue_wait = max(0.0, acc.submitted_wall - enqueued) if enqueued else 0.0
        return {"queue_wait": queue_wait, **acc.timings, "total": time.monotonic() - acc.submitted_at}

    def _resolve(self, acc: VideoAccumulator, setter: Callable[[], None]) -> bool:
        with self._lock:
            if acc.finished:
                return False
            acc.finished = True
            self._active.discard(acc)
            self._set_in_flight()
        try:
            setter()
        except InvalidStateError:  # cancelled by the caller
            pass
        return True

    def _fail(self, acc: VideoAccumulator, exc: TagstreamError) -> None:
        exc.timings_s = self._timings(acc)
        if self._resolve(acc, lambda: acc.future.set_exception(exc)):
            log.info("video %s failed: %s (%s)", acc.request.video_id, exc.reason, exc)

    # --- batcher thread -----------------------------------------------------------------------------
    def _batch_loop(self) -> None:
        try:
            with torch.inference_mode():
                self._batch_loop_inner()
        except Exception as exc:  # pragma: no cover - a bug; fail everything rather than hang
            log.exception("batcher thread crashed")
            with self._lock:
                active = list(self._active)
            for acc in active:
                self._fail(acc, as_error(exc, acc.request.video_id))

    def _batch_loop_inner(self) -> None:
        ready: list[VideoAccumulator] = []
        next_check = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            waits = []
            if len(self._inflight) < self._inference_n:  # a due batch can only start with a free thread
                waits = [w for b in self._buffers.values() if (w := b.time_left(now)) is not None]
            timeout = min([POLL_S, *waits])
            try:
                event = self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
                self._handle(event, ready)
            except queue.Empty:
                pass
            self._apply_done(ready)
            now = time.monotonic()
            for name, buf in self._buffers.items():
                while buf.due(now) and len(self._inflight) < self._inference_n:
                    self._submit_batch(name, buf.take())
                    now = time.monotonic()
            if now >= next_check:
                next_check = now + POLL_S
                self._check_deadlines(now)
            # Videos completed by the same extractor batch are fused together (up to fusion_batch_size).
            ready = [a for a in ready if not a.finished]
            size = self.settings.fusion_batch_size
            while ready:
                group, ready = ready[:size], ready[size:]
                self._finish(group)

    def _handle(self, event: Event, ready: list[VideoAccumulator]) -> None:
        if isinstance(event, BatchDone) or event.video.finished:
            return
        acc, now = event.video, time.monotonic()
        match event:
            case Started():
                if acc.title_ids:
                    acc.expect("text", 1)
                    self._buffers["text"].add(acc, [acc.title_ids], now)
            case Frames(timestamps=timestamps, frames=frames):
                acc.image_times.append(np.asarray(timestamps, dtype=np.float64))
                acc.expect("image", len(frames))
                self._buffers["image"].add(acc, frames, now)
            case AudioPatches(patches=patches):
                acc.expect("audio", len(patches))
                self._buffers["audio"].add(acc, patches, now)
            case Decoded(info=info, stats=stats, decode_s=decode_s):
                acc.info, acc.stats, acc.timings["decode"] = info, stats, decode_s
                acc.decode_done = True
                if acc.complete():
                    ready.append(acc)
            case DecodeFailed(error=error):
                self._drop(acc)
                self._fail(acc, error)

    def _drop(self, acc: VideoAccumulator) -> None:
        for buf in self._buffers.values():
            buf.discard(acc)

    def _check_deadlines(self, now: float) -> None:
        """Fail videos past their deadline; forget queued ones whose caller cancelled the future."""
        with self._lock:
            late = [a for a in self._active if a.deadline_passed(now) or a.future.cancelled()]
        for acc in late:
            if acc.future.cancelled():
                self._drop(acc)
                self._resolve(acc, lambda: None)
                continue
            self._drop(acc)
            self._fail(acc, MediaTimeoutError("the video's deadline passed"))

    # --- extractor batches ----------------------------------------------------------------------------
    def _wake(self, _future: Future[BatchResult]) -> None:
        """Done-callback of an inference batch: wake the batcher (a full event queue wakes it anyway)."""
        try:
            self._events.put_nowait(BatchDone())
        except queue.Full:
            pass

    def _submit_batch(self, name: str, batch: Batch[VideoAccumulator]) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.labels(name).observe(len(batch))
        assert self._executor is not None
        future = self._executor.submit(self._runner.compute, name, batch)
        self._inflight.append(_Running(name, batch, future))
        future.add_done_callback(self._wake)

    def _apply_done(self, ready: list[VideoAccumulator]) -> None:
        """Apply finished batches in the order they were taken (a later one waits for an earlier one)."""
        while self._inflight and self._inflight[0].future.done():
            name, batch, future = self._inflight.popleft()
            try:
                failures = self._runner.apply(future.result())
            except CancelledError:
                continue
            except Exception as exc:  # noqa: BLE001 - not an extractor error (those are caught): fail the batch
                failures = [(acc, exc) for acc in batch.owners()]
            for acc, exc in failures:
                self._drop(acc)
                self._fail(acc, as_error(exc, acc.request.video_id))
            for acc in batch.owners():
                if acc.complete() and acc not in ready:
                    ready.append(acc)

    # --- fusion and results -----------------------------------------------------------------------------
    def _features(self, acc: VideoAccumulator) -> VideoFeatures:
        image, times, audio, text = acc.stacked(*self._dims)
        duration = acc.info.duration_s if acc.info is not None else 0.0
        req = acc.request
        return VideoFeatures(video_id=req.video_id, image=image, image_times=times, audio=audio, text=text,
                             title=req.title or "", duration_s=duration)

    def _finish(self, group: list[VideoAccumulator]) -> None:
        feats = {id(acc): self._features(acc) for acc in group}
        tagger = self.models.tagger
        to_tag = [a for a in group if not a.features_only and tagger is not None]
        predictions: dict[int, dict[str, Any]] = {}  # Prediction.to_dict() per video
        if to_tag:
            t0 = time.perf_counter()
            try:
                preds = tagger.predict([feats[id(a)] for a in to_tag])
                elapsed = time.perf_counter() - t0
                for acc, pred in zip(to_tag, preds, strict=True):
                    predictions[id(acc)] = pred.to_dict()
                    acc.charge("fusion", elapsed / len(to_tag))
            except Exception as exc:  # noqa: BLE001 - isolate per video
                log.warning("fusion batch of %d failed (%s); retrying per video", len(to_tag), exc)
                for acc in to_tag:
                    t0 = time.perf_counter()
                    try:
                        predictions[id(acc)] = tagger.predict([feats[id(acc)]])[0].to_dict()
                        acc.charge("fusion", time.perf_counter() - t0)
                    except Exception as exc2:  # noqa: BLE001
                        self._fail(acc, as_error(exc2, acc.request.video_id))
            if self.metrics is not None:
                self.metrics.batch_size.labels("fusion").observe(len(to_tag))
        for acc in group:
            if acc.finished:
                continue
            f = feats[id(acc)]
            if acc.features_only:
                self._resolve(acc, lambda acc=acc, f=f: acc.future.set_result(f))
                continue
            doc = self._document(acc, f, predictions.get(id(acc)))
            if self._resolve(acc, lambda acc=acc, doc=doc: acc.future.set_result(doc)):
                self._observe(acc, doc)

    def _document(self, acc: VideoAccumulator, f: VideoFeatures, prediction: dict[str, Any] | None) -> Document:
        return video_document(
            acc, f, model_version=self.models.model_version, prediction=prediction,
            class_names=self.models.extractors.image.class_names, top_k_concepts=self.settings.top_k_concepts,
            timings=self._timings(acc),
        )  # fmt: skip

    def _observe(self, acc: VideoAccumulator, doc: Document) -> None:
        m = self.metrics
        if m is None:
            return
        for stage, seconds in doc["timings_s"].items():
            m.stage_seconds.labels(stage).observe(seconds)
        m.frames.inc(acc.frames)
        if acc.stats is not None:
            m.frames_decoded.inc(acc.stats.frames_decoded)
            m.audio_seconds.inc(acc.stats.audio_seconds)
        m.video_seconds.inc(doc["media"].get("duration_s") or 0.0)
