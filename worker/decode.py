"""Streaming decode: sampled RGB frames and 16 kHz mono audio from a local file or http(s) URL.

``VideoSource`` opens the input (see :mod:`worker.media_open` for the protocol/demuxer allow-lists and
error classification), checks limits, reads the keyframe layout, picks a strategy (see
:mod:`worker.sampling`) and yields ``FrameChunk`` / ``AudioChunk`` objects. Memory is bounded by one
chunk of frames, one audio chunk and the decoder's own buffers, whatever the video length.

Interpretations:

- Timestamps are seconds from the video stream's start time (``stream.start_time``), from each frame's
  presentation timestamp (``best_effort_timestamp`` when ``pts`` is missing).
- Frames: swscale (one ``VideoReformatter`` per thread, ``threads=1``) resizes the *display* image so
  its short side is ``resize_short`` and converts to RGB; rotation metadata (``frame.rotation``, the
  counter-clockwise display-matrix angle) is then applied with ``np.rot90`` on the small image; finally
  a ``crop_size`` centre crop.
- Audio is read through a second demuxer on the same input (so seeking the video never leaves gaps in
  the audio); chunks are contiguous, ``audio_chunk_s`` long (the last one shorter), interleaved with the
  frame chunks by time. A URL is therefore fetched twice when audio is decoded.
- ``decode_budget_s`` is wall time from the start of :meth:`VideoSource.chunks`, checked between packets.
- A still image (PNG/JPEG) is ``unsupported_media``; audio-only is ``unsupported_media`` unless
  ``allow_audio_only`` (then only audio chunks are produced).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import av
import av.error
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter

from worker.errors import (
    DecodeError,
    MediaTimeoutError,
    TooLargeError,
    TooLongError,
    UnsupportedMediaError,
)
from worker.media_open import is_url, make_hwaccel, map_av_error, open_input
from worker.sampling import Plan, SamplingPolicy, nearest_indices, plan_strategy

if TYPE_CHECKING:
    from worker.config import Settings

__all__ = ["AudioChunk", "DecodeLimits", "DecodeStats", "FrameChunk", "MediaInfo", "SamplingPolicy", "VideoSource"]

log = logging.getLogger(__name__)
AUDIO_RATE = 16000
_local = threading.local()
_hw_failed = False


def _reformatter() -> VideoReformatter:
    """The calling thread's VideoReformatter (PyAV 18 builds a scaler per call otherwise)."""
    ref = getattr(_local, "reformatter", None)
    if ref is None:
        ref = _local.reformatter = VideoReformatter()
    return ref


@dataclass(frozen=True)
class DecodeLimits:
    max_duration_s: float
    max_pixels: int
    max_file_bytes: int
    open_timeout_s: float
    read_timeout_s: float
    decode_budget_s: float
    allow_audio_only: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> DecodeLimits:
        return cls(
            max_duration_s=settings.max_duration_s,
            max_pixels=settings.max_pixels,
            max_file_bytes=settings.max_file_bytes,
            open_timeout_s=settings.open_timeout_s,
            read_timeout_s=settings.read_timeout_s,
            decode_budget_s=settings.decode_budget_s,
            allow_audio_only=settings.allow_audio_only,
        )


@dataclass
class MediaInfo:
    container: str
    video_codec: str | None
    audio_codec: str | None
    duration_s: float
    width: int  # display width (after rotation)
    height: int
    rotation: int  # counter-clockwise degrees from the display matrix (set once a frame is decoded)
    avg_fps: float
    has_audio: bool
    audio_sample_rate: int | None
    audio_channels: int | None
    keyframe_interval_s: float | None  # mean distance between keyframes, when known
    size_bytes: int | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FrameChunk:
    timestamps: np.ndarray  # (n,) float64 seconds
    frames: np.ndarray  # (n, S, S, 3) uint8 RGB


@dataclass
class AudioChunk:
    start_s: float
    samples: np.ndarray  # (m,) float32 mono 16 kHz


@dataclass
class DecodeStats:
    strategy: str = ""
    frames_decoded: int = 0
    frames_sampled: int = 0
    audio_seconds: float = 0.0
    timings_s: dict[str, float] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)
    hwaccel: str = "none"

    def to_dict(self) -> dict:
        return asdict(self)


class VideoSource:
    """One video: open in ``__init__`` (typed errors), then iterate :meth:`chunks` once."""

    def __init__(self, uri: str, policy: SamplingPolicy, limits: DecodeLimits, *, crop_size: int = 224,
                 resize_short: int = 256, chunk_frames: int = 16, audio_chunk_s: float = 10.0,
                 hwaccel: str = "none", decode_audio: bool = True) -> None:
        self.uri, self.policy, self.limits = uri, policy, limits
        self.crop_size, self.resize_short = crop_size, max(resize_short, crop_size)
        self.chunk_frames, self.audio_chunk_s = max(1, chunk_frames), audio_chunk_s
        self.decode_audio = decode_audio
        self.stats = DecodeStats()
        self._container: av.container.InputContainer | None = None
        self._audio_container: av.container.InputContainer | None = None
        self._deadline = math.inf
        t0 = time.perf_counter()
        self._container = self._open(hwaccel)
        try:
            self._inspect()
        except BaseException:
            self.close()
            raise
        self.stats.timings_s["open_s"] = time.perf_counter() - t0

    # --- opening and inspection -------------------------------------------------------------------
    def _open_plain(self, hw: object | None = None) -> av.container.InputContainer:
        return open_input(self.uri, open_timeout_s=self.limits.open_timeout_s,
                          read_timeout_s=self.limits.read_timeout_s,
                          max_file_bytes=self.limits.max_file_bytes, hwaccel=hw)

    def _open(self, hwaccel: str) -> av.container.InputContainer:
        global _hw_failed
        hw = None if _hw_failed else make_hwaccel(hwaccel)
        if hw is not None:
            try:
                container = self._open_plain(hw)
                self.stats.hwaccel = "cuda"
                return container
            except Exception as exc:  # noqa: BLE001 - any failure with hwaccel: retry in software
                log.info("hwaccel open failed (%s); falling back to software", exc)
                _hw_failed = hwaccel == "auto"
        return self._open_plain(None)

    def _inspect(self) -> None:
        c = self._container
        assert c is not None
        vstreams = [s for s in c.streams.video if not (s.disposition & av.stream.Disposition.attached_pic)]
        astreams = list(c.streams.audio)
        self._v = vstreams[0] if vstreams else None
        self._a = astreams[0] if astreams else None
        if self._v is None and not (self._a is not None and self.limits.allow_audio_only):
            raise UnsupportedMediaError("no video stream" + (" (audio only)" if self._a else ""),
                                        detail={"uri": self.uri})
        duration = None
        if c.duration:
            duration = c.duration / av.time_base
        main = self._v or self._a
        if main is not None and main.duration and main.time_base:
            duration = float(main.duration * main.time_base)
        width = height = rotation = 0
        fps = 0.0
        if self._v is not None:
            cc = self._v.codec_context
            width, height = cc.width, cc.height
            if width <= 0 or height <= 0:
                raise DecodeError("video stream has no dimensions", detail={"uri": self.uri})
            if width * height > self.limits.max_pixels:
                raise TooLargeError(f"{width}x{height} exceeds max_pixels {self.limits.max_pixels}",
                                    detail={"uri": self.uri, "width": width, "height": height})
            fps = float(self._v.average_rate or self._v.guessed_rate or 0.0)
            if self._v.codec_context.name in ("png", "mjpeg", "bmp", "gif", "webp") and (self._v.frames or 0) == 1:
                raise UnsupportedMediaError("a single still image is not a video", detail={"uri": self.uri})
        self._start = 0.0
        if self._v is not None and self._v.start_time is not None:
            self._start = float(self._v.start_time * self._v.time_base)
        self._frame_times, self._key_times = self._keyframe_layout()
        if duration is None and self._frame_times is not None and len(self._frame_times):
            duration = float(self._frame_times[-1] + (1.0 / fps if fps else 0.0))
        if duration is not None and duration > self.limits.max_duration_s:
            raise TooLongError(f"duration {duration:.1f} s exceeds max_duration_s {self.limits.max_duration_s}",
                               detail={"uri": self.uri, "duration_s": duration})
        self._duration = duration
        disp_w, disp_h = (height, width) if rotation % 180 else (width, height)
        key_iv = None
        if self._key_times is not None and len(self._key_times) > 1:
            key_iv = float(np.mean(np.diff(self._key_times)))
        elif self._key_times is not None and len(self._key_times) == 1 and duration:
            key_iv = duration
        a = self._a
        self.info = MediaInfo(
            container=c.format.name, video_codec=self._v.codec_context.name if self._v else None,
            audio_codec=a.codec_context.name if a else None, duration_s=float(duration or 0.0),
            width=disp_w, height=disp_h, rotation=rotation, avg_fps=fps, has_audio=a is not None,
            audio_sample_rate=a.codec_context.sample_rate if a else None,
            audio_channels=a.codec_context.channels if a else None, keyframe_interval_s=key_iv,
            size_bytes=(c.size or None) if c.size and c.size > 0 else None,
        )

    def _keyframe_layout(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """All frame times and keyframe times (seconds from start) from the index or a packet-only pass."""
        v = self._v
        if v is None:
            return None, None
        t0 = time.perf_counter()
        tb = float(v.time_base)
        entries = v.index_entries
        times: list[float] = []
        keys: list[float] = []
        self._seek_ts: dict[float, int] = {}
        if len(entries) > 1 and any(not e.is_keyframe for e in entries):
            # index timestamps are decode times; shift them so the first one is the stream start
            base = min(e.timestamp for e in entries)
            for e in entries:
                if e.is_discard:
                    continue
                t = (e.timestamp - base) * tb
                times.append(t)
                if e.is_keyframe:
                    keys.append(t)  # seeks use t + start in pts units (mov seeks by presentation time)
            source = "index"
        elif not is_url(self.uri):
            c = self._container
            try:
                for packet in c.demux(v):
                    if packet.size == 0:
                        continue
                    ts = packet.pts if packet.pts is not None else packet.dts
                    if ts is None:
                        continue
                    times.append(ts * tb - self._start)
                    if packet.is_keyframe:
                        keys.append(ts * tb - self._start)
                        self._seek_ts[ts * tb - self._start] = ts
                c.seek(0, backward=True, any_frame=False)
            except av.error.FFmpegError as exc:
                raise map_av_error(exc, self.uri) from exc
            source = "demux"
        else:
            self.stats.timings_s["index_s"] = time.perf_counter() - t0
            return None, None
        self.stats.timings_s["index_s"] = time.perf_counter() - t0
        log.debug("keyframe layout from %s: %d frames, %d keyframes", source, len(times), len(keys))
        if not times:
            return None, None
        return np.sort(np.array(times)), np.sort(np.array(keys))

    # --- decoding -------------------------------------------------------------------------------------
    def _check_budget(self) -> None:
        if time.perf_counter() > self._deadline:
            raise MediaTimeoutError(f"decode budget of {self.limits.decode_budget_s} s exceeded",
                                    detail={"uri": self.uri})

    def _to_rgb(self, frame: av.VideoFrame) -> np.ndarray:
        rot = int(round((frame.rotation or 0) / 90.0)) % 4
        if rot and not self.info.rotation:  # the display matrix is known once a frame is decoded
            self.info.rotation = rot * 90
            if rot % 2:
                self.info.width, self.info.height = self.info.height, self.info.width
        w, h = frame.width, frame.height
        disp_w, disp_h = (h, w) if rot % 2 else (w, h)
        scale = self.resize_short / min(disp_w, disp_h)
        out_w, out_h = max(self.crop_size, round(disp_w * scale)), max(self.crop_size, round(disp_h * scale))
        sw, sh = (out_h, out_w) if rot % 2 else (out_w, out_h)
        rgb = _reformatter().reformat(frame, sw, sh, "rgb24", interpolation=Interpolation.BILINEAR,
                                      threads=1).to_ndarray()
        if rot:
            rgb = np.rot90(rgb, k=rot)
        y0, x0 = (rgb.shape[0] - self.crop_size) // 2, (rgb.shape[1] - self.crop_size) // 2
        return np.ascontiguousarray(rgb[y0 : y0 + self.crop_size, x0 : x0 + self.crop_size])

    def _frame_time(self, frame: av.VideoFrame) -> float | None:
        ts = frame.pts if frame.pts is not None else getattr(frame, "best_effort_timestamp", None)
        if ts is None:
            return None
        return float(ts * self._v.time_base) - self._start

    def _decoded_frames(self, after_seek_to: float | None = None) -> Iterator[tuple[float, av.VideoFrame]]:
        """Decode the video stream from the current position, yielding (time, frame)."""
        c, v = self._container, self._v
        if after_seek_to is not None:
            pts = self._seek_ts.get(after_seek_to)
            if pts is None:
                pts = int(round((after_seek_to + self._start) / float(v.time_base)))
            c.seek(pts, stream=v, backward=True, any_frame=False)
            v.codec_context.flush_buffers()
        try:
            for packet in c.demux(v):
                self._check_budget()
                for frame in packet.decode():
                    self.stats.frames_decoded += 1
                    t = self._frame_time(frame)
                    if t is not None:
                        yield t, frame
        except av.error.FFmpegError as exc:
            raise map_av_error(exc, self.uri) from exc

    def _select(self, frames: Iterator[tuple[float, av.VideoFrame]], targets: np.ndarray,
                first: int) -> Iterator[tuple[int, float, av.VideoFrame]]:
        """Nearest decoded frame for targets[first:], in order; stops when they are all served.

        A frame nearer to target j than the previous one is chosen when it arrives at or after the
        target; at end of stream the last frame serves the remaining targets.
        """
        j, prev = first, None
        for t, frame in frames:
            while j < len(targets) and t >= targets[j]:
                if prev is not None and abs(targets[j] - prev[0]) <= abs(t - targets[j]):
                    yield j, prev[0], prev[1]
                else:
                    yield j, t, frame
                j += 1
            if j >= len(targets):
                return
            prev = (t, frame)
        if prev is not None:
            while j < len(targets):
                yield j, prev[0], prev[1]
                j += 1

    def _video_samples(self, plan: Plan, targets: np.ndarray) -> Iterator[tuple[float, np.ndarray]]:
        cc = self._v.codec_context
        if plan.strategy == "keyframes":
            cc.skip_frame = "NONKEY"
        elif plan.strategy.startswith("sequential"):
            cc.thread_type = "AUTO"
            cc.thread_count = 2
            if plan.strategy == "sequential_nonref":
                cc.skip_frame = "NONREF"
        if plan.strategy == "seek" and plan.seeks:
            seek_at = dict(plan.seeks)
            bounds = sorted(seek_at) + [len(targets)]
            groups = [(bounds[i], bounds[i + 1], seek_at[bounds[i]]) for i in range(len(bounds) - 1)]
            if bounds[0] > 0:
                groups.insert(0, (0, bounds[0], None))
        else:
            groups = [(0, len(targets), None)]
        last_key = None
        for start, stop, key_t in groups:
            frames = self._decoded_frames(after_seek_to=key_t)
            for _j, t, frame in self._select(frames, targets[:stop], start):
                key = (t, id(frame))
                if key != last_key:
                    rgb = self._to_rgb(frame)
                    last_key = key
                yield t, rgb
            frames.close()

    def _frame_chunks(self) -> Iterator[FrameChunk]:
        targets = self.policy.target_times(self._duration or (self.policy.max_frames / self.policy.fps))
        tol = self.policy.tolerance_s(self._duration or 0.0)
        plan = plan_strategy(self._frame_times, self._key_times, targets, tol,
                             codec=self._v.codec_context.name, stream_fps=self.info.avg_fps)
        self.stats.strategy, self.stats.costs = plan.strategy, plan.costs
        if self._duration is None and self._frame_times is None:
            log.info("%s: unknown duration; sampling at fps up to max_frames", self.uri)
        times: list[float] = []
        frames: list[np.ndarray] = []
        t_dec = time.perf_counter()
        for t, rgb in self._video_samples(plan, targets):
            times.append(t)
            frames.append(rgb)
            self.stats.frames_sampled += 1
            if len(frames) >= self.chunk_frames:
                yield FrameChunk(np.array(times, np.float64), np.stack(frames))
                times, frames = [], []
        if frames:
            yield FrameChunk(np.array(times, np.float64), np.stack(frames))
        self.stats.timings_s["video_s"] = time.perf_counter() - t_dec
        if self.stats.frames_sampled == 0:
            raise DecodeError("no decodable video frames", detail={"uri": self.uri})

    def _audio_chunks(self) -> Iterator[AudioChunk]:
        self._audio_container = self._open_plain(None)
        a = self._audio_container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
        chunk_n = max(1, int(round(self.audio_chunk_s * AUDIO_RATE)))
        buf: list[np.ndarray] = []
        buffered = 0
        emitted = 0

        def frames_of(decoded) -> Iterator[np.ndarray]:
            for frame in decoded:
                for out in resampler.resample(frame):
                    yield out.to_ndarray().reshape(-1)

        def packets() -> Iterator[np.ndarray]:
            for packet in self._audio_container.demux(a):
                self._check_budget()
                try:
                    yield from frames_of(packet.decode())
                except av.error.InvalidDataError as exc:  # a damaged audio packet: skip it
                    log.debug("%s: audio packet skipped: %s", self.uri, exc)
            yield from frames_of([None])

        try:
            for samples in packets():
                buf.append(samples)
                buffered += samples.size
                while buffered >= chunk_n:
                    data = np.concatenate(buf)
                    yield AudioChunk(emitted / AUDIO_RATE, data[:chunk_n].astype(np.float32, copy=False))
                    emitted += chunk_n
                    rest = data[chunk_n:]
                    buf, buffered = [rest], rest.size
        except av.error.FFmpegError as exc:
            raise map_av_error(exc, self.uri) from exc
        if buffered:
            yield AudioChunk(emitted / AUDIO_RATE, np.concatenate(buf).astype(np.float32, copy=False))
            emitted += buffered
        self.stats.audio_seconds = emitted / AUDIO_RATE

    def chunks(self) -> Iterator[FrameChunk | AudioChunk]:
        """Frame and audio chunks interleaved by time (audio up to the end of each frame chunk)."""
        t0 = time.perf_counter()
        self._deadline = t0 + self.limits.decode_budget_s
        audio = self._audio_chunks() if (self.decode_audio and self._a is not None) else iter(())
        audio_pos = 0.0
        audio_time = 0.0
        try:
            if self._v is not None:
                for chunk in self._frame_chunks():
                    yield chunk
                    horizon = float(chunk.timestamps[-1])
                    while audio_pos <= horizon:
                        ta = time.perf_counter()
                        nxt = next(audio, None)
                        audio_time += time.perf_counter() - ta
                        if nxt is None:
                            audio_pos = math.inf
                            break
                        audio_pos = nxt.start_s + nxt.samples.size / AUDIO_RATE
                        yield nxt
            while True:
                ta = time.perf_counter()
                nxt = next(audio, None)
                audio_time += time.perf_counter() - ta
                if nxt is None:
                    break
                yield nxt
        finally:
            self.stats.timings_s["audio_s"] = audio_time
            self.stats.timings_s["decode_total_s"] = time.perf_counter() - t0

    def close(self) -> None:
        for c in (self._container, self._audio_container):
            if c is not None:
                try:
                    c.close()
                except Exception:  # noqa: BLE001
                    pass
        self._container = self._audio_container = None

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        self.close()


def nearest(frame_times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Re-export of :func:`worker.sampling.nearest_indices` for tests and tools."""
    return nearest_indices(frame_times, targets)
