"""The tag job: the one function a Tagstream worker runs, and the checks that guard it.

Producers enqueue ``worker.jobs.tag_video(video_id, uri=None, title="")`` by dotted path with rq's JSON
serializer (see :mod:`worker.jobs.enqueue`). Inside ``tagstream worker`` the job runs as
:func:`run_tag_job` with the worker's :class:`JobRuntime`: it hands the video to the engine
(:class:`worker.engine.pipeline.Pipeline`, models resident), waits for the result document
cooperatively (deadline and hand-back aware), writes it through the sink and returns it, so the same
document is the rq job result.

How the runtime reaches the job: the :class:`~worker.jobs.worker.TagWorker` that dequeued a
:class:`TagJob` binds its runtime and the job's :class:`JobContext` to that job object
(:meth:`TagJob.bind`) before rq performs it, and :attr:`TagJob.func` then returns :func:`run_tag_job`
with both applied. No module state: two workers in one process (tests do this) each run their own jobs
with their own pipeline. :func:`tag_video` itself, which rq would import by the dotted path, only
exists for that path and refuses to run without a worker.

Security (docs/ARCHITECTURE.md, "Untrusted input"): :func:`refusal_of` inspects the *raw* job payload before rq touches
it: it must be JSON naming exactly :data:`worker.keys.JOB_FUNCTION` with valid arguments (``video_id``
positional or keyword) and no callbacks. The job id is not checked: any rq job id is accepted, and one
video is still processed once at a time through its claim (:mod:`worker.jobs.claim`). :class:`TagJob` is the job class workers and maintenance use; its callback properties
never import anything and webhooks are never sent, so not even rq's own maintenance can be made to
run a function named in a job hash. Loading the job hash itself is bounded and made robust by
:mod:`worker.jobs.payload_guard` (oversized hashes and payloads, zlib bombs, malformed fields: refused with
``invalid_job``; titles with invalid Unicode or control characters: sanitised, and noted in the
result's ``input_warnings``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Protocol

from rq.job import Job

from worker.config import Settings
from worker.engine.document import Document, failed_document
from worker.engine.request import VideoRequest
from worker.errors import InvalidJobError, MediaTimeoutError, ShutdownError, TagstreamError
from worker.jobs.claim import ClaimTicket, VideoClaims, claim_or_reuse
from worker.jobs.payload_guard import (
    MAX_JOB_HASH_BYTES,
    check_uri,
    check_video_id,
    clean_title,
    hash_size,
    load_json,
    minimal_hash,
    restore_safely,
)
from worker.jobs.redis_retry import retry_redis
from worker.jobs.sink import ResultSink
from worker.keys import JOB_FUNCTION
from worker.media.uri_policy import UriPolicy

log = logging.getLogger(__name__)

__all__ = ["JobContext", "JobRuntime", "TagArgs", "TagJob", "parse_payload", "refusal_of", "resolve_uri",
           "run_tag_job", "tag_video", "video_id_of", "write_failed_document"]


class VideoSubmitter(Protocol):
    """What a job hands its video to: :class:`worker.engine.pipeline.Pipeline`, or a stand-in (the
    decode-only pipeline of scripts/soak_lib.py)."""

    def submit(self, request: VideoRequest) -> Future[Document]: ...


@dataclass
class JobRuntime:
    """What a tag job needs inside a worker: the settings, the engine, the result sink, the event the
    worker sets to hand in-flight jobs back (shutdown), and the worker's video claims (None: no claim
    is taken, for stand-ins without Redis)."""

    settings: Settings
    pipeline: VideoSubmitter
    sink: ResultSink
    hand_back: threading.Event = field(default_factory=threading.Event)
    claims: VideoClaims | None = None


@dataclass(frozen=True)
class JobContext:
    """Per-job facts the worker knows and the job's arguments do not carry."""

    enqueued_at: float | None = None  # epoch seconds (queue_wait)
    deadline: float | None = None  # time.monotonic(); default: job_timeout_s from the start
    ticket: ClaimTicket | None = None  # the job's claim on its video (mutable; the worker releases it)


class TagJob(Job):
    """An rq ``Job`` that can only ever call :func:`tag_video`.

    Interpretation: callbacks (``on_success``/``on_failure``/``on_stopped``) and webhooks are rq
    features a queue writer could abuse to run code or make requests from a worker; the tag job uses
    none of them, so they are disabled here rather than checked.

    Loading goes through :mod:`worker.jobs.payload_guard`; ``malformed`` says why a job hash could not be
    trusted (None when it is fine).
    """

    malformed: str | None = None
    prepared: bool = False  # the worker registered the execution and started the job in one MULTI
    runtime: JobRuntime | None = None
    context: JobContext | None = None

    @property
    def ticket(self) -> ClaimTicket | None:
        """The job's claim ticket (:mod:`worker.jobs.claim`) while bound to a worker."""
        return self.context.ticket if self.context is not None else None

    def bind(self, runtime: JobRuntime, context: JobContext) -> None:
        """Run this job with ``runtime`` (the worker's) and ``context`` (see the module docstring)."""
        self.runtime, self.context = runtime, context

    def refresh(self) -> None:
        size = hash_size(self.connection, self.key)
        if size is not None and size > MAX_JOB_HASH_BYTES:  # do not load it: keep what failing it needs
            values = self.connection.hmget(self.key, ["origin", "description"])
            super().restore(minimal_hash({k: v for k, v in zip(("origin", "description"), values, strict=True) if v}))
            self.data = b""
            self.malformed = f"job hash of {size} bytes exceeds {MAX_JOB_HASH_BYTES}"
            return
        super().refresh()

    def restore(self, raw_data: dict[bytes | str, bytes]) -> None:
        self.data, self.malformed = restore_safely(raw_data, super().restore)
        if self.malformed:
            log.warning("job %s is malformed: %s", self.id, self.malformed)

    @property
    def func(self) -> Callable[..., Document]:
        """:func:`run_tag_job` bound to this job's runtime and context; :func:`tag_video` when unbound."""
        if self.func_name != JOB_FUNCTION or self.instance is not None:
            raise InvalidJobError(f"refusing to run {self.func_name!r}: only {JOB_FUNCTION} runs here")
        if self.runtime is None:
            return tag_video
        return functools.partial(run_tag_job, self.runtime, self.context or JobContext())

    @property
    def success_callback(self) -> None:  # type: ignore[override]
        return None

    @property
    def failure_callback(self) -> None:  # type: ignore[override]
        return None

    @property
    def stopped_callback(self) -> None:  # type: ignore[override]
        return None

    def send_webhooks(self, status: object, *, exc_string: str | None = None) -> None:
        return None


@dataclass(frozen=True)
class TagArgs:
    """Validated arguments of one tag job."""

    video_id: str
    uri: str | None
    title: str
    notes: tuple[str, ...] = ()  # what sanitising changed (see worker.jobs.payload_guard.clean_title)


def _bind_args(args: object, kwargs: object) -> TagArgs:
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        raise InvalidJobError("job arguments must be a list and an object")
    try:
        bound = inspect.signature(tag_video).bind(*args, **kwargs)
    except TypeError as exc:
        raise InvalidJobError(f"bad arguments for {JOB_FUNCTION}: {exc}") from None
    bound.apply_defaults()
    video_id = check_video_id(bound.arguments["video_id"])
    uri = check_uri(bound.arguments["uri"])
    title, notes = clean_title(bound.arguments["title"])
    return TagArgs(video_id=video_id, uri=uri, title=title, notes=tuple(notes))


def parse_payload(raw: bytes | str) -> TagArgs:
    """Parse an rq job ``data`` field (already zlib-decompressed) as a tag job, or raise
    :class:`InvalidJobError`. Only ``json.loads`` ever touches the bytes (at most 64 KiB of them)."""
    payload = load_json(raw)
    if not isinstance(payload, list) or len(payload) != 4:
        raise InvalidJobError("job payload is not an rq job tuple")
    func_name, instance, args, kwargs = payload
    if func_name != JOB_FUNCTION:
        raise InvalidJobError(f"job names {str(func_name)[:200]!r}; only {JOB_FUNCTION} is accepted")
    if instance is not None:
        raise InvalidJobError("job must not name an instance")
    return _bind_args(args, kwargs)


def video_id_of(job: Job) -> str | None:
    """The video id a job's payload names, or None when the payload is not a valid tag job (for logs)."""
    try:
        return parse_payload(job.data).video_id
    except Exception:  # noqa: BLE001 - any unreadable payload: no video id to log
        return None


def refusal_of(job: TagJob) -> InvalidJobError | None:
    """Why ``job`` must not run (an :class:`InvalidJobError`), or None if it is a valid tag job.

    Checks the raw payload and the absence of callbacks. The job id is not checked: any rq job id is
    fine (README "The Redis contract"); two jobs for one video are serialised by the claim."""
    if job.malformed:
        return InvalidJobError(job.malformed)
    try:
        parse_payload(job.data)
    except InvalidJobError as exc:
        return exc
    if job._success_callback_name or job._failure_callback_name or job._stopped_callback_name:
        return InvalidJobError("tag jobs take no callbacks")
    return None


def resolve_uri(args: TagArgs, settings: Settings) -> str:
    """The job's URI, or ``settings.uri_template`` filled with the video id; checked by the URI
    policy (raises ForbiddenUriError / NotFoundError / InvalidJobError)."""
    uri = args.uri
    if uri is None:
        if not settings.uri_template:
            raise InvalidJobError("job has no uri and no uri_template is configured")
        uri = settings.uri_template.format(video_id=args.video_id)
    return UriPolicy.from_settings(settings).check(uri)


def _wait(future: Future[Document], deadline: float | None, hand_back: threading.Event) -> Document:
    while True:
        if hand_back.is_set():
            future.cancel()
            raise ShutdownError("worker is shutting down; job handed back")
        step = 0.2 if deadline is None else min(0.2, max(0.0, deadline - time.monotonic()))
        try:
            return future.result(timeout=step)
        except FutureTimeout:
            if deadline is not None and time.monotonic() >= deadline:
                future.cancel()
                raise MediaTimeoutError("job ran past job_timeout_s") from None


def tag_video(video_id: str, uri: str | None = None, title: str = "") -> Document:
    """The job function producers name (``worker.jobs.tag_video``, by dotted path): tag one video and
    return its result document (also written to ``tagstream:tags:{video_id}``).

    Inside ``tagstream worker`` the job runs as :func:`run_tag_job` with the worker's runtime (see the
    module docstring); called any other way there is no worker to run it."""
    raise RuntimeError("worker.jobs.tag_video runs inside `tagstream worker`")


def run_tag_job(runtime: JobRuntime, context: JobContext, video_id: str, uri: str | None = None,
                title: str = "") -> Document:
    """Run one tag job: check the arguments (as :func:`tag_video`'s), resolve the URI under the URI
    policy, submit the video to the engine, wait (until the context's deadline, or ``job_timeout_s``),
    write the document and return it. Raises a :class:`~worker.errors.TagstreamError` on failure:
    permanent ones are failed at once, transient ones retried by rq.

    With claims (a worker's runtime), the video's claim is taken first; a job finding it held waits,
    and may return another job's fresh document instead of running (:func:`claim_or_reuse`)."""
    args = _bind_args([video_id], {"uri": uri, "title": title})
    resolved = resolve_uri(args, runtime.settings)
    deadline = context.deadline or time.monotonic() + runtime.settings.job_timeout_s
    if runtime.claims is not None and context.ticket is not None:
        give_up = runtime.sink.give_up
        reused = claim_or_reuse(
            runtime.claims, context.ticket, args.video_id, enqueued_at=context.enqueued_at, deadline=deadline,
            poll_s=runtime.settings.heartbeat_interval_s, hand_back=runtime.hand_back,
            retry=lambda call: retry_redis(call, give_up=give_up, what=f"claiming {args.video_id}"),
        )  # fmt: skip
        if reused is not None:
            return reused
    request = VideoRequest(video_id=args.video_id, uri=resolved, title=args.title, enqueued_at=context.enqueued_at,
                           deadline=deadline)
    future = runtime.pipeline.submit(request)
    document = _wait(future, deadline + 1.0, runtime.hand_back)
    if not isinstance(document, dict):
        raise TagstreamError("pipeline returned no document")
    if args.notes:
        document["input_warnings"] = list(args.notes) + document.get("input_warnings", [])
    runtime.sink.write(document)
    return document


def write_failed_document(runtime: JobRuntime, job: Job, error: BaseException, model_version: str) -> None:
    """Write the failed document of a finally failed job whose video id is known, with the stage timings
    the pipeline gathered before the failure (``error.timings_s``) when there are any. Only while the job
    holds the video's claim or can take it: a job that gave up waiting for another job of the same video
    leaves the document to that one (one writer per video, :mod:`worker.jobs.claim`). Redis errors
    propagate (the caller retries)."""
    try:
        args = parse_payload(job.data)
    except InvalidJobError:
        return
    ticket = job.ticket if isinstance(job, TagJob) else None
    if runtime.claims is not None and ticket is not None and not runtime.claims.may_write(ticket, args.video_id):
        log.info("not writing a failed document for %s: another job holds the video", args.video_id)
        return
    runtime.sink.write(failed_document(args.video_id, error, model_version=model_version))
