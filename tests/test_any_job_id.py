"""Any well-formed rq job runs, whatever its id (real redis-server, real rq, real workers, pipeline and models).

A plain rq producer (``Queue.enqueue`` with rq's JSON serializer, not :mod:`worker.jobs.enqueue`) enqueues
with rq's random ids, ids of its own, or several jobs for one video mixed with ``submit``'s ``tag-`` id;
two in-process workers (K=4 each) tag every video exactly once (pipeline spies, ``tagstream_videos_total``
and one result document and one ``tagstream:tagged`` event per video), the duplicates return the same
document. rq-dashboard's requeue (``rq.requeue_job`` without a serializer, as its view calls it, and
``FailedJobRegistry.requeue``) runs a failed job again. A claim left by a dead worker expires.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import redis
from rq import Queue, requeue_job
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer
from worker_support import InProcessWorker, MediaServer, small_video, wait_for, worker_settings

from worker.jobs.enqueue import submit
from worker.keys import JOB_FUNCTION, TAGGED_STREAM, claim_key, result_key
from worker.metrics import Metrics


def fetch(conn: redis.Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=conn, serializer=JSONSerializer)


def status(conn: redis.Redis, job_id: str) -> str:
    return fetch(conn, job_id).get_status(refresh=True).value


def document(conn: redis.Redis, video_id: str) -> dict | None:
    raw = conn.get(result_key(video_id))
    return None if raw is None else json.loads(raw)


def sample(metrics: Metrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("tagstream_videos_total", {"outcome": outcome}) or 0.0


def test_plain_rq_producer_any_ids_each_video_tagged_once(redis_url, tmp_path):
    settings = worker_settings(redis_url, [str(tmp_path)], heartbeat_ttl_s=2, heartbeat_interval_s=0.3)
    conn = redis.Redis.from_url(redis_url)
    q = Queue(settings.queue, connection=conn, serializer=JSONSerializer)
    clip = small_video(tmp_path / "clip.mp4")
    server = MediaServer({"held.mp4": clip})
    gate = server.hold("held.mp4", fraction=0.5)  # mix0's first run stays mid-stream until released
    files = {v: str(small_video(tmp_path / f"{v}.mp4", seconds=1.5)) for v in
             ("d0", "d1", "d2", "d3", "c0", "c1", "c2", "c3", "mix1", "mix2")}  # fmt: skip
    jobs: dict[str, list[str]] = {}

    def add(video_id: str, job_id: str) -> None:
        jobs.setdefault(video_id, []).append(job_id)

    # one video, three ids: rq's random id, the producer's own, the tag- convention (all in flight at once)
    held = server.url("held.mp4")
    add("mix0", q.enqueue(JOB_FUNCTION, video_id="mix0", uri=held).id)
    add("mix0", q.enqueue(JOB_FUNCTION, "mix0", uri=held, job_id="producer-mix0").id)
    add("mix0", submit(conn, "mix0", held, "", settings))
    for v in ("d0", "d1", "d2", "d3"):  # rq's random ids, video_id as a keyword (rq's documented style)
        add(v, q.enqueue(JOB_FUNCTION, video_id=v, uri=files[v], title=f"title {v}").id)
    for v in ("c0", "c1", "c2", "c3"):  # the producer's own ids, video_id positional
        add(v, q.enqueue(JOB_FUNCTION, v, uri=files[v], job_id=f"producer-{v}").id)
    add("mix1", q.enqueue(JOB_FUNCTION, video_id="mix1", uri=files["mix1"]).id)  # two random ids
    add("mix1", q.enqueue(JOB_FUNCTION, video_id="mix1", uri=files["mix1"]).id)
    add("mix2", submit(conn, "mix2", files["mix2"], "", settings))  # tag- id, custom id, random id
    add("mix2", q.enqueue(JOB_FUNCTION, "mix2", uri=files["mix2"], job_id="producer-mix2").id)
    add("mix2", q.enqueue(JOB_FUNCTION, video_id="mix2", uri=files["mix2"]).id)
    all_jobs = [j for ids in jobs.values() for j in ids]
    assert len(set(all_jobs)) == len(all_jobs) == 16

    metrics = [Metrics(), Metrics()]
    workers = [InProcessWorker(settings, metrics=m, name=f"w{i}") for i, m in enumerate(metrics)]
    try:
        for w in workers:
            w.start()
        wait_for(lambda: all(status(conn, j) == "started" for j in jobs["mix0"]), 120, "mix0's three jobs started")
        holder = conn.get(claim_key("mix0"))
        assert holder is not None and holder.decode() in jobs["mix0"]
        # the claim outlives its TTL (2 s) while the job runs: the heartbeat renews it
        wait_for(lambda: all(status(conn, j) == "finished" for v in jobs if not v.startswith("mix0")
                             for j in jobs[v]), 240, "every other video")  # fmt: skip
        for _ in range(2):
            gate.wait(1.5)
            assert conn.get(claim_key("mix0")) == holder and conn.pttl(claim_key("mix0")) > 0
        assert [w.spy.video_ids.count("mix0") for w in workers] in ([1, 0], [0, 1])  # only the holder runs
        assert all(status(conn, j) == "started" for j in jobs["mix0"])  # the others wait
        gate.set()
        wait_for(lambda: all(status(conn, j) == "finished" for j in all_jobs), 120, "every job finished")
    finally:
        gate.set()
        for w in workers:
            w.stop()
        server.close()

    runs = Counter(workers[0].spy.video_ids + workers[1].spy.video_ids)
    assert runs == Counter({v: 1 for v in jobs}), runs  # each video through the pipeline exactly once
    assert sum(sample(m, "tagged") for m in metrics) == len(jobs)
    assert sum(sample(m, "reused") for m in metrics) == len(all_jobs) - len(jobs)
    events = Counter(fields[b"video_id"].decode() for _, fields in conn.xrange(TAGGED_STREAM))
    assert events == Counter({v: 1 for v in jobs}), events  # one event per video
    for video_id, ids in jobs.items():
        doc = document(conn, video_id)
        assert doc is not None and doc["status"] == "tagged", (video_id, doc)
        for job_id in ids:  # every job's rq result is the one document
            assert fetch(conn, job_id).return_value() == doc, (video_id, job_id)
    assert conn.keys("tagstream:claim:*") == []  # every claim released


def test_rq_dashboard_requeue_runs_a_failed_job_again(redis_url, tmp_path):
    """A permanent failure (file missing) and a transient one (HTTP 503, no retries left) of random-id
    jobs: requeued as rq-dashboard does, they run again and end tagged once the cause is fixed."""
    settings = worker_settings(redis_url, [str(tmp_path)], job_retries=0)
    conn = redis.Redis.from_url(redis_url)
    q = Queue(settings.queue, connection=conn, serializer=JSONSerializer)
    late = tmp_path / "late.mp4"
    server = MediaServer({"flaky.mp4": small_video(tmp_path / "flaky-src.mp4")})
    server.fail("flaky.mp4", times=1, status=503)
    try:
        missing = q.enqueue(JOB_FUNCTION, video_id="late", uri=str(late)).id
        flaky = q.enqueue(JOB_FUNCTION, video_id="flaky", uri=server.url("flaky.mp4")).id
        first = InProcessWorker(settings).burst()
        assert [status(conn, j) for j in (missing, flaky)] == ["failed", "failed"]
        assert fetch(conn, missing).meta["reason"] == "not_found" and document(conn, "late")["reason"] == "not_found"
        assert fetch(conn, flaky).meta["reason"] == "network_error"
        assert sorted(first.spy.video_ids) == ["flaky"]  # the missing file never reached the decoder

        small_video(late)  # the cause is fixed
        requeue_job(missing, connection=conn)  # rq-dashboard's /job/<id>/requeue: no serializer
        FailedJobRegistry(queue=q).requeue(flaky)  # rq-dashboard's "requeue all"
        second = InProcessWorker(settings).burst()
    finally:
        server.close()
    assert [status(conn, j) for j in (missing, flaky)] == ["finished", "finished"]
    assert sorted(second.spy.video_ids) == ["flaky", "late"]
    for video_id in ("late", "flaky"):
        assert document(conn, video_id)["status"] == "tagged"


def test_a_dead_workers_claim_expires(redis_url, tmp_path):
    """A claim whose holder stopped renewing (a crashed worker) blocks the video only until it expires."""
    settings = worker_settings(redis_url, [str(tmp_path)])
    conn = redis.Redis.from_url(redis_url)
    path = small_video(Path(tmp_path) / "orphan.mp4")
    conn.set(claim_key("orphan"), "job-of-a-dead-worker", px=3000)
    job_id = Queue(settings.queue, connection=conn, serializer=JSONSerializer).enqueue(
        JOB_FUNCTION, video_id="orphan", uri=str(path)).id
    with InProcessWorker(settings) as worker:
        wait_for(lambda: status(conn, job_id) == "started", 60, "job started")
        assert worker.spy.video_ids == []  # waiting, not running
        wait_for(lambda: status(conn, job_id) in ("finished", "failed"), 60, "job ended")
    assert fetch(conn, job_id).get_status() == JobStatus.FINISHED and worker.spy.video_ids == ["orphan"]
    assert document(conn, "orphan")["status"] == "tagged"
