"""One video processed once at a time, whatever the rq job ids: the per-video claim.

Any rq producer may enqueue ``worker.jobs.tag_video`` under any job id (rq's random ids, ids of its own,
or Tagstream's ``tag-`` convention), so two jobs for one video can be in flight at once. What the
deterministic id used to protect is kept by a claim in Redis: ``tagstream:claim:{video_id}``
(:func:`worker.keys.claim_key`), ``SET NX PX heartbeat_ttl`` with the job id as value.

- Only the job that holds a video's claim runs its pipeline or writes its result document (the tagged
  document, or the failed one after a final failure: :meth:`VideoClaims.may_write`).
- The heartbeat renews every claim its worker holds (:meth:`VideoClaims.renew`, compare-and-PEXPIRE in
  one script); a crashed or frozen worker stops renewing, so its claims expire with its heartbeat TTL and
  never block a video for longer. A job re-run under the same id (orphan recovery) takes its own claim
  back at once.
- A claim is released (compare-and-delete script) when its job's thread ends, after the job's document
  was written and rq finalised it, so a job that waited finds the document.

Interpretation of "the second job" (see :func:`claim_or_reuse`): a job that finds its video's claim held
by another job waits (polling every ``heartbeat_interval_s``, within its deadline, handing back on
shutdown, holding no pipeline slot). Once it holds the claim, if a *tagged* document finished after
this job was enqueued exists, that document is reused as this job's result: no second pipeline run, no
second write and no second ``tagstream:tagged`` event, so the rq results of both jobs are the same one
document. The same check runs when the claim was free (a duplicate dequeued after the first finished).
A failed document is not reused: the cause may be fixed (a requeue), and failing is cheap. A result
finished before this job was enqueued is not reused either: enqueueing again means "tag again".
Timestamps compare the document's ``finished_at`` (the writer's clock) with rq's ``enqueued_at`` (the
producer's clock); clocks of producers and workers are assumed to agree within a second.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import redis

from worker.engine.document import Document
from worker.errors import MediaTimeoutError, ShutdownError
from worker.jobs.redis_retry import REDIS_ERRORS
from worker.keys import claim_key, result_key

log = logging.getLogger(__name__)

__all__ = ["ClaimTicket", "VideoClaims", "claim_or_reuse"]

# KEYS[1] claim key; ARGV[1] job id, ARGV[2] ttl ms. Takes a free claim or re-takes the job's own one.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# KEYS[1] claim key; ARGV[1] job id. Deletes the claim only when this job holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: claim keys; ARGV[1] ttl ms, ARGV[1 + i]: the job id holding KEYS[i]. Renews only our own claims.
_RENEW = """
local renewed = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then redis.call('PEXPIRE', key, ARGV[1]) renewed = renewed + 1 end
end
return renewed
"""


@dataclass
class ClaimTicket:
    """One job's relation to its video's claim: ``held`` while it holds it, ``reused`` when the job's
    result is another job's document (:func:`claim_or_reuse`)."""

    job_id: str
    video_id: str | None = None
    held: bool = False
    reused: bool = False


class VideoClaims:
    """The claims one worker holds (thread-safe). ``ttl_s``: the heartbeat TTL."""

    def __init__(self, connection: redis.Redis, ttl_s: float) -> None:
        self.connection = connection
        self.ttl_ms = max(1000, int(ttl_s * 1000))
        self._held: dict[str, ClaimTicket] = {}
        self._lock = threading.Lock()
        self._acquire = connection.register_script(_ACQUIRE)
        self._release = connection.register_script(_RELEASE)
        self._renew = connection.register_script(_RENEW)

    def acquire(self, ticket: ClaimTicket, video_id: str) -> bool:
        """Take ``video_id``'s claim for ``ticket``'s job; False when another job holds it."""
        if not self._acquire(keys=[claim_key(video_id)], args=[ticket.job_id, self.ttl_ms]):
            return False
        ticket.video_id, ticket.held = video_id, True
        with self._lock:
            self._held[ticket.job_id] = ticket
        return True

    def release(self, ticket: ClaimTicket) -> None:
        """Release the ticket's claim if it holds one (never another job's)."""
        if not ticket.held or ticket.video_id is None:
            return
        with self._lock:
            self._held.pop(ticket.job_id, None)
        ticket.held = False
        self._release(keys=[claim_key(ticket.video_id)], args=[ticket.job_id])

    def release_quietly(self, ticket: ClaimTicket) -> None:
        """:meth:`release`; with Redis away the claim is left to expire with the heartbeat TTL."""
        try:
            self.release(ticket)
        except REDIS_ERRORS:
            log.warning("could not release the claim of job %s; it expires with the heartbeat TTL", ticket.job_id)

    def renew(self, pipe: redis.client.Pipeline) -> None:
        """Queue the renewal of every held claim on the heartbeat's pipeline."""
        with self._lock:
            tickets = [t for t in self._held.values() if t.video_id is not None]
        if tickets:
            keys = [claim_key(t.video_id) for t in tickets if t.video_id is not None]
            self._renew(keys=keys, args=[self.ttl_ms, *(t.job_id for t in tickets)], client=pipe)

    def may_write(self, ticket: ClaimTicket, video_id: str) -> bool:
        """Whether the job may write ``video_id``'s document: it holds the claim or can take it now."""
        return ticket.held or self.acquire(ticket, video_id)


def _finished_at(document: Document) -> float | None:
    try:
        return datetime.fromisoformat(str(document["finished_at"]).replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        return None


def recent_result(connection: redis.Redis, video_id: str, enqueued_at: float | None) -> Document | None:
    """The video's tagged document if it finished after ``enqueued_at`` (epoch seconds), else None."""
    if enqueued_at is None:
        return None
    raw = connection.get(result_key(video_id))
    if raw is None:
        return None
    try:
        document = json.loads(raw)
    except ValueError:
        return None
    finished = _finished_at(document) if isinstance(document, dict) else None
    if finished is None or document.get("status") != "tagged" or finished < enqueued_at:
        return None
    return document


def claim_or_reuse(claims: VideoClaims, ticket: ClaimTicket, video_id: str, *, enqueued_at: float | None,
                   deadline: float, poll_s: float, hand_back: threading.Event,
                   retry: Callable[[Callable[[], object]], object] | None = None) -> Document | None:
    """Hold ``video_id``'s claim and return None (run the pipeline), or return the document to reuse
    (module docstring). Raises :class:`ShutdownError` on hand-back and :class:`MediaTimeoutError` when
    the deadline passes while another job holds the claim."""
    call = retry or (lambda f: f())
    waited = False
    while True:
        if call(lambda: claims.acquire(ticket, video_id)):
            document = call(lambda: recent_result(claims.connection, video_id, enqueued_at))
            if document is not None:
                ticket.reused = True
                log.info("video %s was tagged by another job meanwhile; reusing its result", video_id)
                return document  # type: ignore[return-value]
            return None
        if not waited:
            log.info("video %s is claimed by another job; waiting for it", video_id)
            waited = True
        if hand_back.is_set():
            raise ShutdownError("worker is shutting down; job handed back")
        if time.monotonic() >= deadline:
            raise MediaTimeoutError("job ran past job_timeout_s waiting for another job of the same video")
        hand_back.wait(min(poll_s, max(0.0, deadline - time.monotonic())))
