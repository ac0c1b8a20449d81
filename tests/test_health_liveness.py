"""/healthz follows the work loop: 503 once the loop has not iterated for ``liveness_timeout_s``.

A :class:`Liveness` on a fake clock pins the rule (alive before the first beat, while models load;
then alive while the last beat is at most the timeout old). A real in-process worker (real TagWorker,
pipeline and models, real Redis) with an empty queue stays healthy well past the timeout, because
its loop iterates while it waits for jobs; the same worker whose loop is blocked (its dequeue held on
an event) turns /healthz 503, and healthy again once the loop runs.
"""

from __future__ import annotations

import threading

import pytest
from worker_support import InProcessWorker, http_get, wait_for, worker_settings

from worker.jobs.liveness import Liveness
from worker.metrics import Metrics
from worker.service.health import HealthServer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_liveness_rule():
    clock = FakeClock()
    liveness = Liveness(10.0, clock=clock)
    assert liveness.age_s() is None and liveness.alive()  # not started (models loading): alive
    clock.now += 3600
    assert liveness.alive()
    liveness.beat()
    clock.now += 10.0
    assert liveness.age_s() == pytest.approx(10.0) and liveness.alive()
    clock.now += 0.5
    assert not liveness.alive()
    liveness.beat()
    assert liveness.alive() and liveness.age_s() == 0.0
    with pytest.raises(ValueError):
        Liveness(0)


def test_healthz_503_when_liveness_is_stale():
    clock = FakeClock()
    liveness = Liveness(5.0, clock=clock)
    server = HealthServer("127.0.0.1", 0, Metrics().registry, lambda: True, liveness=liveness).start()
    url = f"http://127.0.0.1:{server.port}/healthz"
    try:
        assert http_get(url) == (200, "ok\n")  # never beaten: still loading, healthy
        liveness.beat()
        clock.now += 5.0
        assert http_get(url)[0] == 200
        clock.now += 1.0
        status, body = http_get(url)
        assert status == 503 and "work loop stalled" in body, body
        assert http_get(f"http://127.0.0.1:{server.port}/readyz")[0] == 200  # readiness is separate
        liveness.beat()
        assert http_get(url)[0] == 200
    finally:
        server.stop()


def test_idle_worker_stays_healthy_and_blocked_loop_fails(redis_url, tmp_path):
    timeout_s = 4.0
    settings = worker_settings(redis_url, [str(tmp_path)], liveness_timeout_s=timeout_s)
    live = InProcessWorker(settings, metrics=Metrics())
    worker = live.worker
    assert worker.liveness.timeout_s == timeout_s
    server = HealthServer("127.0.0.1", 0, Metrics().registry, lambda: True, liveness=worker.liveness).start()
    url = f"http://127.0.0.1:{server.port}/healthz"
    release = threading.Event()
    blocked = threading.Event()
    dequeue = worker._dequeue

    def held_dequeue(burst: bool):
        if not release.is_set():
            blocked.set()
            release.wait(120)
        return dequeue(burst)

    try:
        assert http_get(url)[0] == 200  # the loop has not started: healthy
        with live:
            wait_for(lambda: worker.liveness.age_s() is not None, 60, "the work loop to start")
            # an idle worker (empty queue) for twice the timeout: every probe is 200
            for _ in range(int(2 * timeout_s / 0.25)):
                status, body = http_get(url)
                assert status == 200, body
                assert worker.liveness.age_s() < timeout_s
                threading.Event().wait(0.25)
            # the loop stuck in a call that never returns: 503 once the timeout has passed
            worker._dequeue = held_dequeue
            wait_for(blocked.is_set, 30, "the loop to block")
            waited = wait_for(lambda: http_get(url)[0] == 503, 3 * timeout_s, "/healthz to fail")
            # not before the timeout: the last beat came just before the loop blocked
            assert waited >= timeout_s - 1.5
            assert "work loop stalled" in http_get(url)[1]
            release.set()
            wait_for(lambda: http_get(url)[0] == 200, 30, "/healthz to recover")
    finally:
        release.set()
        server.stop()
