"""Result writing: ``tagstream:tags:{video_id}`` plus an event on ``tagstream:tagged``.

One MULTI per document: ``SET tagstream:tags:{id} <json> EX ttl`` and ``XADD tagstream:tagged MAXLEN ~ N
* video_id .. status .. reason .. model_version ..``. Writing the same video twice leaves one result
key (the later document wins); the stream is an event log, so an at-least-once re-run (see
:mod:`worker.rq_worker`) may append a second event for the same video.

Redis being away does not lose a result: :meth:`ResultSink.write` retries with exponential backoff
(up to ``max_backoff_s`` between tries) until the write lands or ``give_up`` is set.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import redis

from worker.config import Settings
from worker.errors import RedisUnavailableError
from worker.keys import TAGGED_STREAM, result_key

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)


def dumps(document: dict[str, Any]) -> str:
    """The JSON text stored in Redis (UTF-8, labels unescaped)."""
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


def retry_redis(
    call: Any,
    *,
    give_up: threading.Event | None = None,
    max_backoff_s: float = 4.0,
    what: str = "redis call",
    on_error: Any = None,
    on_success: Any = None,
) -> Any:
    """Run ``call()`` until it does not raise a Redis connection/timeout error, backing off
    0.1 s, 0.2 s, ... up to ``max_backoff_s``. Raises :class:`RedisUnavailableError` once ``give_up``
    is set."""
    delay = 0.1
    while True:
        try:
            result = call()
        except REDIS_ERRORS as exc:
            if on_error is not None:
                on_error()
            if give_up is not None and give_up.is_set():
                raise RedisUnavailableError(f"{what}: Redis unavailable ({exc})") from exc
            log.warning("%s failed (%s); retrying in %.1f s", what, exc, delay)
            if give_up is not None:
                give_up.wait(delay)
            else:
                time.sleep(delay)
            delay = min(delay * 2, max_backoff_s)
            continue
        if on_success is not None:
            on_success()
        return result


class ResultSink:
    """Writes result documents. Thread-safe (redis-py clients are)."""

    def __init__(
        self,
        connection: redis.Redis,
        settings: Settings,
        *,
        give_up: threading.Event | None = None,
        metrics: Any = None,
    ) -> None:
        self.connection = connection
        self.settings = settings
        self.give_up = give_up
        self.metrics = metrics

    def _ttl(self, document: dict[str, Any]) -> int:
        ttl = self.settings.result_ttl_s if document.get("status") == "tagged" else self.settings.failure_ttl_s
        return max(1, int(ttl))

    def write_once(self, document: dict[str, Any]) -> None:
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

    def write(self, document: dict[str, Any]) -> None:
        """Write ``document``, retrying while Redis is unreachable."""
        up = (lambda: self.metrics.redis_up.set(1)) if self.metrics else None
        down = (lambda: (self.metrics.redis_up.set(0), self.metrics.redis_errors.inc())) if self.metrics else None
        retry_redis(
            lambda: self.write_once(document),
            give_up=self.give_up,
            what=f"writing result of {document.get('video_id')}",
            on_error=down,
            on_success=up,
        )


def read_result(connection: redis.Redis, video_id: str) -> dict[str, Any] | None:
    """The stored result document of ``video_id``, or None."""
    raw = connection.get(result_key(video_id))
    return None if raw is None else json.loads(raw)
