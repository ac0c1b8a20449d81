"""The worker end to end, in process: real redis-server, real rq lifecycle (:class:`TagWorker`), the
real pipeline with the real extractors (EfficientNet-Lite0, log-mel audio, MiniLM on CPU) and a real
tiny fusion checkpoint (tests/worker_support.py), real encoded videos.

Covers issue 4's bar for: enqueue -> tags end to end (Python client, ``tagstream enqueue``, the URI
template, ``tagstream status``); duplicate enqueue -> one job, one result; 20 videos with K=4 all
tagged while a corrupt video in the same batches fails alone with its reason; refused payloads
(pickle, other function, callbacks, foreign job id, path outside the allowed roots, disallowed host,
local playlist) never run; transient failures (HTTP 503, job timeout) retried and permanent ones
(404) not; one slow video does not hold up the others; Redis passwords and ACL users from the URL.
Processes (SIGKILL, SIGTERM, Redis restarts)
are in tests/test_rq_worker.py.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from media import make_video
from rq import Queue
from rq.job import JobStatus
from rq.serializers import JSONSerializer
from worker_support import (
    ROOT,
    TINY_LABELS,
    InProcessWorker,
    MediaServer,
    shared_models,
    small_video,
    statuses,
    wait_for,
    worker_settings,
)

from worker.engine.document import TIMING_KEYS
from worker.jobs.enqueue import enqueue_video, submit, tag_queue
from worker.jobs.task import TagJob
from worker.keys import TAGGED_STREAM, job_id_for, result_key
from worker.metrics import Metrics

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """Four distinct good clips (2 s, 160x90, H.264 + AAC), a truncated file without its index, a clip
    that decodes for 15 s and then hits garbage, and an HLS playlist pointing at a good clip."""
    d = tmp_path_factory.mktemp("e2e_media")
    files = {f"good{i}": small_video(d / f"good{i}.mp4", pattern=("index", "busy")[i % 2]) for i in range(4)}
    data = make_video(d / "moov_at_end.mp4", seconds=2.0, fps=10, size=(160, 90), audio="aac").read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])  # the moov box (at the end) is lost
    files["truncated"] = d / "truncated.mp4"
    long = small_video(d / "long.mp4", seconds=30.0, pattern="busy").read_bytes()
    half = len(long) // 2
    (d / "midway_garbage.mp4").write_bytes(long[:half] + bytes(len(long) - half))
    files["midway"] = d / "midway_garbage.mp4"
    (d / "playlist.m3u8").write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{files['good1']}\n#EXT-X-ENDLIST\n")
    files["playlist"] = d / "playlist.m3u8"
    return files


@pytest.fixture()
def conn(redis_url) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def fetch(conn: redis.Redis, video_id: str) -> TagJob:
    return TagJob.fetch(job_id_for(video_id), connection=conn, serializer=JSONSerializer)


def result(conn: redis.Redis, video_id: str) -> dict:
    return json.loads(conn.get(result_key(video_id)))


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def cli(*args: str, url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TAGSTREAM_REDIS_URL": url}
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def assert_tagged_document(doc: dict, video_id: str, *, titled: bool) -> None:
    models = shared_models()
    assert doc["schema"] == 1 and doc["video_id"] == video_id
    assert doc["status"] == "tagged" and doc["reason"] is None
    assert doc["model_version"] == models.model_version
    assert doc["tags"] and {t["label"] for t in doc["tags"]} <= set(TINY_LABELS)
    assert doc["categories"] and all(0 <= c["score"] <= 1 for c in doc["categories"])
    # segments come from the attention weights; a tag with no positive image evidence has none
    assert any(tag["segments"] for tag in doc["tags"])
    for tag in doc["tags"]:
        assert all(0 <= a < b <= doc["media"]["duration_s"] + 1e-6 for a, b in tag["segments"])
    assert doc["concepts"] and all(0 <= c["score"] <= 1 for c in doc["concepts"])
    media = doc["media"]
    assert (media["width"], media["height"], media["frames"]) == (160, 90, 2)
    assert media["duration_s"] == pytest.approx(2.0, abs=0.15) and media["audio_s"] == pytest.approx(2.0, abs=0.15)
    timings = doc["timings_s"]
    assert set(timings) == set(TIMING_KEYS)
    assert timings["total"] >= timings["decode"] > 0 and timings["image"] > 0 and timings["audio"] > 0
    assert (timings["text"] > 0) == titled
    assert doc["finished_at"].endswith("Z")


def test_enqueue_to_tags_end_to_end(conn, redis_url, media, tmp_path):
    """Python client, ``tagstream enqueue`` and the URI template all end in tagged results that rq,
    Redis, the ``tagstream:tagged`` stream and ``tagstream status`` agree on."""
    template_dir = tmp_path / "by-id"
    template_dir.mkdir()
    shutil.copy(media["good3"], template_dir / "from-template.mp4")
    roots = [str(media["good0"].parent), str(template_dir)]
    settings = worker_settings(redis_url, roots, uri_template=str(template_dir / "{video_id}.mp4"))
    submit(conn, "client-a", str(media["good0"]), "a cat plays the piano", settings)
    submit(conn, "client-b", str(media["good1"]), "", settings)
    enqueued = cli("enqueue", "cli-c", "--uri", str(media["good2"]), "--title", "racing game", url=redis_url)
    assert enqueued.returncode == 0 and enqueued.stdout.strip() == f"{job_id_for('cli-c')} enqueued", enqueued
    submit(conn, "from-template", None, "", settings)  # no uri: the worker's uri_template
    names = {"client-a": True, "client-b": False, "cli-c": True, "from-template": False}

    metrics = Metrics()
    InProcessWorker(settings, metrics=metrics).burst()

    for name, titled in names.items():
        job = fetch(conn, name)
        assert job.get_status() == JobStatus.FINISHED, name
        doc = result(conn, name)
        assert_tagged_document(doc, name, titled=titled)
        assert job.return_value() == doc  # the rq job result is the same document
        assert 0 < conn.ttl(result_key(name)) <= settings.result_ttl_s
    events = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in conn.xrange(TAGGED_STREAM)]
    assert sorted(e["video_id"] for e in events) == sorted(names)
    assert all(e["status"] == "tagged" and e["model_version"] == shared_models().model_version for e in events)
    queue = tag_queue(conn, settings)  # nothing left in rq's working sets
    assert queue.count == 0 and queue.started_job_registry.count == 0 and queue.failed_job_registry.count == 0
    assert conn.llen(queue.intermediate_queue_key) == 0
    assert sample(metrics, "tagstream_videos_total", outcome="tagged") == 4
    assert sample(metrics, "tagstream_frames_total") == 8

    shown = cli("status", "cli-c", url=redis_url)
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["job_status"] == "finished" and status["result"] == result(conn, "cli-c")
    assert cli("status", "never-enqueued", url=redis_url).returncode == 1


def test_duplicate_enqueue_one_job_one_result(conn, redis_url, media):
    settings = worker_settings(redis_url, [str(media["good0"].parent)])
    uri = str(media["good0"])
    assert enqueue_video(conn, "dup", uri, "", settings) == (job_id_for("dup"), True)
    assert enqueue_video(conn, "dup", uri, "", settings) == (job_id_for("dup"), False)
    assert tag_queue(conn, settings).count == 1
    metrics = Metrics()
    InProcessWorker(settings, metrics=metrics).burst()
    assert enqueue_video(conn, "dup", uri, "", settings)[1] is False  # a finished job still counts
    again = InProcessWorker(settings, metrics=metrics).burst()
    assert again.spy.video_ids == []  # nothing left to run
    assert sample(metrics, "tagstream_videos_total", outcome="tagged") == 1
    assert conn.keys(result_key("*")) == [result_key("dup").encode()] and conn.xlen(TAGGED_STREAM) == 1


def test_twenty_videos_k4_and_corrupt_ones_fail_alone(conn, redis_url, media):
    """20 videos, K=4, image batches of up to 8 frames across videos. A truncated file fails at open;
    another decodes 15 s (its first 16 frames go into the shared image batches) and then hits garbage.
    Both fail with ``decode_error`` (permanent: no retry) and timings; the 18 others are tagged."""
    settings = worker_settings(redis_url, [str(media["good0"].parent)], concurrency=4, image_batch_size=8,
                               batch_max_wait_s=1.0)  # fmt: skip
    names = [f"v{i:02d}" for i in range(20)]
    corrupt = {"v02": media["truncated"], "v05": media["midway"]}
    for i, name in enumerate(names):
        submit(conn, name, str(corrupt.get(name, media[f"good{i % 4}"])), "", settings)
    metrics = Metrics()
    worker = InProcessWorker(settings, metrics=metrics).burst()

    got = dict(zip(names, statuses(conn, names), strict=True))
    assert {n: s for n, s in got.items() if n not in corrupt} == {n: "finished" for n in names if n not in corrupt}
    for name in names:
        if name not in corrupt:
            assert result(conn, name)["status"] == "tagged"
    for name in corrupt:
        assert got[name] == "failed"
        job = fetch(conn, name)
        assert job.meta["reason"] == "decode_error" and job.exc_info.startswith("reason=decode_error")
        doc = result(conn, name)
        assert doc["status"] == "failed" and doc["reason"] == "decode_error" and doc["tags"] == []
        assert doc["error"]["permanent"] is True
        # the stages that ran before the failure are reported, not zeros
        assert doc["timings_s"]["total"] > 0 and doc["timings_s"]["decode"] > 0, doc["timings_s"]
    assert worker.worker.jobs_started == 20 and sorted(worker.spy.video_ids) == names  # each ran once
    assert sample(metrics, "tagstream_videos_total", outcome="retried") == 0
    assert sample(metrics, "tagstream_errors_total", reason="decode_error") == 2
    assert sample(metrics, "tagstream_videos_total", outcome="tagged") == 18
    batches = sample(metrics, "tagstream_batch_size_count", extractor="image")
    assert sample(metrics, "tagstream_batch_size_sum", extractor="image") >= 18 * 2
    assert batches < 18  # fewer image batches than videos: batches were built across videos


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/tagstream-pwned-by-pickle",))


def test_refused_payloads_never_run(conn, redis_url, media, tmp_path):
    settings = worker_settings(redis_url, [str(media["good0"].parent)])
    marker = Path("/tmp/tagstream-pwned-by-pickle")
    marker.unlink(missing_ok=True)
    other_marker = tmp_path / "other-function-ran"
    good = str(media["good0"])
    q = Queue(settings.queue, connection=conn, serializer=JSONSerializer)
    # pickle bytes written into the data field of an otherwise valid job
    submit(conn, "pickled", good, "", settings)
    conn.hset(f"rq:job:{job_id_for('pickled')}", "data", pickle.dumps(("worker.jobs.tag_video", None, [_Boom()], {})))
    q.enqueue_call("os.system", args=(f"touch {other_marker}",), job_id="tag-other")  # another function
    q.enqueue_call("worker.jobs.tag_video", args=("cb",), kwargs={"uri": good}, job_id=job_id_for("cb"),
                   on_failure="os.abort")  # a callback that would run code  # fmt: skip
    q.enqueue_call("worker.jobs.tag_video", args=("x",), kwargs={"uri": good}, job_id="tag-not-x")  # any id runs
    q.enqueue_call("worker.jobs.tag_video", args=(123,), job_id="tag-123")  # not a string id
    submit(conn, "outside", "/etc/passwd", "", settings)  # outside the allowed roots
    submit(conn, "dotdot", str(media["good0"].parent / ".." / ".." / "etc" / "passwd"), "", settings)
    submit(conn, "evilhost", "http://evil.example/v.mp4", "", settings)  # host not allowed
    submit(conn, "datauri", "data:video/mp4;base64,AAAA", "", settings)  # scheme not allowed
    submit(conn, "playlist", str(media["playlist"]), "", settings)  # local playlist inside the roots
    worker = InProcessWorker(settings).burst()

    assert not marker.exists() and not other_marker.exists()
    expect = {
        job_id_for("pickled"): "invalid_job", "tag-other": "invalid_job", job_id_for("cb"): "invalid_job",
        "tag-123": "invalid_job", job_id_for("outside"): "forbidden_uri",
        job_id_for("dotdot"): "forbidden_uri", job_id_for("evilhost"): "forbidden_uri",
        job_id_for("datauri"): "forbidden_uri", job_id_for("playlist"): "forbidden_media",
    }  # fmt: skip
    for job_id, reason in expect.items():
        job = TagJob.fetch(job_id, connection=conn, serializer=JSONSerializer)
        assert job.get_status() == JobStatus.FAILED, job_id
        assert job.exc_info.startswith(f"reason={reason}"), (job_id, job.exc_info[:200])
        assert job.meta["reason"] == reason
    assert sorted(worker.spy.video_ids) == ["playlist", "x"]  # x (any job id runs); the decoder refused the playlist
    for video_id, reason in (("outside", "forbidden_uri"), ("evilhost", "forbidden_uri"), ("playlist", "forbidden_media")):
        assert result(conn, video_id)["reason"] == reason
    assert TagJob.fetch("tag-not-x", connection=conn, serializer=JSONSerializer).get_status() == JobStatus.FINISHED
    assert result(conn, "x")["status"] == "tagged"  # a job id of the producer's choosing is a job like any other


def test_transient_failures_are_retried_and_permanent_ones_are_not(conn, redis_url, media):
    """HTTP 503 (network_error) is retried and then tagged; 404 (not_found) fails at once."""
    server = MediaServer({"flaky.mp4": media["good1"]})
    server.fail("flaky.mp4", times=1, status=503)
    try:
        settings = worker_settings(redis_url, [], job_retries=2)
        submit(conn, "flaky", server.url("flaky.mp4"), "", settings)
        submit(conn, "gone", server.url("gone.mp4"), "", settings)
        metrics = Metrics()
        InProcessWorker(settings, metrics=metrics).burst()
        assert statuses(conn, ["flaky", "gone"]) == ["finished", "failed"]
        assert fetch(conn, "flaky").retries_left == 1  # one retry spent on the 503
        assert server.requests("flaky.mp4") >= 2
        assert result(conn, "flaky")["status"] == "tagged"
        assert server.requests("gone.mp4") == 1 and fetch(conn, "gone").meta["reason"] == "not_found"
        assert sample(metrics, "tagstream_errors_total", reason="network_error") == 1
        assert sample(metrics, "tagstream_videos_total", outcome="retried") == 1
    finally:
        server.close()


def test_job_timeout_is_transient_then_final(conn, redis_url, media):
    """A source that never answers: each attempt stops at ``job_timeout_s`` (reason ``timeout``,
    transient), is retried once, and the final failure writes the failed document."""
    server = MediaServer({"stuck.mp4": media["good0"]})
    gate = server.hold("stuck.mp4", every=True)
    try:
        settings = worker_settings(redis_url, [], job_retries=1, job_timeout_s=2)
        submit(conn, "stuck", server.url("stuck.mp4"), "", settings)
        metrics = Metrics()
        with InProcessWorker(settings, metrics=metrics):
            wait_for(lambda: statuses(conn, ["stuck"]) == ["failed"], 60, "the final timeout")
            gate.set()  # let the decode threads stuck in the two requests go before the pipeline stops
        assert server.requests("stuck.mp4") == 2
        assert fetch(conn, "stuck").meta["reason"] == "timeout"
        assert result(conn, "stuck")["reason"] == "timeout"
        assert sample(metrics, "tagstream_videos_total", outcome="retried") == 1
        assert sample(metrics, "tagstream_videos_total", outcome="failed") == 1
    finally:
        gate.set()
        server.close()


def test_a_slow_video_does_not_hold_up_the_others(conn, redis_url, media):
    """One video whose server does not answer stays in flight while six others are tagged."""
    server = MediaServer({"slow.mp4": media["good0"]})
    gate = server.hold("slow.mp4")
    settings = worker_settings(redis_url, [str(media["good0"].parent)], concurrency=4, decode_threads=2)
    try:
        submit(conn, "slow", server.url("slow.mp4"), "", settings)
        others = [f"fast{i}" for i in range(6)]
        for i, name in enumerate(others):
            submit(conn, name, str(media[f"good{i % 4}"]), "", settings)
        with InProcessWorker(settings):
            wait_for(lambda: statuses(conn, others).count("finished") == 6, 120, "the six fast videos")
            assert statuses(conn, ["slow"]) == ["started"] and server.requests("slow.mp4") == 1
            gate.set()
            wait_for(lambda: statuses(conn, ["slow"]) == ["finished"], 60, "the slow video once released")
        assert result(conn, "slow")["status"] == "tagged"
    finally:
        gate.set()
        server.close()


def test_password_and_acl_user_come_from_the_url(media):
    """A Redis with a password on the default user and an ACL user: ``tagstream enqueue``, the worker
    and ``tagstream status`` all authenticate from the URL alone."""
    from worker.tools.local_redis import LocalRedis

    server = LocalRedis().start()
    try:
        admin = redis.Redis.from_url(server.url)
        admin.acl_setuser("tagger", enabled=True, passwords=["+tagger-pw"], keys=["*"], channels=["*"],
                          commands=["+@all"])  # fmt: skip
        admin.config_set("requirepass", "default-pw")
        with pytest.raises(redis.RedisError):
            redis.Redis.from_url(server.url).ping()  # no credentials: refused
        acl_url = f"redis://tagger:tagger-pw@127.0.0.1:{server.port}/0"
        password_url = f"redis://:default-pw@127.0.0.1:{server.port}/0"
        enqueued = cli("enqueue", "secured", "--uri", str(media["good0"]), url=acl_url)
        assert enqueued.returncode == 0 and "enqueued" in enqueued.stdout, enqueued.stderr
        InProcessWorker(worker_settings(acl_url, [str(media["good0"].parent)])).burst()
        shown = cli("status", "secured", url=password_url)
        assert shown.returncode == 0, shown.stderr
        status = json.loads(shown.stdout)
        assert status["job_status"] == "finished" and status["result"]["status"] == "tagged"
    finally:
        server.stop()
