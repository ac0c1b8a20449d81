"""XADD intake bridged into the rq queue (real redis-server): acknowledgement, idempotence, takeover
of a dead consumer's entries, and the bridged jobs tagged by a real worker (real pipeline and
models). The bridge running inside a ``tagstream worker`` process is in tests/test_rq_worker.py."""

from __future__ import annotations

import redis
from worker_support import InProcessWorker, small_video, statuses, worker_settings

from worker.jobs.enqueue import tag_queue
from worker.jobs.uploads import UploadsBridge
from worker.keys import UPLOADS_GROUP, UPLOADS_STREAM, job_id_for


def test_xadd_entries_become_jobs_once_and_are_acked(redis_url, tmp_path):
    conn = redis.Redis.from_url(redis_url)
    settings = worker_settings(redis_url, [str(tmp_path)])
    files = {name: small_video(tmp_path / f"{name}.mp4") for name in ("u1", "u2")}
    conn.xadd(UPLOADS_STREAM, {"video_id": "u1", "uri": str(files["u1"]), "title": "first"})
    conn.xadd(UPLOADS_STREAM, {"video_id": "u2", "uri": str(files["u2"])})
    conn.xadd(UPLOADS_STREAM, {"video_id": "u1", "uri": str(files["u1"])})  # duplicate
    conn.xadd(UPLOADS_STREAM, {"uri": "/nowhere.mp4"})  # unusable: acked and dropped
    bridge = UploadsBridge(conn, settings, consumer="w1")
    assert bridge.poll(block_ms=100) == 4
    assert bridge.poll(block_ms=100) == 0
    q = tag_queue(conn, settings)
    assert sorted(q.job_ids) == sorted([job_id_for("u1"), job_id_for("u2")])
    assert conn.xpending(UPLOADS_STREAM, UPLOADS_GROUP)["pending"] == 0
    assert conn.xlen(UPLOADS_STREAM) == 0  # bridged entries are deleted, not only acknowledged
    job = q.fetch_job(job_id_for("u1"))
    assert job.kwargs == {"uri": str(files["u1"]), "title": "first"}
    InProcessWorker(settings).burst()
    assert statuses(conn, ["u1", "u2"]) == ["finished", "finished"]


def test_entries_of_a_dead_consumer_are_claimed(redis_url, tmp_path):
    conn = redis.Redis.from_url(redis_url)
    settings = worker_settings(redis_url, [str(tmp_path)])
    path = tmp_path / "c1.mp4"  # the bridge never opens it
    UploadsBridge(conn, settings, consumer="setup").ensure_group()
    conn.xadd(UPLOADS_STREAM, {"video_id": "c1", "uri": str(path)})
    # a consumer reads the entry and dies before enqueueing / acking it
    assert conn.xreadgroup(UPLOADS_GROUP, "dead", {UPLOADS_STREAM: ">"}, count=10)
    assert conn.xpending(UPLOADS_STREAM, UPLOADS_GROUP)["pending"] == 1
    survivor = UploadsBridge(conn, settings, consumer="alive", claim_idle_s=0)
    assert survivor.poll(block_ms=100) == 1
    assert conn.xpending(UPLOADS_STREAM, UPLOADS_GROUP)["pending"] == 0 and conn.xlen(UPLOADS_STREAM) == 0
    assert tag_queue(conn, settings).job_ids == [job_id_for("c1")]
