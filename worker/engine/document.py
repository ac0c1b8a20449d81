"""The result document: one JSON object per video, built here and nowhere else.

The same document is written to ``tagstream:tags:{video_id}``, returned as the rq job result and
printed by ``tagstream tag FILE`` (README "The Redis contract"; docs/ARCHITECTURE.md). Field names and
meanings are the public contract:

``schema``, ``video_id``, ``status`` (``"tagged"`` | ``"failed"``), ``reason`` (``None`` or a reason code
from :mod:`worker.errors`), ``model_version``, ``categories`` (level 1, ``{"label", "score"}``), ``tags``
(level 2, ``{"label", "score", "segments": [[start_s, end_s], ...]}``), ``concepts`` (generic visual
concepts of the image backbone, ``{"label", "score"}``), ``media`` (``duration_s``, ``frames``,
``audio_s``, ``width``, ``height``), ``timings_s`` (``queue_wait``, ``decode``, ``image``, ``audio``,
``text``, ``fusion``, ``total``) and ``finished_at`` (ISO-8601 UTC with a ``Z``).

Extra fields are allowed: a failed document carries ``error`` (the message and details), and a
document produced before a fusion checkpoint exists carries ``features`` (the shapes of the extracted
feature sequences) with empty ``tags`` and ``categories``. A tagged document also carries ``decode``
(the decoder's :class:`~worker.media.records.DecodeStats`) and, when the frames end before the declared
duration, ``input_warnings``.

:func:`video_document` builds a tagged video's document from what the engine gathered;
:func:`failed_document` a failed one's (the worker's failure path and ``tagstream tag`` use it).
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, SupportsFloat

from model.features import VideoFeatures
from worker.engine.buffers import VideoAccumulator
from worker.errors import TagstreamError, reason_of
from worker.media.records import DecodeStats, MediaInfo
from worker.metrics import STAGES

SCHEMA_VERSION = 1

#: A result document: a JSON object (field values are of several JSON types, hence ``Any``).
Document = dict[str, Any]

TIMING_KEYS = STAGES  # one spelling: the metrics' stage label values are the document's timing keys
MEDIA_KEYS = ("duration_s", "frames", "audio_s", "width", "height")


def utc_now_iso() -> str:
    """Current UTC time as ``2026-11-26T17:00:00.123Z`` (millisecond precision)."""
    now = _dt.datetime.now(_dt.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _num(value: SupportsFloat | None, ndigits: int = 4) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        return None
    return round(value, ndigits)


def normalise_timings(timings: Mapping[str, Any] | None) -> dict[str, float]:
    """Every key of :data:`TIMING_KEYS` present (missing stages are 0.0), seconds rounded to 0.1 ms."""
    timings = timings or {}
    return {key: _num(timings.get(key, 0.0)) or 0.0 for key in TIMING_KEYS}


def normalise_media(media: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every key of :data:`MEDIA_KEYS` present; counts and sizes as ints, seconds as floats."""
    media = dict(media or {})
    out: dict[str, Any] = {}
    for key in MEDIA_KEYS:
        value = media.pop(key, None)
        if value is None:
            out[key] = None
        elif key in ("frames", "width", "height"):
            out[key] = int(value)
        else:
            out[key] = _num(value, 3)
    out.update(media)  # extra media facts (codec, fps, ...) are kept
    return out


def _scored(items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for item in items:
        entry = dict(item)
        entry["score"] = _num(entry.get("score"))
        if "segments" in entry:
            entry["segments"] = [[_num(a, 2), _num(b, 2)] for a, b in entry["segments"]]
        out.append(entry)
    return out


def tagged_document(
    video_id: str,
    *,
    model_version: str,
    prediction: Mapping[str, Any] | None,
    concepts: Iterable[Mapping[str, Any]],
    media: Mapping[str, Any],
    timings: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Document:
    """The document of a tagged video.

    ``prediction`` is ``model.predict.Prediction.to_dict()`` (``categories`` and ``tags``), or None
    when no fusion checkpoint is loaded (then ``tags``/``categories`` are empty and ``extra`` should
    carry ``features``). ``extra`` fields are merged last but cannot overwrite contract fields.
    """
    prediction = prediction or {}
    doc: Document = {
        "schema": SCHEMA_VERSION,
        "video_id": video_id,
        "status": "tagged",
        "reason": None,
        "model_version": model_version,
        "categories": _scored(prediction.get("categories", [])),
        "tags": _scored(prediction.get("tags", [])),
        "concepts": _scored(concepts),
        "media": normalise_media(media),
        "timings_s": normalise_timings(timings),
        "finished_at": utc_now_iso(),
    }
    for key, value in (extra or {}).items():
        doc.setdefault(key, value)
    return doc


def video_document(
    video: VideoAccumulator,
    features: VideoFeatures,
    *,
    model_version: str,
    prediction: Mapping[str, Any] | None,
    class_names: Sequence[str],
    top_k_concepts: int,
    timings: Mapping[str, float],
) -> Document:
    """The document of a video the engine finished: ``media`` from the decoder's
    :class:`~worker.media.records.MediaInfo` and stats and the frames that reached the image extractor,
    ``concepts`` from the mean softmax over those frames, ``decode`` (the decoder's stats),
    ``input_warnings`` when the frames ended early, and ``features`` (shapes) when ``prediction`` is None
    (no fusion checkpoint)."""
    info, stats = video.info, video.stats
    media = media_of(info, stats, video.frames)
    extra: dict[str, Any] = {}
    if stats is not None:
        extra["decode"] = stats.to_dict()
        if stats.ended_early_s is not None:
            extra["input_warnings"] = [
                f"frames end at {stats.ended_early_s:g} s of the declared {media['duration_s'] or 0:g} s "
                "(a truncated or damaged file): tagged from the frames that decode"
            ]
    if prediction is None:
        extra["features"] = {
            "image": list(features.image.shape), "audio": list(features.audio.shape), "text": list(features.text.shape)
        }
    return tagged_document(
        video.request.video_id,
        model_version=model_version,
        prediction=prediction,
        concepts=video.concepts(class_names, top_k_concepts),
        media=media,
        timings=timings,
        extra=extra,
    )


def media_of(info: MediaInfo | None, stats: DecodeStats | None, frames: int) -> dict[str, Any]:
    """The ``media`` section (before :func:`normalise_media`): duration and display size from the
    container, audio seconds from the decoder, ``frames`` = frames that were sampled and extracted."""
    return {
        "duration_s": info.duration_s if info is not None else None,
        "frames": frames,
        "audio_s": stats.audio_seconds if stats is not None else 0.0,
        "width": info.width if info is not None else None,
        "height": info.height if info is not None else None,
    }


def failed_document(video_id: str, error: BaseException, *, model_version: str) -> Document:
    """The document of a video that could not be tagged; ``reason`` is the error's reason code
    (``internal_error`` for exceptions that are not :class:`~worker.errors.TagstreamError`), and
    ``timings_s`` the stages the engine ran before it failed (``TagstreamError.timings_s``; zeros when
    it never reached the engine)."""
    timings = None
    if isinstance(error, TagstreamError):
        info = error.to_dict()
        timings = error.timings_s
    else:
        info = {"reason": reason_of(error), "message": f"{type(error).__name__}: {error}", "permanent": True}
    return {
        "schema": SCHEMA_VERSION,
        "video_id": video_id,
        "status": "failed",
        "reason": info["reason"],
        "model_version": model_version,
        "categories": [],
        "tags": [],
        "concepts": [],
        "media": normalise_media(None),
        "timings_s": normalise_timings(timings),
        "finished_at": utc_now_iso(),
        "error": info,
    }
