"""The heartbeat thread of a :class:`~worker.jobs.worker.TagWorker`.

Every ``heartbeat_interval_s``, one Redis pipeline renews the worker's own key (TTL ``worker_ttl`` + 60 s),
every execution in flight and every job (TTL ``heartbeat_ttl_s``; a job's only while it still exists), and
every video claim its jobs hold (:mod:`worker.jobs.claim`; only claims still held by the same job).
When the worker's hash had expired (an outage longer than its TTL), the worker registers again. Then
the rq worker state is rewritten if a write failed (``after_beat``), and ``tagstream_queue_jobs`` is
updated from rq's keys (so a scrape never waits on Redis). Each round's outcome is recorded in the
worker's :class:`~worker.jobs.redis_retry.RedisStatus`; a failed round is retried at the next interval.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from rq import worker_registration
from rq.utils import now
from rq.worker import BaseWorker

from worker.jobs.claim import VideoClaims
from worker.jobs.queue_metrics import update_queue_metrics
from worker.jobs.redis_retry import REDIS_ERRORS, RedisStatus
from worker.metrics import Metrics

log = logging.getLogger(__name__)


class Heartbeat:
    """Beats for ``worker`` in a daemon thread between :meth:`start` and :meth:`stop`."""

    def __init__(self, worker: BaseWorker, *, interval_s: float, ttl_s: float, queue_name: str,
                 status: RedisStatus, metrics: Metrics | None, after_beat: Callable[[], None],
                 claims: VideoClaims | None = None) -> None:
        self.worker = worker
        self.interval_s, self.ttl = interval_s, max(1, int(ttl_s))
        self.queue_name = queue_name
        self.status, self.metrics, self.after_beat = status, metrics, after_beat
        self.claims = claims
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def beat_once(self) -> None:
        """One round (see the module docstring); Redis errors propagate."""
        worker = self.worker
        with worker.connection.pipeline() as pipe:
            worker.heartbeat(worker.worker_ttl + 60, pipeline=pipe)
            for execution in list(worker.executions.values()):
                job = execution._job
                if job is None:
                    continue
                execution.heartbeat(job.started_job_registry, self.ttl, pipe)
                job.heartbeat(now(), self.ttl, pipeline=pipe, xx=True)
            if self.claims is not None:
                self.claims.renew(pipe)
            results = pipe.execute()
        if results and results[0] == 1:  # our hash had expired (long outage): register again
            self._register_again()
        self.after_beat()

    def _register_again(self) -> None:
        worker = self.worker
        with worker.connection.pipeline() as pipe:
            pipe.hset(worker.key, mapping=worker.serialize())
            pipe.hset(worker.key, "state", worker.get_state())
            worker_registration.register(worker, pipe)
            pipe.expire(worker.key, worker.worker_ttl + 60)
            pipe.execute()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat_once()
                if self.metrics is not None:
                    update_queue_metrics(self.worker.connection, self.queue_name, self.metrics)
                self.status.record(True)
            except REDIS_ERRORS as exc:
                self.status.record(False)
                log.warning("heartbeat failed: %s", exc)
            except Exception:
                log.exception("heartbeat error")
