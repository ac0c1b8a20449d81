"""The engine's decode threads: one video at a time each, from a bounded request queue to the event queue.

Each thread takes a :class:`~worker.engine.buffers.VideoAccumulator`, builds its
:class:`~worker.media.records.DecodeRequest` (the worker's sampling policy, decode limits and open
policy; crop and short side of the image extractor), opens it in a decoder process of the
:class:`~worker.media.isolation.DecodePool` (``decode_isolation``, the default) or in the thread itself
(:class:`~worker.media.source.VideoSource`; PyAV releases the GIL while demuxing, decoding and scaling),
and emits :mod:`worker.engine.events`. The request asks for ``audio_patches``: the audio arrives already
cut into 0.96 s log-mel patches (NumPy, :mod:`model.log_mel`, in the decoder process with isolation), so
this process neither receives the raw audio nor spends its CPU on the front end.

Timing: ``decode`` is the wall time from open to the last chunk, including cutting the audio patches,
*excluding* the time ``emit`` spent blocked on a full event queue (backpressure from the batcher is not
decode time). A request queue that is full blocks :meth:`DecodeThreads.put` (backpressure on the submitter).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from worker.config import Settings
from worker.engine.buffers import VideoAccumulator
from worker.engine.events import AudioPatches, Decoded, DecodeFailed, Event, Frames, Started
from worker.errors import MediaTimeoutError, TagstreamError
from worker.media.hwaccel import HwaccelChoice, choose_hwaccel, cuda_listed, run_probe
from worker.media.isolation import DecodePool, IsolatedSource
from worker.media.open import OpenPolicy
from worker.media.records import DecodeLimits, DecodeRequest, FrameChunk, PatchChunk
from worker.media.sampling import SamplingPolicy
from worker.media.source import VideoSource

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often blocked threads look at the stop flag
#: Frames per chunk and seconds of audio per patch chunk the engine asks its decoders for. Every chunk is
#: a message, an event and a batcher step in this process (about 0.5 ms of its CPU each on a 2-vCPU VM), so
#: a one-minute video arrives in 2 frame chunks and 1 patch chunk instead of 4 and 6 (16 frames, 10 s):
#: BENCHMARKS.md "GPU feed". A frame chunk is one shared-memory slot: 32 x 224 x 224 x 3 = 4.8 MB.
CHUNK_FRAMES = 32
AUDIO_CHUNK_S = 60.0


def as_error(exc: BaseException, video_id: str) -> TagstreamError:
    """``exc`` as a TagstreamError (an unexpected exception is logged with its traceback and becomes
    ``internal_error``)."""
    if isinstance(exc, TagstreamError):
        return exc
    log.error("video %s: unexpected %s: %s", video_id, type(exc).__name__, exc, exc_info=exc)
    return TagstreamError(f"{type(exc).__name__}: {exc}")


def resolve_hwaccel(settings: Settings, device_type: str) -> HwaccelChoice:
    """The hwaccel the decoders use (:func:`worker.media.hwaccel.choose_hwaccel`): ``none`` and ``cuda`` as
    set; ``auto`` is NVDEC only on a GPU worker whose probe (a subprocess, at most
    :data:`~worker.media.hwaccel.PROBE_TIMEOUT_S`) measured it faster than software decoding, with as many
    NVDEC sessions as the worker would run (``resolved_decode_threads(hwaccel="cuda")``) against the CPUs
    software decoding could use (the CPU budget, or ``decode_threads`` when fewer). Logged at INFO, with the
    probe's figures."""
    sessions = settings.resolved_decode_threads(hwaccel="cuda")
    sampling = SamplingPolicy(fps=settings.fps, max_frames=settings.max_frames)
    choice = choose_hwaccel(
        settings.hwaccel, gpu=device_type == "cuda", cuda_listed=cuda_listed(),
        probe=lambda: run_probe(streams=sessions, sampling=sampling),
        cpu_budget=min(settings.resolved_cpu_budget(), settings.resolved_decode_threads()), sessions=sessions,
    )  # fmt: skip
    log.info("hwaccel %s: %s", choice.hwaccel, choice.reason)
    if choice.probe is not None:
        log.info("hwaccel probe (%s): %s", choice.probe.clip, choice.probe.describe())
    return choice


class DecodeThreads:
    """``settings.resolved_decode_threads(hwaccel=...)`` decode threads (with ``decode_isolation`` one
    decoder process each; see the module docstring): the CPU budget in software, at least eight NVDEC
    sessions when :func:`resolve_hwaccel` chose ``cuda``, unless ``decode_threads`` is set.

    ``emit(event)`` pushes to the batcher and returns the seconds it blocked; ``forget(video)`` resolves a
    video whose caller cancelled it while it was queued. ``stopping`` ends the threads."""

    def __init__(self, settings: Settings, *, device_type: str, crop_size: int, resize_short: int,
                 emit: Callable[[Event], float], forget: Callable[[VideoAccumulator], None],
                 stopping: threading.Event) -> None:
        self.hwaccel_choice = resolve_hwaccel(settings, device_type)
        self.hwaccel = self.hwaccel_choice.hwaccel
        self.count = settings.resolved_decode_threads(hwaccel=self.hwaccel)
        self.requests: queue.Queue[VideoAccumulator] = queue.Queue(maxsize=max(2 * self.count, 2 * settings.concurrency))
        self.settings = settings
        self._sampling = SamplingPolicy(fps=settings.fps, max_frames=settings.max_frames)
        self._limits = DecodeLimits.from_settings(settings)
        self._open_policy = OpenPolicy.from_settings(settings)
        self._crop_size, self._resize_short = crop_size, resize_short
        self._emit, self._forget, self._stopping = emit, forget, stopping
        self.pool: DecodePool | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> list[threading.Thread]:
        """Start the decoder processes (with isolation) and the threads; returns the threads."""
        if self.settings.decode_isolation:
            self.pool = DecodePool.from_settings(self.settings, self.count, software=self.hwaccel == "none",
                                                 slot_bytes=CHUNK_FRAMES * self._crop_size**2 * 3)
        for i in range(self.count):
            t = threading.Thread(target=self._loop, name=f"tagstream-decode-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return list(self._threads)

    def close(self) -> None:
        """Kill the decoder processes (the threads end on ``stopping``)."""
        if self.pool is not None:
            self.pool.close()

    def put(self, video: VideoAccumulator) -> bool:
        """Queue ``video`` for decoding, waiting up to :data:`POLL_S`; False when the queue stayed full."""
        try:
            self.requests.put(video, timeout=POLL_S)
            return True
        except queue.Full:
            return False

    def request_for(self, video: VideoAccumulator) -> DecodeRequest:
        return DecodeRequest(
            uri=video.request.uri, sampling=self._sampling, limits=self._limits, open_policy=self._open_policy,
            crop_size=self._crop_size, resize_short=self._resize_short, hwaccel=self.hwaccel,
            audio_patches=True, chunk_frames=CHUNK_FRAMES, audio_chunk_s=AUDIO_CHUNK_S,
        )  # fmt: skip

    def open(self, request: DecodeRequest) -> VideoSource | IsolatedSource:
        """``request`` opened in a decoder process when isolation is on, else in this thread."""
        return self.pool.open(request) if self.pool is not None else VideoSource.open(request)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                video = self.requests.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if video.finished:
                continue
            try:
                running = video.future.set_running_or_notify_cancel()
            except RuntimeError:  # resolved (deadline, stop) between the check above and here
                continue
            if not running:  # cancelled by the caller while queued
                self._forget(video)
                continue
            video.started_at = time.monotonic()
            self._emit(Started(video))
            self._decode(video)

    def _decode(self, video: VideoAccumulator) -> None:
        t0, blocked = time.perf_counter(), 0.0
        try:
            with self.open(self.request_for(video)) as source:
                for chunk in source.chunks():
                    if video.finished or self._stopping.is_set():
                        break
                    if video.deadline_passed(time.monotonic()):
                        raise MediaTimeoutError("the video's deadline passed while decoding")
                    if isinstance(chunk, FrameChunk):
                        blocked += self._emit(Frames(video, chunk.timestamps, chunk.frames))
                    elif isinstance(chunk, PatchChunk):
                        blocked += self._emit(AudioPatches(video, chunk.patches))
                info, stats = source.info, source.stats
            self._emit(Decoded(video, info, stats, time.perf_counter() - t0 - blocked))
        except Exception as exc:  # noqa: BLE001 - every failure belongs to this video only
            video.timings["decode"] = time.perf_counter() - t0 - blocked
            self._emit(DecodeFailed(video, as_error(exc, video.request.video_id)))
