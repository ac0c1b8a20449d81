"""Language-neutral intake: ``XADD tagstream:uploads * video_id .. uri .. title ..`` -> rq queue.

Every worker runs a bridge in a thread. Workers share the consumer group
:data:`worker.keys.UPLOADS_GROUP` (created with MKSTREAM, starting at the stream's beginning, so
entries added before any worker ran are bridged too). Each entry is enqueued with
:func:`worker.jobs.enqueue.enqueue_video` and acknowledged only after the enqueue succeeded; a duplicate
(the video's job already exists) is acknowledged too, so bridging is idempotent.

Nothing is dropped silently: an entry that can never succeed (no ``video_id``, an invalid one, an invalid
``uri``, fields over :data:`MAX_ENTRY_BYTES`, or refused by the enqueue) is moved to the capped stream
:data:`worker.keys.UPLOADS_REJECTED_STREAM` (``MAXLEN ~`` :data:`REJECTED_MAXLEN`) with its original
fields plus ``reason`` (one of :data:`worker.metrics.UPLOAD_REJECT_REASONS`), ``error`` (for people) and
``entry_id`` (its id in ``tagstream:uploads``); those three names overwrite original fields of the same
name. A too_large entry keeps its first :data:`MAX_REJECTED_FIELDS` fields, each cut to
:data:`MAX_REJECTED_VALUE_CHARS` characters, so the rejected stream stays bounded. The XADD, XACK and
XDEL run in one transaction, and ``tagstream_uploads_rejected_total{reason}`` counts each refusal. The
checks are the worker's own payload checks (:mod:`worker.jobs.payload_guard`), so an entry the bridge
enqueues is not refused later as ``invalid_job`` for its arguments. Entries a consumer read but
never acknowledged (it died between read and ack) are taken over with XAUTOCLAIM once idle for
``claim_idle_s``; a restarted consumer with the same name first re-reads its own pending entries.

The stream is a hand-off queue owned by Tagstream: an entry is deleted (XDEL, in the same transaction
as its XACK) once bridged, so the stream holds only entries not yet bridged and its memory returns to
nothing after a burst. (Acknowledging alone never frees a stream entry.)

Redis errors back off with the worker's one policy (:mod:`worker.jobs.redis_retry`); any other error
backs off the same way and is logged with its traceback.
"""

from __future__ import annotations

import logging
import threading

import redis

from worker.config import Settings
from worker.errors import InvalidJobError
from worker.jobs.enqueue import enqueue_video
from worker.jobs.payload_guard import MAX_PAYLOAD_BYTES, check_uri, check_video_id
from worker.jobs.redis_retry import REDIS_ERRORS, Backoff
from worker.keys import UPLOADS_GROUP, UPLOADS_REJECTED_STREAM, UPLOADS_STREAM
from worker.metrics import UPLOAD_REJECT_REASONS, Metrics

log = logging.getLogger(__name__)

Fields = dict[bytes | str, bytes | str]
#: A stream entry as redis-py returns it: its id and fields (None when it was deleted while pending).
Entry = tuple[bytes | str, Fields | None]

MAX_ENTRY_BYTES = MAX_PAYLOAD_BYTES  # the bound a job payload has
REJECTED_MAXLEN = 10_000
MAX_REJECTED_FIELDS = 32
MAX_REJECTED_VALUE_CHARS = 1024


class Rejected(Exception):
    """An uploads entry that can never be bridged: ``reason`` is one of ``UPLOAD_REJECT_REASONS``."""

    def __init__(self, reason: str, error: str) -> None:
        assert reason in UPLOAD_REJECT_REASONS, reason
        super().__init__(error)
        self.reason = reason


def check_entry(fields: dict[str, str], raw_bytes: int) -> tuple[str, str | None, str]:
    """``(video_id, uri, title)`` of an entry, or :class:`Rejected` (module docstring)."""
    if raw_bytes > MAX_ENTRY_BYTES:
        raise Rejected("too_large", f"entry of {raw_bytes} bytes exceeds {MAX_ENTRY_BYTES}")
    video_id = fields.get("video_id", "")
    if not video_id:
        raise Rejected("missing_video_id", "entry has no video_id")
    try:
        check_video_id(video_id)
    except InvalidJobError as exc:
        raise Rejected("invalid_video_id", str(exc)) from None
    try:
        uri = check_uri(fields.get("uri") or None)
    except InvalidJobError as exc:
        raise Rejected("invalid_uri", str(exc)) from None
    return video_id, uri, fields.get("title", "")


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


class UploadsBridge:
    """Moves ``tagstream:uploads`` entries into the rq queue (see module docstring)."""

    def __init__(
        self,
        connection: redis.Redis,
        settings: Settings,
        consumer: str,
        *,
        claim_idle_s: float | None = None,
        batch: int = 50,
        metrics: Metrics | None = None,
    ) -> None:
        self.connection = connection
        self.settings = settings
        self.consumer = consumer
        self.claim_idle_ms = int(1000 * (claim_idle_s if claim_idle_s is not None else settings.heartbeat_ttl_s))
        self.batch = batch
        self.metrics = metrics
        self._group_ready = False
        self._own_pending_done = False
        self._claim_cursor = "0-0"

    def ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.connection.xgroup_create(UPLOADS_STREAM, UPLOADS_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _handle(self, entry_id: bytes | str, raw: Fields | None) -> bool:
        """Enqueue one entry, or move it to the rejected stream; returns True when it was acked."""
        raw = raw or {}
        fields = {_text(k): _text(v) for k, v in raw.items()}
        try:
            video_id, uri, title = check_entry(fields, sum(len(k) + len(v) for k, v in raw.items()))
            try:
                job_id, created = enqueue_video(self.connection, video_id, uri, title, self.settings)
            except ValueError as exc:
                raise Rejected("enqueue_error", str(exc)) from None
        except Rejected as rejected:
            self._reject(entry_id, fields, rejected)
            return True
        log.info("bridged upload %s -> %s (%s)", video_id, job_id, "enqueued" if created else "duplicate")
        self._done(entry_id)
        return True

    def _reject(self, entry_id: bytes | str, fields: dict[str, str], rejected: Rejected) -> None:
        """Move one entry to the rejected stream and acknowledge and delete it, atomically."""
        log.warning("uploads entry %s rejected (%s): %s", _text(entry_id), rejected.reason, rejected)
        if rejected.reason == "too_large":
            fields = {k[:MAX_REJECTED_VALUE_CHARS]: v[:MAX_REJECTED_VALUE_CHARS]
                      for k, v in list(fields.items())[:MAX_REJECTED_FIELDS]}  # fmt: skip
        record = {**fields, "reason": rejected.reason, "error": str(rejected)[:1024], "entry_id": _text(entry_id)}
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.xadd(UPLOADS_REJECTED_STREAM, record, maxlen=REJECTED_MAXLEN, approximate=True)
            pipe.xack(UPLOADS_STREAM, UPLOADS_GROUP, entry_id).xdel(UPLOADS_STREAM, entry_id)
            pipe.execute()
        if self.metrics is not None:
            self.metrics.uploads_rejected.labels(rejected.reason).inc()

    def _done(self, entry_id: bytes | str) -> None:
        """Acknowledge and delete one entry, atomically."""
        self.connection.pipeline(transaction=True).xack(UPLOADS_STREAM, UPLOADS_GROUP, entry_id).xdel(
            UPLOADS_STREAM, entry_id
        ).execute()

    def _process(self, entries: list[Entry]) -> int:
        count = 0
        for entry_id, fields in entries:
            if fields is None:  # deleted from the stream while pending
                self._done(entry_id)
                continue
            self._handle(entry_id, fields)
            count += 1
        return count

    def poll(self, block_ms: int | None = 1000) -> int:
        """Bridge what is available (blocking up to ``block_ms`` for new entries); returns the number
        of entries handled. Redis errors propagate (the caller backs off)."""
        self.ensure_group()
        handled = 0
        if not self._own_pending_done:
            reply = self.connection.xreadgroup(UPLOADS_GROUP, self.consumer, {UPLOADS_STREAM: "0"}, count=self.batch)
            entries = reply[0][1] if reply else []
            handled += self._process(entries)
            if len(entries) < self.batch:
                self._own_pending_done = True
        claimed = self.connection.xautoclaim(
            UPLOADS_STREAM, UPLOADS_GROUP, self.consumer, self.claim_idle_ms, start_id=self._claim_cursor,
            count=self.batch,
        )  # fmt: skip
        self._claim_cursor = _text(claimed[0]) or "0-0"
        handled += self._process(claimed[1])
        reply = self.connection.xreadgroup(
            UPLOADS_GROUP, self.consumer, {UPLOADS_STREAM: ">"}, count=self.batch, block=block_ms
        )
        if reply:
            handled += self._process(reply[0][1])
        return handled

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; errors back off (module docstring) instead of ending the loop."""
        backoff = Backoff()
        while not stop.is_set():
            try:
                self.poll(block_ms=500)
                backoff.reset()
            except REDIS_ERRORS as exc:
                self._group_ready = False
                delay = backoff.next()
                log.warning("uploads bridge: Redis unavailable (%s); retrying in %.1f s", exc, delay)
                stop.wait(delay)
            except Exception:
                log.exception("uploads bridge error")
                stop.wait(backoff.next())
