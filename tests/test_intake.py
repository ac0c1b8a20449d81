"""XADD intake bridged into the rq queue (real redis-server): acknowledgement, idempotence, takeover
of a dead consumer's entries, and the bridged jobs tagged by a real worker (real pipeline and
models). The bridge running inside a ``tagstream worker`` process is in tests/test_rq_worker.py."""

from __future__ import annotations

import shutil
import subprocess

import redis
from worker_support import InProcessWorker, small_video, statuses, worker_settings

from worker.jobs.enqueue import tag_queue
from worker.jobs.uploads import MAX_ENTRY_BYTES, MAX_REJECTED_VALUE_CHARS, UploadsBridge
from worker.keys import UPLOADS_GROUP, UPLOADS_REJECTED_STREAM, UPLOADS_STREAM, job_id_for
from worker.metrics import Metrics


def test_xadd_entries_become_jobs_once_and_are_acked(redis_url, tmp_path):
    conn = redis.Redis.from_url(redis_url)
    settings = worker_settings(redis_url, [str(tmp_path)])
    files = {name: small_video(tmp_path / f"{name}.mp4") for name in ("u1", "u2")}
    conn.xadd(UPLOADS_STREAM, {"video_id": "u1", "uri": str(files["u1"]), "title": "first"})
    conn.xadd(UPLOADS_STREAM, {"video_id": "u2", "uri": str(files["u2"])})
    conn.xadd(UPLOADS_STREAM, {"video_id": "u1", "uri": str(files["u1"])})  # duplicate
    conn.xadd(UPLOADS_STREAM, {"uri": "/nowhere.mp4"})  # unusable: acked, moved to the rejected stream
    bridge = UploadsBridge(conn, settings, consumer="w1")
    assert bridge.poll(block_ms=100) == 4
    assert bridge.poll(block_ms=100) == 0
    q = tag_queue(conn, settings)
    assert sorted(q.job_ids) == sorted([job_id_for("u1"), job_id_for("u2")])
    assert conn.xpending(UPLOADS_STREAM, UPLOADS_GROUP)["pending"] == 0
    assert conn.xlen(UPLOADS_STREAM) == 0  # bridged entries are deleted, not only acknowledged
    assert conn.xlen(UPLOADS_REJECTED_STREAM) == 1
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


def test_refused_entries_go_to_the_rejected_stream(redis_url, tmp_path):
    """Entries written by a client that is not Python (the real redis-cli binary) that can never be
    bridged are moved to tagstream:uploads:rejected with their fields and a reason, and counted."""
    redis_cli = shutil.which("redis-cli")
    assert redis_cli, "redis-cli is not on PATH"
    conn = redis.Redis.from_url(redis_url)
    settings = worker_settings(redis_url, [str(tmp_path)])

    def xadd(*fields: str) -> str:
        done = subprocess.run([redis_cli, "-u", redis_url, "XADD", UPLOADS_STREAM, "*", *fields],
                              capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
        return done.stdout.strip()

    ids = {
        "missing_video_id": xadd("uri", "/nowhere.mp4", "title", "no id"),
        "invalid_video_id": xadd("video_id", "x" * 600, "uri", "/a.mp4"),
        "invalid_uri": xadd("video_id", "bad-uri", "uri", "u" * 5000),
        "too_large": xadd("video_id", "big", "title", "t" * (MAX_ENTRY_BYTES + 1)),
    }
    good = xadd("video_id", "fine", "uri", str(tmp_path / "fine.mp4"))
    metrics = Metrics()
    bridge = UploadsBridge(conn, settings, consumer="w1", metrics=metrics)
    assert bridge.poll(block_ms=100) == 5
    assert tag_queue(conn, settings).job_ids == [job_id_for("fine")]
    assert conn.xlen(UPLOADS_STREAM) == 0 and conn.xpending(UPLOADS_STREAM, UPLOADS_GROUP)["pending"] == 0
    rejected = {f[b"entry_id"].decode(): {k.decode(): v.decode() for k, v in f.items()}
                for _, f in conn.xrange(UPLOADS_REJECTED_STREAM)}  # fmt: skip
    assert good not in rejected and sorted(rejected) == sorted(ids.values())
    for reason, entry_id in ids.items():
        entry = rejected[entry_id]
        assert entry["reason"] == reason and entry["error"], entry
        assert metrics.registry.get_sample_value("tagstream_uploads_rejected_total", {"reason": reason}) == 1
    assert rejected[ids["missing_video_id"]]["uri"] == "/nowhere.mp4"  # the original fields are kept
    assert rejected[ids["missing_video_id"]]["title"] == "no id"
    assert rejected[ids["invalid_uri"]]["video_id"] == "bad-uri" and len(rejected[ids["invalid_uri"]]["uri"]) == 5000
    assert len(rejected[ids["too_large"]]["title"]) == MAX_REJECTED_VALUE_CHARS  # bounded
