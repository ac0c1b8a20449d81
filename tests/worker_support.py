"""Shared parts of the worker tests (real parts only).

* :func:`shared_models`: the real extractors (EfficientNet-Lite0, log-mel audio, MiniLM text, on CPU)
  plus a real, tiny, randomly initialised fusion checkpoint, loaded once per pytest process and reused
  by every module that tags in-process (the models are read-only once loaded).
* :func:`small_video`: real encoded H.264 + AAC clips, small (160x90) and short so a test tags dozens.
* :class:`MediaServer`: serves real files over HTTP and can hold a request (before the headers, or
  after part of the body so the decoder is mid-stream) until the test releases it, or fail a request
  with an HTTP status. Holding is how tests keep jobs in flight without depending on timing.
* :func:`spawn_worker`: a real ``tagstream worker`` process (``python -m worker.cli worker``).
* :func:`wait_for`: poll a condition with a deadline (the deadline is a failure bound, not a speed test).
"""

from __future__ import annotations

import atexit
import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import redis
from media import make_video
from prometheus_client.parser import text_string_to_metric_families
from rq.serializers import JSONSerializer

from worker.config import Settings
from worker.keys import job_id_for

ROOT = Path(__file__).resolve().parent.parent
TINY_LABELS = ["游戏-射击", "游戏-赛车", "音乐-钢琴", "动物-猫"]
SMALL = (160, 90)


# --- models ------------------------------------------------------------------------------------------
def save_tiny_checkpoint(path: Path, extractor_ids: dict) -> str:
    """A real checkpoint directory with a small, randomly initialised (seeded) fusion model."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.fusion import FusionConfig, FusionModel
    from model.labels import LabelSet

    torch.manual_seed(0)
    dims = {k: v["dim"] for k, v in extractor_ids.items()}
    cfg = FusionConfig(image_dim=dims["image"], audio_dim=dims["audio"], text_dim=dims["text"],
                       num_labels=len(TINY_LABELS), image_hidden=16, audio_hidden=8, text_filters=8,
                       text_branch="encoder")  # fmt: skip
    return save_checkpoint(path, FusionModel(cfg), labels=LabelSet(TINY_LABELS), chars=None,
                           extractors=extractor_ids, sampling={"fps": 1.0, "max_frames": 300})  # fmt: skip


@functools.lru_cache(maxsize=1)
def shared_models() -> Any:
    """Real extractors on CPU + the tiny checkpoint, loaded once per process (``LoadedModels``)."""
    from worker.engine.models import load_extractors, load_models

    extractors = load_extractors(Settings(device="cpu"))
    tmp = Path(tempfile.mkdtemp(prefix="tagstream-ckpt-"))
    atexit.register(shutil.rmtree, tmp, True)
    save_tiny_checkpoint(tmp / "tiny", extractors.ids())
    return load_models(Settings(device="cpu", checkpoint=tmp / "tiny"), extractors=extractors)


# --- media -------------------------------------------------------------------------------------------
def small_video(path: Path, seconds: float = 2.0, **kw: Any) -> Path:
    """A real 160x90 H.264 clip with an AAC tone, 10 fps, moov at the front (streams over HTTP)."""
    kw.setdefault("audio", "aac")
    return make_video(path, seconds=seconds, fps=10, size=SMALL, faststart=True, **kw)


class MediaServer:
    """Serves files over HTTP (``url(name)``), counting requests per name.

    ``hold(name, fraction)`` makes the FIRST request of ``name`` send ``fraction`` of the body (0: not
    even the headers) and then wait until the returned event is set (or the server closes); later
    requests are served at once, so a job retried elsewhere is not held (``every=True`` holds every
    request). ``fail(name, times, status)`` answers the first ``times`` requests with ``status``.
    """

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = dict(files)
        self.counts: dict[str, int] = {}
        self.holds: dict[str, tuple[float, threading.Event, bool]] = {}
        self.fails: dict[str, tuple[int, int]] = {}
        self.closing = threading.Event()
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                outer._serve(self)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = "127.0.0.1"
        threading.Thread(target=self.server.serve_forever, name="media-server", daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://{self.host}:{self.server.server_address[1]}/{name}"

    def add(self, name: str, path: Path) -> str:
        self.files[name] = path
        return self.url(name)

    def hold(self, name: str, fraction: float = 0.0, every: bool = False,
             gate: threading.Event | None = None) -> threading.Event:
        """Hold ``name`` (see class docstring) until the returned event (``gate`` when given) is set."""
        gate = gate or threading.Event()
        self.holds[name] = (fraction, gate, every)
        return gate

    def fail(self, name: str, times: int = 1, status: int = 503) -> None:
        self.fails[name] = (times, status)

    def requests(self, name: str) -> int:
        with self._lock:
            return self.counts.get(name, 0)

    def _serve(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        name = handler.path.lstrip("/").split("?", 1)[0]
        with self._lock:
            n = self.counts[name] = self.counts.get(name, 0) + 1
            times, status = self.fails.get(name, (0, 0))
        if name not in self.files:
            handler.send_error(404)
            return
        if n <= times:
            handler.send_error(status)
            return
        body = self.files[name].read_bytes()
        fraction, gate, every = self.holds.get(name, (0.0, None, False))
        held = gate is not None and (n == 1 or every) and not gate.is_set()
        try:
            if held and fraction <= 0:
                self._wait(gate)
            handler.send_response(200)
            handler.send_header("Content-Type", "video/mp4")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            cut = int(len(body) * fraction) if held else len(body)
            handler.wfile.write(body[:cut])
            handler.wfile.flush()
            if held and fraction > 0:
                self._wait(gate)
            handler.wfile.write(body[cut:])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the reader went away (a killed worker): nothing to serve

    def _wait(self, gate: threading.Event) -> None:
        while not gate.wait(0.1) and not self.closing.is_set():
            pass

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


# --- processes and polling ----------------------------------------------------------------------------
def settings_flags(**values: Any) -> list[str]:
    """``concurrency=4`` -> ``["--concurrency", "4"]`` (lists comma-joined, booleans as flags)."""
    out: list[str] = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)]
    return out


def spawn_worker(log_path: Path, *args: str, env: dict[str, str] | None = None, **settings: Any) -> subprocess.Popen:
    """Start a real ``tagstream worker`` (CPU) with ``args`` and settings given as flags."""
    settings.setdefault("device", "cpu")
    settings.setdefault("hwaccel", "none")
    cmd = [sys.executable, "-m", "worker.cli", "worker", *args, *settings_flags(**settings)]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=log_path.open("wb"))


def wait_for(predicate: Any, timeout: float, what: str, proc: subprocess.Popen | None = None) -> float:
    """Poll ``predicate`` until true; fail after ``timeout`` s or when ``proc`` exits. Returns the
    seconds waited."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def statuses(conn: redis.Redis, video_ids: list[str]) -> list[str | None]:
    """rq status of each video's job (None when rq no longer has it)."""
    from worker.jobs.task import TagJob

    out = []
    for vid in video_ids:
        job = TagJob.fetch_many([job_id_for(vid)], connection=conn, serializer=JSONSerializer)[0]
        out.append(None if job is None else job.get_status(refresh=False).value)
    return out


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    """(status, body); connection errors and timeouts are status 0."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        try:
            return err.code, err.read().decode()
        except OSError:
            return err.code, ""
    except OSError:
        return 0, ""


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """The worker's /metrics as ``{(sample name, sorted label items): value}`` ({} when unreachable)."""
    status, text = http_get(f"http://127.0.0.1:{port}/metrics")
    if status != 200:
        return {}
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# --- in-process workers (real TagWorker + real Pipeline + shared models) --------------------------------
def worker_settings(redis_url: str, roots: list[str], **overrides: Any) -> Settings:
    """Settings for test workers: CPU, fast heartbeats and maintenance, local HTTP allowed."""
    base: dict[str, Any] = dict(
        redis_url=redis_url, allowed_roots=roots, allowed_hosts=["127.0.0.1"], concurrency=4, decode_threads=4,
        device="cpu", hwaccel="none", metrics_port=0, heartbeat_interval_s=0.5, heartbeat_ttl_s=5,
        maintenance_interval_s=1, shutdown_grace_s=30, job_retries=2, open_timeout_s=300, read_timeout_s=300,
        batch_max_wait_s=0.05,
    )  # fmt: skip
    base.update(overrides)
    return Settings(**base)


class SpyPipeline:
    """The real pipeline, recording the video id of every request it is given."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.video_ids: list[str] = []

    def submit(self, request: Any, **kw: Any) -> Any:
        self.video_ids.append(request.video_id)
        return self.pipeline.submit(request, **kw)


class InProcessWorker:
    """A real :class:`~worker.jobs.worker.TagWorker` over a real pipeline and :func:`shared_models`,
    run in a thread (``start``) or to completion (``burst``). ``stop`` asks twice (hand back at once)."""

    def __init__(self, settings: Settings, *, metrics: Any = None, name: str | None = None) -> None:
        from worker.engine.pipeline import Pipeline
        from worker.jobs.worker import TagWorker

        models = shared_models()
        self.settings = settings
        self.metrics = metrics
        self.pipeline = Pipeline(settings, models, metrics)
        self.spy = SpyPipeline(self.pipeline)
        self.connection = redis.Redis.from_url(settings.redis_url)
        self.worker = TagWorker(settings, self.connection, self.spy, model_version=models.model_version,
                                metrics=metrics, name=name)  # fmt: skip
        self.thread: threading.Thread | None = None

    def burst(self) -> InProcessWorker:
        self.pipeline.start()
        try:
            self.worker.work(burst=True)
        finally:
            self.pipeline.stop(timeout=10)
        return self

    def start(self) -> InProcessWorker:
        if self.thread is not None:
            return self
        self.pipeline.start()
        self.thread = threading.Thread(target=self.worker.work, kwargs={"burst": False}, daemon=True)
        self.thread.start()
        return self

    def join(self, timeout: float) -> bool:
        assert self.thread is not None
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.worker.request_stop()
            self.worker.request_stop()
            self.thread.join(timeout)
        self.pipeline.stop(timeout=10)

    def __enter__(self) -> InProcessWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
