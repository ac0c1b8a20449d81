"""/metrics, /healthz and /readyz of a live worker; the exposition passes `promtool check metrics`."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from test_rq_worker import FakePipeline, FakeRequest, make_settings, media_files

from worker.client import submit
from worker.health import HealthServer
from worker.metrics import Metrics
from worker.rq_worker import TagWorker


@pytest.fixture(scope="session")
def promtool() -> str:
    """promtool from Debian's `prometheus` package, installed here if missing (failing if that fails)."""
    found = shutil.which("promtool")
    if not found:
        subprocess.run(["apt-get", "update"], check=True, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "prometheus"], check=True, capture_output=True)
        found = shutil.which("promtool")
    assert found, "promtool could not be installed"
    return found


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_live_worker_metrics_and_health(redis_url, tmp_path, promtool):
    conn = redis.Redis.from_url(redis_url)
    settings = make_settings(redis_url, tmp_path, heartbeat_interval_s=0.2)
    for name, path in media_files(tmp_path, ["h1", "h2", "corrupt1"]).items():
        submit(conn, name, str(path), "", settings)
    metrics = Metrics()
    worker = TagWorker(settings, conn, FakePipeline(0.1), model_version="fake", metrics=metrics,
                       request_factory=FakeRequest)
    loaded = {"models": True}
    server = HealthServer("127.0.0.1", 0, metrics.registry, lambda: loaded["models"] and worker.redis_ok).start()
    base = f"http://127.0.0.1:{server.port}"
    thread = threading.Thread(target=worker.work, daemon=True)
    try:
        assert get(base + "/healthz")[0] == 200
        assert get(base + "/readyz")[0] == 503  # worker not connected yet
        thread.start()
        deadline = time.monotonic() + 30
        while metrics.videos.labels("tagged")._value.get() < 2 or metrics.videos.labels("failed")._value.get() < 1:
            assert time.monotonic() < deadline, "worker did not finish the jobs"
            time.sleep(0.1)
        time.sleep(0.5)  # one more heartbeat: queue gauges
        assert get(base + "/readyz")[0] == 200
        loaded["models"] = False
        assert get(base + "/readyz")[0] == 503
        status, text = get(base + "/metrics")
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert "tagstream_stage_duration_seconds" in families
        stages = {s.labels.get("stage") for s in families["tagstream_stage_duration_seconds"].samples}
        assert {"queue_wait", "decode", "image", "audio", "text", "fusion", "total"} <= stages
        videos = {s.labels["outcome"]: s.value for s in families["tagstream_videos"].samples
                  if s.name == "tagstream_videos_total"}
        assert videos["tagged"] == 2 and videos["failed"] == 1
        errors = {s.labels["reason"]: s.value for s in families["tagstream_errors"].samples
                  if s.name == "tagstream_errors_total"}
        assert errors["decode_error"] == 1
        queue = {s.labels["state"]: s.value for s in families["tagstream_queue_jobs"].samples}
        assert queue["finished"] == 2 and queue["failed"] == 1 and queue["queued"] == 0
        assert families["tagstream_redis_up"].samples[0].value == 1
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        worker.request_stop()
        thread.join(30)
        server.stop()
