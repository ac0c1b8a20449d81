"""A real Prometheus scraping a real ``tagstream worker`` while it tags videos; then every PromQL
expression of the dashboard, the rules and the KEDA ScaledObjects runs against Prometheus's HTTP API.
While the worker holds a job, ``rq info`` and rq-dashboard are run against the same Redis and must show
the queue, the worker and the jobs.

One module-scoped scene keeps the cost of starting the worker (model load, about 10 s on 2 cores)
to once. A job whose video is served by a local HTTP server that answers only when the test says so
stays "started" for as long as the test needs, so nothing depends on timing.

Prometheus loads deploy/'s rule file with the group intervals shortened to 1 s, so recording rules
(and the alert expressions built on them) have data within seconds.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import redis
import yaml
from deploy_support import ROOT, RULES, deploy_expressions, ensure_tool
from media import make_video

from worker.jobs.enqueue import submit

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VIDEOS = 3
# Expressions that may legitimately return no series here; for them the query must still succeed.
MAY_BE_EMPTY = {
    "dashboard:GPU memory per worker:A": "no GPU on this machine: tagstream_gpu_memory_bytes has no series",
    "rule:TagstreamGpuMemoryNearLimit": "no GPU on this machine",
    "rule:TagstreamBacklogGrowing": "alert condition does not hold (small backlog)",
    "rule:TagstreamLatencyHigh": "alert condition does not hold (fast videos)",
    "rule:TagstreamFailureRatioHigh": "alert condition does not hold (no failures)",
    "rule:TagstreamNoWorkers": "alert condition does not hold (a worker is up)",
    "rule:TagstreamNoReadyWorkers": "alert condition does not hold (the worker is ready)",
    "rule:TagstreamOrphanedJobs": "alert condition does not hold (no worker died)",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) while waiting for {what}")
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - not up yet
            value = None
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


class _HeldVideoServer:
    """Serves one real video over HTTP, but only after :meth:`release` (the request waits)."""

    def __init__(self, video: Path) -> None:
        self.released = threading.Event()
        self.requested = threading.Event()
        body, released, requested = video.read_bytes(), self.released, self.requested

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                requested.set()
                released.wait(120)
                self.send_response(200)
                self.send_header("Content-Type", "video/mp4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/held.mp4"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()


def _prometheus_config(tmp: Path, worker_port: int) -> Path:
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
    (tmp / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp / "rules.yaml")],
        "scrape_configs": [
            {"job_name": "tagstream-worker", "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]}
        ],
    }
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


class Scene:
    def __init__(self, redis_url: str, prom_url: str, worker_port: int, held_job: str, tagged_jobs: list[str]):
        self.redis_url, self.prom_url, self.worker_port = redis_url, prom_url, worker_port
        self.held_job, self.tagged_jobs = held_job, tagged_jobs

    def query(self, expr: str) -> dict:
        url = f"{self.prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as err:  # 400 carries the PromQL error
            return json.load(err)

    def value(self, expr: str) -> float | None:
        result = self.query(expr)["data"]["result"]
        return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def scene(redis_server, tmp_path_factory):
    prometheus = ensure_tool("prometheus", "prometheus")
    tmp = tmp_path_factory.mktemp("live")
    redis_url = redis_server.url
    connection = redis.Redis.from_url(redis_url)
    connection.flushall()
    media = tmp / "media"
    for i in range(VIDEOS):
        make_video(media / f"v{i}.mp4", seconds=2.0, audio="aac")
    held = _HeldVideoServer(make_video(tmp / "held.mp4", seconds=2.0, audio="aac"))

    worker_port, prom_port = _free_port(), _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "worker", "--name", "live-worker", "--redis-url", redis_url,
         "--metrics-host", "127.0.0.1", "--metrics-port", str(worker_port), "--device", "cpu",
         "--concurrency", "2", "--allowed-roots", str(media), "--allowed-schemes", "file,http",
         "--allowed-hosts", "127.0.0.1", "--read-timeout-s", "120", "--open-timeout-s", "120",
         "--heartbeat-interval-s", "1", "--log-level", "WARNING"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "worker.log", "wb"),
    )  # fmt: skip
    prom = subprocess.Popen(
        [prometheus, f"--config.file={_prometheus_config(tmp, worker_port)}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "prometheus.log", "wb"),
    )  # fmt: skip
    try:
        s = Scene(redis_url, f"http://127.0.0.1:{prom_port}", worker_port, "", [])
        # Submit only once Prometheus scrapes the worker, so the counters' increase falls inside its samples.
        _wait(lambda: s.value('up{job="tagstream-worker"}') == 1, 120, "Prometheus scraping the worker", prom)
        s.tagged_jobs = [submit(connection, f"live-{i}", uri=str(media / f"v{i}.mp4"), title="a cat video")
                         for i in range(VIDEOS)]  # fmt: skip
        s.held_job = submit(connection, "live-held", uri=held.url, title="held")
        _wait(lambda: (s.value('sum(tagstream_videos_total{outcome="tagged"})') or 0) >= VIDEOS, 120,
              "the worker to tag the videos (seen by Prometheus)", worker)  # fmt: skip
        _wait(held.requested.is_set, 60, "the worker to open the held video", worker)
        _wait(lambda: (s.value('max(tagstream_queue_jobs{state="started"})') or 0) >= 1, 30, "a started job in Prometheus")
        # Counters need two samples inside each window, recording rules a couple of evaluations.
        _wait(lambda: s.value("tagstream:video_seconds:rate5m"), 30, "recording rules with data")
        _wait(lambda: (s.value('tagstream:backlog_jobs{queue="tagging"}') or 0) >= 1, 30,
              "the backlog rule to see the started job")  # fmt: skip
        # the jobs were submitted while Prometheus scraped: wait until the rules have seen the queue drain
        _wait(lambda: s.value('tagstream:queued_jobs{queue="tagging"}') == 0, 30, "the queued rule to reach 0")
        _wait(lambda: s.query("deriv(tagstream:backlog_jobs[10m])")["data"]["result"], 30, "two backlog samples")
        yield s
    finally:
        held.close()
        for proc in (worker, prom):
            proc.terminate()
        time.sleep(0.5)
        worker.terminate()  # second SIGTERM: hand the held job back at once instead of waiting the grace period
        for proc in (worker, prom):
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_every_deploy_expression_runs_against_live_prometheus(scene):
    empty_ok_seen, failures = set(), []
    for where, expr in deploy_expressions():
        concrete = expr.replace("$__rate_interval", "1m")
        answer = scene.query(concrete)
        if answer.get("status") != "success":
            failures.append(f"{where}: {answer.get('error')}")
            continue
        if not answer["data"]["result"]:
            if where in MAY_BE_EMPTY:
                empty_ok_seen.add(where)
            else:
                failures.append(f"{where}: no data for {concrete}")
    assert not failures, "\n".join(failures)
    assert set(MAY_BE_EMPTY) >= empty_ok_seen


def test_live_values_make_sense(scene):
    assert scene.value('sum(up{job="tagstream-worker"})') == 1
    assert scene.value("tagstream:workers_ready") == 1
    assert scene.value('tagstream:videos:rate5m{outcome="tagged"}') > 0
    assert scene.value('sum(tagstream_videos_total{outcome="tagged"})') == VIDEOS
    assert scene.value("sum(tagstream_in_flight_videos)") >= 1  # the held video
    assert scene.value('tagstream:backlog_jobs{queue="tagging"}') >= 1  # started counts as backlog
    assert scene.value('tagstream:queued_jobs{queue="tagging"}') == 0  # ...though nothing waits
    # The alerts' conditions are valid PromQL that does not hold on a healthy worker.
    assert scene.query('ALERTS{alertstate="firing"}')["data"]["result"] == []


def _rq_info(scene: Scene, *args: str) -> str:
    rq = Path(sys.executable).with_name("rq")
    proc = subprocess.run([str(rq), "info", "--url", scene.redis_url, "--serializer", "json", *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_rq_info_shows_queue_worker_and_jobs(scene):
    queues = _rq_info(scene, "--only-queues", "--raw")
    # nothing waits, the held job is executing, the others finished
    assert re.search(rf"^queue tagging 0, 1 executing, {VIDEOS} finished, 0 failed$", queues, re.M), queues
    workers = _rq_info(scene, "--only-workers", "--raw")
    assert re.search(rf"^worker live-worker \(.*\) busy tagging\. jobs: {VIDEOS} finished, 0 failed$", workers, re.M), workers
    full = _rq_info(scene)
    assert "tagging" in full and "live-worker" in full and "1 workers, 1 queues" in full, full


def test_rq_dashboard_shows_queue_worker_and_jobs(scene):
    port = _free_port()
    launcher = ROOT / "deploy" / "rq_dashboard_json.py"  # rq-dashboard with JSON as rq's fallback serializer
    proc = subprocess.Popen([sys.executable, str(launcher), "--redis-url", scene.redis_url, "--bind", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    base = f"http://127.0.0.1:{port}/0"

    def get(path: str) -> dict:
        try:
            with urllib.request.urlopen(base + path, timeout=10) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as err:
            proc.terminate()
            pytest.fail(f"rq-dashboard {path}: {err}\n{proc.communicate(timeout=30)[1].decode()[-3000:]}")

    try:
        queues = _wait(lambda: get("/data/queues.json"), 30, "rq-dashboard", proc)["queues"]
        tagging = next(q for q in queues if q["name"] == "tagging")
        assert tagging["count"] == 0 and tagging["started_job_registry_count"] == 1, tagging
        assert tagging["finished_job_registry_count"] == VIDEOS and tagging["failed_job_registry_count"] == 0, tagging
        workers = get("/data/workers.json")["workers"]
        assert [w["name"] for w in workers] == ["live-worker"], workers
        assert workers[0]["queues"] == ["tagging"] and workers[0]["state"] == "busy", workers
        finished = get("/data/jobs/tagging/finished/20/asc/1.json")["jobs"]
        assert {j["id"] for j in finished} == set(scene.tagged_jobs), finished
        started = get("/data/jobs/tagging/started/20/asc/1.json")["jobs"]
        assert [j["id"] for j in started] == [scene.held_job], started
        job = get(f"/data/job/{scene.held_job}.json")
        assert job["status"] == "started" and "live-held" in json.dumps(job), job
    finally:
        proc.terminate()
        proc.wait(30)
