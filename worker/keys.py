"""Every Redis key and stream name Tagstream uses (rq's own keys are rq's business)."""

from __future__ import annotations

import hashlib
import re

RESULT_PREFIX = "tagstream:tags:"
"""``tagstream:tags:{video_id}``: one JSON result document per video (:mod:`worker.engine.document`)."""

TAGGED_STREAM = "tagstream:tagged"
"""Capped stream with one entry per finished video (``video_id``, ``status``, ``reason``)."""

UPLOADS_STREAM = "tagstream:uploads"
"""Language-neutral intake: ``XADD tagstream:uploads * video_id .. uri .. title ..``."""

UPLOADS_REJECTED_STREAM = "tagstream:uploads:rejected"
"""Capped stream of the ``tagstream:uploads`` entries the bridge refused: the original fields plus
``reason`` (machine-readable, :data:`worker.metrics.UPLOAD_REJECT_REASONS`), ``error`` and ``entry_id``."""

CLAIM_PREFIX = "tagstream:claim:"
"""``tagstream:claim:{video_id}``: the id of the job processing the video (:mod:`worker.jobs.claim`)."""

UPLOADS_GROUP = "tagstream-bridge"
"""Consumer group the workers use to bridge ``tagstream:uploads`` into the rq queue."""

JOB_FUNCTION = "worker.jobs.tag_video"
"""The only job function a worker runs."""

_JOB_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def result_key(video_id: str) -> str:
    return f"{RESULT_PREFIX}{video_id}"


def claim_key(video_id: str) -> str:
    return f"{CLAIM_PREFIX}{video_id}"


def first_seen_key(intermediate_queue_key: str) -> str:
    """Hash of job id -> when maintenance first saw the job in rq's intermediate list
    (:class:`worker.jobs.maintenance.BoundedIntermediateQueue`); a worker removes its job's entry when the
    job starts."""
    return f"{intermediate_queue_key}:first_seen"


def job_id_for(video_id: str) -> str:
    """rq job id :func:`worker.jobs.enqueue.submit` gives a video (workers accept any id): ``tag-`` + the id with every character outside ``[A-Za-z0-9_-]``
    replaced by ``_``, plus a short hash when anything was replaced so distinct ids stay distinct."""
    safe = _JOB_ID_UNSAFE.sub("_", video_id)
    if safe != video_id or not video_id:
        safe = f"{safe[:80]}-{hashlib.sha1(video_id.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"
    return f"tag-{safe}"
