"""/metrics, /healthz and /readyz of a live in-process worker (real pipeline and models, real Redis);
the exposition passes `promtool check metrics`. The ``tagstream worker`` process's endpoints are
exercised in tests/test_rq_worker.py and tests/test_prometheus_live.py. Then, on a bare server:
prometheus_client's content negotiation (OpenMetrics, gzip), the process/platform/GC collectors, and
stage buckets that resolve the fast stages. /healthz liveness: tests/test_health_liveness.py."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from worker_support import InProcessWorker, small_video, wait_for, worker_settings

from worker.jobs.enqueue import submit
from worker.metrics import STAGE_BUCKETS, Metrics
from worker.service.health import HealthServer


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
    settings = worker_settings(redis_url, [str(tmp_path)], heartbeat_interval_s=0.2)
    good = small_video(tmp_path / "good.mp4")
    (tmp_path / "corrupt.mp4").write_bytes(good.read_bytes()[:2000])
    for name, path in (("h1", good), ("h2", good), ("corrupt1", tmp_path / "corrupt.mp4")):
        submit(conn, name, str(path), "", settings)
    metrics = Metrics()
    live = InProcessWorker(settings, metrics=metrics)
    worker = live.worker
    assert metrics.track_gpu_memory("cpu") is False  # no GPU: no tagstream_gpu_memory_bytes series
    loaded = {"models": True}
    server = HealthServer("127.0.0.1", 0, metrics.registry, lambda: loaded["models"] and worker.redis_ok).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert get(base + "/healthz")[0] == 200
        assert get(base + "/readyz")[0] == 503  # worker not connected yet
        live.start()
        value = metrics.registry.get_sample_value
        wait_for(lambda: value("tagstream_videos_total", {"outcome": "tagged"}) == 2
                 and value("tagstream_videos_total", {"outcome": "failed"}) == 1, 120, "the jobs")  # fmt: skip
        # the heartbeat thread refreshes the queue gauges
        wait_for(lambda: value("tagstream_queue_jobs", {"queue": "tagging", "state": "finished"}) == 2, 30,
                 "queue gauges")  # fmt: skip
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
        # the real pipeline's counters: 2 tagged videos x 2 sampled frames, no video left in flight
        assert families["tagstream_frames"].samples[0].value == 4
        assert families["tagstream_in_flight_videos"].samples[0].value == 0
        batches = {s.labels["extractor"]: s.value for s in families["tagstream_batch_size"].samples
                   if s.name == "tagstream_batch_size_sum"}
        assert batches["image"] == 4 and batches["fusion"] == 2
        assert families["tagstream_gpu_memory_bytes"].samples == []
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        live.stop()
        server.stop()


def _request(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()


@pytest.fixture()
def bare_server():
    """A HealthServer over a fresh Metrics registry, no worker behind it."""
    metrics = Metrics()
    server = HealthServer("127.0.0.1", 0, metrics.registry, lambda: True).start()
    try:
        yield metrics, f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def test_metrics_content_negotiation_openmetrics_and_gzip(bare_server):
    """/metrics is prometheus_client's exposition: Prometheus text by default, OpenMetrics when the
    Accept header asks for it (ends with '# EOF'), gzip when Accept-Encoding allows it."""
    metrics, base = bare_server
    metrics.videos.labels("tagged").inc()
    status, headers, body = _request(base + "/metrics", {})
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "content-encoding" not in headers and b"# EOF" not in body
    assert b'tagstream_videos_total{outcome="tagged"} 1.0' in body

    status, headers, body = _request(base + "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    assert b'tagstream_videos_total{outcome="tagged"} 1.0' in body

    status, headers, body = _request(base + "/metrics", {"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("content-encoding") == "gzip"
    assert b"tagstream_videos_total" in gzip.decompress(body)
    # the health endpoints and unknown paths are not the exposition
    assert get(base + "/healthz") == (200, "ok\n")
    assert get(base + "/readyz") == (200, "ready\n")
    assert get(base + "/nothing")[0] == 404


def test_process_and_platform_collectors_are_exported(bare_server):
    """The worker's own registry carries prometheus_client's process, platform and GC collectors."""
    _, base = bare_server
    status, text = get(base + "/metrics")
    assert status == 200
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                 "process_start_time_seconds", "python_info", "python_gc_collections_total"):
        assert name in samples, name
    assert samples["process_resident_memory_bytes"].value > 0
    assert samples["python_info"].labels["implementation"]


def test_stage_buckets_resolve_fast_stages():
    """Audio (~0.3 ms) and fusion (~6 ms) observations land in distinct buckets, neither the first,
    each bucket at most 2x wide; the top bucket still holds an hour and the alert threshold (120 s)
    is a bucket boundary."""
    bounds = list(STAGE_BUCKETS)
    assert bounds == sorted(bounds) and bounds[-1] >= 3600 and 120 in bounds
    assert all(hi / lo <= 2.0 + 1e-9 for lo, hi in zip(bounds, bounds[1:], strict=False))

    metrics = Metrics()
    metrics.stage_seconds.labels("audio").observe(0.0003)
    metrics.stage_seconds.labels("fusion").observe(0.006)
    value = metrics.registry.get_sample_value

    def bucket_of(stage: str) -> int:
        """Index of the first bucket whose cumulative count includes the one observation."""
        return next(i for i, b in enumerate(bounds)
                    if value("tagstream_stage_duration_seconds_bucket", {"stage": stage, "le": str(float(b))}) == 1)

    audio, fusion = bucket_of("audio"), bucket_of("fusion")
    assert 0 < audio < fusion
    for index, observed in ((audio, 0.0003), (fusion, 0.006)):
        assert bounds[index - 1] < observed <= bounds[index]
        assert bounds[index] / bounds[index - 1] <= 2.0 + 1e-9
