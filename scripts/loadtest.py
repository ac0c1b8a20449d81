"""Open-loop load test: enqueue at a fixed rate, record latency and backlog over time, plot them.

Starts a private redis-server (``worker.tools.local_redis``) and one real worker process (``python -m
worker.cli worker``, the production entry point) configured through ``TAGSTREAM_*`` variables, waits
until the worker has registered with rq, then enqueues the benchmark clips (``bench_clips.py``, cycled,
each under a new video id) at ``--rate`` videos per minute for ``--duration`` seconds *whatever the
worker's progress* (open loop), then waits for the backlog to drain. Every second it samples the backlog
(jobs queued + jobs started and not finished). Latency of a job = rq's ``ended_at - enqueued_at``.

Prints p50/p95/p99 latency, throughput while loaded and the backlog's peak and end, and with ``--plot``
writes a PNG: latency of each job against its enqueue time, and backlog against time.

    python scripts/loadtest.py --rate 6 --duration 120 --plot loadtest.png
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_clips import default_cache, make_clips  # noqa: E402
from bench_worker import percentile  # noqa: E402


def start_worker(redis_url: str, roots: str, k: int, extra_env: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, "TAGSTREAM_REDIS_URL": redis_url, "TAGSTREAM_QUEUE": "loadtest",
           "TAGSTREAM_ALLOWED_ROOTS": roots, "TAGSTREAM_CONCURRENCY": str(k), "TAGSTREAM_DEVICE": "cpu",
           "TAGSTREAM_METRICS_PORT": "0", "TAGSTREAM_LOG_LEVEL": "WARNING", "TAGSTREAM_JOB_RETRIES": "0",
           **extra_env}
    cmd = [sys.executable, "-m", "worker.cli", "worker", "--no-bridge"]
    return subprocess.Popen(cmd, env=env, cwd=str(Path(__file__).resolve().parents[1]))


def wait_registered(conn, proc: subprocess.Popen, timeout_s: float = 300.0) -> None:
    from rq import Worker

    end = time.monotonic() + timeout_s
    while not Worker.all(connection=conn):
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError("the worker did not start")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=6.0, help="videos enqueued per minute (default 6)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of enqueueing (default 120)")
    p.add_argument("--k", type=int, default=8, help="worker concurrency K (default 8)")
    p.add_argument("--clips", type=int, default=20, help="clips of the benchmark set to cycle through")
    p.add_argument("--cache", type=Path, default=default_cache())
    p.add_argument("--drain-timeout", type=float, default=600.0, help="max seconds to wait for the backlog")
    p.add_argument("--plot", type=Path, default=None, help="write latency + backlog over time (PNG) here")
    p.add_argument("--json", type=Path, default=None, help="write the raw samples and latencies here")
    p.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for the worker (repeatable)")
    args = p.parse_args(argv)

    import redis
    from rq import Queue
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from worker.config import Settings
    from worker.jobs.enqueue import enqueue_video
    from worker.keys import job_id_for
    from worker.tools.local_redis import LocalRedis

    clips = make_clips(args.cache, args.clips)
    extra = dict(item.split("=", 1) for item in args.env)
    with LocalRedis() as server:
        conn = redis.Redis.from_url(server.url)
        settings = Settings(redis_url=server.url, queue="loadtest", job_retries=0)
        worker = start_worker(server.url, str(clips[0].path.parent), args.k, extra)
        try:
            wait_registered(conn, worker)
            queue = Queue("loadtest", connection=conn, serializer=JSONSerializer)
            samples: list[tuple[float, int, int]] = []
            ids: list[tuple[str, float]] = []
            stop = threading.Event()
            t0 = time.time()

            def sample() -> None:
                while not stop.wait(1.0):
                    queued, started = queue.count, queue.started_job_registry.count
                    samples.append((time.time() - t0, queued + started, len(queue.finished_job_registry)))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            n = int(args.rate * args.duration / 60.0)
            for i in range(n):  # open loop: the schedule does not wait for the worker
                time.sleep(max(0.0, t0 + i * 60.0 / args.rate - time.time()))
                clip = clips[i % len(clips)]
                vid = f"{clip.video_id}-{i:04d}"
                enqueue_video(conn, vid, str(clip.path), clip.title, settings)
                ids.append((vid, clip.seconds))
            end = time.monotonic() + args.drain_timeout
            while time.monotonic() < end and (queue.count or queue.started_job_registry.count):
                time.sleep(1.0)
            time.sleep(1.5)
            stop.set()
            sampler.join()
            load = os.getloadavg()
            rows = []
            for vid, seconds in ids:
                job = Job.fetch(job_id_for(vid), connection=conn, serializer=JSONSerializer)
                if job.ended_at is None:
                    rows.append((job.enqueued_at.timestamp() - t0, None, seconds, job.get_status().value))
                    continue
                rows.append((job.enqueued_at.timestamp() - t0, (job.ended_at - job.enqueued_at).total_seconds(),
                             seconds, job.get_status().value))
        finally:
            worker.terminate()
            worker.wait(timeout=60)
    lat = [r[1] for r in rows if r[1] is not None]
    done = [r for r in rows if r[3] == "finished"]
    last_end = max((r[0] + r[1] for r in rows if r[1] is not None), default=0.0)
    print(f"open loop: {n} videos at {args.rate:g}/min for {args.duration:g} s (K={args.k}); "
          f"{len(done)} finished, {len(rows) - len(done)} not")
    print(f"latency s: p50 {percentile(lat, 50):.1f}, p95 {percentile(lat, 95):.1f}, p99 {percentile(lat, 99):.1f}, "
          f"max {max(lat, default=float('nan')):.1f}")
    print(f"throughput: {60.0 * len(done) / last_end:.2f} videos/min over {last_end:.0f} s; backlog peak "
          f"{max((s[1] for s in samples), default=0)}, at end of enqueueing "
          f"{next((s[1] for s in samples if s[0] >= args.duration), 0)}; load average at end {load[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"samples": samples, "jobs": rows, "args": vars(args) | {"cache": str(args.cache),
                                         "plot": str(args.plot), "json": str(args.json)}}, indent=1))
    if args.plot:
        plot(rows, samples, args)
    return 0


def plot(rows: list[tuple], samples: list[tuple], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 4.6), dpi=80, sharex=True)
    pts = [(r[0], r[1]) for r in rows if r[1] is not None]
    if pts:
        ax.plot(*zip(*pts, strict=True), ".", ms=4)
    ax.set_ylabel("latency s")
    ax.set_title(f"open loop {args.rate:g} videos/min for {args.duration:g} s, K={args.k}", fontsize=9)
    if samples:
        ax2.plot([s[0] for s in samples], [s[1] for s in samples], "-")
    ax2.axvline(args.duration, ls="--", lw=1, color="gray")
    ax2.set_ylabel("backlog (queued + running)")
    ax2.set_xlabel("seconds since the first enqueue")
    fig.tight_layout()
    fig.savefig(args.plot)


if __name__ == "__main__":
    sys.exit(main())
