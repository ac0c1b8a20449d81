"""The ``tagstream`` command's errors: one line on stderr naming the setting or server, documented exit
codes (2 usage/configuration, 69 Redis unavailable, 70 internal error, 1 unchanged), no password in
the line, ``--debug`` for the traceback. Every case runs the real command in a subprocess
(``python -m worker.cli``) against a real, unreachable Redis address (a free port with nothing
listening) or the test session's real Redis."""

from __future__ import annotations

import importlib.metadata
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from worker.cli_errors import redact

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cretPW"


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    seconds: float


def free_port() -> int:
    """A TCP port nothing listens on (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def dead_redis() -> str:
    """URL of a Redis that is not there (connection refused), with a password in it."""
    return f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"


def tagstream(*args: str, redis_url: str, env: dict[str, str] | None = None, timeout: float = 60) -> Result:
    """Run ``python -m worker.cli ARGS`` with no TAGSTREAM_* variables from the caller's environment
    except ``TAGSTREAM_REDIS_URL=redis_url`` (so nothing ever reaches a default local Redis)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TAGSTREAM_")}
    full_env = {**base, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TAGSTREAM_REDIS_URL": redis_url,
                **(env or {})}  # fmt: skip
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=full_env, capture_output=True,
                         text=True, timeout=timeout)  # fmt: skip
    return Result(out.returncode, out.stdout, out.stderr, time.monotonic() - start)


def one_line(result: Result) -> str:
    """The single stderr line (asserted: exactly one, non-empty, no traceback, no password)."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), result.stderr
    assert "Traceback" not in result.stderr and SECRET not in result.stderr
    return lines[0]


# --- enqueue and status ---------------------------------------------------------------------------------
def test_enqueue_with_a_url_that_is_not_redis(dead_redis):
    r = tagstream("enqueue", "v1", "--redis-url", "notaurl", redis_url=dead_redis)
    line = one_line(r)
    assert r.code == 2 and r.stdout == ""
    assert line == "tagstream: error: --redis-url 'notaurl': not a Redis URL (expected redis://, rediss://, unix:// or redis+sentinel://)"


def test_a_bad_url_from_the_environment_is_named_so_and_its_password_hidden(dead_redis):
    r = tagstream("enqueue", "v1", redis_url=f"http://admin:{SECRET}@cache.example.com:6379/0")
    line = one_line(r)
    assert r.code == 2
    assert line.startswith("tagstream: error: TAGSTREAM_REDIS_URL 'http://admin:***@cache.example.com:6379/0': ")


def test_enqueue_an_empty_video_id(dead_redis):
    r = tagstream("enqueue", "", redis_url=dead_redis)
    assert r.code == 2 and one_line(r) == "tagstream: error: VIDEO_ID '': the video id is empty"


@pytest.mark.parametrize("command", ["enqueue", "status"])
def test_unreachable_redis_names_the_server_not_the_password(command, dead_redis):
    r = tagstream(command, "v1", redis_url=dead_redis)
    line = one_line(r)
    host_port = dead_redis.rsplit("@", 1)[1].removesuffix("/0")
    assert r.code == 69 and r.stdout == ""
    assert line == (f"tagstream: error: Redis at {host_port} is unreachable (Connection refused); start it or set "
                    "TAGSTREAM_REDIS_URL (or --redis-url)")  # fmt: skip


def test_status_and_enqueue_keep_their_results_with_a_live_redis(redis_url):
    unknown = tagstream("status", "never-seen", redis_url=redis_url)
    assert unknown.code == 1 and '"job_status": null' in unknown.stdout  # 1 keeps its meaning
    r = tagstream("enqueue", "v1", redis_url=redis_url)
    assert r.code == 0 and r.stdout == "tag-v1 enqueued\n"


# --- worker: settings, device, Redis, all before the metrics port and the models ------------------------
@pytest.fixture()
def held_port():
    """A metrics port some other program holds: a worker that bound it before its pre-flight check would
    fail on the port instead of reporting the real problem."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def worker(*args: str, redis_url: str, port: int, env: dict[str, str] | None = None) -> Result:
    return tagstream("worker", "--metrics-host", "127.0.0.1", "--metrics-port", str(port), "--hwaccel", "none",
                     *args, redis_url=redis_url, env=env, timeout=120)  # fmt: skip


def test_worker_with_a_non_integer_setting(dead_redis, held_port):
    r = worker("--concurrency", "abc", "--device", "cpu", redis_url=dead_redis, port=held_port)
    assert r.code == 2
    assert one_line(r) == ("tagstream: error: --concurrency 'abc': input should be a valid integer, unable to "
                           "parse string as an integer")  # fmt: skip


def test_a_setting_from_the_environment_is_named_by_its_variable(dead_redis, held_port):
    r = worker(redis_url=dead_redis, port=held_port, env={"TAGSTREAM_CONCURRENCY": "0", "TAGSTREAM_DEVICE": "cpu"})
    assert r.code == 2
    assert one_line(r) == "tagstream: error: TAGSTREAM_CONCURRENCY '0': input should be greater than or equal to 1"


def test_worker_with_an_unknown_device(dead_redis, held_port):
    r = worker("--device", "tpu", redis_url=dead_redis, port=held_port)
    assert r.code == 2
    assert one_line(r) == "tagstream: error: --device 'tpu': expected auto, cpu, cuda, cuda:N or mps"


def test_worker_asking_for_cuda_on_a_machine_without(dead_redis, held_port):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    r = worker("--device", "cuda", redis_url=dead_redis, port=held_port, env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.code == 2
    assert one_line(r).startswith("tagstream: error: --device 'cuda': torch sees no CUDA device")


def test_worker_with_a_bad_redis_url_fails_before_binding_or_loading(dead_redis, held_port):
    """Before: every model loaded first (minutes on a GPU). The held metrics port proves the worker never
    got as far as binding it; one stderr line proves no model-loading log line was written."""
    r = worker("--redis-url", "notaurl", "--device", "cpu", redis_url=dead_redis, port=held_port)
    assert r.code == 2 and r.seconds < 20
    assert one_line(r).startswith("tagstream: error: --redis-url 'notaurl': not a Redis URL")


def test_worker_with_unreachable_redis_fails_before_binding_or_loading(dead_redis, held_port):
    r = worker("--device", "cpu", redis_url=dead_redis, port=held_port)
    assert r.code == 69 and r.seconds < 20
    assert "Redis at 127.0.0.1:" in one_line(r) and "is unreachable (Connection refused)" in r.stderr


@pytest.mark.parametrize(
    ("extra", "code", "named"),
    [(["--concurrency", "0"], 2, "--concurrency '0'"), ([], 69, "Redis at 127.0.0.1:")],
)
def test_supervisor_fails_fast_before_starting_workers(dead_redis, held_port, extra, code, named):
    r = worker("--gpus", "0,1", "--device", "cpu", *extra, redis_url=dead_redis, port=held_port,
               env={"CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    assert r.code == code and r.seconds < 20
    assert named in one_line(r)  # no "worker 0 started" log line: no child ran


@pytest.mark.parametrize(
    ("value", "message"),
    [("0", "input should be greater than or equal to 1"),
     ("two", "input should be a valid integer, unable to parse string as an integer")],
)  # fmt: skip
def test_workers_per_gpu_must_be_a_positive_integer(dead_redis, held_port, value, message):
    r = worker("--workers-per-gpu", value, "--device", "cpu", redis_url=dead_redis, port=held_port)
    assert r.code == 2
    assert one_line(r) == f"tagstream: error: --workers-per-gpu '{value}': {message}"
    r = worker("--device", "cpu", redis_url=dead_redis, port=held_port, env={"TAGSTREAM_WORKERS_PER_GPU": value})
    assert r.code == 2
    assert one_line(r) == f"tagstream: error: TAGSTREAM_WORKERS_PER_GPU '{value}': {message}"


def test_workers_per_gpu_needs_a_metrics_port_for_each_worker(dead_redis):
    """Two CPU workers (no GPU) from port 65535 would need 65536 too: refused before any worker starts."""
    r = worker("--workers-per-gpu", "2", "--device", "cpu", redis_url=dead_redis, port=65535,
               env={"CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    assert r.code == 2
    assert one_line(r) == "tagstream: error: --metrics-port 65535: not a TCP port (1-65535, or 0 for no metrics server)"


# --- the mechanism: --debug, internal errors, --version, unknown commands ---------------------------------
@pytest.mark.parametrize(
    ("argv", "env"),
    [(["--debug", "enqueue", "v1"], {}), (["enqueue", "v1", "--debug"], {}),
     (["enqueue", "v1"], {"TAGSTREAM_LOG_LEVEL": "DEBUG"})],
)  # fmt: skip
def test_debug_shows_the_traceback_with_the_same_exit_status(argv, env):
    r = tagstream(*argv, redis_url="notaurl", env=env)
    assert r.code == 2
    assert r.stderr.startswith("Traceback (most recent call last):") and "UsageError" in r.stderr
    assert "tagstream: error:" not in r.stderr


INTERNAL_ERROR = """
import sys
import worker.jobs.enqueue
def broken(*args, **kwargs):
    raise RuntimeError("boom at " + sys.argv[-1])
worker.jobs.enqueue.connect = broken
from worker.cli import main
sys.argv = ["tagstream", "enqueue", "v1"]
sys.exit(main())
"""


def test_an_unexpected_exception_is_one_line_and_exit_70(dead_redis):
    env = {**os.environ, "TAGSTREAM_REDIS_URL": dead_redis}
    out = subprocess.run([sys.executable, "-c", INTERNAL_ERROR], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    r = Result(out.returncode, out.stdout, out.stderr, 0.0)
    assert r.code == 70
    assert one_line(r) == "tagstream: internal error: RuntimeError: boom at v1 (run with --debug for the traceback)"


def test_version(dead_redis):
    r = tagstream("--version", redis_url=dead_redis)
    assert r.code == 0 and r.stderr == ""
    assert r.stdout == f"tagstream {importlib.metadata.version('tagstream')}\n"


def test_unknown_command_and_usage(dead_redis):
    r = tagstream("frobnicate", redis_url=dead_redis)
    lines = r.stderr.splitlines()
    assert r.code == 2 and r.stdout == ""
    assert lines[0] == "tagstream: unknown command 'frobnicate'" and "usage: tagstream" in r.stderr
    bare = tagstream(redis_url=dead_redis)
    assert bare.code == 2 and bare.stderr.startswith("usage: tagstream")
    helped = tagstream("-h", redis_url=dead_redis)
    assert helped.code == 0 and helped.stdout.startswith("usage: tagstream") and helped.stderr == ""


def test_redact_masks_every_password_form():
    assert redact("redis://:pw@h:1/0 and rediss://user:pw@h") == "redis://:***@h:1/0 and rediss://user:***@h"
    assert redact("redis://pw@h") == "redis://***@h"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"


def test_model_commands_report_what_they_were_pointed_at(tmp_path, dead_redis):
    """A folder that is neither a feature store nor an MVT folder, and a raw-video folder given to predict,
    are the user's input (model.errors.InputError / FileNotFoundError): one line, usage status 2, and predict
    says so before it extracts anything."""
    result = tagstream("evaluate", str(tmp_path / "ck"), str(tmp_path), redis_url=dead_redis)
    assert result.code == 2 and "neither a feature store" in one_line(result)
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "train.tsv").write_text("clip.mp4\tcat\n", encoding="utf-8")
    result = tagstream("predict", str(tmp_path / "ck"), str(videos), "--out", str(tmp_path / "out.jsonl"),
                       redis_url=dead_redis)
    assert result.code == 2 and "not a checkpoint directory" in one_line(result)
