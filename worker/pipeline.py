"""The in-process tagging engine: decode threads -> cross-video batcher -> fusion -> futures.

Threads (DESIGN.md section 2):

* ``settings.resolved_decode_threads()`` **decode threads**. Each takes one :class:`VideoRequest` at a
  time from a bounded request queue, opens one :class:`~worker.decode.VideoSource` (PyAV releases the
  GIL while demuxing, decoding and scaling, so threads decode in parallel), cuts 16 kHz audio into
  VGGish log-mel patches as it arrives, and pushes frame chunks / audio patches into the bounded
  event queue. A full event queue blocks only the decode thread that pushes (backpressure); the time
  it spends blocked is *not* counted as decode time.
* One **batcher thread** owns every :class:`~worker.batching.VideoAccumulator`. It fills three
  :class:`~worker.batching.SizeOrWaitBuffer` s with the items of *all* in-flight videos (frames: up to
  ``resolved_image_batch_size()``, audio patches: ``audio_batch_size``, titles: ``text_batch_size``; each is due
  when full or when its oldest item has waited ``batch_max_wait_s``), hands due batches to the
  **inference threads**, scatters their results back per video *in the order the batches were taken*
  (so a video's frames stay in order), and runs the fusion ``Tagger`` over up to ``fusion_batch_size``
  videos whose decode has finished and whose features are all in. Then it resolves the video's future.
* ``settings.resolved_inference_threads()`` **inference threads** run up to that many extractor
  batches at once under ``torch.inference_mode`` through :class:`~worker.batching.ExtractorRunner` (on
  CUDA from pinned host memory with non-blocking copies). While they are all busy, due items wait in
  their buffers, so batches grow towards their maximum instead of queueing. On CPU with more than one
  inference thread, torch's intra-op threads are set to 1 for the pipeline's lifetime (process-wide;
  restored by :meth:`Pipeline.stop`): independent batches on single-threaded kernels keep every core
  busy without OpenMP teams of several threads competing for cores with each other and with the
  decoders (measured on 2 cores: intra-op parallelism stalls whenever a decoder holds a core).

Decoder isolation (``decode_isolation``, default on): each decode thread decodes through a
supervised child process of a :class:`~worker.decode_pool.DecodePool` (one child per thread), so a
native crash or hang in FFmpeg fails that one video (``decoder_crash`` / ``timeout``) and the child is
replaced; off, ``VideoSource`` runs in the decode thread itself. Either way each decode thread installs
the worker's :class:`~worker.media_open.OpenPolicy` (redirect targets pass the URI policy).

Isolation: a decode error fails that video only. If an extractor or the fusion model raises on a
batch, the batch is re-run per video, so only the video(s) that still fail are failed.

Timings per video (``timings_s`` of the result): ``decode`` = wall time of the video's decode in its
thread (open to last chunk, including audio patching, excluding time blocked by backpressure);
``image``/``audio``/``text``/``fusion`` = the video's share of each batch's time, proportional to its
items in the batch; ``total`` = submit to result; ``queue_wait`` = submit time minus the request's
``enqueued_at`` (epoch seconds; 0 when unknown).

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from model.features import VideoFeatures
from worker.batching import Batch, ExtractorRunner, SizeOrWaitBuffer, VideoAccumulator
from worker.config import Settings
from worker.errors import MediaTimeoutError, ShutdownError, TagstreamError
from worker.models import LoadedModels
from worker.result import tagged_document

if TYPE_CHECKING:
    from worker.metrics import Metrics

log = logging.getLogger(__name__)

_POLL_S = 0.1  # how often blocked threads look at the stop flag and deadlines are checked


@dataclass
class VideoRequest:
    """One video to tag. ``enqueued_at``: epoch seconds when it was enqueued (for ``queue_wait``);
    ``deadline``: a ``time.monotonic()`` instant by which the whole video must be done."""

    video_id: str
    uri: str
    title: str = ""
    enqueued_at: float | None = None
    deadline: float | None = None


def _as_error(exc: BaseException, video_id: str) -> TagstreamError:
    if isinstance(exc, TagstreamError):
        return exc
    log.error("video %s: unexpected %s: %s", video_id, type(exc).__name__, exc, exc_info=exc)
    return TagstreamError(f"{type(exc).__name__}: {exc}")


class Pipeline:
    """Decode pool + cross-video batcher + fusion, shared by every video a worker has in flight.

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
        self._threads_n = settings.resolved_decode_threads()
        self._requests: queue.Queue[VideoAccumulator | None] = queue.Queue(
            maxsize=max(2 * self._threads_n, 2 * settings.concurrency)
        )
        self._events: queue.Queue[tuple] = queue.Queue(maxsize=2 * self._threads_n + 8)
        wait = settings.batch_max_wait_s
        self._buffers: dict[str, SizeOrWaitBuffer[VideoAccumulator]] = {
            "image": SizeOrWaitBuffer("image", settings.resolved_image_batch_size(self.device.type), wait),
            "audio": SizeOrWaitBuffer("audio", settings.audio_batch_size, wait),
            "text": SizeOrWaitBuffer("text", settings.text_batch_size, wait),
        }
        self._runner = ExtractorRunner(models.extractors, self.device)
        self._inference_n = settings.resolved_inference_threads(self.device.type)
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: deque[tuple[str, Batch, Future]] = deque()  # taken order = apply order
        self._torch_threads: int | None = None  # torch's intra-op threads before start(), if changed
        self._lock = threading.Lock()
        self._active: set[VideoAccumulator] = set()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._started:
            return
        self._started = True
        from worker.decode import DecodeLimits, SamplingPolicy

        self._policy = SamplingPolicy(fps=self.settings.fps, max_frames=self.settings.max_frames)
        self._limits = DecodeLimits.from_settings(self.settings)
        self._decode_pool = None
        if self.settings.decode_isolation:
            from worker.decode_pool import DecodePool

            software = self._hwaccel() == "none"
            self._decode_pool = DecodePool.from_settings(self.settings, self._threads_n, software=software)
        for i in range(self._threads_n):
            t = threading.Thread(target=self._decode_loop, name=f"tagstream-decode-{i}", daemon=True)
            t.start()
            self._threads.append(t)
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
        if getattr(self, "_decode_pool", None) is not None:
            self._decode_pool.close()
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

    def in_flight(self) -> int:
        with self._lock:
            return len(self._active)

    def submit(self, request: VideoRequest, *, features_only: bool = False) -> Future:
        """Queue a video. Blocks while the request queue is full (backpressure on the caller)."""
        if not self._started:
            raise RuntimeError("Pipeline.start() was not called")
        future: Future = Future()
        acc = VideoAccumulator(request=request, future=future, submitted_at=time.monotonic(),
                               submitted_wall=time.time(), features_only=features_only)
        if self._stopping.is_set():
            future.set_exception(ShutdownError("the pipeline is stopping"))
            return future
        with self._lock:
            self._active.add(acc)
            self._set_in_flight()
        while not self._put(self._requests, acc):
            if self._stopping.is_set():
                self._fail(acc, ShutdownError("the pipeline is stopping"))
                break
        return future

    # --- helpers shared by threads -----------------------------------------------------------------
    def _set_in_flight(self) -> None:
        if self.metrics is not None:
            self.metrics.in_flight.set(len(self._active))

    def _put(self, q: queue.Queue, item: Any) -> bool:
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            return False

    def _emit(self, event: tuple) -> float:
        """Push an event to the batcher, waiting while the queue is full; returns seconds blocked."""
        t0 = time.perf_counter()
        while not self._put(self._events, event):
            if self._stopping.is_set():
                break
        return time.perf_counter() - t0

    def _timings(self, acc: VideoAccumulator) -> dict[str, float]:
        enqueued = getattr(acc.request, "enqueued_at", None)
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
        exc.timings_s = self._timings(acc)  # type: ignore[attr-defined]
        if self._resolve(acc, lambda: acc.future.set_exception(exc)):
            log.info("video %s failed: %s (%s)", acc.request.video_id, exc.reason, exc)

    # --- decode threads -----------------------------------------------------------------------------
    def _hwaccel(self) -> str:
        """The hwaccel to decode with: "auto" is NVDEC only on a GPU worker (software fallback on failure)."""
        hwaccel = self.settings.hwaccel
        return "none" if hwaccel == "auto" and self.device.type != "cuda" else hwaccel

    def _source(self, uri: str, **kwargs: Any) -> Any:
        """A VideoSource, in a pool child when decode isolation is on."""
        if self._decode_pool is not None:
            return self._decode_pool.source(uri, self._policy, self._limits, **kwargs)
        from worker.decode import VideoSource

        return VideoSource(uri, self._policy, self._limits, **kwargs)

    def _decode_loop(self) -> None:
        from model.audio_frontend import PatchStream
        from worker.decode import FrameChunk
        from worker.media_open import OpenPolicy, set_thread_policy

        image = self.models.extractors.image
        hwaccel = self._hwaccel()
        set_thread_policy(OpenPolicy.from_settings(self.settings))
        while not self._stopping.is_set():
            try:
                acc = self._requests.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if acc is None or acc.finished:
                continue
            try:
                running = acc.future.set_running_or_notify_cancel()
            except RuntimeError:  # resolved (deadline, stop) between the check above and here
                continue
            if not running:  # cancelled by the caller while queued
                self._resolve(acc, lambda: None)
                continue
            acc.started_at = time.monotonic()
            req = acc.request
            self._emit(("start", acc))
            t0, blocked = time.perf_counter(), 0.0
            try:
                with torch.inference_mode(), self._source(
                    req.uri, crop_size=int(image.input_size),
                    resize_short=int(image.resize_short), hwaccel=hwaccel,
                ) as source:
                    patcher = PatchStream()
                    for chunk in source.chunks():
                        if acc.finished or self._stopping.is_set():
                            break
                        if acc.deadline_passed(time.monotonic()):
                            raise MediaTimeoutError("the video's deadline passed while decoding")
                        if isinstance(chunk, FrameChunk):
                            blocked += self._emit(("frames", acc, chunk.timestamps, chunk.frames))
                        else:
                            patches = patcher.push(chunk.samples)
                            if len(patches):
                                blocked += self._emit(("audio", acc, patches.numpy()))
                    info, stats = source.info, source.stats
                decode_s = time.perf_counter() - t0 - blocked
                self._emit(("decoded", acc, info, stats, decode_s))
            except Exception as exc:  # noqa: BLE001 - every failure belongs to this video only
                acc.timings["decode"] = time.perf_counter() - t0 - blocked
                self._emit(("failed", acc, _as_error(exc, req.video_id)))

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
                self._fail(acc, _as_error(exc, acc.request.video_id))

    def _batch_loop_inner(self) -> None:
        ready: list[VideoAccumulator] = []
        next_check = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            waits = []
            if len(self._inflight) < self._inference_n:  # a due batch can only start with a free thread
                waits = [w for b in self._buffers.values() if (w := b.time_left(now)) is not None]
            timeout = min([_POLL_S, *waits])
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
                next_check = now + _POLL_S
                self._check_deadlines(now)
            # Videos completed by the same extractor batch are fused together (up to fusion_batch_size).
            ready = [a for a in ready if not a.finished]
            size = self.settings.fusion_batch_size
            while ready:
                group, ready = ready[:size], ready[size:]
                self._finish(group)

    def _handle(self, event: tuple, ready: list[VideoAccumulator]) -> None:
        kind, acc = event[0], event[1]
        if kind == "wake" or acc.finished:  # "wake": an inference batch finished
            return
        now = time.monotonic()
        if kind == "start":
            title = (acc.request.title or "").strip()
            if title:
                acc.expect("text", 1)
                self._buffers["text"].add(acc, [title], now)
        elif kind == "frames":
            timestamps, frames = event[2], event[3]
            acc.image_times.append(np.asarray(timestamps, dtype=np.float64))
            acc.expect("image", len(frames))
            self._buffers["image"].add(acc, frames, now)
        elif kind == "audio":
            acc.expect("audio", len(event[2]))
            self._buffers["audio"].add(acc, event[2], now)
        elif kind == "decoded":
            acc.info, acc.stats, acc.timings["decode"] = event[2], event[3], event[4]
            acc.decode_done = True
            if acc.complete():
                ready.append(acc)
        elif kind == "failed":
            self._drop(acc)
            self._fail(acc, event[2])

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
    def _wake(self, _future: Future) -> None:
        """Done-callback of an inference batch: wake the batcher (a full event queue wakes it anyway)."""
        try:
            self._events.put_nowait(("wake", None))
        except queue.Full:
            pass

    def _submit_batch(self, name: str, batch: Batch) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.labels(name).observe(len(batch))
        assert self._executor is not None
        future = self._executor.submit(self._runner.compute, name, batch)
        self._inflight.append((name, batch, future))
        future.add_done_callback(self._wake)

    def _apply_done(self, ready: list[VideoAccumulator]) -> None:
        """Apply finished batches in the order they were taken (a later one waits for an earlier one)."""
        while self._inflight and self._inflight[0][2].done():
            name, batch, future = self._inflight.popleft()
            try:
                failures = self._runner.apply(future.result())
            except CancelledError:
                continue
            except Exception as exc:  # noqa: BLE001 - not an extractor error (those are caught): fail the batch
                failures = [(acc, exc) for acc in batch.owners()]
            for acc, exc in failures:
                self._drop(acc)
                self._fail(acc, _as_error(exc, acc.request.video_id))
            for acc in batch.owners():
                if acc.complete() and acc not in ready:
                    ready.append(acc)

    # --- fusion and results -----------------------------------------------------------------------------
    def _features(self, acc: VideoAccumulator) -> VideoFeatures:
        image, times, audio, text = acc.stacked(*self._dims)
        duration = float(getattr(acc.info, "duration_s", 0.0) or 0.0)
        req = acc.request
        return VideoFeatures(video_id=req.video_id, image=image, image_times=times, audio=audio, text=text,
                             title=req.title or "", duration_s=duration)

    def _finish(self, group: list[VideoAccumulator]) -> None:
        feats = {id(acc): self._features(acc) for acc in group}
        tagger = self.models.tagger
        to_tag = [a for a in group if not a.features_only and tagger is not None]
        predictions: dict[int, dict | None] = {}
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
                        self._fail(acc, _as_error(exc2, acc.request.video_id))
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

    def _document(self, acc: VideoAccumulator, f: VideoFeatures, prediction: dict | None) -> dict:
        info, stats = acc.info, acc.stats
        media = {
            "duration_s": getattr(info, "duration_s", None),
            "frames": acc.frames,
            "audio_s": getattr(stats, "audio_seconds", 0.0),
            "width": getattr(info, "width", None),
            "height": getattr(info, "height", None),
        }
        extra: dict[str, Any] = {}
        if stats is not None and hasattr(stats, "to_dict"):
            extra["decode"] = stats.to_dict()
        ended = getattr(stats, "ended_early_s", None)
        if ended is not None:
            extra["input_warnings"] = [f"frames end at {ended:g} s of the declared {media['duration_s'] or 0:g} s "
                                       "(a truncated or damaged file): tagged from the frames that decode"]
        if self.models.tagger is None:
            extra["features"] = {
                "image": list(f.image.shape), "audio": list(f.audio.shape), "text": list(f.text.shape)
            }
        image = self.models.extractors.image
        return tagged_document(
            acc.request.video_id,
            model_version=self.models.model_version,
            prediction=prediction,
            concepts=acc.concepts(image.class_names, self.settings.top_k_concepts),
            media=media,
            timings=self._timings(acc),
            extra=extra,
        )

    def _observe(self, acc: VideoAccumulator, doc: dict) -> None:
        m = self.metrics
        if m is None:
            return
        for stage, seconds in doc["timings_s"].items():
            m.stage_seconds.labels(stage).observe(seconds)
        m.frames.inc(acc.frames)
        m.frames_decoded.inc(getattr(acc.stats, "frames_decoded", 0) or 0)
        m.audio_seconds.inc(getattr(acc.stats, "audio_seconds", 0.0) or 0.0)
        m.video_seconds.inc(doc["media"].get("duration_s") or 0.0)
