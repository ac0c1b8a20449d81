"""``tagstream status VIDEO_ID``: the job's rq state and the stored result document, as JSON.

Output: ``{"video_id", "job_id", "job_status" (rq's: queued/started/finished/failed/... or null when
rq no longer has the job), "reason" (from the failed job's meta), "result" (the document in
tagstream:tags:VIDEO_ID or null)}``. Exit status 0 when anything is known about the video, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import redis
from rq.exceptions import NoSuchJobError
from rq.serializers import JSONSerializer

from worker.cli_errors import UsageError
from worker.config import add_settings_arguments, settings_from_args
from worker.jobs.connection import connect
from worker.jobs.sink import read_result
from worker.jobs.task import TagJob
from worker.keys import job_id_for


def video_status(connection: redis.Redis, video_id: str) -> dict[str, Any]:  # a JSON object
    """Job state and result of one video (see module docstring)."""
    job_id = job_id_for(video_id)
    status = reason = None
    retries_left = None
    try:
        job = TagJob.fetch(job_id, connection=connection, serializer=JSONSerializer)
        status = str(job.get_status(refresh=False).value)
        reason = (job.meta or {}).get("reason")
        retries_left = job.retries_left
    except NoSuchJobError:
        pass
    result = read_result(connection, video_id)
    if reason is None and result is not None:
        reason = result.get("reason")
    return {
        "video_id": video_id,
        "job_id": job_id,
        "job_status": status,
        "retries_left": retries_left,
        "reason": reason,
        "result": result,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video_id")
    add_settings_arguments(parser, ["redis_url", "queue", "log_level"])


def run(args: argparse.Namespace) -> int:
    """``tagstream status``: prints the JSON; 0 when anything is known about the video, 1 otherwise."""
    if not args.video_id:
        raise UsageError("the video id is empty", setting="VIDEO_ID", value=args.video_id)
    settings = settings_from_args(args)
    connection = connect(settings)
    info = video_status(connection, args.video_id)
    sys.stdout.write(json.dumps(info, ensure_ascii=False, indent=2) + "\n")
    return 0 if info["job_status"] is not None or info["result"] is not None else 1
