"""A job enqueued by an older Tagstream is run by this one (the queue contract did not move with the code).

``OLD_JOB_HASH`` is the rq job hash exactly as ``worker.client.enqueue_video`` of commit 2289d20 (before
worker/ became sub-packages) wrote it for ``enqueue_video(r, "old-v1", None, "猫咪第一次看到雪")``: captured
once from a real redis-server with HGETALL (rq 3.0.0, JSON serializer, zlib-compressed payload naming
``worker.jobs.tag_video``). The test writes it, the queue list and the queue set as that client left
them, and runs the current in-process worker (real TagWorker, pipeline and models); the job's URI comes
from ``uri_template``, as it would have for that job. Also: rq itself resolves the dotted path.
"""

from __future__ import annotations

import json
import zlib

import pytest
import redis
from rq.utils import import_attribute
from worker_support import InProcessWorker, small_video, worker_settings

from worker.jobs import tag_video
from worker.keys import JOB_FUNCTION, TAGGED_STREAM, job_id_for, result_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

OLD_JOB_HASH = {
    "created_at": b"2026-12-03T14:20:38.473919Z",
    "data": b'x\x9c-\x89\xdd\n\x83 \x18\x86oE\xdec\x0b\xb3Vl\xb7\x92\x11\xba>\x86\x9bL0\xbfv0\xba\xf7\x0c:{~F\xfcb\xfaP\xaa\xdf\xd1\xadu\xb6\xafy\xf3\x0bEH\xf1\xe5\x10\xa4\x18\x11\xc3Rm\r&)\xfe\xe0\xe4\xf1\xb8\x0e\xb2\xcf\x81\x8a\xc2\xf0\xd0jg\xf8\xd6Y[\xd8\xe9\xa7\xe1\x8e\x942\xdc;\xdd\x942\xa8\xf3\xea\xb6\x94{O\x16\xfbt\x00"\xc5%\xc4',  # noqa: E501
    "description": b"tag old-v1",
    "ended_at": b"",
    "enqueue_at_front_on_retry": b"1",
    "enqueued_at": b"2026-12-03T14:20:38.475827Z",
    "failure_callback_name": b"",
    "failure_ttl": b"604800",
    "group_id": b"",
    "last_heartbeat": b"",
    "origin": b"tagging",
    "result_ttl": b"604800",
    "retries_left": b"3",
    "retry_intervals": b"[0]",
    "started_at": b"",
    "status": b"queued",
    "stopped_callback_name": b"",
    "success_callback_name": b"",
    "timeout": b"900",
    "worker_name": b"",
}
OLD_VIDEO_ID = "old-v1"
OLD_TITLE = "猫咪第一次看到雪"


def test_the_captured_payload_is_the_old_contract():
    payload = json.loads(zlib.decompress(OLD_JOB_HASH["data"]))
    assert payload == [JOB_FUNCTION, None, [OLD_VIDEO_ID], {"uri": None, "title": OLD_TITLE}]
    assert import_attribute(JOB_FUNCTION) is tag_video  # rq finds the job function by its dotted path


def test_a_job_enqueued_by_the_old_client_is_tagged(redis_url, tmp_path):
    small_video(tmp_path / f"{OLD_VIDEO_ID}.mp4")
    settings = worker_settings(redis_url, [str(tmp_path)], uri_template=str(tmp_path / "{video_id}.mp4"))
    conn = redis.Redis.from_url(redis_url)
    job_id = job_id_for(OLD_VIDEO_ID)
    conn.hset(f"rq:job:{job_id}", mapping=OLD_JOB_HASH)
    conn.rpush("rq:queue:tagging", job_id)
    conn.sadd("rq:queues", "rq:queue:tagging")

    InProcessWorker(settings).burst()

    doc = json.loads(conn.get(result_key(OLD_VIDEO_ID)))
    assert doc["status"] == "tagged" and doc["video_id"] == OLD_VIDEO_ID, doc
    assert doc["media"]["frames"] == 2 and doc["timings_s"]["total"] > 0
    assert conn.hget(f"rq:job:{job_id}", "status") == b"finished"
    events = conn.xrange(TAGGED_STREAM)
    assert [e[1][b"video_id"] for e in events] == [OLD_VIDEO_ID.encode()]
