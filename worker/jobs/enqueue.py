"""Enqueueing tag jobs: :func:`submit` and the ``tagstream enqueue`` command.

The contract (README "The Redis contract"): rq queue ``settings.queue`` with rq's JSON serializer, function by
dotted path ``worker.jobs.tag_video(video_id, uri=None, title="")``. Workers accept any job id (a plain rq
producer's random or own ids; one video still runs once at a time, :mod:`worker.jobs.claim`); this module
keeps the deterministic id ``worker.keys.job_id_for(video_id)`` so a video enqueued twice through it is one
job: ``unique=True`` and ``Retry(max=settings.job_retries,
enqueue_at_front=True)`` without an interval (an interval needs rq's scheduler, which would fork the
worker holding the models). A retried job (transient failure, or orphaned by a dead worker) goes back
to the *front* of the queue: its turn had come already, so a crash does not send it behind the whole
backlog, and orphan recovery time stays bounded by the heartbeat TTL + maintenance interval.

Enqueueing a video whose job still exists (queued, running, or finished/failed within its result or
failure TTL) is harmless: rq raises ``DuplicateJobError`` and :func:`enqueue_video` reports "already
queued". Nothing here imports torch (tests/test_layering.py checks it): producers import this module.
"""

from __future__ import annotations

import argparse
import logging
import sys

import redis
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError
from rq.serializers import JSONSerializer

from worker.cli_errors import UsageError
from worker.config import Settings, add_settings_arguments, settings_from_args
from worker.jobs.connection import connect
from worker.jobs.task import TagJob
from worker.keys import JOB_FUNCTION, job_id_for

log = logging.getLogger(__name__)


def tag_queue(connection: redis.Redis, settings: Settings) -> Queue:
    """The rq queue tag jobs go to (JSON serializer, :class:`worker.jobs.task.TagJob`)."""
    return Queue(settings.queue, connection=connection, serializer=JSONSerializer, job_class=TagJob)


def enqueue_video(
    connection: redis.Redis,
    video_id: str,
    uri: str | None = None,
    title: str = "",
    settings: Settings | None = None,
) -> tuple[str, bool]:
    """Enqueue one video; returns ``(job_id, created)`` where ``created`` is False when the job
    already existed (duplicate enqueue)."""
    settings = settings or Settings()
    if not isinstance(video_id, str) or not video_id:
        raise ValueError("video_id must be a non-empty string")
    job_id = job_id_for(video_id)
    retry = Retry(max=settings.job_retries, enqueue_at_front=True) if settings.job_retries > 0 else None
    try:
        tag_queue(connection, settings).enqueue_call(
            JOB_FUNCTION,
            args=(video_id,),
            kwargs={"uri": uri or None, "title": title or ""},
            timeout=max(1, int(settings.job_timeout_s)),
            result_ttl=settings.result_ttl_s,
            failure_ttl=settings.failure_ttl_s,
            description=f"tag {video_id[:200]}",
            job_id=job_id,
            retry=retry,
            unique=True,
        )
    except DuplicateJobError:
        log.info("video %s already queued (job %s)", video_id, job_id)
        return job_id, False
    return job_id, True


def submit(
    redis_client: redis.Redis,
    video_id: str,
    uri: str | None = None,
    title: str = "",
    settings: Settings | None = None,
) -> str:
    """Enqueue ``video_id`` for tagging and return its rq job id (the same id for a duplicate)."""
    return enqueue_video(redis_client, video_id, uri, title, settings)[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video_id", help="Video id; the result lands in tagstream:tags:VIDEO_ID.")
    parser.add_argument("--uri", default=None, help="File path or URL; default: the configured uri_template.")
    parser.add_argument("--title", default="", help="Video title (the text modality).")
    add_settings_arguments(
        parser, ["redis_url", "queue", "job_retries", "job_timeout_s", "result_ttl_s", "failure_ttl_s", "log_level"]
    )


def run(args: argparse.Namespace) -> int:
    """``tagstream enqueue``: prints ``JOB_ID enqueued`` or ``JOB_ID already queued``, returns 0."""
    if not args.video_id:
        raise UsageError("the video id is empty", setting="VIDEO_ID", value=args.video_id)
    settings = settings_from_args(args)
    connection = connect(settings)
    job_id, created = enqueue_video(connection, args.video_id, args.uri, args.title, settings)
    sys.stdout.write(f"{job_id} {'enqueued' if created else 'already queued'}\n")
    return 0
