"""Result writing: ``tagstream:tags:{video_id}`` plus an event on ``tagstream:tagged``.

One MULTI per document: ``SET tagstream:tags:{id} <json> EX ttl`` and ``XADD tagstream:tagged MAXLEN ~ N
* video_id .. status .. reason .. model_version ..``. Writing the same video twice leaves one result
key (the later document wins); the stream is an event log, so an at-least-once re-run (see
:mod:`worker.jobs.worker`) may append a second event for the same video.

Redis being away does not lose a result: :meth:`ResultSink.write` retries with the worker's one backoff
policy (:mod:`worker.jobs.redis_retry`) until the write lands or ``give_up`` is set.
"""

from __future__ import annotations

import json
import logging
import threading

import redis

from worker.config import Settings
from worker.engine.document import Document
from worker.jobs.redis_retry import RedisStatus, retry_redis
from worker.keys import TAGGED_STREAM, result_key

log = logging.getLogger(__name__)


def dumps(document: Document) -> str:
    """The JSON text stored in Redis (UTF-8, labels unescaped)."""
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


class ResultSink:
    """Writes result documents. Thread-safe (redis-py clients are). ``status`` (the worker's) records
    the outcome of every try."""

    def __init__(
        self,
        connection: redis.Redis,
        settings: Settings,
        *,
        give_up: threading.Event | None = None,
        status: RedisStatus | None = None,
    ) -> None:
        self.connection = connection
        self.settings = settings
        self.give_up = give_up
        self.status = status

    def _ttl(self, document: Document) -> int:
        ttl = self.settings.result_ttl_s if document.get("status") == "tagged" else self.settings.failure_ttl_s
        return max(1, int(ttl))

    def write_once(self, document: Document) -> None:
        video_id = str(document["video_id"])
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.set(result_key(video_id), dumps(document), ex=self._ttl(document))
            pipe.xadd(
                TAGGED_STREAM,
                {
                    "video_id": video_id,
                    "status": str(document.get("status", "")),
                    "reason": str(document.get("reason") or ""),
                    "model_version": str(document.get("model_version") or ""),
                },
                maxlen=self.settings.tagged_stream_maxlen,
                approximate=True,
            )
            pipe.execute()

    def write(self, document: Document) -> None:
        """Write ``document``, retrying while Redis is unreachable."""
        status = self.status
        retry_redis(
            lambda: self.write_once(document),
            give_up=self.give_up,
            what=f"writing result of {document.get('video_id')}",
            on_error=None if status is None else lambda: status.record(False),
            on_success=None if status is None else lambda: status.record(True),
        )


def read_result(connection: redis.Redis, video_id: str) -> Document | None:
    """The stored result document of ``video_id``, or None."""
    raw = connection.get(result_key(video_id))
    return None if raw is None else json.loads(raw)
