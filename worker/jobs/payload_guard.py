"""Hostile queue payloads: bounded job hashes, bounded decompression, argument checks and sanitising.

Anyone who can write to Redis can write any rq job hash. rq itself trusts it: ``Job.restore``
decompresses ``data`` with no size limit (a few MB of zlib can expand to gigabytes), parses dates,
statuses and integers without catching errors (one malformed field made ``dequeue_any`` raise on every
try, so the job stuck at the head of the queue and blocked every job behind it), and loads the whole
hash whatever its size. :class:`worker.jobs.task.TagJob` routes loading through this module:

- :func:`hash_size`: a job hash over :data:`MAX_JOB_HASH_BYTES` (``MEMORY USAGE``) is not loaded; only
  its ``origin``/``status`` are, and the job is refused.
- :func:`restore_safely`: ``data`` is decompressed by :func:`bounded_payload` (at most
  :data:`MAX_PAYLOAD_BYTES` out, one level: rq never sees compressed bytes again); a payload that is not
  UTF-8 has its invalid bytes replaced (U+FFFD); if rq's own ``restore`` still fails on some field, the
  job is restored from a minimal hash (payload, origin) so it can be failed normally. Every such job gets
  ``job.malformed`` (a reason) and :func:`worker.jobs.task.refusal_of` fails it with ``invalid_job``.
- :func:`load_json`: JSON only, at most :data:`MAX_PAYLOAD_BYTES`, nesting bombs refused.
- :func:`check_video_id`: a video id must be 1-512 characters of valid Unicode with no control
  characters (they would break keys, logs and the ``tagstream:tagged`` stream); anything else is
  refused. Spaces, slashes, colons, glob characters and non-Latin scripts are fine (the rq job id is
  sanitised by :func:`worker.keys.job_id_for`; Redis keys are binary-safe).
- :func:`clean_title`: titles are sanitised, not refused: lone surrogates become U+FFFD, control
  characters (other than tab/newline) become spaces, length is cut to ``MAX_TITLE_CHARS``; each change is
  reported as a note (``input_warnings`` in the result document).
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from collections.abc import Callable
from typing import Any

import redis

from worker.errors import InvalidJobError

log = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 64 * 1024
MAX_JOB_HASH_BYTES = 1 << 20
MAX_VIDEO_ID_CHARS = 512
MAX_TITLE_CHARS = 4096
MAX_URI_CHARS = 4096
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_ID_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def bounded_payload(raw: bytes) -> tuple[bytes, str | None]:
    """rq's ``data`` field as JSON bytes: zlib-decompressed when it is zlib (as rq writes it), at most
    :data:`MAX_PAYLOAD_BYTES`. Returns ``(payload, problem)``; ``problem`` is None when all is well."""
    out = raw
    try:
        d = zlib.decompressobj()
        chunk = d.decompress(raw, MAX_PAYLOAD_BYTES + 1)
        if d.eof:
            out = chunk
        elif len(chunk) > MAX_PAYLOAD_BYTES or d.unconsumed_tail:
            return b"", f"job payload expands past {MAX_PAYLOAD_BYTES} bytes"
    except zlib.error:
        pass  # not compressed: rq falls back to the raw bytes too
    if len(out) > MAX_PAYLOAD_BYTES:
        return b"", f"job payload of {len(out)} bytes exceeds {MAX_PAYLOAD_BYTES}"
    try:
        out.decode("utf-8")
    except UnicodeDecodeError:
        log.warning("job payload is not valid UTF-8; invalid bytes replaced with U+FFFD")
        out = out.decode("utf-8", "replace").encode("utf-8")
    return out, None


def load_json(raw: bytes | str) -> Any:
    """``json.loads`` of a payload, refusing what is not small, UTF-8 JSON (any JSON value: the caller
    checks its shape)."""
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise InvalidJobError(f"job payload of {len(raw)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidJobError("job payload is not JSON (only rq's JSONSerializer is accepted)") from None
    except RecursionError:
        raise InvalidJobError("job payload nests too deeply") from None


def check_video_id(video_id: object) -> str:
    if not isinstance(video_id, str) or not video_id or len(video_id) > MAX_VIDEO_ID_CHARS:
        raise InvalidJobError(f"video_id must be a string of 1 to {MAX_VIDEO_ID_CHARS} characters")
    if _SURROGATE.search(video_id):
        raise InvalidJobError("video_id is not valid Unicode (lone surrogate)")
    if _ID_CONTROL.search(video_id):
        raise InvalidJobError("video_id contains control characters")
    return video_id


def check_uri(uri: object) -> str | None:
    if uri is None:
        return None
    if not isinstance(uri, str) or len(uri) > MAX_URI_CHARS:
        raise InvalidJobError(f"uri must be null or a string of at most {MAX_URI_CHARS} characters")
    if _SURROGATE.search(uri):
        raise InvalidJobError("uri is not valid Unicode (lone surrogate)")
    return uri or None


def clean_title(title: object) -> tuple[str, list[str]]:
    """The title to use and notes on what was changed (see the module docstring)."""
    if title is None:
        return "", []
    if not isinstance(title, str):
        raise InvalidJobError("title must be a string")
    notes = []
    if _SURROGATE.search(title):
        title = _SURROGATE.sub("\ufffd", title)
        notes.append("title was not valid Unicode: lone surrogates replaced with U+FFFD")
    if "\ufffd" in title and not notes:
        notes.append("title contains U+FFFD (invalid UTF-8 in the payload was replaced)")
    if _CONTROL.search(title):
        title = _CONTROL.sub(" ", title)
        notes.append("control characters in the title replaced with spaces")
    if len(title) > MAX_TITLE_CHARS:
        title = title[:MAX_TITLE_CHARS]
        notes.append(f"title cut to {MAX_TITLE_CHARS} characters")
    return title, notes


# --- loading job hashes --------------------------------------------------------------------------------
def hash_size(connection: redis.Redis, key: str) -> int | None:
    """Approximate bytes of a Redis key (``MEMORY USAGE``); None when the server does not allow it."""
    try:
        return connection.memory_usage(key, samples=0)
    except redis.ResponseError:  # an ACL user without MEMORY, or an old server: load it anyway
        return None


def _text(value: object) -> str | None:
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        return None


def minimal_hash(raw: dict[bytes | str, bytes], payload: bytes = b"") -> dict[str, bytes | str]:
    """The fields a refused job needs to be failed normally (everything else is dropped)."""
    fields: dict[str, bytes | str] = {"data": payload or b"-"}
    for name in ("origin", "description"):
        value = raw.get(name.encode(), raw.get(name))
        text = _text(value) if value is not None else None
        if text and len(text) <= 1024:
            fields[name] = text
    return fields


def restore_safely(
    raw: dict[bytes | str, bytes], restore: Callable[[dict[str, bytes | str]], None]
) -> tuple[bytes, str | None]:
    """Restore a job from the hash ``raw`` through rq's ``restore`` made safe (module docstring); returns
    the job's bounded payload and why the hash is malformed (None when it is fine)."""
    problems: list[str] = []
    fields: dict[str, bytes | str] = {}
    for key, value in raw.items():
        name = _text(key)
        if name is None:
            problems.append("job hash has a field name that is not UTF-8")
            continue
        fields[name] = value
    payload = b""
    if "data" in fields:
        payload, problem = bounded_payload(fields["data"])
        if problem:
            problems.append(problem)
        fields["data"] = b"-"  # placeholder rq cannot decompress; the bounded payload is set below
    try:
        restore(fields)
    except Exception as exc:  # noqa: BLE001 - any field rq cannot parse makes the job malformed
        if "data" not in fields:
            raise
        problems.append(f"malformed job hash ({type(exc).__name__}: {str(exc)[:200]})")
        restore(minimal_hash(fields, payload))
    return payload, "; ".join(problems) or None
