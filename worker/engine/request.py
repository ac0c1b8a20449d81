"""What the engine is asked to tag: one :class:`VideoRequest` per video.

Kept apart from :mod:`worker.engine.pipeline` (which imports torch) so that code that only builds
requests (the job function, scripts' stand-in pipelines) does not load torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VideoRequest:
    """One video to tag. ``uri``: what the decoder opens (already checked by the caller's URI policy,
    when one applies). ``enqueued_at``: epoch seconds when it was enqueued (for ``queue_wait``; None:
    unknown). ``deadline``: a ``time.monotonic()`` instant by which the whole video must be done (None:
    no deadline)."""

    video_id: str
    uri: str
    title: str = ""
    enqueued_at: float | None = None
    deadline: float | None = None
