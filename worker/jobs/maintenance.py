"""Maintenance of one rq queue by a :class:`~worker.jobs.worker.TagWorker`: orphaned jobs, stale
registries, dead workers, and jobs stuck in the intermediate list.

rq's own maintenance, with two bounds made configurable:

* the lock that keeps two workers from cleaning at once expires after two maintenance intervals
  (rq's own: 899 s, so a worker killed mid-maintenance blocked it for 15 minutes);
* a job left in ``rq:queue:<q>:intermediate`` without a started execution (its worker died between
  BLMOVE and registering the execution, or lost the BLMOVE reply in a Redis outage) is handled as
  abandoned once it has been seen there for ``heartbeat_ttl_s`` (rq: a hard-coded minute); first-seen
  times live in one pruned hash (rq: one key per job, kept 24 h). A TagWorker registers the execution
  and removes the job from the list in one MULTI right after BLMOVE, so a live worker's job sits there
  for one round trip.

Abandoned jobs go through rq's failure handling: with retries left (``Retry``) they are enqueued
again, at the front of the queue (``enqueue_at_front=True``, see :mod:`worker.jobs.enqueue`).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import redis
from rq import Queue
from rq.intermediate_queue import IntermediateQueue
from rq.registry import clean_registries
from rq.utils import now
from rq.worker import BaseWorker
from rq.worker_registration import clean_worker_registry

from worker.keys import first_seen_key
from worker.metrics import Metrics

log = logging.getLogger(__name__)


class BoundedIntermediateQueue(IntermediateQueue):
    """rq's intermediate list with the "stuck" threshold ``stuck_after_s`` instead of 60 s, and its
    first-seen times in one hash (``<list key>:first_seen``) pruned on every pass, instead of one key
    per job kept 24 h (a job that starts between rq's LRANGE and its SET NX left such a key behind)."""

    def __init__(self, queue_key: str, connection: redis.Redis, stuck_after_s: float) -> None:
        super().__init__(queue_key, connection)
        self.stuck_after_s = stuck_after_s
        self.seen_key = first_seen_key(self.key)

    def set_first_seen(self, job_id: str) -> bool:
        return bool(self.connection.hsetnx(self.seen_key, job_id, now().timestamp()))

    def get_first_seen(self, job_id: str) -> datetime | None:
        value = self.connection.hget(self.seen_key, job_id)
        return None if value is None else datetime.fromtimestamp(float(value), tz=UTC)

    def should_be_cleaned_up(self, job_id: str) -> bool:
        first_seen = self.get_first_seen(job_id)
        return first_seen is not None and (now() - first_seen).total_seconds() > self.stuck_after_s

    def remove(self, job_id: str) -> None:
        with self.connection.pipeline() as pipe:
            pipe.lrem(self.key, 1, job_id)
            pipe.hdel(self.seen_key, job_id)
            pipe.execute()

    def cleanup(self, worker: BaseWorker, queue: Queue) -> None:
        super().cleanup(worker, queue)
        stale = {f.decode() for f in self.connection.hkeys(self.seen_key)} - set(self.get_job_ids())
        if stale:
            self.connection.hdel(self.seen_key, *stale)


def maintain_queue(worker: BaseWorker, queue: Queue, *, maintenance_interval_s: float, stuck_after_s: float,
                   metrics: Metrics | None = None) -> int:
    """One maintenance pass over ``queue`` unless another worker holds its lock; returns the number
    of orphaned executions collected."""
    lock_s = max(2, int(2 * maintenance_interval_s))
    if not worker.connection.set(queue.registry_cleaning_key, 1, nx=True, ex=lock_s):
        return 0
    try:
        expired = queue.started_job_registry.get_expired_job_ids()
        clean_registries(queue, worker._exc_handlers)
        clean_worker_registry(queue)
        BoundedIntermediateQueue(queue.key, worker.connection, stuck_after_s).cleanup(worker, queue)
        if expired:
            log.warning("collected %d orphaned job(s): %s", len(expired), ", ".join(expired[:10]))
            if metrics is not None:
                metrics.orphans_recovered.inc(len(expired))
        return len(expired)
    finally:
        queue.release_maintenance_lock()
