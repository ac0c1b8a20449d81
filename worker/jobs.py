"""The tag job: the one function a Tagstream worker runs, and the checks that guard it.

Producers enqueue ``worker.jobs.tag_video(video_id, uri=None, title="")`` by dotted path with rq's JSON
serializer (see :mod:`worker.client`). Inside ``tagstream worker`` the function hands the video to the
in-process :class:`worker.pipeline.Pipeline` (models resident), waits for the result document
cooperatively (deadline and hand-back aware), writes it through the sink and returns it, so the same
document is the rq job result.

Security (DESIGN.md section 7): :func:`refusal_of` inspects the *raw* job payload before rq touches
it: it must be JSON naming exactly :data:`worker.keys.JOB_FUNCTION` with valid arguments and no
callbacks. :class:`TagJob` is the job class workers and maintenance use; its callback properties
never import anything and webhooks are never sent, so not even rq's own maintenance can be made to
run a function named in a job hash. Loading the job hash itself is bounded and made robust by
:mod:`worker.payload_guard` (oversized hashes and payloads, zlib bombs, malformed fields: refused with
``invalid_job``; titles with invalid Unicode or control characters: sanitised, and noted in the
result's ``input_warnings``).
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from rq.job import Job

from worker.config import Settings
from worker.errors import InvalidJobError, MediaTimeoutError, ShutdownError, TagstreamError
from worker.keys import JOB_FUNCTION, job_id_for
from worker.payload_guard import (
    MAX_JOB_HASH_BYTES,
    MAX_TITLE_CHARS,
    MAX_URI_CHARS,
    MAX_VIDEO_ID_CHARS,
    check_uri,
    check_video_id,
    clean_title,
    hash_size,
    load_json,
    minimal_hash,
    restore_safely,
)

__all__ = ["MAX_TITLE_CHARS", "MAX_URI_CHARS", "MAX_VIDEO_ID_CHARS", "TagArgs", "TagJob", "parse_payload",
           "refusal_of", "resolve_uri", "tag_video"]


class TagJob(Job):
    """An rq ``Job`` that can only ever call :func:`tag_video`.

    Interpretation: callbacks (``on_success``/``on_failure``/``on_stopped``) and webhooks are rq
    features a queue writer could abuse to run code or make requests from a worker; the tag job uses
    none of them, so they are disabled here rather than checked.

    Loading goes through :mod:`worker.payload_guard`; ``malformed`` says why a job hash could not be
    trusted (None when it is fine).
    """

    malformed: str | None = None

    def refresh(self) -> None:
        size = hash_size(self.connection, self.key)
        if size is not None and size > MAX_JOB_HASH_BYTES:  # do not load it: keep what failing it needs
            values = self.connection.hmget(self.key, ["origin", "description"])
            super().restore(minimal_hash({k: v for k, v in zip(("origin", "description"), values, strict=True) if v}))
            self.data = b""
            self.malformed = f"job hash of {size} bytes exceeds {MAX_JOB_HASH_BYTES}"
            return
        super().refresh()

    def restore(self, raw_data: Any) -> None:
        restore_safely(self, raw_data, super().restore)

    @property
    def func(self) -> Callable[..., Any]:
        if self.func_name != JOB_FUNCTION or self.instance is not None:
            raise InvalidJobError(f"refusing to run {self.func_name!r}: only {JOB_FUNCTION} runs here")
        return tag_video

    @property
    def success_callback(self) -> None:  # type: ignore[override]
        return None

    @property
    def failure_callback(self) -> None:  # type: ignore[override]
        return None

    @property
    def stopped_callback(self) -> None:  # type: ignore[override]
        return None

    def send_webhooks(self, status: Any, *, exc_string: str | None = None) -> None:
        return None


@dataclass(frozen=True)
class TagArgs:
    """Validated arguments of one tag job."""

    video_id: str
    uri: str | None
    title: str
    notes: tuple[str, ...] = ()  # what sanitising changed (see worker.payload_guard.clean_title)


def _bind_args(args: Any, kwargs: Any) -> TagArgs:
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


def refusal_of(job: Job) -> InvalidJobError | None:
    """Why ``job`` must not run (an :class:`InvalidJobError`), or None if it is a valid tag job.

    Checks the raw payload, the absence of callbacks, and that the job id is the one derived from
    the video id (so one video cannot be enqueued under several ids)."""
    if getattr(job, "malformed", None):
        return InvalidJobError(job.malformed)
    try:
        args = parse_payload(job.data)
    except InvalidJobError as exc:
        return exc
    for name in ("_success_callback_name", "_failure_callback_name", "_stopped_callback_name"):
        if getattr(job, name, None):
            return InvalidJobError("tag jobs take no callbacks")
    if job.id != job_id_for(args.video_id):
        return InvalidJobError(f"job id {job.id!r} does not match video id (expected {job_id_for(args.video_id)!r})")
    return None


def resolve_uri(args: TagArgs, settings: Settings) -> str:
    """The job's URI, or ``settings.uri_template`` filled with the video id; checked by the URI
    policy (raises ForbiddenUriError / NotFoundError / InvalidJobError)."""
    uri = args.uri
    if uri is None:
        if not settings.uri_template:
            raise InvalidJobError("job has no uri and no uri_template is configured")
        uri = settings.uri_template.format(video_id=args.video_id)
    from worker.uri_policy import UriPolicy

    return UriPolicy.from_settings(settings).check(uri)


# --- runtime: set by the worker process ------------------------------------------------------------
@dataclass
class JobRuntime:
    """What :func:`tag_video` needs inside a worker: the pipeline, settings and the result sink."""

    settings: Settings
    pipeline: Any  # worker.pipeline.Pipeline: submit(VideoRequest) -> Future[dict]
    sink: Any  # worker.sink.ResultSink
    hand_back: threading.Event = field(default_factory=threading.Event)
    request_factory: Any = None  # default: worker.pipeline.VideoRequest


@dataclass
class JobContext:
    """Per-job facts the worker thread knows and the job function cannot see."""

    enqueued_at: float | None = None  # epoch seconds
    deadline: float | None = None  # time.monotonic()


_runtime: JobRuntime | None = None
_local = threading.local()


def install_runtime(runtime: JobRuntime | None) -> None:
    global _runtime
    _runtime = runtime


def set_context(context: JobContext | None) -> None:
    _local.context = context


def _wait(future: Future, deadline: float | None, hand_back: threading.Event) -> dict:
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


def tag_video(video_id: str, uri: str | None = None, title: str = "") -> dict:
    """Tag one video and return its result document (also written to ``tagstream:tags:{video_id}``).

    Runs only inside ``tagstream worker``. Raises a :class:`~worker.errors.TagstreamError` on failure:
    permanent ones are failed at once, transient ones retried by rq."""
    runtime = _runtime
    if runtime is None:
        raise RuntimeError("worker.jobs.tag_video runs inside `tagstream worker`")
    args = _bind_args([video_id], {"uri": uri, "title": title})
    resolved = resolve_uri(args, runtime.settings)
    factory = runtime.request_factory
    if factory is None:
        from worker.pipeline import VideoRequest as factory

    context: JobContext = getattr(_local, "context", None) or JobContext()
    deadline = context.deadline or time.monotonic() + runtime.settings.job_timeout_s
    request = factory(
        video_id=args.video_id, uri=resolved, title=args.title, enqueued_at=context.enqueued_at, deadline=deadline
    )
    future = runtime.pipeline.submit(request)
    document = _wait(future, deadline + 1.0, runtime.hand_back)
    if not isinstance(document, dict):
        raise TagstreamError("pipeline returned no document")
    if args.notes:
        document["input_warnings"] = list(args.notes) + document.get("input_warnings", [])
    runtime.sink.write(document)
    return document
