"""One retry policy for every Redis call a worker makes: which errors, how long to wait, what to record.

Errors: :data:`REDIS_ERRORS` (a lost connection or a timeout) are the only ones retried; anything else
Redis answers (a wrong type, a refused command, bad credentials) is a bug or a setting, not an outage.
Delays: :data:`FIRST_DELAY_S`, doubling up to :data:`MAX_DELAY_S`, back to the first after a success
(:class:`Backoff`). The result sink, the worker's own loop and bookkeeping (:func:`retry_redis`) and the
uploads bridge's loop all use them. A retried call waits on ``give_up`` (a worker's second SIGTERM),
so an outage never delays a forced stop by more than a call's own timeout.

:class:`RedisStatus` is what the worker knows about Redis from those calls (``tagstream_redis_up``,
``tagstream_redis_errors_total``, ``/readyz``), and since when.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from worker.errors import RedisUnavailableError
from worker.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)
FIRST_DELAY_S = 0.1
MAX_DELAY_S = 4.0


class Backoff:
    """The delays of one retry loop: :data:`FIRST_DELAY_S`, doubling up to :data:`MAX_DELAY_S`."""

    def __init__(self) -> None:
        self._delay = FIRST_DELAY_S

    def next(self) -> float:
        """The delay to wait now (the following one doubles)."""
        delay = self._delay
        self._delay = min(delay * 2, MAX_DELAY_S)
        return delay

    def reset(self) -> None:
        """After a success: the next failure waits :data:`FIRST_DELAY_S` again."""
        self._delay = FIRST_DELAY_S


class RedisStatus:
    """Whether the last Redis call succeeded, since when it has been failing, and when it came back;
    each change is mirrored in ``metrics`` (``redis_up``; every failure counts in ``redis_errors``).
    Thread-safe enough for its use: single assignments read by other threads."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self.up = False
        self.down_since: float | None = None  # time.monotonic() of the first failure of the current outage
        self.back_at: float | None = None  # time.monotonic() when the last outage ended

    def record(self, up: bool) -> None:
        """Record the outcome of one Redis call."""
        if not up and self.down_since is None:
            self.down_since = time.monotonic()
        elif up and self.down_since is not None:
            self.down_since = None
            self.back_at = time.monotonic()
        self.up = up
        if self.metrics is not None:
            self.metrics.redis_up.set(1 if up else 0)
            if not up:
                self.metrics.redis_errors.inc()

    def recovering(self, grace_s: float) -> bool:
        """True while Redis is away and for ``grace_s`` after it came back."""
        if self.down_since is not None:  # no call has succeeded since the last failure
            return True
        return self.back_at is not None and time.monotonic() - self.back_at < grace_s


def retry_redis(
    call: Callable[[], T],
    *,
    give_up: threading.Event | None = None,
    what: str = "redis call",
    on_error: Callable[[], None] | None = None,
    on_success: Callable[[], None] | None = None,
) -> T:
    """Run ``call()`` until it does not raise one of :data:`REDIS_ERRORS`, waiting :class:`Backoff`'s
    delays in between. Raises :class:`RedisUnavailableError` once ``give_up`` is set. ``on_error`` runs
    after each failure, ``on_success`` after the success."""
    backoff = Backoff()
    while True:
        try:
            result = call()
        except REDIS_ERRORS as exc:
            if on_error is not None:
                on_error()
            if give_up is not None and give_up.is_set():
                raise RedisUnavailableError(f"{what}: Redis unavailable ({exc})") from exc
            delay = backoff.next()
            log.warning("%s failed (%s); retrying in %.1f s", what, exc, delay)
            if give_up is not None:
                give_up.wait(delay)
            else:
                time.sleep(delay)
            continue
        if on_success is not None:
            on_success()
        return result
