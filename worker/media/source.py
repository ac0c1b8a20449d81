"""Streaming decode: sampled RGB frames and 16 kHz mono audio (or its log-mel patches) from a local file or
http(s) URL.

``VideoSource`` opens the input of a :class:`~worker.media.records.DecodeRequest` (see :mod:`worker.media.open`
for the protocol/demuxer allow-lists and
error classification), checks limits, reads the keyframe layout, picks a strategy (see
:mod:`worker.media.sampling`) and yields ``FrameChunk`` / ``AudioChunk`` (or ``PatchChunk``) objects. Memory
is bounded by one chunk of frames, one audio chunk and the decoder's own buffers, whatever the video length.

Interpretations:

- Timestamps are seconds from the video stream's start time (``stream.start_time``), from each frame's
  presentation timestamp (a frame without one is never a sample; PyAV 18 exposes no
  ``best_effort_timestamp``).
- Frames: :func:`worker.media.rgb.to_rgb` (swscale, one ``VideoReformatter`` per thread, ``threads=1``):
  the *display* image (``frame.rotation`` honoured) resized to short side ``resize_short``, centre crop
  ``crop_size``, RGB. Only the sampled frames are converted.
- Video decoding follows the plan of :func:`worker.media.sampling.plan_strategy`: only the planned packets are
  sent to the decoder (the others are demuxed and dropped, or seeked over), ``skip_frame=NONREF`` for
  ``seek_nonref`` and ``sequential_nonref``. Every sample is checked against its target; a miss (a stream that breaks the
  plan's assumptions) makes the rest be decoded without skipping from the keyframe before the missed
  bin (``DecodeStats.fallbacks``). ``codec_threads`` (default 1: parallelism comes from decoding several
  videos at once) is the decoder's thread count, frame threading when > 1.
- Audio (:mod:`worker.media.audio`) is read through a second demuxer on the same input (so seeking the
  video never leaves gaps in the audio); chunks are contiguous, ``audio_chunk_s`` long (the last one
  shorter), interleaved with the frame chunks by time. A URL is therefore fetched twice when audio is
  decoded.
- With ``audio_patches`` each audio chunk, as it comes out, goes through one
  :class:`model.log_mel.PatchCutter` (NumPy, no torch) and the patches it completes are yielded as a
  ``PatchChunk`` in its place (nothing when it completes none; the remainder at the end that fills no
  patch is dropped, as VGGish does). The cutting is part of ``timings_s["audio_s"]``;
  ``DecodeStats.audio_seconds`` still counts the audio decoded.
- ``decode_budget_s`` is wall time from the start of :meth:`VideoSource.chunks`, checked between packets.
- A still image (PNG/JPEG) is ``unsupported_media``; audio-only is ``unsupported_media`` unless
  ``allow_audio_only`` (then only audio chunks are produced).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator

import av
import av.error
import numpy as np
from av.codec.hwaccel import HWAccel

from model.log_mel import PATCH_SECONDS, PatchCutter
from worker.errors import (
    DecodeError,
    MediaTimeoutError,
    TooLargeError,
    TooLongError,
    UnsupportedMediaError,
)
from worker.media.audio import AUDIO_RATE, audio_chunks
from worker.media.hwaccel import make_hwaccel
from worker.media.open import OpenPolicy, is_url, map_av_error, open_input
from worker.media.records import (
    AudioChunk,
    DecodeLimits,
    DecodeRequest,
    DecodeStats,
    FrameChunk,
    MediaInfo,
    PatchChunk,
)
from worker.media.rgb import to_rgb
from worker.media.sampling import Layout, Plan, SamplingPolicy, Selector, nearest_indices, plan_strategy

__all__ = ["VideoSource"]

log = logging.getLogger(__name__)
_hw_failed = False


class VideoSource:
    """One video decoded in the calling thread: open in ``__init__`` (typed errors), then iterate
    :meth:`chunks` once.

    ``VideoSource(uri, sampling, limits, **options)`` decodes ``DecodeRequest(uri, sampling, limits,
    **options)`` (the options are that record's fields); :meth:`open` takes the record itself."""

    def __init__(self, uri: str, policy: SamplingPolicy, limits: DecodeLimits, *, crop_size: int = 224,
                 resize_short: int = 256, chunk_frames: int = 16, audio_chunk_s: float = 10.0,
                 hwaccel: str = "none", decode_audio: bool = True, codec_threads: int = 1,
                 strategy: str | None = None, open_policy: OpenPolicy | None = None,
                 audio_patches: bool = False) -> None:
        self.request = DecodeRequest(
            uri=uri, sampling=policy, limits=limits, open_policy=open_policy, crop_size=crop_size,
            resize_short=resize_short, chunk_frames=chunk_frames, audio_chunk_s=audio_chunk_s, hwaccel=hwaccel,
            decode_audio=decode_audio, codec_threads=codec_threads, strategy=strategy, audio_patches=audio_patches,
        )  # fmt: skip
        self.uri, self.policy, self.limits = uri, policy, limits
        self.codec_threads, self.force_strategy = max(0, codec_threads), strategy
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

    @classmethod
    def open(cls, request: DecodeRequest) -> VideoSource:
        """Open ``request`` in the calling thread."""
        r = request
        return cls(r.uri, r.sampling, r.limits, crop_size=r.crop_size, resize_short=r.resize_short,
                   chunk_frames=r.chunk_frames, audio_chunk_s=r.audio_chunk_s, hwaccel=r.hwaccel,
                   decode_audio=r.decode_audio, codec_threads=r.codec_threads, strategy=r.strategy,
                   open_policy=r.open_policy, audio_patches=r.audio_patches)  # fmt: skip

    @property
    def layout(self) -> Layout | None:
        """The video's packets in decode order (times, keyframe flags), as the planner sees them."""
        return self._layout

    # --- opening and inspection -------------------------------------------------------------------
    def _open_plain(self, hw: HWAccel | None = None) -> av.container.InputContainer:
        return open_input(self.uri, open_timeout_s=self.limits.open_timeout_s,
                          read_timeout_s=self.limits.read_timeout_s,
                          max_file_bytes=self.limits.max_file_bytes, hwaccel=hw, policy=self.request.open_policy)

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
        # a stream FFmpeg has no decoder for (no codec context: e.g. a corrupt codec tag) counts as absent
        vstreams = [s for s in c.streams.video
                    if s.codec_context is not None and not (s.disposition & av.stream.Disposition.attached_pic)]
        astreams = [s for s in c.streams.audio if s.codec_context is not None]
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
        self._tb = float(self._v.time_base) if self._v is not None else 0.0
        if self._v is not None and self._v.start_time is not None:
            self._start = float(self._v.start_time * self._v.time_base)
        self._layout = self._keyframe_layout()
        if duration is None and self._layout is not None:
            duration = float(self._layout.times.max() + (1.0 / fps if fps else 0.0))
        if duration is not None and duration > self.limits.max_duration_s:
            raise TooLongError(f"duration {duration:.1f} s exceeds max_duration_s {self.limits.max_duration_s}",
                               detail={"uri": self.uri, "duration_s": duration})
        self._duration = duration
        disp_w, disp_h = (height, width) if rotation % 180 else (width, height)
        key_iv = None
        key_times = np.sort(self._layout.key_times) if self._layout is not None else None
        if key_times is not None and len(key_times) > 1:
            key_iv = float(np.mean(np.diff(key_times)))
        elif key_times is not None and len(key_times) == 1 and duration:
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

    def _packet_time(self, packet: av.Packet) -> float | None:
        ts = packet.pts if packet.pts is not None else packet.dts
        return None if ts is None else ts * self._tb - self._start

    def _keyframe_layout(self) -> Layout | None:
        """Packets in decode order (presentation time, keyframe flag): a packet-only demux pass for local
        files, the container index (decode times) for URLs; None when neither is available."""
        v = self._v
        if v is None:
            return None
        t0 = time.perf_counter()
        tb = float(v.time_base)
        times: list[float] = []
        keys: list[bool] = []
        self._seek_ts: dict[int, int] = {}  # packet index of a keyframe -> its timestamp, for seeking
        exact = True
        if not is_url(self.uri):
            c = self._container
            try:
                for packet in c.demux(v):
                    if packet.size == 0:
                        continue
                    ts = packet.pts if packet.pts is not None else packet.dts
                    if ts is None:
                        continue
                    if packet.is_keyframe:
                        self._seek_ts[len(times)] = ts
                    times.append(ts * tb - self._start)
                    keys.append(bool(packet.is_keyframe))
                c.seek(0, backward=True, any_frame=False)
            except av.error.FFmpegError as exc:
                raise map_av_error(exc, self.uri) from exc
        else:
            entries = [e for e in v.index_entries if not e.is_discard]
            if len(entries) > 1 and any(not e.is_keyframe for e in entries):
                # index timestamps are decode times; shift them so the first one is the stream start
                base = min(e.timestamp for e in entries)
                times = [(e.timestamp - base) * tb for e in entries]
                keys = [bool(e.is_keyframe) for e in entries]
                exact = False
        self.stats.timings_s["index_s"] = time.perf_counter() - t0
        if not times:
            return None
        log.debug("layout (%s): %d packets, %d keyframes", "demux" if exact else "index", len(times), sum(keys))
        return Layout(np.array(times), np.array(keys, bool), exact)

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
        return to_rgb(frame, self.resize_short, self.crop_size, rotation=rot * 90)

    def _frame_time(self, frame: av.VideoFrame) -> float | None:
        ts = frame.pts
        if ts is None:
            return None
        return ts * self._tb - self._start

    def _demux(self, seek_ts: int | None = None) -> Iterator[av.Packet]:
        """Video packets (non-empty) from the current position, or after seeking to ``seek_ts``."""
        c, v = self._container, self._v
        if seek_ts is not None:
            c.seek(seek_ts, stream=v, backward=True, any_frame=False)  # also flushes the decoder
        for packet in c.demux(v):
            self._check_budget()
            if packet.size:
                yield packet

    def _index_of(self, packet: av.Packet, prev: int) -> int:
        """Decode-order index of ``packet`` in the layout: resynchronised on every keyframe (by time)."""
        lay = self._layout
        if lay is None or not packet.is_keyframe or not len(self._key_idx):
            return prev + 1
        t = self._packet_time(packet)
        if t is None:
            return prev + 1
        return int(self._key_idx[nearest_indices(self._key_t, np.array([t]))[0]])

    def _execute(self, plan: Plan, sel: Selector,
                 seek_ts: int | None = None) -> Iterator[tuple[int, float, av.VideoFrame]]:
        """Send the plan's packets to the decoder and feed its frames to ``sel``; drain at the end."""
        cc = self._v.codec_context
        n = len(self._layout) if self._layout is not None else 0
        if plan.send is None:
            spans = [(0, plan.last if plan.last >= 0 else math.inf)]
        else:
            edges = np.flatnonzero(np.diff(np.concatenate([[0], plan.send.view(np.int8), [0]])))
            spans = list(zip(edges[::2].tolist(), (edges[1::2] - 1).tolist(), strict=True))
        seek_to = set(plan.seek_to)

        def drain() -> Iterator[tuple[int, float, av.VideoFrame]]:
            for frame in cc.decode(None):
                yield from self._fed(sel, frame)

        packets = self._demux(seek_ts)
        idx = -1 if seek_ts is None or not n else -(n + 2)  # after a seek: unknown until a keyframe
        try:
            for a, b in spans:
                if a in seek_to and a > idx + 1:
                    yield from drain()
                    packets.close()
                    packets = self._demux(self._seek_ts.get(a, int(round((self._layout.times[a] + self._start)
                                                                      / self._tb))))
                    idx = -(n + 2)
                for packet in packets:
                    idx = self._index_of(packet, idx)
                    if idx < a:
                        continue
                    for frame in cc.decode(packet):
                        yield from self._fed(sel, frame)
                    if sel.done or idx >= b:
                        break
                if sel.done:
                    break
            if not sel.done:
                yield from drain()
        except av.error.FFmpegError as exc:
            raise map_av_error(exc, self.uri) from exc
        finally:
            packets.close()
        yield from sel.finish()

    def _fed(self, sel: Selector, frame: av.VideoFrame) -> Iterator[tuple[int, float, av.VideoFrame]]:
        self.stats.frames_decoded += 1
        t = self._frame_time(frame)
        if t is not None:
            yield from sel.feed(t, frame)

    def _video_samples(self, plan: Plan, targets: np.ndarray, tol: float) -> Iterator[tuple[float, np.ndarray]]:
        """(time, RGB) per target, in order. A sample outside the tolerance (a stream whose non-reference
        frames run longer than assumed, or a planned frame the decoder did not output) makes the rest be
        decoded sequentially, without skipping, from the keyframe before the missed target's bin."""
        cc = self._v.codec_context
        cc.thread_count = self.codec_threads
        cc.thread_type = "AUTO" if self.codec_threads != 1 else "SLICE"
        cc.skip_frame = plan.skip_frame
        eps = 1e-6 if (self._layout is not None and self._layout.exact) else 0.0
        sel = Selector(plan.aims, eps)
        run = self._execute(plan, sel)
        last_key = None
        rgb = None
        while True:
            miss = None
            for j, t, frame in run:
                if abs(t - targets[j]) > tol + 1e-6 and miss is None and not sel.fallback:
                    miss = j
                    break
                if abs(t - targets[j]) > tol + 1e-6 and sel.exhausted and t < targets[j]:
                    # even decoding everything, the frames stop here: a truncated or damaged file.
                    # The later targets get no sample rather than copies of the last frame.
                    self.stats.ended_early_s = round(t, 3)
                    log.warning("%s: frames end at %.3f s of %.3f s; %d of %d samples missing", self.uri, t,
                                self._duration or 0.0, len(targets) - j, len(targets))
                    run.close()
                    return
                if abs(t - targets[j]) > tol + 1e-6:
                    log.warning("%s: sample %d at %.3f s is %.3f s from its target", self.uri, j, t,
                                abs(t - targets[j]))
                key = (t, id(frame))
                if key != last_key:
                    rgb = self._to_rgb(frame)
                    last_key = key
                yield t, rgb
            if miss is None:
                return
            run.close()
            log.info("%s: %s missed target %d (%.3f s); decoding the rest without skipping",
                     self.uri, plan.strategy, miss, targets[miss])
            self.stats.fallbacks += 1
            cc.skip_frame = "DEFAULT"  # the seek below flushes the decoder
            start_t = targets[miss] - tol
            seek_ts = int(math.floor((max(start_t, 0.0) + self._start) / self._tb))
            if self._layout is not None and len(self._key_idx):
                k = int(np.searchsorted(self._key_t, start_t + 1e-9, side="right")) - 1
                k_idx = int(self._key_idx[max(k, 0)])
                seek_ts = self._seek_ts.get(k_idx, seek_ts)
            sel = Selector(targets, 0.0, first=miss, fallback=True)
            run = self._execute(Plan("sequential", {}, targets), sel, seek_ts=seek_ts)

    def _frame_chunks(self) -> Iterator[FrameChunk]:
        targets = self.policy.target_times(self._duration or (self.policy.max_frames / self.policy.fps))
        tol = self.policy.tolerance_s(self._duration or 0.0)
        t_plan = time.perf_counter()
        plan = plan_strategy(self._layout, targets, tol, codec=self._v.codec_context.name,
                             stream_fps=self.info.avg_fps, force=self.force_strategy)
        self.stats.timings_s["plan_s"] = time.perf_counter() - t_plan
        self.stats.strategy, self.stats.costs, self.stats.plan = plan.strategy, plan.costs, plan.detail
        if self._layout is not None:
            self._key_idx = np.flatnonzero(self._layout.keys)
            self._key_t = self._layout.times[self._key_idx]
        else:
            self._key_idx = self._key_t = np.zeros(0)
            log.info("%s: no packet layout; sampling sequentially", self.uri)
        times: list[float] = []
        frames: list[np.ndarray] = []
        t_dec = time.perf_counter()
        for t, rgb in self._video_samples(plan, targets, tol):
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
        stream = self._audio_container.streams[self._a.index]  # the stream _inspect chose, in this demuxer
        for chunk in audio_chunks(self._audio_container, stream, self.audio_chunk_s, uri=self.uri,
                                  check_budget=self._check_budget):
            self.stats.audio_seconds = chunk.start_s + chunk.samples.size / AUDIO_RATE
            yield chunk

    def _audio_records(self) -> Iterator[tuple[float, AudioChunk | PatchChunk | None]]:
        """Per decoded audio chunk: (seconds of audio decoded so far, what to yield for it): the chunk,
        or with ``audio_patches`` the patches it completes (None when it completes none)."""
        cutter = PatchCutter() if self.request.audio_patches else None
        for chunk in self._audio_chunks():
            end_s = chunk.start_s + chunk.samples.size / AUDIO_RATE
            if cutter is None:
                yield end_s, chunk
                continue
            start_s = cutter.patches_emitted * PATCH_SECONDS
            patches = cutter.push(chunk.samples)
            yield end_s, (PatchChunk(start_s, patches) if len(patches) else None)

    def chunks(self) -> Iterator[FrameChunk | AudioChunk | PatchChunk]:
        """Frame and audio chunks (or patch chunks) interleaved by time (audio up to the end of each frame
        chunk)."""
        t0 = time.perf_counter()
        self._deadline = t0 + self.limits.decode_budget_s
        audio = self._audio_records() if (self.decode_audio and self._a is not None) else iter(())
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
                        audio_pos, record = nxt
                        if record is not None:
                            yield record
            while True:
                ta = time.perf_counter()
                nxt = next(audio, None)
                audio_time += time.perf_counter() - ta
                if nxt is None:
                    break
                if nxt[1] is not None:
                    yield nxt[1]
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

