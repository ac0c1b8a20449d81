"""Payload checks and the client (JSON only, one function, unique ids)."""

from __future__ import annotations

import json
import pickle

import pytest
import redis
from rq.serializers import JSONSerializer

from worker.config import Settings
from worker.errors import InvalidJobError
from worker.jobs.enqueue import enqueue_video, tag_queue
from worker.jobs.task import TagJob, parse_payload
from worker.keys import JOB_FUNCTION, job_id_for


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
