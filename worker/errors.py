"""Typed failures with machine-readable reason codes.

Every failure a video can meet maps to one subclass here; its ``reason`` is the string written to
``tagstream:tags:{video_id}`` and the rq failed registry, and used as the ``reason`` label of
``tagstream_errors_total``. ``permanent`` decides retries: permanent failures (bad media, forbidden
input) are never retried; transient ones (network, Redis, timeouts) are.

The set of reasons is closed (see ``REASONS``) so metric labels stay bounded.
"""

from __future__ import annotations

from typing import Any


class TagstreamError(Exception):
    """Base class. ``reason`` is a stable, machine-readable code; the message is for humans.

    ``detail``: facts for the failed document's ``error`` (the URI, sizes, the decoder's exit status).
    ``timings_s``: the per-stage seconds of the engine's work on the video before it failed (set by the
    engine; None when the failure came before it)."""

    reason: str = "internal_error"
    permanent: bool = True

    def __init__(self, message: str = "", *, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message or self.reason)
        self.detail = detail or {}
        self.timings_s: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "message": str(self), "permanent": self.permanent, **self.detail}


# --- input and policy -------------------------------------------------------------------------
class NotFoundError(TagstreamError):
    reason = "not_found"


class ForbiddenUriError(TagstreamError):
    """The URI's scheme, host or local root is not allowed by the URI policy."""

    reason = "forbidden_uri"


class ForbiddenMediaError(TagstreamError):
    """The file is a playlist, concat script or other container that could pull in other resources."""

    reason = "forbidden_media"


class InvalidJobError(TagstreamError):
    """The queue payload is not a valid tag job (other function, not JSON, bad arguments)."""

    reason = "invalid_job"


# --- media ----------------------------------------------------------------------------------------
class DecodeError(TagstreamError):
    """The bytes could not be demuxed or decoded (corrupt, truncated, not media at all)."""

    reason = "decode_error"


class UnsupportedMediaError(TagstreamError):
    """Readable media that we do not tag: no video stream (audio-only, subtitles), unknown codec."""

    reason = "unsupported_media"


class TooLongError(TagstreamError):
    reason = "too_long"


class TooLargeError(TagstreamError):
    """Too many pixels per frame or too many bytes."""

    reason = "too_large"


class DecoderCrashError(TagstreamError):
    """The isolated decoder process died (a native crash in FFmpeg, a signal, the kernel's OOM killer)
    while decoding this video. Permanent: the same bytes would crash it again."""

    reason = "decoder_crash"


# --- transient ------------------------------------------------------------------------------------
class MediaTimeoutError(TagstreamError):
    """Open/read timeout or the decode-time budget ran out."""

    reason = "timeout"
    permanent = False


class NetworkError(TagstreamError):
    reason = "network_error"
    permanent = False


class RedisUnavailableError(TagstreamError):
    reason = "redis_unavailable"
    permanent = False


class ShutdownError(TagstreamError):
    """The worker is shutting down and handed the job back."""

    reason = "shutdown"
    permanent = False


REASONS: tuple[str, ...] = tuple(
    sorted(
        {
            cls.reason
            for cls in (
                TagstreamError,
                NotFoundError,
                ForbiddenUriError,
                ForbiddenMediaError,
                InvalidJobError,
                DecodeError,
                UnsupportedMediaError,
                TooLongError,
                TooLargeError,
                DecoderCrashError,
                MediaTimeoutError,
                NetworkError,
                RedisUnavailableError,
                ShutdownError,
            )
        }
    )
)


def reason_of(exc: BaseException) -> str:
    """The reason code for any exception; unknown exceptions are ``internal_error``."""
    return exc.reason if isinstance(exc, TagstreamError) else TagstreamError.reason
