"""Payload checks and the client (JSON only, one function, unique ids)."""

from __future__ import annotations

import json
import pickle

import pytest
import redis
from rq.serializers import JSONSerializer

from worker.config import Settings
from worker.errors import InvalidJobError
from worker.jobs.claim import ClaimTicket, VideoClaims
from worker.jobs.enqueue import enqueue_video, tag_queue
from worker.jobs.task import TagJob, parse_payload, refusal_of
from worker.keys import JOB_FUNCTION, claim_key, job_id_for


def test_parse_payload_accepts_only_the_tag_job():
    ok = parse_payload(json.dumps([JOB_FUNCTION, None, ["v1"], {"uri": "/d/v1.mp4", "title": "t"}]))
    assert (ok.video_id, ok.uri, ok.title) == ("v1", "/d/v1.mp4", "t")
    assert parse_payload(json.dumps([JOB_FUNCTION, None, [], {"video_id": "v2"}])).uri is None
    bad = [
        pickle.dumps((JOB_FUNCTION, None, ["v"], {})),
        json.dumps(["os.system", None, ["id"], {}]),
        json.dumps([JOB_FUNCTION, "instance", ["v"], {}]),
        json.dumps([JOB_FUNCTION, None, [123], {}]),
        json.dumps([JOB_FUNCTION, None, ["v"], {"evil": 1}]),
        json.dumps({"func": JOB_FUNCTION}),
    ]
    for raw in bad:
        with pytest.raises(InvalidJobError):
            parse_payload(raw)


def test_enqueue_is_json_unique_and_retrying(redis_url):
    conn = redis.Redis.from_url(redis_url)
    settings = Settings(redis_url=redis_url, job_retries=3)
    assert enqueue_video(conn, "a/b c", "/x.mp4", "t", settings) == (job_id_for("a/b c"), True)
    assert enqueue_video(conn, "a/b c", "/x.mp4", "t", settings)[1] is False
    job = TagJob.fetch(job_id_for("a/b c"), connection=conn, serializer=JSONSerializer)
    assert json.loads(job.data)[0] == JOB_FUNCTION and job.retries_left == 3
    assert job.retry_intervals in (None, [0])  # no interval: no rq scheduler needed
    assert tag_queue(conn, settings).count == 1


def test_tag_job_class_never_imports_other_functions(redis_url):
    conn = redis.Redis.from_url(redis_url)
    q = tag_queue(conn, Settings(redis_url=redis_url))
    job = q.enqueue_call("os.system", args=("id",), job_id="tag-x", on_failure="os.abort")
    fetched = TagJob.fetch(job.id, connection=conn, serializer=JSONSerializer)
    with pytest.raises(InvalidJobError):
        _ = fetched.func
    assert fetched.failure_callback is None


def test_any_job_id_is_accepted_and_video_id_may_be_a_keyword(redis_url):
    conn = redis.Redis.from_url(redis_url)
    q = tag_queue(conn, Settings(redis_url=redis_url))
    jobs = [
        q.enqueue(JOB_FUNCTION, video_id="v1", uri="/d/v1.mp4"),  # rq's random id
        q.enqueue(JOB_FUNCTION, "v1", uri="/d/v1.mp4", job_id="my-own-id"),
        q.enqueue_call(JOB_FUNCTION, args=("v1",), job_id=job_id_for("v1")),
    ]
    for job in jobs:
        fetched = TagJob.fetch(job.id, connection=conn, serializer=JSONSerializer)
        assert refusal_of(fetched) is None, job.id
        assert parse_payload(fetched.data).video_id == "v1"


def test_claims_are_exclusive_renewed_and_released_by_their_holder_only(redis_url):
    conn = redis.Redis.from_url(redis_url)
    claims, other = VideoClaims(conn, ttl_s=2), VideoClaims(conn, ttl_s=2)
    a, b = ClaimTicket("job-a"), ClaimTicket("job-b")
    assert claims.acquire(a, "v") and not other.acquire(b, "v")
    assert claims.acquire(ClaimTicket("job-a"), "v")  # the same job (re-run after a crash) takes it back
    other.release(b)  # not held: nothing happens
    assert conn.get(claim_key("v")) == b"job-a"
    conn.pexpire(claim_key("v"), 100)
    with conn.pipeline() as pipe:
        claims.renew(pipe)
        pipe.execute()
    assert conn.pttl(claim_key("v")) > 1000
    conn.set(claim_key("v"), "job-b")  # a's lease ran out and b took the video
    claims.release(a)  # compare-and-delete: b's claim stays
    assert conn.get(claim_key("v")) == b"job-b"
    with conn.pipeline() as pipe:  # nor is b's claim renewed by a's worker
        conn.pexpire(claim_key("v"), 5000)
        claims._held["job-a"] = a
        a.held = True
        claims.renew(pipe)
        pipe.execute()
    assert 0 < conn.pttl(claim_key("v")) <= 5000
