"""The rq side of the worker against a real redis-server: lifecycle, refusals, crashes, signals,
Redis restarts. The pipeline is a stand-in (``FakePipeline``) so these tests measure the queue
machinery, not the models; tests/test_worker_e2e.py runs the real pipeline.

Subprocess workers run ``run_fake_worker()`` from this file (settings from TAGSTREAM_* variables,
``FAKE_DELAY_S`` per video).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from rq import Queue, Worker
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from worker.client import enqueue_video, submit, tag_queue
from worker.config import Settings
from worker.errors import DecodeError, NetworkError, ShutdownError
from worker.jobs import TagJob
from worker.keys import TAGGED_STREAM, job_id_for, result_key
from worker.result import tagged_document
from worker.rq_worker import TagWorker

HERE = Path(__file__).resolve().parent


@dataclass
class FakeRequest:
    video_id: str
    uri: str
    title: str = ""
    enqueued_at: float | None = None
    deadline: float | None = None


class FakePipeline:
    """``submit(req) -> Future[dict]`` after ``delay_s``; ``corrupt`` in the URI -> DecodeError,
    ``flaky`` -> NetworkError on the first attempt of each video."""

    def __init__(self, delay_s: float = 0.2) -> None:
        self.delay_s = delay_s
        self.pool = ThreadPoolExecutor(16)
        self.attempts: dict[str, int] = {}
        self.requests: list = []
        self.stopped = threading.Event()

    def stop(self, timeout: float | None = None) -> None:
        self.stopped.set()
        self.pool.shutdown(wait=True)

    def submit(self, req) -> Future:
        self.requests.append(req)
        self.attempts[req.video_id] = self.attempts.get(req.video_id, 0) + 1
        attempt = self.attempts[req.video_id]

        def work() -> dict:
            if self.stopped.wait(self.delay_s):
                raise ShutdownError("pipeline stopped")
            if "corrupt" in req.uri:
                raise DecodeError("cannot decode")
            if "flaky" in req.uri and attempt == 1:
                raise NetworkError("connection reset")
            return tagged_document(
                req.video_id, model_version="fake", prediction=None, concepts=[], media={},
                timings={"total": self.delay_s},
            )  # fmt: skip

        return self.pool.submit(work)


def make_settings(url: str, root: Path, **overrides) -> Settings:
    base = dict(
        redis_url=url, allowed_roots=[str(root)], concurrency=4, heartbeat_interval_s=0.5, heartbeat_ttl_s=3,
        maintenance_interval_s=1, shutdown_grace_s=5, metrics_port=0, job_retries=2,
    )  # fmt: skip
    base.update(overrides)
    return Settings(**base)


def media_files(root: Path, names: list[str]) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        p = root / f"{name}.mp4"
        p.write_bytes(b"\x00\x00\x00\x18ftypmp42")  # the fake pipeline never reads it
        out[name] = p
    return out


def run_burst(settings: Settings, conn: redis.Redis, pipeline: FakePipeline | None = None) -> TagWorker:
    worker = TagWorker(settings, conn, pipeline or FakePipeline(), model_version="fake", request_factory=FakeRequest)
    worker.work(burst=True)
    return worker


def run_fake_worker() -> None:
    """Entry point of subprocess workers (see module docstring)."""
    import logging

    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    settings = Settings()
    conn = redis.Redis.from_url(settings.redis_url)
    pipeline = FakePipeline(float(os.environ.get("FAKE_DELAY_S", "0.2")))
    worker = TagWorker(settings, conn, pipeline, model_version="fake", name=os.environ.get("FAKE_WORKER_NAME"),
                       request_factory=FakeRequest)
    try:
        worker.work()
    finally:
        pipeline.stop()


def spawn_worker(settings: Settings, delay_s: float, name: str, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.update({f"TAGSTREAM_{k.upper()}": (",".join(v) if isinstance(v, list) else str(v))
                for k, v in settings.model_dump(exclude_none=True).items()})
    env.update({"FAKE_DELAY_S": str(delay_s), "FAKE_WORKER_NAME": name})
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); from test_rq_worker import run_fake_worker; run_fake_worker()"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)


def wait_for(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def statuses(conn: redis.Redis, video_ids: list[str]) -> list[str]:
    return [TagJob.fetch(job_id_for(v), connection=conn, serializer=JSONSerializer).get_status().value for v in video_ids]


@pytest.fixture()
def conn(redis_url):
    return redis.Redis.from_url(redis_url)


def test_enqueue_to_result_through_rq_lifecycle(conn, redis_url, tmp_path):
    settings = make_settings(redis_url, tmp_path)
    files = media_files(tmp_path, ["a", "b", "c"])
    for name, path in files.items():
        submit(conn, name, str(path), f"title {name}", settings)
    run_burst(settings, conn)
    for name in files:
        job = TagJob.fetch(job_id_for(name), connection=conn, serializer=JSONSerializer)
        assert job.get_status() == JobStatus.FINISHED
        doc = json.loads(conn.get(result_key(name)))
        assert doc["status"] == "tagged" and doc["video_id"] == name
        assert job.return_value() == doc
        assert conn.ttl(result_key(name)) > 0
    events = conn.xrange(TAGGED_STREAM)
    assert sorted(e[1][b"video_id"].decode() for e in events) == ["a", "b", "c"]
    # nothing left behind in rq's working sets
    q = tag_queue(conn, settings)
    assert q.count == 0 and q.started_job_registry.count == 0
    assert conn.llen(q.intermediate_queue_key) == 0


def test_duplicate_enqueue_one_job_one_result(conn, redis_url, tmp_path):
    settings = make_settings(redis_url, tmp_path)
    path = media_files(tmp_path, ["dup"])["dup"]
    first = enqueue_video(conn, "dup", str(path), "", settings)
    second = enqueue_video(conn, "dup", str(path), "", settings)
    assert first == (job_id_for("dup"), True) and second == (job_id_for("dup"), False)
    assert tag_queue(conn, settings).count == 1
    pipeline = FakePipeline()
    run_burst(settings, conn, pipeline)
    assert enqueue_video(conn, "dup", str(path), "", settings)[1] is False  # finished job still counts
    run_burst(settings, conn, pipeline)
    assert pipeline.attempts == {"dup": 1}
    assert len(conn.keys(result_key("*"))) == 1 and conn.xlen(TAGGED_STREAM) == 1


def test_twenty_videos_k4_and_failures_are_classified(conn, redis_url, tmp_path):
    settings = make_settings(redis_url, tmp_path, concurrency=4)
    names = [f"v{i:02d}" for i in range(18)] + ["corrupt01", "flaky01"]
    files = media_files(tmp_path, names)
    for name, path in files.items():
        submit(conn, name, str(path), "", settings)
    pipeline = FakePipeline(0.2)
    worker = run_burst(settings, conn, pipeline)
    got = dict(zip(names, statuses(conn, names), strict=True))
    assert all(got[n] == "finished" for n in names if n != "corrupt01")
    assert got["corrupt01"] == "failed"
    bad = TagJob.fetch(job_id_for("corrupt01"), connection=conn, serializer=JSONSerializer)
    assert bad.meta["reason"] == "decode_error" and bad.exc_info.startswith("reason=decode_error")
    assert pipeline.attempts["corrupt01"] == 1  # permanent: never retried
    assert pipeline.attempts["flaky01"] == 2  # transient: retried once, then tagged
    assert json.loads(conn.get(result_key("corrupt01")))["reason"] == "decode_error"
    assert worker.jobs_started == 21


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/tagstream-pwned-by-pickle",))


def test_refused_payloads_never_run(conn, redis_url, tmp_path):
    settings = make_settings(redis_url, tmp_path)
    marker = Path("/tmp/tagstream-pwned-by-pickle")
    marker.unlink(missing_ok=True)
    other_marker = tmp_path / "other-function-ran"
    good = media_files(tmp_path, ["ok"])["ok"]
    q = Queue(settings.queue, connection=conn, serializer=JSONSerializer)
    # 1. pickle bytes written into the data field of an otherwise valid job
    submit(conn, "pickled", str(good), "", settings)
    conn.hset(f"rq:job:{job_id_for('pickled')}", "data", pickle.dumps(("worker.jobs.tag_video", None, [_Boom()], {})))
    # 2. a job naming another function
    q.enqueue_call("os.system", args=(f"touch {other_marker}",), job_id="tag-other")
    # 3. valid function but a callback that would run code
    q.enqueue_call("worker.jobs.tag_video", args=("cb",), kwargs={"uri": str(good)}, job_id=job_id_for("cb"),
                   on_failure="os.abort")
    # 4. job id not derived from the video id
    q.enqueue_call("worker.jobs.tag_video", args=("x",), kwargs={"uri": str(good)}, job_id="tag-not-x")
    # 5. URI outside the allowed roots, 6. disallowed host
    submit(conn, "outside", "/etc/passwd", "", settings)
    submit(conn, "evilhost", "http://evil.example/v.mp4", "", settings)
    pipeline = FakePipeline()
    run_burst(settings, conn, pipeline)
    assert not marker.exists() and not other_marker.exists()
    expect = {
        job_id_for("pickled"): "invalid_job", "tag-other": "invalid_job", job_id_for("cb"): "invalid_job",
        "tag-not-x": "invalid_job", job_id_for("outside"): "forbidden_uri", job_id_for("evilhost"): "forbidden_uri",
    }  # fmt: skip
    for job_id, reason in expect.items():
        job = TagJob.fetch(job_id, connection=conn, serializer=JSONSerializer)
        assert job.get_status() == JobStatus.FAILED, job_id
        assert job.exc_info.startswith(f"reason={reason}"), job_id
        assert job.meta["reason"] == reason
    assert pipeline.requests == []  # nothing reached the pipeline
    assert json.loads(conn.get(result_key("outside")))["reason"] == "forbidden_uri"


def test_sigkill_worker_jobs_finished_by_survivor(conn, redis_url, tmp_path):
    settings = make_settings(redis_url, tmp_path, concurrency=4, heartbeat_interval_s=1, heartbeat_ttl_s=4,
                             maintenance_interval_s=2)
    names = [f"k{i}" for i in range(6)]
    for name, path in media_files(tmp_path / "m", names).items():
        submit(conn, name, str(path), "", settings)
    q = tag_queue(conn, settings)
    victim = spawn_worker(settings, 60.0, "victim", tmp_path / "victim.log")
    try:
        wait_for(lambda: q.started_job_registry.count == 4, 30, "victim holding 4 jobs")
        # rq's own tooling sees the worker and its executions
        workers = Worker.all(queue=q)
        assert [w.name for w in workers] == ["victim"]
        assert len(workers[0].get_current_executions(refresh=True)) == 4
        info = subprocess.run([str(Path(sys.executable).with_name("rq")), "info", "--url", redis_url, settings.queue], capture_output=True, text=True)
        assert "victim" in info.stdout
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        killed_at = time.monotonic()
        survivor = spawn_worker(settings, 0.2, "survivor", tmp_path / "survivor.log")
        try:
            bound = settings.heartbeat_ttl_s + settings.maintenance_interval_s + 15
            recovery = wait_for(lambda: statuses(conn, names).count("finished") == 6, bound, "survivor")
        finally:
            survivor.send_signal(signal.SIGTERM)
            survivor.wait(20)
    finally:
        if victim.poll() is None:
            victim.kill()
    print(f"recovery after SIGKILL: {recovery:.1f} s (ttl {settings.heartbeat_ttl_s}, "
          f"maintenance {settings.maintenance_interval_s}); total {time.monotonic() - killed_at:.1f} s")
    assert q.started_job_registry.count == 0


def test_sigterm_mid_batch_loses_nothing(conn, redis_url, tmp_path):
    settings = make_settings(redis_url, tmp_path, concurrency=4, shutdown_grace_s=1.0)
    names = [f"t{i}" for i in range(8)]
    for name, path in media_files(tmp_path / "m", names).items():
        submit(conn, name, str(path), "", settings)
    q = tag_queue(conn, settings)
    proc = spawn_worker(settings, 30.0, "term", tmp_path / "term.log")
    try:
        wait_for(lambda: q.started_job_registry.count == 4, 30, "4 jobs in flight")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    got = statuses(conn, names)
    assert got.count("queued") == 8, got  # 4 handed back + 4 never started
    assert q.count == 8 and q.started_job_registry.count == 0
    for name in names:  # no retry was spent on the hand-back
        assert TagJob.fetch(job_id_for(name), connection=conn, serializer=JSONSerializer).retries_left == 2
    assert Worker.all(queue=q) == []
    run_burst(settings, conn)
    assert statuses(conn, names).count("finished") == 8


def test_sigterm_grace_lets_jobs_finish_and_second_signal_hands_back(conn, redis_url, tmp_path):
    settings = make_settings(redis_url, tmp_path, concurrency=2, shutdown_grace_s=30)
    names = ["g0", "g1", "g2"]
    for name, path in media_files(tmp_path / "m", names).items():
        submit(conn, name, str(path), "", settings)
    q = tag_queue(conn, settings)
    proc = spawn_worker(settings, 2.0, "grace", tmp_path / "grace.log")
    try:
        wait_for(lambda: q.started_job_registry.count == 2, 30, "2 jobs in flight")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(statuses(conn, names)) == ["finished", "finished", "queued"]
    proc = spawn_worker(settings, 60.0, "grace2", tmp_path / "grace2.log")
    try:
        wait_for(lambda: q.started_job_registry.count == 1, 30, "1 job in flight")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(statuses(conn, names)) == ["finished", "finished", "queued"]


def test_redis_restart_mid_run_every_job_completes(tmp_path):
    from worker.local_redis import LocalRedis

    server = LocalRedis(appendonly=True).start()
    try:
        conn = redis.Redis.from_url(server.url)
        settings = make_settings(server.url, tmp_path, concurrency=4, heartbeat_ttl_s=10)
        names = [f"r{i}" for i in range(10)]
        for name, path in media_files(tmp_path / "m", names).items():
            submit(conn, name, str(path), "", settings)
        q = tag_queue(conn, settings)
        worker = TagWorker(settings, redis.Redis.from_url(server.url), FakePipeline(1.0), model_version="fake",
                           request_factory=FakeRequest)
        thread = threading.Thread(target=worker.work, kwargs={"burst": True}, daemon=True)
        thread.start()
        wait_for(lambda: q.started_job_registry.count >= 2, 30, "jobs in flight")
        time.sleep(0.5)  # let appendfsync everysec catch up
        server.restart(down_s=1.5)
        thread.join(120)
        assert not thread.is_alive()
        conn = redis.Redis.from_url(server.url)
        assert statuses(conn, names).count("finished") == 10
        assert len(conn.keys(result_key("*"))) == 10
    finally:
        server.stop()
