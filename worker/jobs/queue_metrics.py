"""``tagstream_queue_jobs{queue,state}`` from rq's own keys.

Updated periodically by the worker (with its heartbeats), not on scrape, so a scrape never waits on
Redis. States: ``queued`` (the queue list), ``started``, ``finished``, ``failed``, ``deferred`` and
``scheduled`` (rq's registries; counted with ZCARD, which includes entries rq has not cleaned yet).
"""

from __future__ import annotations

import redis
from rq import Queue

from worker.metrics import QUEUE_STATES, Metrics


def queue_key(queue_name: str) -> str:
    """The Redis list of an rq queue (``rq:queue:<name>``)."""
    return Queue.redis_queue_namespace_prefix + queue_name


def queue_counts(connection: redis.Redis, queue_name: str) -> dict[str, int]:
    """Jobs per state for one rq queue (one round trip)."""
    queue = Queue(queue_name, connection=connection)
    keys = {
        "started": queue.started_job_registry.key,
        "finished": queue.finished_job_registry.key,
        "failed": queue.failed_job_registry.key,
        "deferred": queue.deferred_job_registry.key,
        "scheduled": queue.scheduled_job_registry.key,
    }
    with connection.pipeline(transaction=False) as pipe:
        pipe.llen(queue.key)
        for key in keys.values():
            pipe.zcard(key)
        values = pipe.execute()
    counts = {"queued": int(values[0])}
    counts.update({state: int(v) for state, v in zip(keys, values[1:], strict=True)})
    return counts


def update_queue_metrics(connection: redis.Redis, queue_name: str, metrics: Metrics) -> dict[str, int]:
    """Set ``tagstream_queue_jobs`` for every state; returns the counts."""
    counts = queue_counts(connection, queue_name)
    for state in QUEUE_STATES:
        metrics.queue_jobs.labels(queue_name, state).set(counts.get(state, 0))
    return counts
