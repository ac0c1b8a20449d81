"""Log format and progress output.

* ``configure_logging(level, "json")``: every line one JSON object with time (ISO 8601 UTC), level,
  logger, message, video_id/job_id where known and exc_info as a string; checked on plain records
  and on the lines a real in-process worker logs for a failing job (real TagWorker, pipeline, models
  and Redis). ``text`` keeps today's format.
* :class:`model.progress.Progress`: a tqdm bar only on a terminal; on anything else (a file, a pipe)
  no carriage return is written and progress goes to the log as plain lines; ``tagstream dataset
  synth`` renders a real video that way and has ``--no-progress``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
from datetime import datetime, timedelta

import pytest
import redis
from worker_support import InProcessWorker, small_video, worker_settings

from model.progress import Progress, quiet_model_libraries
from worker.jobs.enqueue import submit
from worker.keys import job_id_for
from worker.logs import configure_logging, current_context, log_context, logging_options

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


@pytest.fixture()
def restore_root_logger():
    """configure_logging replaces the root logger's handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def json_lines(text: str) -> list[dict]:
    lines = text.splitlines()
    assert lines, "nothing was logged"
    docs = [json.loads(line) for line in lines]  # each line alone is one JSON object
    for doc in docs:
        assert isinstance(doc, dict)
        assert {"time", "level", "logger", "message"} <= set(doc), doc
        assert ISO_UTC.match(doc["time"]), doc["time"]
    return docs


def test_json_lines_carry_fields_context_and_exceptions(restore_root_logger):
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)
    log = logging.getLogger("tagstream.test")
    before = datetime.now().astimezone()
    log.debug("not shown at INFO")
    log.info("plain 猫 line\nwith a newline")
    with log_context(job_id="tag-v1", video_id="v1"):
        assert current_context() == {"job_id": "tag-v1", "video_id": "v1"}
        log.warning("inside the job")
        with log_context(video_id="v2"):
            log.info("nested")
    log.info("explicit", extra={"video_id": "v3", "job_id": "tag-v3"})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("it failed")
    seen = {}
    thread = threading.Thread(target=lambda: seen.update(ctx=current_context()))
    with log_context(job_id="tag-v1"):
        thread.start()
        thread.join()
    assert seen["ctx"] == {}  # a new thread starts without the job context

    plain, inside, nested, explicit, failed = json_lines(out.getvalue())
    assert plain["message"] == "plain 猫 line\nwith a newline" and plain["level"] == "INFO"
    assert plain["logger"] == "tagstream.test" and "video_id" not in plain and "job_id" not in plain
    when = datetime.fromisoformat(plain["time"].replace("Z", "+00:00"))
    assert when.utcoffset() == timedelta(0) and abs(when - before) < timedelta(seconds=30)
    assert (inside["level"], inside["job_id"], inside["video_id"]) == ("WARNING", "tag-v1", "v1")
    assert (nested["job_id"], nested["video_id"]) == ("tag-v1", "v2")
    assert (explicit["job_id"], explicit["video_id"]) == ("tag-v3", "v3")
    assert failed["level"] == "ERROR" and failed["message"] == "it failed"
    assert isinstance(failed["exc_info"], str) and "RuntimeError: boom" in failed["exc_info"]
    assert "Traceback" in failed["exc_info"]


def test_text_is_the_default_and_bad_values_are_refused(restore_root_logger, monkeypatch):
    monkeypatch.delenv("TAGSTREAM_LOG_LEVEL", raising=False)
    monkeypatch.delenv("TAGSTREAM_LOG_FORMAT", raising=False)
    assert logging_options(argparse.Namespace()) == ("INFO", "text")
    assert logging_options(None) == ("INFO", "text")
    monkeypatch.setenv("TAGSTREAM_LOG_FORMAT", "JSON")
    monkeypatch.setenv("TAGSTREAM_LOG_LEVEL", "warning")
    assert logging_options(argparse.Namespace(setting_log_level=None, setting_log_format=None)) == ("warning", "json")
    flags = argparse.Namespace(setting_log_level="DEBUG", setting_log_format="text")
    assert logging_options(flags) == ("DEBUG", "text")  # flags win over the environment
    assert logging_options(argparse.Namespace(log_level="ERROR")) == ("ERROR", "json")

    out = io.StringIO()
    configure_logging("info", "text", stream=out)
    logging.getLogger("tagstream.test").info("hello %s", "text")
    assert re.match(r"^\d{4}-\d{2}-\d{2} [\d:,]+ INFO tagstream\.test: hello text$", out.getvalue().strip())
    configure_logging("INFO", "text", stream=out)  # again: replaced, not added
    ours = [h for h in logging.getLogger().handlers if type(h).__module__ == "worker.logs"]
    assert len(ours) == 1
    logging.getLogger("tagstream.test").info("once")
    assert out.getvalue().count("once") == 1
    with pytest.raises(ValueError):
        configure_logging("INFO", "yaml")
    with pytest.raises(ValueError):
        configure_logging("LOUD", "json")


def test_worker_job_lines_carry_job_and_video_id(redis_url, tmp_path, restore_root_logger):
    """Two real jobs, one failing (its file does not exist), one tagged: every line about either, the
    worker's and rq's, carries that job's job_id and video_id."""
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)
    settings = worker_settings(redis_url, [str(tmp_path)])
    conn = redis.Redis.from_url(redis_url)
    submit(conn, "vid-json-1", str(tmp_path / "missing.mp4"), "", settings)
    submit(conn, "vid-json-2", str(small_video(tmp_path / "good.mp4")), "", settings)
    InProcessWorker(settings).burst()

    docs = json_lines(out.getvalue())
    for video_id in ("vid-json-1", "vid-json-2"):
        about_job = [d for d in docs if job_id_for(video_id) in d["message"]]
        assert about_job, docs
        for doc in about_job:
            assert doc.get("job_id") == job_id_for(video_id), doc
            assert doc.get("video_id") == video_id, doc
    failed = [d for d in docs if d["logger"] == "worker.jobs.worker" and "not_found" in d["message"]]
    assert failed and failed[0]["level"] == "WARNING" and failed[0]["video_id"] == "vid-json-1", docs
    tagged = [d for d in docs if d["logger"] == "rq.worker" and "Job OK" in d["message"]]
    assert tagged and tagged[0]["video_id"] == "vid-json-2", docs
    # lines of the loop itself (not about a job) carry no job fields
    started = [d for d in docs if d["message"].startswith("worker ") and " on queue " in d["message"]]
    assert started and "job_id" not in started[0]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_logs_lines_without_carriage_returns_off_a_terminal(caplog):
    stream = io.StringIO()
    log = logging.getLogger("tagstream.progress-test")
    with caplog.at_level(logging.INFO, logger=log.name):
        with Progress(3, "demo", unit="video", stream=stream, logger=log, every_s=0) as bar:
            for _ in range(3):
                bar.update()
                bar.set_postfix(failed=0)
    assert stream.getvalue() == ""  # nothing drawn: no '\r' anywhere
    lines = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert lines[0].startswith("demo: 1/3 video (33%), ") and "video/s" in lines[0]
    assert lines[-1].startswith("demo: 3/3 video (100%), done in ") and lines[-1].endswith("failed=0")
    assert not any("\r" in line for line in lines)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger=log.name):
        for _ in Progress(5, "quiet", stream=stream, logger=log).iterate(range(5)):
            pass  # every_s=10 s: no line before the end
        for _ in Progress(5, "off", enabled=False, stream=stream, logger=log).iterate(range(5)):
            pass
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["quiet: 5/5 it (100%)"]
    assert stream.getvalue() == ""


def test_progress_draws_a_bar_on_a_terminal(caplog):
    tty = Terminal()
    log = logging.getLogger("tagstream.progress-test")
    with caplog.at_level(logging.INFO, logger=log.name):
        for _ in Progress(4, "bar", stream=tty, logger=log, every_s=0).iterate(range(4)):
            pass
    assert "\r" in tty.getvalue() and "4/4" in tty.getvalue()
    assert not caplog.records


def test_synth_progress_is_logged_off_a_terminal_and_can_be_turned_off(tmp_path, caplog, capsys):
    from model import synth

    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    assert parser.parse_args(["synth", "out", "--no-progress"]).no_progress is True
    assert parser.parse_args(["synth", "out"]).no_progress is False

    with caplog.at_level(logging.INFO, logger="model.synth"):
        synth.generate(tmp_path / "a", 1, seed=3, workers=1)  # stderr is pytest's capture, not a terminal
    err = capsys.readouterr().err
    assert "\r" not in err
    assert any(r.getMessage().startswith("synth: 1/1 video (100%), done in") for r in caplog.records)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="model.synth"):
        synth.generate(tmp_path / "b", 1, seed=3, workers=1, progress=False)
    assert not any(r.getMessage().startswith("synth: ") for r in caplog.records)
    assert "\r" not in capsys.readouterr().err


def test_quiet_model_libraries_turns_transformers_bars_and_handler_off():
    from transformers.utils import logging as tlog

    before = tlog.is_progress_bar_enabled()
    library = logging.getLogger("transformers")
    try:
        quiet_model_libraries(io.StringIO())
        assert not tlog.is_progress_bar_enabled()
        assert library.propagate  # its records reach the root handlers, formatted as configured
        assert not any(type(h) is logging.StreamHandler for h in library.handlers)  # not its own stderr one
    finally:
        if before:
            tlog.enable_progress_bar()
        tlog.disable_propagation()
        tlog.enable_default_handler()


def test_json_on_stderr_of_a_process():
    """A process configured from TAGSTREAM_LOG_FORMAT=json: every stderr line is one JSON object, a
    warnings.warn and a job-context line included."""
    code = (
        "import logging, warnings\n"
        "from worker.logs import configure_logging, log_context, logging_options\n"
        "configure_logging(*logging_options(None))\n"
        "logging.getLogger('worker.tools.demo').info('started')\n"
        "with log_context(job_id='tag-v9', video_id='v9'):\n"
        "    logging.getLogger('worker.jobs.worker').warning('job tag-v9 failed: not_found')\n"
        "warnings.warn('careful')\n"
    )
    env = {**os.environ, "TAGSTREAM_LOG_FORMAT": "json", "TAGSTREAM_LOG_LEVEL": "INFO"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    started, job, warned = json_lines(proc.stderr)
    assert started["message"] == "started" and "job_id" not in started
    assert (job["job_id"], job["video_id"], job["level"]) == ("tag-v9", "v9", "WARNING")
    assert warned["logger"] == "py.warnings" and "careful" in warned["message"]
