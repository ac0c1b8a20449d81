"""Shared machinery of the fault and load scripts (``chaos.py``, ``burst.py``, ``redis_outage.py``).

* Tiny real media: H.264 + AAC MP4 files made with PyAV (64x64, 1 s by default), so decoding is cheap
  and the queue machinery is what gets exercised.
* Worker processes: ``real`` runs the product itself, ``python -m worker.cli worker`` (= ``tagstream
  worker``, models resident, about 10-20 s to start on a 2-core CPU); ``decode-only`` runs the same
  :class:`worker.jobs.worker.TagWorker`, result sink, metrics and health server, but its pipeline only
  decodes the video with the production decoder (``worker.media.probe``) and writes a ``tagged`` document
  without tags (``model_version`` ``decode-only``). It starts in about a second, which is what lets a
  CI-sized chaos run kill and restart workers within seconds. Settings travel as ``TAGSTREAM_*``
  environment variables, exactly as in a deployment.
* :class:`SentinelGroup`: a master, a replica and three sentinels, for failover runs.
* Redis inspection helpers (pipelined, so polling thousands of jobs is cheap) and ``/proc`` RSS.

Run ``python scripts/soak_lib.py decode-only-worker --name NAME [--delay-s S]`` to start a decode-only
worker by hand (settings from the environment).
"""

from __future__ import annotations

import argparse
import fractions
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from worker.config import Settings  # noqa: E402
from worker.engine.request import VideoRequest  # noqa: E402
from worker.keys import RESULT_PREFIX, TAGGED_STREAM, job_id_for, result_key  # noqa: E402

log = logging.getLogger("soak")

WORKER_KINDS = ("real", "decode-only")


# --- media ------------------------------------------------------------------------------------------
def make_tiny_video(path: Path, *, size: int = 64, seconds: float = 1.0, fps: int = 10, seed: int = 0) -> Path:
    """An H.264 + AAC MP4 of ``size`` x ``size`` pixels; ``seed`` varies colour and tone."""
    import av
    import numpy as np

    path = Path(path)
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width = vs.height = size
        vs.pix_fmt = "yuv420p"
        vs.options = {"preset": "ultrafast"}
        aus = out.add_stream("aac", rate=16000)
        aus.layout = "mono"
        base = rng.integers(0, 256, 3)
        for i in range(int(seconds * fps)):
            img = np.empty((size, size, 3), np.uint8)
            img[:] = (base + 7 * i) % 256
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            frame.time_base = fractions.Fraction(1, fps)
            out.mux(vs.encode(frame))
        out.mux(vs.encode(None))
        tone = np.sin(2 * np.pi * (220 + 20 * (seed % 20)) * np.arange(int(seconds * 16000)) / 16000)
        samples = (0.3 * tone).astype(np.float32)
        for start in range(0, samples.size, 1024):
            chunk = samples[start : start + 1024]
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate = 16000
            frame.pts = start
            frame.time_base = fractions.Fraction(1, 16000)
            out.mux(aus.encode(frame))
        out.mux(aus.encode(None))
    return path


def make_media(directory: Path, count: int, **kwargs: Any) -> list[Path]:
    """``count`` distinct tiny videos in ``directory`` (``clip0000.mp4`` ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    return [make_tiny_video(directory / f"clip{i:04d}.mp4", seed=i, **kwargs) for i in range(count)]


def make_corrupt(path: Path, good: Path) -> Path:
    """A truncated copy of ``good``: the worker fails it with ``decode_error`` (permanent)."""
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


# --- worker processes ---------------------------------------------------------------------------------
def settings_env(settings: Settings) -> dict[str, str]:
    """``os.environ`` plus ``TAGSTREAM_*`` for every field of ``settings``."""
    env = dict(os.environ)
    for key, value in settings.model_dump(exclude_none=True).items():
        env[f"TAGSTREAM_{key.upper()}"] = ",".join(value) if isinstance(value, list) else str(value)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


@dataclass
class WorkerProc:
    """One worker subprocess; its output goes to ``log_path``."""

    name: str
    kind: str
    proc: subprocess.Popen
    log_path: Path
    metrics_port: int
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def term(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def rss_bytes(self) -> int | None:
        return rss_bytes(self.pid) if self.alive() else None

    def log_count(self, text: str) -> int:
        try:
            return self.log_path.read_text(errors="replace").count(text)
        except OSError:
            return 0


def spawn_worker(kind: str, settings: Settings, name: str, log_dir: Path, *, delay_s: float = 0.0) -> WorkerProc:
    """Start a ``real`` or ``decode-only`` worker named ``name`` with ``settings`` in its environment."""
    if kind == "real":
        cmd = [sys.executable, "-m", "worker.cli", "worker", "--name", name]
    elif kind == "decode-only":
        cmd = [sys.executable, str(Path(__file__).resolve()), "decode-only-worker", "--name", name,
               "--delay-s", str(delay_s)]  # fmt: skip
    else:
        raise ValueError(f"unknown worker kind {kind!r}; expected one of {WORKER_KINDS}")
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as out:
        proc = subprocess.Popen(cmd, env=settings_env(settings), stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT))
    return WorkerProc(name=name, kind=kind, proc=proc, log_path=log_path, metrics_port=settings.metrics_port)


def report_and_exit_status(report: dict[str, Any], json_path: Path | None, summary: Any) -> int:
    """The end of each soak script: write the report to ``--json`` when given, print its summary; exit
    status 1 when the report says it is not ``ok``."""
    if json_path:
        json_path.write_text(json.dumps(report, indent=2))
    print(summary(report))
    return 0 if report.get("ok", True) else 1


def wait_ready(workers: list[WorkerProc], timeout_s: float) -> None:
    """Wait until every worker's ``/readyz`` answers 200 (models loaded, Redis reachable)."""
    if not wait_until(lambda: all(scrape(w.metrics_port, "/readyz")[0] == 200 for w in workers), timeout_s, 0.5):
        raise RuntimeError("workers did not become ready")


def stop_workers(workers: list[WorkerProc], timeout_s: float = 120.0) -> list[int | None]:
    """SIGTERM every worker (a graceful stop), wait for each; returns their exit statuses."""
    for w in workers:
        w.term()
    for w in workers:
        w.proc.wait(timeout_s)
    return [w.proc.returncode for w in workers]


def kill_all(workers: list[WorkerProc], server: Any) -> None:
    """End of a run: SIGKILL every worker still alive, then stop the Redis server."""
    for w in workers:
        if w.alive():
            w.kill()
    server.stop()


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` from ``/proc`` (Linux), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def scrape(port: int, path: str = "/metrics", timeout_s: float = 2.0) -> tuple[int, str]:
    """GET ``http://127.0.0.1:port/path``: (status, body); (0, error text) when unreachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as resp:  # noqa: S310
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


def metric_values(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` from a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit, so a script's ``finally`` stops its workers and Redis."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


# --- Redis with replicas and Sentinel -----------------------------------------------------------------
@dataclass
class SentinelGroup:
    """One master, one replica and ``sentinels`` sentinels (``redis-server`` and ``redis-server
    --sentinel``) on free ports of 127.0.0.1, data and configs in ``directory``.

    :meth:`start` returns once the replica is in sync and every sentinel knows the replica and the other
    sentinels, so a failover can start at once. ``down_after_ms`` and ``failover_timeout_ms`` are
    Sentinel's ``down-after-milliseconds`` and ``failover-timeout``; ``quorum`` is the number of
    sentinels that must agree the master is down."""

    directory: Path
    master_name: str = "tagstream"
    sentinels: int = 3
    quorum: int = 2
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    appendonly: bool = False
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL of the group (see :mod:`worker.jobs.connection`)."""
        hosts = ",".join(f"127.0.0.1:{self.ports[f'sentinel{i}']}" for i in range(self.sentinels))
        return f"redis+sentinel://{hosts}/{self.master_name}/0"

    def node(self, name: str) -> redis.Redis:
        """A plain client of one node (``master``, ``replica``, ``sentinelN``) by its original role."""
        return redis.Redis(host="127.0.0.1", port=self.ports[name], socket_timeout=5, socket_connect_timeout=2)

    def _spawn(self, name: str, args: list[str]) -> None:
        from worker.tools.local_redis import redis_server_binary

        log_path = self.directory / f"{name}.log"
        with log_path.open("ab") as out:
            self.procs[name] = subprocess.Popen([redis_server_binary(), *args], stdout=out, stderr=subprocess.STDOUT)

    def _data_node(self, name: str, extra: list[str]) -> None:
        from worker.tools.local_redis import free_port

        self.ports[name] = port = free_port()
        data = self.directory / name
        data.mkdir(parents=True, exist_ok=True)
        self._spawn(name, [
            "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", "",
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0", "--daemonize", "no", *extra,
        ])  # fmt: skip
        if not wait_until(lambda: self.node(name).ping(), 10, 0.05):
            raise RuntimeError(f"redis-server {name} did not start on port {port}")

    def start(self, timeout_s: float = 30.0) -> SentinelGroup:
        from worker.tools.local_redis import free_port

        self.directory.mkdir(parents=True, exist_ok=True)
        self._data_node("master", [])
        self._data_node("replica", ["--replicaof", "127.0.0.1", str(self.ports["master"])])
        in_sync = lambda: self.node("replica").info("replication").get("master_link_status") == "up"  # noqa: E731
        if not wait_until(in_sync, timeout_s, 0.05):
            raise RuntimeError("the replica did not sync with the master")
        for i in range(self.sentinels):
            name = f"sentinel{i}"
            self.ports[name] = port = free_port()
            conf = self.directory / f"{name}.conf"
            conf.write_text("\n".join([
                f"port {port}", "bind 127.0.0.1", f"dir {self.directory}",
                f"sentinel monitor {self.master_name} 127.0.0.1 {self.ports['master']} {self.quorum}",
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {self.master_name} 1", "",
            ]))  # fmt: skip
            self._spawn(name, [str(conf), "--sentinel"])

        def known() -> bool:
            for i in range(self.sentinels):
                view = self.sentinel_view(i)
                if int(view["num-slaves"]) < 1 or int(view["num-other-sentinels"]) < self.sentinels - 1:
                    return False
            return True

        if not wait_until(known, timeout_s, 0.1):
            raise RuntimeError("the sentinels did not discover the replica and each other")
        return self

    def sentinel_view(self, index: int) -> dict[str, str]:
        """``SENTINEL MASTER`` of sentinel ``index``, as text."""
        raw = self.node(f"sentinel{index}").execute_command("SENTINEL MASTER", self.master_name)
        pairs = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
        text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
        return {text(k): text(v) for k, v in pairs}

    def master_address(self) -> tuple[str, int] | None:
        """The master's address as the first sentinel that answers sees it."""
        for i in range(self.sentinels):
            try:
                host, port = self.node(f"sentinel{i}").execute_command(
                    "SENTINEL GET-MASTER-ADDR-BY-NAME", self.master_name)  # fmt: skip
                return (host.decode() if isinstance(host, bytes) else host), int(port)
            except redis.RedisError:
                continue
        return None

    def kill(self, name: str) -> None:
        """SIGKILL one node (no shutdown, no last writes)."""
        proc = self.procs[name]
        proc.kill()
        proc.wait(10)

    def wait_promoted(self, name: str = "replica", timeout_s: float = 30.0) -> float:
        """Wait until every sentinel names ``name`` the master (and none flags it down or in failover)
        and it answers as one; returns the seconds waited. Raises RuntimeError on timeout."""
        start = time.monotonic()

        def promoted() -> bool:
            for i in range(self.sentinels):
                view = self.sentinel_view(i)
                if (view.get("ip"), int(view.get("port", 0))) != ("127.0.0.1", self.ports[name]):
                    return False
                if "down" in view.get("flags", "") or "failover" in view.get("flags", ""):
                    return False
            return self.node(name).info("replication").get("role") == "master"

        if not wait_until(promoted, timeout_s, 0.05):
            raise RuntimeError(f"{name} was not promoted within {timeout_s} s")
        return time.monotonic() - start

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    def __enter__(self) -> SentinelGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- Redis inspection ---------------------------------------------------------------------------------
def job_statuses(conn: redis.Redis, video_ids: list[str]) -> dict[str, str | None]:
    """rq status of each video's job (``queued``, ``started``, ``finished``, ...; None: no job hash)."""
    with conn.pipeline(transaction=False) as pipe:
        for vid in video_ids:
            pipe.hget(f"rq:job:{job_id_for(vid)}", "status")
        values = pipe.execute()
    return {vid: (v.decode() if v is not None else None) for vid, v in zip(video_ids, values, strict=True)}


def results(conn: redis.Redis, video_ids: list[str]) -> dict[str, dict | None]:
    """Each video's stored result document, or None."""
    with conn.pipeline(transaction=False) as pipe:
        for vid in video_ids:
            pipe.get(result_key(vid))
        values = pipe.execute()
    return {vid: (json.loads(v) if v is not None else None) for vid, v in zip(video_ids, values, strict=True)}


def retries_left(conn: redis.Redis, video_ids: list[str]) -> dict[str, int | None]:
    with conn.pipeline(transaction=False) as pipe:
        for vid in video_ids:
            pipe.hget(f"rq:job:{job_id_for(vid)}", "retries_left")
        values = pipe.execute()
    return {vid: (int(v) if v is not None else None) for vid, v in zip(video_ids, values, strict=True)}


def completions(conn: redis.Redis) -> dict[str, int]:
    """How many ``tagstream:tagged`` events each video has (one per result write)."""
    counts: dict[str, int] = {}
    last = "-"
    while True:
        batch = conn.xrange(TAGGED_STREAM, min=last, count=5000)
        if last != "-":
            batch = batch[1:]
        if not batch:
            return counts
        for _, fields in batch:
            vid = fields[b"video_id"].decode()
            counts[vid] = counts.get(vid, 0) + 1
        last = batch[-1][0].decode()


def worker_jobs(conn: redis.Redis, worker_name: str) -> set[str]:
    """Job ids the worker has registered executions for (rq 3's per-worker execution index)."""
    members = conn.smembers(f"rq:worker:{worker_name}:executions")
    return {m.decode().rsplit(":", 1)[0] for m in members}


def queue_state(conn: redis.Redis, queue: str) -> dict[str, int]:
    """Lengths of rq's working sets for ``queue``."""
    with conn.pipeline(transaction=False) as pipe:
        pipe.llen(f"rq:queue:{queue}")
        pipe.llen(f"rq:queue:{queue}:intermediate")
        pipe.zcard(f"rq:wip:{queue}")
        pipe.zcard(f"rq:failed:{queue}")
        pipe.zcard(f"rq:finished:{queue}")
        values = pipe.execute()
    return dict(zip(("queued", "intermediate", "started", "failed", "finished"), map(int, values), strict=True))


def memory_info(conn: redis.Redis) -> dict[str, int]:
    info = conn.info("memory")
    return {"used_memory": int(info["used_memory"]), "used_memory_rss": int(info["used_memory_rss"]),
            "keys": int(conn.dbsize())}  # fmt: skip


def key_families(conn: redis.Redis) -> dict[str, int]:
    """Key counts by family (``rq:job``, ``tagstream:tags``, ...), to show what lingers."""
    counts: dict[str, int] = {}
    for key in conn.scan_iter(count=1000):
        parts = key.decode(errors="replace").split(":")
        family = ":".join(parts[:2]) if len(parts) > 1 else parts[0]
        counts[family] = counts.get(family, 0) + 1
    return dict(sorted(counts.items()))


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) by linear interpolation, or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def wait_until(predicate: Any, timeout_s: float, poll_s: float = 0.2) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if predicate():
                return True
        except (redis.ConnectionError, redis.TimeoutError):
            pass
        time.sleep(poll_s)
    return False


def verify(conn: redis.Redis, settings: Settings, video_ids: list[str], job_retries: int) -> dict[str, Any]:
    """The invariants, checked against Redis after the workers stopped."""
    statuses = job_statuses(conn, video_ids)
    docs = results(conn, video_ids)
    events = completions(conn)
    left = retries_left(conn, video_ids)
    qs = queue_state(conn, settings.queue)
    result_keys = sum(1 for _ in conn.scan_iter(match=f"{RESULT_PREFIX}*", count=1000))
    tagged = [v for v in video_ids if docs[v] and docs[v]["status"] == "tagged" and docs[v]["video_id"] == v]
    report = {
        "distinct_videos": len(video_ids),
        "tagged": len(tagged),
        "lost": sum(1 for v in video_ids if docs[v] is None),
        "failed": sum(1 for v in video_ids if docs[v] is not None and docs[v]["status"] != "tagged"),
        "jobs_not_finished": {s or "missing": n for s, n in Counter(statuses.values()).items() if s != "finished"},
        "stuck_started": sum(1 for s in statuses.values() if s == "started") + qs["started"],
        "left_in_queue": qs["queued"],
        "left_in_intermediate": qs["intermediate"],
        "failed_registry": qs["failed"],
        "result_keys": result_keys,
        "stray_results": result_keys - sum(1 for v in video_ids if docs[v] is not None),
        "videos_written_more_than_once": sum(1 for v in video_ids if events.get(v, 0) > 1),
        "result_writes": sum(events.get(v, 0) for v in video_ids),
        "videos_without_event": sum(1 for v in video_ids if events.get(v, 0) == 0),
        "videos_retried": sum(1 for v in video_ids if left[v] is not None and left[v] < job_retries),
        "retries_spent": sum(job_retries - left[v] for v in video_ids if left[v] is not None),
    }
    report["ok"] = (
        report["tagged"] == len(video_ids) and report["lost"] == 0 and report["stuck_started"] == 0
        and not report["jobs_not_finished"] and report["left_in_queue"] == 0 and report["left_in_intermediate"] == 0
        and report["failed_registry"] == 0 and report["stray_results"] == 0 and report["result_keys"] == len(video_ids)
    )  # fmt: skip
    return report


# --- the decode-only worker -----------------------------------------------------------------------------
class DecodeOnlyPipeline:
    """``submit(request) -> Future[dict]``: decodes with the production decoder, waits ``delay_s``
    (standing in for model time, so jobs are in flight long enough to be killed), returns a tagged
    document without tags. Decode errors propagate as the decoder raised them (typed, with reasons)."""

    def __init__(self, settings: Settings, delay_s: float = 0.0) -> None:
        self.settings = settings
        self.delay_s = delay_s
        self.pool = ThreadPoolExecutor(max(settings.concurrency, 1), thread_name_prefix="decode")
        self.stopped = threading.Event()

    def submit(self, request: VideoRequest) -> Future:
        return self.pool.submit(self._tag, request)

    def _tag(self, request: VideoRequest) -> dict:
        from worker.engine.document import tagged_document
        from worker.errors import ShutdownError
        from worker.media.probe import probe

        start = time.perf_counter()
        doc = probe(request.uri, self.settings)
        if self.stopped.wait(self.delay_s):
            raise ShutdownError("pipeline stopped")
        info = doc["info"]
        media = {"duration_s": info["duration_s"], "frames": doc["frames_sampled"], "audio_s": doc["audio_seconds"],
                 "width": info["width"], "height": info["height"]}  # fmt: skip
        queue_wait = max(0.0, time.time() - request.enqueued_at) if request.enqueued_at else 0.0
        timings = {"decode": doc["timings_s"]["total_s"], "total": time.perf_counter() - start, "queue_wait": queue_wait}
        return tagged_document(request.video_id, model_version="decode-only", prediction=None, concepts=[],
                               media=media, timings=timings)  # fmt: skip

    def stop(self, timeout: float | None = None) -> None:
        self.stopped.set()
        self.pool.shutdown(wait=True, cancel_futures=True)


def decode_only_worker_main(argv: list[str]) -> int:
    """A TagWorker with :class:`DecodeOnlyPipeline`, metrics and health server; settings from env."""
    parser = argparse.ArgumentParser(prog="soak_lib.py decode-only-worker")
    parser.add_argument("--name", default=None)
    parser.add_argument("--delay-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    settings = Settings()
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    from worker.jobs.worker import TagWorker
    from worker.metrics import Metrics
    from worker.service.health import HealthServer

    metrics = Metrics()
    state: dict[str, Any] = {"worker": None}
    health = None
    if settings.metrics_port:
        ready = lambda: bool(state["worker"] is not None and state["worker"].redis_ok)  # noqa: E731
        health = HealthServer(settings.metrics_host, settings.metrics_port, metrics.registry, ready).start()
    import worker.engine.document  # noqa: F401
    import worker.media.probe  # noqa: F401  (warm: imported before the first job, as models are in a real worker)

    pipeline = DecodeOnlyPipeline(settings, args.delay_s)
    from worker.jobs.connection import redis_from_url

    conn = redis_from_url(settings.redis_url, health_check_interval=30)
    worker = TagWorker(settings, conn, pipeline, model_version="decode-only", metrics=metrics, name=args.name)
    state["worker"] = worker
    try:
        worker.work()
    finally:
        pipeline.stop()
        if health is not None:
            health.stop()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "decode-only-worker":
        sys.exit(decode_only_worker_main(sys.argv[2:]))
    sys.exit("usage: soak_lib.py decode-only-worker --name NAME [--delay-s S]")
