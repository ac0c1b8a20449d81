"""Whether the worker's work loop still iterates: beaten by :class:`~worker.jobs.worker.TagWorker`,
read by ``/healthz`` (:class:`worker.service.health.HealthServer`)."""

from __future__ import annotations

import time
from collections.abc import Callable


class Liveness:
    """When the work loop last iterated, for ``/healthz``.

    The loop calls :meth:`beat` on every iteration (an idle worker iterates at least every few seconds:
    its dequeue waits with a timeout). Interpretation: before the first beat the loop has not started
    (models loading), which counts as alive; after it, the loop is alive while the last beat is at most
    ``timeout_s`` old. Thread-safe (one float assignment)."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.timeout_s = float(timeout_s)
        self._clock = clock
        self._last: float | None = None

    def beat(self) -> None:
        """Record one iteration of the loop."""
        self._last = self._clock()

    def age_s(self) -> float | None:
        """Seconds since the last beat, or None before the first one."""
        last = self._last
        return None if last is None else max(0.0, self._clock() - last)

    def alive(self) -> bool:
        """True before the first beat and while the last one is at most ``timeout_s`` old."""
        age = self.age_s()
        return age is None or age <= self.timeout_s
