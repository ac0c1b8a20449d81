"""The tagging worker: an rq 3 ``BaseWorker`` with up to K jobs in flight in one process.

Lifecycle (docs/ARCHITECTURE.md, "The rq worker"): a slot semaphore of K; ``Queue.dequeue_any`` with a 1 s
block (BLMOVE into ``rq:queue:<q>:intermediate``); :meth:`TagWorker.prepare_execution` registers the
execution and starts the job in one MULTI; each job runs in its own thread through rq's ``perform_job``,
with the worker's :class:`~worker.jobs.task.JobRuntime` bound to the job. Heartbeats:
:mod:`worker.jobs.heartbeat`; maintenance (orphans of dead workers are retried after about
``heartbeat_ttl_s + maintenance_interval_s``, at the front of the queue): :mod:`worker.jobs.maintenance`.
No SIGALRM death penalty (it fails every threaded job): deadlines are cooperative.

Failures: :func:`worker.jobs.task.refusal_of` inspects the raw payload first; a job that is not exactly
the tag job is failed with ``invalid_job`` and never executed. Permanent errors are failed without
retry, transient ones use rq's ``Retry``; a final failure writes the failed document, and the reason
is in ``exc_info`` (``reason=<code>`` first) and ``job.meta["reason"]``.

Shutdown: the first SIGTERM/SIGINT stops dequeuing and lets in-flight jobs finish for
``shutdown_grace_s``; the rest are then handed back without spending a retry (one MULTI:
``cleanup_execution`` + ``enqueue_job(at_front=True)``). A second signal hands back at once.

Redis outages: every call retries with :mod:`worker.jobs.redis_retry`'s policy; in-flight work goes on.
Every heartbeat TTL lapses in an outage longer than ``heartbeat_ttl_s``, so after Redis returns the
worker waits ``heartbeat_ttl_s`` more before collecting orphans (live workers renew meanwhile); without
that wait the first maintenance re-ran every in-flight job (tests/test_chaos.py).

Observability: rq's worker state is ``busy`` while a job is in flight, else ``idle``, written under one
lock with the in-flight count. The loop beats :attr:`TagWorker.liveness` every iteration (``/healthz``).
Logs in a job's thread carry its ``job_id`` and ``video_id`` (:func:`worker.logs.log_context`).

Any job id: one video runs once at a time through its claim (:mod:`worker.jobs.claim`), renewed by the
heartbeat and released when the job's thread ends; only the claim holder writes the video's document.
At-least-once: a worker paused longer than the heartbeat TTL may see its job re-run elsewhere and still
finish it (its claim lapsed too); result writes are idempotent (one key; maybe a second event).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

import redis
from rq import Queue
from rq.exceptions import DequeueTimeout
from rq.executions import Execution
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.suspension import is_suspended
from rq.timeouts import BaseDeathPenalty
from rq.utils import now
from rq.worker import BaseWorker, WorkerStatus

from worker.config import Settings
from worker.errors import InvalidJobError, ShutdownError, TagstreamError, reason_of
from worker.jobs.claim import ClaimTicket, VideoClaims
from worker.jobs.heartbeat import Heartbeat
from worker.jobs.liveness import Liveness
from worker.jobs.maintenance import maintain_queue
from worker.jobs.redis_retry import REDIS_ERRORS, Backoff, RedisStatus, retry_redis
from worker.jobs.sink import ResultSink
from worker.jobs.task import (
    JobContext,
    JobRuntime,
    TagJob,
    VideoSubmitter,
    refusal_of,
    video_id_of,
    write_failed_document,
)
from worker.keys import first_seen_key
from worker.logs import log_context
from worker.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")


def bounded_ttl(ttl: int | None, limit: int) -> int:
    """``ttl`` if it is set and within ``0..limit``, else ``limit``."""
    return limit if ttl is None or ttl < 0 or ttl > limit else int(ttl)


class NoDeathPenalty(BaseDeathPenalty):
    """rq's default penalty uses SIGALRM (main thread only); deadlines here are cooperative."""

    def setup_death_penalty(self) -> None:
        pass

    def cancel_death_penalty(self) -> None:
        pass


class TagWorker(BaseWorker):
    """See the module docstring. ``pipeline`` is the engine (``submit(VideoRequest) -> Future[dict]``).
    ``liveness`` (default: a new one with ``settings.liveness_timeout_s``) is beaten by :meth:`work`'s
    loop."""

    death_penalty_class = NoDeathPenalty
    job_class = TagJob

    def __init__(
        self,
        settings: Settings,
        connection: redis.Redis,
        pipeline: VideoSubmitter,
        *,
        model_version: str = "",
        metrics: Metrics | None = None,
        name: str | None = None,
        liveness: Liveness | None = None,
    ) -> None:
        self.settings = settings
        self.liveness = liveness if liveness is not None else Liveness(settings.liveness_timeout_s)
        self._loop_thread: threading.Thread | None = None
        self._state_lock = threading.Lock()  # orders the rq state writes with the in-flight count
        self._active = 0  # executions prepared and not yet ended
        self._state_written: str | None = None
        self.metrics = metrics
        self.model_version = model_version
        queue = Queue(
            settings.queue, connection=connection, job_class=TagJob, serializer=JSONSerializer,
            death_penalty_class=NoDeathPenalty,
        )  # fmt: skip
        super().__init__(
            [queue], name=name, connection=connection, serializer=JSONSerializer, job_class=TagJob,
            default_result_ttl=settings.result_ttl_s, maintenance_interval=settings.maintenance_interval_s,
            worker_ttl=max(20, int(settings.heartbeat_ttl_s)), job_monitoring_interval=settings.heartbeat_interval_s,
        )  # fmt: skip
        self.queue = queue
        self.slots = threading.Semaphore(settings.concurrency)
        self.give_up = threading.Event()  # second signal: stop retrying Redis, hand back now
        self.stopping = threading.Event()  # first signal: stop dequeuing
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._errors: dict[str, BaseException] = {}
        self.redis_status = RedisStatus(metrics)
        self.jobs_started = 0
        self.sink = ResultSink(connection, settings, give_up=self.give_up, status=self.redis_status)
        self.claims = VideoClaims(connection, settings.heartbeat_ttl_s)
        self.runtime = JobRuntime(settings=settings, pipeline=pipeline, sink=self.sink, claims=self.claims)
        self._heart = Heartbeat(self, interval_s=settings.heartbeat_interval_s, ttl_s=settings.heartbeat_ttl_s,
                                queue_name=queue.name, status=self.redis_status, metrics=metrics, after_beat=self._sync_state,
                                claims=self.claims)  # fmt: skip

    # --- small helpers ---------------------------------------------------------------------------
    @property
    def redis_ok(self) -> bool:
        """Whether the last Redis call succeeded (``/readyz``)."""
        return self.redis_status.up

    def _retry(self, call: Callable[[], T], what: str) -> T:
        def on_error() -> None:
            self.redis_status.record(False)
            self._beat_if_loop()  # the loop waiting for Redis is alive, not stuck

        return retry_redis(
            call, give_up=self.give_up, what=what, on_error=on_error, on_success=lambda: self.redis_status.record(True),
        )  # fmt: skip

    def _beat_if_loop(self) -> None:
        if threading.current_thread() is self._loop_thread:
            self.liveness.beat()

    def _sync_state(self) -> None:
        """Write rq's worker state for the in-flight count (``busy`` when > 0, else ``idle``) if the
        last written one differs; a Redis error leaves it for the next call (the heartbeat's)."""
        with self._state_lock:
            desired = WorkerStatus.BUSY if self._active else WorkerStatus.IDLE
            if desired == self._state_written:
                return
            try:
                self.set_state(desired)
            except REDIS_ERRORS as exc:
                log.debug("could not set worker state %s: %s", desired, exc)
                return
            self._state_written = desired

    def _execution_ended(self) -> None:
        with self._state_lock:
            self._active -= 1
        self._sync_state()

    def _count(self, outcome: str, reason: str | None = None) -> None:
        if self.metrics is None:
            return
        self.metrics.videos.labels(outcome).inc()
        if reason:
            self.metrics.errors.labels(reason).inc()

    def _after_outage_grace(self) -> bool:
        """While Redis is away and for ``heartbeat_ttl_s`` after it returns: every execution's TTL ran
        out meanwhile, and live workers need one heartbeat to renew theirs (see module docstring)."""
        return self.redis_status.recovering(self.settings.heartbeat_ttl_s)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._threads)

    # --- rq overrides ----------------------------------------------------------------------------
    def _set_ip_address(self, connection: redis.Redis) -> None:
        """rq's constructor names the connection in Redis; a worker started while Redis is away waits
        for it (backing off) instead of dying (found by scripts/chaos.py restarting Redis)."""
        retry_redis(lambda: super(TagWorker, self)._set_ip_address(connection), what="naming the Redis connection")

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """Always ``heartbeat_ttl_s``: rq's version goes negative once a job outlives its timeout."""
        return max(1, int(self.settings.heartbeat_ttl_s))

    def prepare_execution(self, job: Job) -> Execution:
        """Register the execution *and* start the job in one MULTI (rq: two steps, the second in the
        job's thread; a kill in between left the job ``queued`` in the intermediate list for 60 s).
        The worker turns ``busy`` in the same MULTI; :meth:`_execution_ended` turns it ``idle`` again."""
        with self._state_lock, self.connection.pipeline() as pipe:
            ttl = self.get_heartbeat_ttl(job)
            execution = Execution.create(job, ttl, pipeline=pipe, worker_name=self.name)
            self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            self.heartbeat(ttl, pipeline=pipe)
            job.heartbeat(now(), ttl, pipeline=pipe)
            job.prepare_for_execution(self.name, pipeline=pipe)
            pipe.persist(job.key)
            intermediate = Queue(job.origin, connection=self.connection).intermediate_queue_key
            pipe.lrem(intermediate, 1, job.id)
            pipe.hdel(first_seen_key(intermediate), job.id)  # see worker.jobs.maintenance
            pipe.execute()
            self._active += 1
            self._state_written = WorkerStatus.BUSY
        self.executions[execution.id] = execution
        if isinstance(job, TagJob):
            job.prepared = True
        return execution

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        if isinstance(job, TagJob) and job.prepared:  # done atomically by prepare_execution
            return
        self._retry(lambda: super(TagWorker, self).prepare_job_execution(job, remove_from_intermediate_queue),
                    f"starting job {job.id}")

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        self._retry(lambda: super(TagWorker, self).handle_execution_ended(job, queue, heartbeat_ttl),
                    f"ending job {job.id}")

    def handle_exception(self, job: Job, *exc_info: Any) -> None:  # rq's (type, value, traceback)
        self._errors[job.id] = exc_info[1]
        error = exc_info[1]
        if isinstance(error, TagstreamError):  # an expected outcome: one line, no traceback
            if not isinstance(error, ShutdownError):
                log.warning("job %s failed: %s: %s", job.id, error.reason, error)
            return
        super().handle_exception(job, *exc_info)

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: StartedJobRegistry,
                           execution: Execution) -> None:
        def attempt() -> None:
            self.executions[execution.id] = execution
            super(TagWorker, self).handle_job_success(job, queue, started_job_registry, execution)

        self._retry(attempt, f"finishing job {job.id}")
        self._count("reused" if isinstance(job, TagJob) and job.ticket and job.ticket.reused else "tagged")

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry: StartedJobRegistry | None = None,
                           exc_string: str = "", execution: Execution | None = None) -> None:
        error = self._errors.pop(job.id, None)
        if error is None:  # rq's own call (intermediate-queue cleanup): plain rq semantics
            return super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)
        if isinstance(error, ShutdownError) and execution is not None:
            self.hand_back(job, queue, execution)
            return None
        reason = reason_of(error)
        permanent = error.permanent if isinstance(error, TagstreamError) else True
        will_retry = not permanent and job.should_retry
        if not will_retry:
            job.retries_left = 0
        job.meta = {"reason": reason}
        exc_string = f"reason={reason}\n{exc_string}"
        self._retry(lambda: job.save_meta(), f"saving reason of {job.id}")
        if will_retry:
            log.warning("job %s: %s (transient), retrying (%s left)", job.id, reason, job.retries_left)
            self._count("retried", reason)
        else:
            self._write_failed(job, error)
            self._count("failed", reason)
        self._retry(lambda: self.connection.ping(), "waiting for Redis")
        return super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)

    def _write_failed(self, job: Job, error: BaseException) -> None:
        """:func:`worker.jobs.task.write_failed_document` (only the video's claim holder writes)."""
        self._retry(lambda: write_failed_document(self.runtime, job, error, self.model_version), f"failing {job.id}")

    def hand_back(self, job: Job, queue: Queue, execution: Execution) -> None:
        """Return an unfinished job to the front of its queue without spending a retry."""

        def attempt() -> None:
            with self.connection.pipeline() as pipe:
                pipe.multi()
                self.cleanup_execution(job, pipe, execution)
                queue.enqueue_job(job, pipeline=pipe, at_front=True)
                pipe.execute()

        self._retry(attempt, f"handing back {job.id}")
        self._count("handed_back")
        log.info("job %s handed back to %s", job.id, queue.name)

    def refuse(self, job: Job, queue: Queue, execution: Execution, error: InvalidJobError) -> None:
        """Fail a job that is not a valid tag job without executing anything of it."""
        log.warning("refusing job %s: %s", job.id, error)
        job.started_at = job.ended_at = now()
        self._retry(lambda: self.connection.lrem(queue.intermediate_queue_key, 1, job.id), "dequeue bookkeeping")
        job.retries_left = 0
        self._errors[job.id] = error
        self.handle_job_failure(job, queue, queue.started_job_registry, f"InvalidJobError: {error}", execution)

    def clean_registries(self) -> None:
        """rq's maintenance with bounded lock and intermediate-list waits (:mod:`worker.jobs.maintenance`)."""
        for queue in self.queues:
            maintain_queue(self, queue, maintenance_interval_s=self.settings.maintenance_interval_s,
                           stuck_after_s=self.settings.heartbeat_ttl_s, metrics=self.metrics)  # fmt: skip
        self.last_cleaned_at = now()

    # --- threads ---------------------------------------------------------------------------------
    def _run_job(self, job: TagJob, queue: Queue, execution: Execution) -> None:
        with log_context(job_id=job.id, video_id=video_id_of(job)):
            self._run_job_in_context(job, queue, execution)

    def _run_job_in_context(self, job: TagJob, queue: Queue, execution: Execution) -> None:
        enqueued = job.enqueued_at.timestamp() if job.enqueued_at else None
        ticket = ClaimTicket(job.id)
        deadline = time.monotonic() + self.settings.job_timeout_s
        job.bind(self.runtime, JobContext(enqueued_at=enqueued, deadline=deadline, ticket=ticket))
        try:
            refusal = refusal_of(job)
            if refusal is not None:
                self.refuse(job, queue, execution, refusal)
            else:
                self.perform_job(job, queue, execution)
        except Exception:
            # Finalisation could not reach Redis before give-up: stop beating for this execution so
            # its TTL expires and maintenance (here or elsewhere) retries the job.
            log.exception("job %s could not be finalised; left for orphan recovery", job.id)
            self.executions.pop(execution.id, None)
        finally:
            self.claims.release_quietly(ticket)  # after the document and rq's bookkeeping
            with self._lock:
                self._threads.discard(threading.current_thread())
            self._execution_ended()
            self.slots.release()

    # --- signals ---------------------------------------------------------------------------------
    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        """First signal: stop dequeuing, finish within the grace period. Second: hand back now."""
        if self.stopping.is_set():
            log.warning("second stop request: handing back in-flight jobs now")
            self.runtime.hand_back.set()
            self.give_up.set()
            return
        log.info("stop requested: finishing %d in-flight job(s) within %.0f s", self.in_flight(),
                 self.settings.shutdown_grace_s)
        self._shutdown_requested_date = now()
        self.stopping.set()

    def request_force_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        self.stopping.set()
        self.request_stop(signum, frame)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.request_stop)
            signal.signal(signal.SIGTERM, self.request_stop)

    # --- the loop ---------------------------------------------------------------------------------
    def _dequeue(self, burst: bool) -> tuple[TagJob, Queue] | None:
        try:
            return Queue.dequeue_any(
                self.queues, None if burst else 1, connection=self.connection, job_class=TagJob,
                serializer=JSONSerializer, death_penalty_class=NoDeathPenalty,
            )  # fmt: skip
        except DequeueTimeout:
            return None

    def _start(self, job: TagJob, queue: Queue) -> None:
        # A job's own TTLs may be shorter than the configured ones, never longer, missing (rq's
        # default keeps failed jobs a year) or infinite (-1): Redis memory stays bounded.
        job.result_ttl = bounded_ttl(job.result_ttl, self.settings.result_ttl_s)
        job.failure_ttl = bounded_ttl(job.failure_ttl, self.settings.failure_ttl_s)
        execution = self._retry(lambda: self.prepare_execution(job), f"registering job {job.id}")
        thread = threading.Thread(target=self._run_job, args=(job, queue, execution), name=f"job-{job.id}",
                                  daemon=True)
        with self._lock:
            self._threads.add(thread)
        self.jobs_started += 1
        try:
            thread.start()
        except BaseException:
            with self._lock:
                self._threads.discard(thread)
            self._execution_ended()
            raise

    def work(self, burst: bool | None = None, max_jobs: int | None = None, **_: Any) -> bool:  # type: ignore[override]
        """Run until stopped (signal, ``burst`` and nothing left, or ``max_jobs`` started).
        Returns True when any job was started."""
        burst = self.settings.burst if burst is None else burst
        max_jobs = self.settings.max_jobs if max_jobs is None else max_jobs
        self._install_signal_handlers()
        self._retry(self.register_birth, "registering worker")
        self.redis_status.record(True)
        try:
            self.subscribe()
        except REDIS_ERRORS:
            log.warning("could not subscribe to rq commands")
        self.set_state(WorkerStatus.STARTED)
        self._sync_state()  # idle: nothing in flight yet
        self._loop_thread = threading.current_thread()
        self._heart.start()
        log.info("worker %s (pid %d) on queue %s, K=%d", self.name, os.getpid(), self.queue.name,
                 self.settings.concurrency)
        backoff = Backoff()
        try:
            while not self.stopping.is_set():
                self.liveness.beat()  # every wait below is bounded (dequeue 1 s, slots 0.5 s, backoff 4 s)
                if max_jobs and self.jobs_started >= max_jobs:
                    log.info("started %d jobs (max_jobs): recycling", self.jobs_started)
                    break
                try:
                    if self.should_run_maintenance_tasks and not self._after_outage_grace():
                        self.clean_registries()
                    suspended = is_suspended(self.connection, self)
                    self.redis_status.record(True)
                    if suspended:
                        self.stopping.wait(1.0)
                        continue
                    if not self.slots.acquire(timeout=0.5):
                        continue
                    try:
                        result = self._dequeue(burst)
                    except BaseException:
                        self.slots.release()
                        raise
                    if result is None:
                        self.slots.release()
                        if burst:
                            if self.in_flight() == 0 and self._queue_empty():
                                log.info("burst: queue empty, nothing in flight: done")
                                break
                            self.stopping.wait(0.2)
                        continue
                    job, queue = result
                    try:
                        self._start(job, queue)
                    except BaseException:
                        self.slots.release()
                        raise
                    backoff.reset()
                    self.redis_status.record(True)
                except REDIS_ERRORS as exc:
                    self.redis_status.record(False)
                    delay = backoff.next()
                    log.warning("Redis unavailable (%s); retrying in %.1f s", exc, delay)
                    self.stopping.wait(delay)
                except Exception:
                    log.exception("worker loop error")
                    self.stopping.wait(1.0)
            self._drain()
        finally:
            self._heart.stop()
            try:
                self.register_death()
                self.unsubscribe()
            except REDIS_ERRORS:
                log.warning("could not register worker death (Redis unavailable)")
            except Exception:
                log.exception("teardown error")
        return self.jobs_started > 0

    def _queue_empty(self) -> bool:
        return self.queue.count == 0 and self.connection.llen(self.queue.intermediate_queue_key) == 0

    def _drain(self) -> None:
        """Wait for in-flight jobs: without limit after burst/max_jobs, else for the grace period,
        then hand back what is left."""
        graceful_until = time.monotonic() + self.settings.shutdown_grace_s if self.stopping.is_set() else None
        while self.in_flight():
            self.liveness.beat()  # draining is progress: the grace period may exceed the liveness timeout
            if graceful_until is not None and time.monotonic() >= graceful_until and not self.runtime.hand_back.is_set():
                log.warning("grace period over: handing back %d job(s)", self.in_flight())
                self.runtime.hand_back.set()
            if self.runtime.hand_back.is_set() and self.give_up.is_set():
                self._join_all(5.0)
                break
            time.sleep(0.05)
            if graceful_until is None and self.stopping.is_set():
                graceful_until = time.monotonic() + self.settings.shutdown_grace_s

    def _join_all(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, end - time.monotonic()))
