"""The plain records that cross the media boundary: what a decoder is asked for, and what it gives back.

In: :class:`DecodeRequest` (the URI, the :class:`~worker.media.sampling.SamplingPolicy`, the
:class:`DecodeLimits`, the :class:`~worker.media.open.OpenPolicy` and the output options), the one
description of a decode that both decoders take: :class:`~worker.media.source.VideoSource` in the calling
thread, :class:`~worker.media.isolation.IsolatedSource` in a decoder process (it travels there as JSON,
:meth:`DecodeRequest.to_wire`). Out: :class:`FrameChunk` and :class:`AudioChunk` (or, with
``audio_patches``, :class:`PatchChunk`: the audio already cut into VGGish log-mel patches by
:class:`model.log_mel.PatchCutter`) while decoding, then :class:`MediaInfo` and :class:`DecodeStats`.

Nothing here imports torch or the settings module (the GPU benchmark image has no pydantic-settings);
``from_settings`` takes any object with the settings' field names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.media.open import OpenPolicy
from worker.media.sampling import SamplingPolicy

if TYPE_CHECKING:
    from worker.config import Settings

__all__ = ["AudioChunk", "DecodeLimits", "DecodeRequest", "DecodeStats", "FrameChunk", "MediaInfo",
           "PatchChunk"]  # fmt: skip


@dataclass(frozen=True)
class DecodeLimits:
    """What one video may cost: refusals (``max_*``), timeouts and the decode wall-time budget."""

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


@dataclass(frozen=True)
class DecodeRequest:
    """Everything a decoder needs for one video.

    ``open_policy`` None means the opening thread's policy (:func:`worker.media.open.set_thread_policy`,
    else the permissive default); the worker always sets one. ``crop_size``/``resize_short``: frames are
    the centre ``crop_size`` square of the display image scaled to short side ``resize_short``.
    ``chunk_frames`` frames per :class:`FrameChunk`, ``audio_chunk_s`` seconds per :class:`AudioChunk`.
    ``audio_patches``: the audio comes out as :class:`PatchChunk` s (each one the patches completed by
    the next ``audio_chunk_s`` of audio; a chunk that completes none gives no record) instead of
    :class:`AudioChunk` s.
    ``hwaccel``: ``none``, ``cuda`` or ``auto``. ``codec_threads``: the video decoder's own threads.
    ``strategy`` forces a sampling strategy (benchmarks and tests; None: the cheapest plan).
    """

    uri: str
    sampling: SamplingPolicy
    limits: DecodeLimits
    open_policy: OpenPolicy | None = None
    crop_size: int = 224
    resize_short: int = 256
    chunk_frames: int = 16
    audio_chunk_s: float = 10.0
    hwaccel: str = "none"
    decode_audio: bool = True
    codec_threads: int = 1
    strategy: str | None = None
    audio_patches: bool = False

    def to_wire(self) -> dict[str, Any]:
        """JSON-ready form (nested records as objects), for a decoder process."""
        return asdict(self)

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> DecodeRequest:
        """Inverse of :meth:`to_wire` (the parent is trusted: a malformed request raises)."""
        options = {f.name: raw[f.name] for f in fields(cls) if f.name not in ("sampling", "limits", "open_policy")}
        policy = raw.get("open_policy")
        return cls(
            sampling=SamplingPolicy(**raw["sampling"]),
            limits=DecodeLimits(**raw["limits"]),
            open_policy=None if policy is None else OpenPolicy.from_dict(policy),
            **options,
        )


@dataclass
class MediaInfo:
    """What the container says about a video (``rotation`` is set once a frame has been decoded)."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FrameChunk:
    """Consecutive sampled frames of one video."""

    timestamps: np.ndarray  # (n,) float64 seconds
    frames: np.ndarray  # (n, S, S, 3) uint8 RGB


@dataclass
class AudioChunk:
    """Contiguous 16 kHz mono audio of one video, starting ``start_s`` seconds in."""

    start_s: float
    samples: np.ndarray  # (m,) float32 mono 16 kHz


@dataclass
class PatchChunk:
    """Consecutive VGGish log-mel patches of one video's audio (:mod:`model.log_mel`); patch ``k`` of the
    chunk covers the 0.975 s of audio from ``start_s + 0.96 k`` seconds in (0.96 s apart, not overlapping
    in frames)."""

    start_s: float
    patches: np.ndarray  # (n, 96, 64) float32, n >= 1


@dataclass
class DecodeStats:
    """What the decoder did for one video (``tagstream probe`` prints it; the result's ``decode``)."""

    strategy: str = ""
    frames_decoded: int = 0
    frames_sampled: int = 0
    audio_seconds: float = 0.0
    timings_s: dict[str, float] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)
    plan: dict[str, float] = field(default_factory=dict)  # packets, keyframes, seeks, packets sent to the decoder
    fallbacks: int = 0  # times a missed target made the rest be decoded without skipping
    ended_early_s: float | None = None  # last frame, when frames end before the last target's bin
    hwaccel: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
