"""Logging configuration of every ``tagstream`` command: text (the default) or JSON lines on stderr.

* ``text``: ``2026-01-02 03:04:05,678 INFO worker.jobs.worker: message`` (as before).
* ``json``: one JSON object per line with ``time`` (ISO 8601, UTC, milliseconds, ``Z``), ``level``,
  ``logger``, ``message`` and, where known, ``video_id`` and ``job_id``; ``exc_info`` (the formatted
  traceback, a string) when the record carries an exception and ``stack_info`` when it carries a stack.

Job context: a record gets ``video_id`` / ``job_id`` either from ``extra={"video_id": ..., "job_id": ...}``
on the logging call or, when it has none, from the innermost :func:`log_context` active in the logging
thread (a :class:`contextvars.ContextVar`, so each job thread has its own and a new thread starts
with none). The worker enters :func:`log_context` around each job (``worker.jobs.worker``), so everything
logged while the job runs in its thread (rq's messages included) carries both ids.

Nothing here imports torch, rq or pydantic: ``tagstream enqueue`` stays light.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

#: record attributes the JSON format carries when they are set (from ``extra=`` or :func:`log_context`)
CONTEXT_FIELDS = ("video_id", "job_id")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_context: ContextVar[dict[str, str]] = ContextVar("tagstream_log_context", default={})  # noqa: B039 - never mutated


@contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Attach ``fields`` (``video_id``, ``job_id``; None values are left out) to every record logged
    in this thread (or asyncio task) until the block ends; nested blocks add to the outer ones."""
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"unknown log context field(s): {', '.join(sorted(unknown))}")
    merged = {**_context.get(), **{key: str(value) for key, value in fields.items() if value is not None}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> dict[str, str]:
    """The fields :func:`log_context` attaches in this thread now (a copy)."""
    return dict(_context.get())


class ContextFilter(logging.Filter):
    """Sets ``video_id`` / ``job_id`` on a record from :func:`log_context` unless ``extra=`` set them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if getattr(record, key, None) is None:
                setattr(record, key, value)
        return True


def iso_utc(timestamp: float) -> str:
    """``2026-01-02T03:04:05.678Z``: ISO 8601, UTC, millisecond precision."""
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring); non-ASCII text is kept as is."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                doc[key] = str(value)
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc_info"] = record.exc_text
        if record.stack_info:
            doc["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def make_formatter(fmt: str) -> logging.Formatter:
    """The formatter for ``fmt`` (``text`` or ``json``); ValueError for anything else."""
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    value = logging.getLevelName(str(level).strip().upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r} (DEBUG, INFO, WARNING, ERROR or CRITICAL)")
    return value


class _Handler(logging.StreamHandler):
    """The handler :func:`configure_logging` installs. Without an explicit stream it writes to whatever
    ``sys.stderr`` is when a record is emitted (a test runner's capture swaps and closes it)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._fixed = stream
        super().__init__(stream)

    @property
    def stream(self) -> IO[str]:  # type: ignore[override]
        return self._fixed if self._fixed is not None else sys.stderr

    @stream.setter
    def stream(self, value: IO[str] | None) -> None:
        self._fixed = value


def configure_logging(level: str | int, fmt: str, stream: IO[str] | None = None) -> None:
    """Log records of ``level`` and above to ``stream`` (default: stderr) in format ``fmt``.

    Installs one handler on the root logger (with :class:`ContextFilter`) and sets the root level;
    calling it again replaces that handler, so it switches format or level instead of doubling lines.
    Handlers installed by others (a test runner's capture) are left alone. ``warnings.warn`` messages
    become log records too, so a JSON log stays JSON. Raises ValueError for an unknown level or format,
    before changing anything."""
    numeric, formatter = _level(level), make_formatter(fmt)
    handler = _Handler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)


def logging_options(args: argparse.Namespace | None = None) -> tuple[str, str]:
    """(level, format) for a command: its ``--log-level`` / ``--log-format`` flag when it has one and it
    was given (the settings flags ``setting_log_level`` / ``setting_log_format`` or a plain
    ``log_level``), else ``TAGSTREAM_LOG_LEVEL`` / ``TAGSTREAM_LOG_FORMAT``, else ``INFO`` / ``text``."""
    level = fmt = None
    if args is not None:
        level = getattr(args, "setting_log_level", None) or getattr(args, "log_level", None)
        fmt = getattr(args, "setting_log_format", None) or getattr(args, "log_format", None)
    level = level or os.environ.get("TAGSTREAM_LOG_LEVEL") or "INFO"
    fmt = (fmt or os.environ.get("TAGSTREAM_LOG_FORMAT") or "text").strip().lower()
    return level, fmt
