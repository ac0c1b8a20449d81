"""Hostile queue payloads against the real worker (real rq, Redis, pipeline and models): each is refused
with ``invalid_job`` and never executed, or sanitised and tagged with ``input_warnings``; malformed job
hashes do not block the jobs queued behind them."""

from __future__ import annotations

import json
import pickle
import zlib

import pytest
import redis
from rq.job import JobStatus
from rq.serializers import JSONSerializer
from worker_support import InProcessWorker, small_video, statuses, worker_settings

from worker.errors import InvalidJobError
from worker.jobs.enqueue import submit, tag_queue
from worker.jobs.payload_guard import MAX_PAYLOAD_BYTES, bounded_payload, clean_title
from worker.jobs.task import TagJob, parse_payload
from worker.keys import JOB_FUNCTION, job_id_for, result_key


class _Boom:
    def __reduce__(self):
        return (open, ("/tmp/tagstream-pwned-by-pickle", "w"))


def forge(conn: redis.Redis, template: str, video_id: str, queue_key: str, **fields) -> str:
    """A job hash written by hand: a copy of ``template``'s job under ``video_id``'s job id with
    ``fields`` overwritten, pushed onto the queue as any producer could."""
    job_id = job_id_for(video_id)
    raw = conn.hgetall(f"rq:job:{job_id_for(template)}")
    conn.hset(f"rq:job:{job_id}", mapping={**raw, **fields})
    conn.rpush(queue_key, job_id)
    return job_id


def payload(video_id: str, uri: str, title: str = "") -> bytes:
    return zlib.compress(json.dumps([JOB_FUNCTION, None, [video_id], {"uri": uri, "title": title}]).encode())


def test_unit_guards():
    bomb = zlib.compress(b" " * (50 << 20), 9)  # 50 MB of spaces in ~50 KB
    assert len(bomb) < 100_000 and bounded_payload(bomb) == (b"", f"job payload expands past {MAX_PAYLOAD_BYTES} bytes")
    assert bounded_payload(zlib.compress(b'["x"]')) == (b'["x"]', None)
    assert bounded_payload(b'["caf\xe9"]') == ('["caf\ufffd"]'.encode(), None)
    for raw in (b"[" * 30_000 + b"]" * 30_000, b"x" * (MAX_PAYLOAD_BYTES + 1), pickle.dumps((JOB_FUNCTION, None, [], {}))):
        with pytest.raises(InvalidJobError):
            parse_payload(raw)
    for args, kwargs in ((["v"], {"uri": "/a.mp4"}), ([], {"video_id": "v", "uri": "/a.mp4"})):  # both forms
        assert parse_payload(json.dumps([JOB_FUNCTION, None, args, kwargs])).video_id == "v"
    with pytest.raises(InvalidJobError):  # both at once
        parse_payload(json.dumps([JOB_FUNCTION, None, ["v"], {"video_id": "v"}]))
    assert clean_title("a\x00b\x1bc\td") == ("a b c\td", ["control characters in the title replaced with spaces"])
    assert clean_title("caf\udce9")[0] == "caf\ufffd"
    for bad_id in ("", "a\nb", "nul\x00", "\ud800x", "x" * 513, "del\x7f"):
        with pytest.raises(InvalidJobError):
            parse_payload(json.dumps([JOB_FUNCTION, None, [bad_id], {}]))


def test_hostile_payloads_are_refused_or_sanitised(redis_url, tmp_path):
    conn = redis.Redis.from_url(redis_url)
    settings = worker_settings(redis_url, [str(tmp_path)], job_retries=0)
    q = tag_queue(conn, settings)
    video = str(small_video(tmp_path / "v.mp4"))
    marker = tmp_path / "ran"
    submit(conn, "template", video, "", settings)

    refused = {
        "pickle": dict(data=pickle.dumps((JOB_FUNCTION, None, [_Boom()], {}))),
        "other_function": dict(data=zlib.compress(json.dumps(["os.system", None, [f"touch {marker}"], {}]).encode())),
        "zlib_bomb": dict(data=zlib.compress(b'["worker.jobs.tag_video", null, ["zlib_bomb"], {"title": "'
                                             + b"a" * (40 << 20) + b'"}]', 9)),
        "oversized_payload": dict(data=payload("oversized_payload", video, "t" * (MAX_PAYLOAD_BYTES + 10))),
        "oversized_hash": dict(data=payload("oversized_hash", video), description="d" * (2 << 20)),
        "nesting_bomb": dict(data=b"[" * 30_000 + b"]" * 30_000),
        "bad_created_at": dict(data=payload("bad_created_at", video), created_at="yesterday"),
        "bad_status": dict(data=payload("bad_status", video), status="pwned"),
        "bad_timeout": dict(data=payload("bad_timeout", video), timeout="forever"),
        "non_utf8_field_value": dict(data=payload("non_utf8_field_value", video), worker_name=b"\xff\xfe"),
        "id_with_newline\nx": dict(data=payload("id_with_newline\nx", video)),
        "id_with_nul\x00": dict(data=payload("id_with_nul\x00", video)),
        "id_lone_surrogate\ud800": dict(data=payload("id_lone_surrogate\ud800", video)),
        "i" * 600: dict(data=payload("i" * 600, video)),
        "uri_too_long": dict(data=payload("uri_too_long", "/" + "u" * 5000)),
        "extra_argument": dict(data=zlib.compress(json.dumps([JOB_FUNCTION, None, ["extra_argument"],
                                                              {"uri": video, "shell": "rm -rf /"}]).encode())),
    }  # fmt: skip
    for vid, fields in refused.items():
        forge(conn, "template", vid, q.key, **fields)
    conn.hset(f"rq:job:{job_id_for('non_utf8_field_name')}", mapping=conn.hgetall(f"rq:job:{job_id_for('template')}"))
    conn.hset(f"rq:job:{job_id_for('non_utf8_field_name')}", mapping={b"\xff\xfekey": b"1",
                                                                       "data": payload("non_utf8_field_name", video)})
    conn.rpush(q.key, job_id_for("non_utf8_field_name"))
    refused["non_utf8_field_name"] = {}

    sanitised = {
        "surrogate_title": ("caf\udce9 video", "lone surrogates"),
        "control_title": ("a\x00title\x1b[31m red", "control characters"),
        "long_title": ("x" * 5000, "cut to 4096"),
    }
    for vid, (title, _) in sanitised.items():
        forge(conn, "template", vid, q.key, data=payload(vid, video, title))
    raw = b'["worker.jobs.tag_video", null, ["latin1_title"], {"uri": "%s", "title": "caf\xe9 \xff"}]' % video.encode()
    forge(conn, "template", "latin1_title", q.key, data=zlib.compress(raw))
    sanitised["latin1_title"] = ("", "U+FFFD")
    odd_ids = ["a/b c", "ünï:cødé*?[x]", "../../etc/passwd", "视频-123", "sp ace", "z" * 512]
    for vid in odd_ids:
        submit(conn, vid, video, "", settings)

    worker = InProcessWorker(settings).burst()

    assert not marker.exists() and not (tmp_path / "tagstream-pwned-by-pickle").exists()
    executed = set(worker.spy.video_ids)
    for vid in refused:
        job = TagJob.fetch(job_id_for(vid), connection=conn, serializer=JSONSerializer)
        assert job.get_status() == JobStatus.FAILED, vid
        assert job.exc_info.startswith("reason=invalid_job"), (vid, job.exc_info[:200])
        assert vid not in executed
    assert "expands past" in TagJob.fetch(job_id_for("zlib_bomb"), connection=conn, serializer=JSONSerializer).exc_info
    for vid, (_, why) in sanitised.items():
        doc = json.loads(conn.get(result_key(vid)))
        assert doc["status"] == "tagged", vid
        assert any(why in w for w in doc["input_warnings"]), (vid, doc["input_warnings"])
    for vid in odd_ids:
        assert json.loads(conn.get(result_key(vid)))["status"] == "tagged", vid
    assert len({job_id_for(v) for v in odd_ids}) == len(odd_ids)
    # the malformed hashes did not block the queue: everything behind them ran, nothing is left over
    assert statuses(conn, ["template", *sanitised, *odd_ids]).count("finished") == 1 + len(sanitised) + len(odd_ids)
    assert q.count == 0 and conn.llen(q.intermediate_queue_key) == 0
    # refusing a job rewrote its hash with the bounded payload, not the bomb
    assert conn.hstrlen(f"rq:job:{job_id_for('zlib_bomb')}", "data") < 1024
