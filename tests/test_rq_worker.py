"""Worker processes against a real redis-server: XADD intake, Redis restarted mid-run, SIGTERM
mid-batch, SIGKILL with jobs in flight.

Two real ``tagstream worker`` processes (CPU, real models, features-only unless a checkpoint ships)
are started once for the module, at the same time so their model loads overlap: ``proc-a`` on queue
``qa`` (with the uploads bridge) and ``proc-b`` on queue ``qb``. They talk to this module's own
``redis-server`` (AOF on, ``appendfsync always``) so it can be restarted. Survivors that pick up
after a killed or stopped process are in-process :class:`TagWorker` s over the real pipeline and
models (tests/worker_support.py). Jobs are kept in flight by an HTTP server that holds a video's
first request until the test releases it, so nothing here depends on how fast the machine is.

Order matters only for cost: proc-a serves the XADD and Redis-restart tests and is then SIGTERMed;
proc-b is SIGKILLed. A test that finds its process gone starts a new one.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from rq import Worker
from rq.serializers import JSONSerializer
from worker_support import (
    InProcessWorker,
    MediaServer,
    http_get,
    scrape,
    small_video,
    spawn_worker,
    statuses,
    wait_for,
    worker_settings,
)

from worker.jobs.enqueue import submit, tag_queue
from worker.jobs.task import TagJob
from worker.keys import TAGGED_STREAM, UPLOADS_GROUP, UPLOADS_STREAM, job_id_for, result_key
from worker.tools.local_redis import LocalRedis, free_port

# Model loads in three processes at once can take minutes on a busy 2-core machine.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

LOAD_S = 300  # generous bound on a worker process's start-up (model load) on a busy 2-core machine
RETRIES = 2
PROCESS_SETTINGS = {
    "a": dict(queue="qa", concurrency=6, decode_threads=6, heartbeat_ttl_s=20, shutdown_grace_s=120),
    "b": dict(queue="qb", concurrency=4, decode_threads=4, heartbeat_ttl_s=4),
}


class Scene:
    """The module's Redis, media, HTTP media server and worker processes."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.redis = LocalRedis(appendonly=True).start()
        self.conn = redis.Redis.from_url(self.redis.url)
        self.conn.config_set("appendfsync", "always")
        self.media_dir = tmp / "media"
        self.videos = [small_video(self.media_dir / f"good{i}.mp4", pattern=("index", "busy")[i % 2]) for i in range(3)]
        self.server = MediaServer({})
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self.names: dict[str, str] = {}
        self.spawns = 0

    def settings(self, key: str, **overrides):
        """The settings of process ``key`` (in-process survivors use the same ones)."""
        values = dict(PROCESS_SETTINGS[key], heartbeat_interval_s=0.5, maintenance_interval_s=1, job_retries=RETRIES)
        values.update(overrides)
        return worker_settings(self.redis.url, [str(self.media_dir)], **values)

    def spawn(self, key: str) -> subprocess.Popen:
        self.spawns += 1
        self.ports[key] = free_port()
        values = dict(PROCESS_SETTINGS[key], redis_url=self.redis.url, allowed_roots=[str(self.media_dir)],
                      allowed_hosts=["127.0.0.1"], heartbeat_interval_s=0.5, maintenance_interval_s=1,
                      job_retries=RETRIES, open_timeout_s=300, read_timeout_s=300, metrics_host="127.0.0.1",
                      metrics_port=self.ports[key], log_level="INFO")  # fmt: skip
        self.names[key] = f"proc-{key}.{self.spawns}"
        args = ["--name", self.names[key]] + ([] if key == "a" else ["--no-bridge"])
        self.procs[key] = spawn_worker(self.tmp / f"{self.names[key]}.log", *args, **values)
        return self.procs[key]

    def ready(self, key: str) -> subprocess.Popen:
        """Process ``key``, started if it is not running, once ``/readyz`` answers 200."""
        proc = self.procs.get(key)
        if proc is None or proc.poll() is not None:
            proc = self.spawn(key)
        url = f"http://127.0.0.1:{self.ports[key]}/readyz"
        wait_for(lambda: http_get(url)[0] == 200, LOAD_S, f"proc-{key} ready", proc)
        return proc

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.server.close()
        self.redis.stop()


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    s = Scene(tmp_path_factory.mktemp("procs"))
    try:
        s.spawn("a")
        s.spawn("b")
        yield s
    finally:
        s.close()


def hold(scene: Scene, names: list[str]) -> tuple[dict[str, str], object]:
    """URLs for ``names`` whose first request waits for the returned gate."""
    gate = threading.Event()
    urls = {}
    for i, name in enumerate(names):
        urls[name] = scene.server.add(f"{name}.mp4", scene.videos[i % len(scene.videos)])
        scene.server.hold(f"{name}.mp4", gate=gate)
    return urls, gate


def requested(scene: Scene, names: list[str]) -> bool:
    return all(scene.server.requests(f"{n}.mp4") >= 1 for n in names)


def doc(conn: redis.Redis, video_id: str) -> dict:
    raw = conn.get(result_key(video_id))
    return json.loads(raw) if raw else {}


def fetch(conn: redis.Redis, video_id: str) -> TagJob:
    return TagJob.fetch(job_id_for(video_id), connection=conn, serializer=JSONSerializer)


def test_xadd_intake_through_a_running_worker(scene):
    """``XADD tagstream:uploads`` entries are bridged by the running worker into its queue and tagged;
    a duplicate entry is one job and one result; an entry without a video id is acknowledged."""
    proc = scene.ready("a")
    conn = scene.conn
    video = str(scene.videos[0])
    conn.xadd(UPLOADS_STREAM, {"video_id": "up-1", "uri": video, "title": "first upload"})
    conn.xadd(UPLOADS_STREAM, {"video_id": "up-2", "uri": str(scene.videos[1])})
    conn.xadd(UPLOADS_STREAM, {"video_id": "up-1", "uri": video})  # the same video again
    conn.xadd(UPLOADS_STREAM, {"uri": video})  # unusable: no video id
    wait_for(lambda: statuses(conn, ["up-1", "up-2"]) == ["finished", "finished"], 120, "bridged jobs", proc)
    wait_for(lambda: conn.xpending(UPLOADS_STREAM, UPLOADS_GROUP)["pending"] == 0, 30, "entries acked", proc)
    assert doc(conn, "up-1")["status"] == "tagged" and doc(conn, "up-2")["status"] == "tagged"
    assert fetch(conn, "up-1").kwargs == {"uri": video, "title": "first upload"}
    events = [f[b"video_id"] for _, f in conn.xrange(TAGGED_STREAM)]
    assert events.count(b"up-1") == 1 and events.count(b"up-2") == 1
    assert tag_queue(conn, scene.settings("a")).finished_job_registry.count == 2


def test_redis_restarted_mid_run_every_job_completes(scene):
    """Redis stops while jobs are in flight (four of them held at their source) and others wait: the
    worker reports not-ready, keeps tagging what it holds, and once Redis is back every job completes
    in place (no job runs twice, no retry is spent)."""
    proc = scene.ready("a")
    conn = scene.conn
    settings = scene.settings("a")
    held, gate = hold(scene, [f"rr-held{i}" for i in range(4)])
    for name, url in held.items():
        submit(conn, name, url, "", settings)
    local = [f"rr-local{i}" for i in range(6)]
    for i, name in enumerate(local):
        submit(conn, name, str(scene.videos[i % 3]), "", settings)
    wait_for(lambda: requested(scene, list(held)), 120, "four held videos in flight", proc)
    ready_url = f"http://127.0.0.1:{scene.ports['a']}/readyz"
    assert http_get(ready_url)[0] == 200

    total = ("tagstream_stage_duration_seconds_count", (("stage", "total"),))
    done_before = scrape(scene.ports["a"]).get(total, 0.0)

    scene.redis.stop()
    wait_for(lambda: http_get(ready_url)[0] == 503, 30, "not ready while Redis is down", proc)
    gate.set()  # the held videos are tagged while Redis is away; their results wait for it
    wait_for(lambda: scrape(scene.ports["a"]).get(total, 0.0) >= done_before + 4, 120, "held videos tagged", proc)
    scene.redis.start()
    conn = scene.conn = redis.Redis.from_url(scene.redis.url)
    names = list(held) + local
    wait_for(lambda: statuses(conn, names).count("finished") == len(names), 120, "every job finished", proc)
    wait_for(lambda: http_get(ready_url)[0] == 200, 30, "ready again", proc)
    assert proc.poll() is None  # the outage did not kill the worker
    assert {n: doc(conn, n).get("status") for n in names} == {n: "tagged" for n in names}
    # one attempt each (a video and an audio open) and no retry spent
    assert {n: scene.server.requests(f"{n}.mp4") for n in held} == {n: 2 for n in held}
    assert {n: fetch(conn, n).retries_left for n in names} == {n: RETRIES for n in names}
    assert scrape(scene.ports["a"]).get(("tagstream_redis_up", ())) == 1


def test_sigterm_mid_batch_loses_nothing(scene):
    """SIGTERM while jobs are in flight: no new job starts, in-flight jobs may finish within the grace
    period, a second SIGTERM hands the rest back at once without spending a retry, and a second
    worker then finishes every job: nothing is lost or run twice."""
    proc = scene.ready("a")
    conn = scene.conn
    settings = scene.settings("a")
    finishing, finish_gate = hold(scene, ["st-finish0", "st-finish1"])
    handed, _ = hold(scene, ["st-back0", "st-back1"])
    for name, url in {**finishing, **handed}.items():
        submit(conn, name, url, "", settings)
    local = [f"st-local{i}" for i in range(8)]
    for i, name in enumerate(local):
        submit(conn, name, str(scene.videos[i % 3]), "", settings)
    names = list(finishing) + list(handed) + local
    wait_for(lambda: requested(scene, list(finishing) + list(handed)), 120, "held videos in flight", proc)
    before = scrape(scene.ports["a"])

    proc.send_signal(signal.SIGTERM)  # 1st: stop taking jobs, finish within the grace period
    finish_gate.set()
    wait_for(lambda: statuses(conn, list(finishing)) == ["finished", "finished"], 120, "in-flight jobs finish", proc)
    proc.send_signal(signal.SIGTERM)  # 2nd: hand back now
    assert proc.wait(60) == 0

    got = dict(zip(names, statuses(conn, names), strict=True))
    assert got["st-back0"] == got["st-back1"] == "queued", got
    assert set(got.values()) <= {"finished", "queued"}, got  # nothing started, failed or lost
    queue = tag_queue(conn, settings)
    assert queue.started_job_registry.count == 0 and queue.failed_job_registry.count == 0
    assert sorted(queue.job_ids) == sorted(job_id_for(n) for n in names if got[n] == "queued")
    for name in handed:
        assert fetch(conn, name).retries_left == RETRIES  # handing back spends no retry
    assert not [w for w in Worker.all(queue=queue) if w.name.startswith("proc-a")]  # unregistered
    assert before.get(("tagstream_in_flight_videos", ()), 0) >= 4, before

    InProcessWorker(settings).burst()  # a second worker finishes what was handed back
    assert statuses(conn, names) == ["finished"] * len(names)
    assert all(doc(conn, n)["status"] == "tagged" for n in names)
    events = [f[b"video_id"].decode() for _, f in conn.xrange(TAGGED_STREAM)]
    assert sorted(e for e in events if e.startswith("st-")) == sorted(names)  # each tagged exactly once


def test_sigkill_worker_jobs_finished_by_survivor(scene):
    """A worker process killed with SIGKILL while holding four jobs: a second worker requeues them
    once their heartbeats expire and finishes them, within heartbeat TTL + maintenance interval +
    a margin for running them."""
    victim = scene.ready("b")
    conn = scene.conn
    settings = scene.settings("b")
    held, _gate = hold(scene, [f"kill-held{i}" for i in range(4)])  # never released: the victim dies holding them
    for name, url in held.items():
        submit(conn, name, url, "", settings)
    waiting = ["kill-wait0", "kill-wait1"]
    for i, name in enumerate(waiting):
        submit(conn, name, str(scene.videos[i]), "", settings)
    names = list(held) + waiting
    queue = tag_queue(conn, settings)
    wait_for(lambda: requested(scene, list(held)) and queue.started_job_registry.count == 4, 120,
             "the victim holding four jobs", victim)  # fmt: skip
    workers = Worker.all(queue=queue)
    assert [w.name for w in workers] == [scene.names["b"]]
    assert len(workers[0].get_current_executions(refresh=True)) == 4  # rq sees all four executions
    info = subprocess.run([str(Path(sys.executable).with_name("rq")), "info", "--url", scene.redis.url,
                           "--serializer", "json", "--only-queues", "--raw", "qb"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "queue qb 2, 4 executing" in info.stdout, info.stdout + info.stderr

    survivor = InProcessWorker(settings, name="survivor")  # models loaded before the clock starts
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    killed_at = time.monotonic()
    margin_s = 15.0  # running four small videos on a busy machine
    requeue_bound = settings.heartbeat_ttl_s + settings.maintenance_interval_s + 5.0
    with survivor.start():
        # behavioural bounds: orphans requeued (one retry spent) within TTL + maintenance (+5 s of
        # slack), every job finished within that + margin_s; wait_for fails the test past either bound
        since_kill = lambda: time.monotonic() - killed_at  # noqa: E731
        wait_for(lambda: all(fetch(conn, n).retries_left == RETRIES - 1 for n in held),
                 requeue_bound - since_kill(), "the orphaned jobs requeued")  # fmt: skip
        requeued = since_kill()
        wait_for(lambda: statuses(conn, names).count("finished") == len(names),
                 requeue_bound + margin_s - since_kill(), "the survivor finishing every job")  # fmt: skip
        recovery = since_kill()
        assert sorted(survivor.spy.video_ids) == sorted(names)  # each job ran once more, no more
    print(f"SIGKILL recovery: orphans requeued {requeued:.1f} s and all {len(names)} jobs finished "
          f"{recovery:.1f} s after the kill (heartbeat TTL {settings.heartbeat_ttl_s:g} s + maintenance "
          f"{settings.maintenance_interval_s:g} s; bound {requeue_bound + margin_s:g} s)")  # fmt: skip
    for name in held:
        assert fetch(conn, name).retries_left == RETRIES - 1  # recovery spends one retry
        assert doc(conn, name)["status"] == "tagged"
    assert queue.started_job_registry.count == 0


def test_grace_period_over_hands_jobs_back(redis_url, tmp_path):
    """A stop request with jobs that cannot finish within ``shutdown_grace_s``: they go back to the
    front of the queue without spending a retry (in process: the same code path as SIGTERM)."""
    video = small_video(tmp_path / "v.mp4")
    server = MediaServer({"a.mp4": video, "b.mp4": video})
    gate = server.hold("a.mp4")
    server.hold("b.mp4", gate=gate)
    conn = redis.Redis.from_url(redis_url)
    settings = worker_settings(redis_url, [str(tmp_path)], shutdown_grace_s=0.5, job_retries=RETRIES)
    try:
        submit(conn, "gr-a", server.url("a.mp4"), "", settings)
        submit(conn, "gr-b", server.url("b.mp4"), "", settings)
        submit(conn, "gr-c", str(video), "", settings)
        worker = InProcessWorker(settings).start()
        try:
            wait_for(lambda: server.requests("a.mp4") and server.requests("b.mp4"), 60, "two held jobs")
            wait_for(lambda: statuses(conn, ["gr-c"]) == ["finished"], 60, "the local video")
            worker.worker.request_stop()  # once: graceful
            assert worker.join(60)
        finally:
            gate.set()
            worker.stop()
        assert statuses(conn, ["gr-a", "gr-b", "gr-c"]) == ["queued", "queued", "finished"]
        assert [fetch(conn, n).retries_left for n in ("gr-a", "gr-b")] == [RETRIES, RETRIES]
        assert set(tag_queue(conn, settings).job_ids) == {job_id_for("gr-a"), job_id_for("gr-b")}
    finally:
        server.close()


def rq_info_worker_state(redis_url: str, name: str) -> str | None:
    """The state the real ``rq info`` command shows for worker ``name`` (None when it lists none)."""
    proc = subprocess.run([str(Path(sys.executable).with_name("rq")), "info", "--url", redis_url,
                           "--serializer", "json", "--only-workers", "--raw"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in proc.stdout.splitlines():
        if line.startswith(f"worker {name} ("):
            return line.split(") ", 1)[1].split(" ", 1)[0]
    return None


def test_rq_info_shows_idle_and_busy(redis_url, tmp_path):
    """rq's worker state follows the jobs in flight: ``idle`` before any job, ``busy`` while one is held
    (also after a second, quick job finished next to it), ``idle`` again once the held one finished."""
    video = small_video(tmp_path / "v.mp4")
    server = MediaServer({"held.mp4": video})
    gate = server.hold("held.mp4")
    conn = redis.Redis.from_url(redis_url)
    settings = worker_settings(redis_url, [str(tmp_path)], concurrency=2)
    name = "state-worker"
    try:
        with InProcessWorker(settings, name=name):
            wait_for(lambda: rq_info_worker_state(redis_url, name) == "idle", 60, "rq info: idle before any job")
            submit(conn, "st-held", server.url("held.mp4"), "", settings)
            wait_for(lambda: server.requests("held.mp4") == 1, 60, "the held job to start")
            assert rq_info_worker_state(redis_url, name) == "busy"
            submit(conn, "st-quick", str(video), "", settings)
            wait_for(lambda: statuses(conn, ["st-quick"]) == ["finished"], 60, "the quick job")
            assert statuses(conn, ["st-held"]) == ["started"]
            assert rq_info_worker_state(redis_url, name) == "busy"  # one job is still in flight
            gate.set()
            wait_for(lambda: statuses(conn, ["st-held"]) == ["finished"], 60, "the held job")
            wait_for(lambda: rq_info_worker_state(redis_url, name) == "idle", 30, "rq info: idle after the jobs")
    finally:
        gate.set()
        server.close()
