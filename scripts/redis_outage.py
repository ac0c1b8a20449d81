"""Redis unavailable for 30 s in the middle of a run: workers keep running, back off, resume, lose nothing.

1. Makes tiny real videos, starts a private ``redis-server`` (AOF, ``appendfsync everysec``) and
   ``--workers`` worker processes (``real`` = ``tagstream worker``, or ``decode-only``), each with its
   own metrics port, and waits until every ``/readyz`` answers 200.
2. Enqueues ``--videos`` videos; once ``--at`` of them are done (and ``--in-flight`` started), stops Redis (``--mode term``: clean
   shutdown; ``kill``: SIGKILL, the last second of writes may be lost) for ``--outage-s`` seconds,
   then starts it again on the same port and data directory.
3. Every second during the outage and after it, scrapes each worker's ``/metrics`` and ``/readyz``:
   ``tagstream_redis_up``, ``tagstream_redis_errors_total``, readiness, process alive.
4. Waits until every job is finished and checks the chaos soak's invariants (one tagged result per
   video, nothing lost, nothing started, nothing queued).

Reported: whether every worker process stayed alive, what the metrics showed during the outage, the
time from Redis being back to the first job finished and to every worker ready again, jobs finished
during the outage (they complete in memory and are written when Redis returns), duplicates, totals.

Example (the RELIABILITY.md run)::

    python scripts/redis_outage.py --videos 300 --workers 2 --outage-s 30
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soak_lib as lib  # noqa: E402

from worker.config import Settings  # noqa: E402
from worker.jobs.enqueue import enqueue_video  # noqa: E402
from worker.tools.local_redis import LocalRedis, free_port  # noqa: E402

log = logging.getLogger("outage")
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)


def observe(workers: list[lib.WorkerProc]) -> list[dict[str, Any]]:
    """One observation per worker: alive, readiness, redis_up, redis error count, videos tagged."""
    out = []
    for w in workers:
        code, text = lib.scrape(w.metrics_port)
        values = lib.metric_values(text) if code == 200 else {}
        ready, _ = lib.scrape(w.metrics_port, "/readyz")
        out.append({
            "worker": w.name, "alive": w.alive(), "ready": ready == 200,
            "redis_up": values.get("tagstream_redis_up"),
            "redis_errors": values.get("tagstream_redis_errors_total"),
            "tagged": values.get('tagstream_videos_total{outcome="tagged"}'),
        })  # fmt: skip
    return out


def finished_count(conn: redis.Redis, video_ids: list[str]) -> int | None:
    try:
        return sum(1 for s in lib.job_statuses(conn, video_ids).values() if s == "finished")
    except REDIS_ERRORS:
        return None


def run_outage(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tagstream-outage-"))
    files = lib.make_media(workdir / "media", args.files)
    (workdir / "redis").mkdir(parents=True, exist_ok=True)
    server = LocalRedis(appendonly=True, data_dir=workdir / "redis").start()
    conn = redis.Redis.from_url(server.url, socket_timeout=10)
    settings = Settings(
        redis_url=server.url, allowed_roots=[str((workdir / "media").resolve())], concurrency=args.concurrency,
        heartbeat_interval_s=args.heartbeat_interval_s, heartbeat_ttl_s=args.heartbeat_ttl_s,
        maintenance_interval_s=args.maintenance_interval_s, job_retries=args.job_retries, result_ttl_s=86400,
        failure_ttl_s=86400, device="cpu", decode_threads=1, log_level="INFO",
    )  # fmt: skip
    workers: list[lib.WorkerProc] = []
    report: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    try:
        for i in range(args.workers):
            ws = settings.model_copy(update={"metrics_port": free_port()})
            workers.append(lib.spawn_worker(args.worker_kind, ws, f"outage-w{i}", workdir / "logs",
                                            delay_s=args.decode_delay_s))  # fmt: skip
        t_spawn = time.monotonic()
        lib.wait_ready(workers, 600)
        report["workers_ready_after_s"] = round(time.monotonic() - t_spawn, 1)
        video_ids = [f"outage-{i:05d}" for i in range(args.videos)]
        for i, vid in enumerate(video_ids):
            enqueue_video(conn, vid, str(files[i % len(files)]), f"outage clip {i}", settings)
        time.sleep(1.5)  # on disk before a crash-mode stop
        t_enqueued = time.monotonic()
        def outage_point() -> bool:
            started = lib.queue_state(conn, settings.queue)["started"]
            return (finished_count(conn, video_ids) or 0) >= args.at * len(video_ids) and started >= args.in_flight

        if not lib.wait_until(outage_point, 1800, 0.2):
            raise RuntimeError("run did not reach the outage point")
        before = finished_count(conn, video_ids) or 0
        in_flight = lib.queue_state(conn, settings.queue)["started"]
        down_at = time.monotonic()
        server.stop(kill=args.mode == "kill")
        log.info("Redis stopped (%s) with %d/%d finished, %d in flight", args.mode, before, len(video_ids), in_flight)
        during: list[list[dict]] = []
        while time.monotonic() - down_at < args.outage_s:
            during.append(observe(workers))
            time.sleep(1.0)
        server.start()
        up_at = time.monotonic()
        log.info("Redis back after %.1f s", up_at - down_at)
        after: list[tuple[float, list[dict]]] = []
        first_finish = all_ready = None
        while True:
            now = time.monotonic() - up_at
            obs = observe(workers)
            after.append((now, obs))
            done = finished_count(conn, video_ids)
            if first_finish is None and done is not None and done > before:
                first_finish = now
            if all_ready is None and all(o["ready"] for o in obs):
                all_ready = now
            if done == len(video_ids) and lib.queue_state(conn, settings.queue)["started"] == 0:
                break
            if now > args.timeout_s:
                break
            time.sleep(0.5)
        drained_after = time.monotonic() - up_at
        flat = [o for snap in during for o in snap]
        report.update({
            "videos": len(video_ids), "mode": args.mode, "finished_before_outage": before,
            "in_flight_at_outage": in_flight, "outage_s": round(up_at - down_at, 1),
            "during": {
                "observations": len(flat),
                "all_workers_alive": all(o["alive"] for o in flat),
                "redis_up_values": sorted({o["redis_up"] for o in flat if o["redis_up"] is not None}),
                "ready_values": sorted({o["ready"] for o in flat}),
                "redis_up_at_end": [o["redis_up"] for o in during[-1]] if during else [],
                "ready_at_end": [o["ready"] for o in during[-1]] if during else [],
                "redis_errors_at_end": [o["redis_errors"] for o in during[-1]] if during else [],
            },
            "first_job_finished_after_s": None if first_finish is None else round(first_finish, 1),
            "all_ready_after_s": None if all_ready is None else round(all_ready, 1),
            "drained_after_s": round(drained_after, 1),
            "workers_alive_after": all(o["alive"] for o in after[-1][1]),
            "redis_up_after": [o["redis_up"] for o in after[-1][1]],
            "run_s_after_enqueue": round(time.monotonic() - t_enqueued, 1),
        })  # fmt: skip
        report["worker_exit_codes"] = lib.stop_workers(workers)
        report["verify"] = lib.verify(conn, settings, video_ids, args.job_retries)
        report["total_s"] = round(time.monotonic() - t0, 1)
        d = report["during"]
        report["ok"] = bool(
            report["verify"]["ok"] and d["all_workers_alive"] and report["workers_alive_after"]
            and d["redis_up_at_end"] == [0.0] * len(workers) and d["ready_at_end"] == [False] * len(workers)
            and all(e and e > 0 for e in d["redis_errors_at_end"]) and report["redis_up_after"] == [1.0] * len(workers)
            and report["worker_exit_codes"] == [0] * len(workers)
        )  # fmt: skip
        report["workdir"] = str(workdir)
        return report
    finally:
        lib.kill_all(workers, server)


def summary(r: dict[str, Any]) -> str:
    d, v = r["during"], r["verify"]
    return "\n".join([
        f"Redis outage ({r['mode']}, {r['outage_s']} s): {'OK' if r['ok'] else 'FAILED'}; "
        f"{r['config']['worker_kind']} workers x{r['config']['workers']}, {r['videos']} videos",
        f"  at the outage: {r['finished_before_outage']} finished, {r['in_flight_at_outage']} in flight",
        f"  during: workers alive {d['all_workers_alive']}; at its end, per worker: tagstream_redis_up "
        f"{d['redis_up_at_end']}, /readyz ok {d['ready_at_end']}, tagstream_redis_errors_total {d['redis_errors_at_end']}",
        f"  after Redis returned: first job finished {r['first_job_finished_after_s']} s, all workers ready "
        f"{r['all_ready_after_s']} s, drained {r['drained_after_s']} s; redis_up {r['redis_up_after']}",
        f"  verify: tagged {v['tagged']}/{v['distinct_videos']}, lost {v['lost']}, stuck {v['stuck_started']}, "
        f"written more than once {v['videos_written_more_than_once']}, retried {v['videos_retried']}; "
        f"worker exits {r['worker_exit_codes']}; total {r['total_s']} s",
    ])  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=300)
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--worker-kind", choices=lib.WORKER_KINDS, default="real")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--decode-delay-s", type=float, default=0.0)
    p.add_argument("--outage-s", type=float, default=30.0)
    p.add_argument("--mode", choices=("term", "kill"), default="term")
    p.add_argument("--at", type=float, default=0.3, help="fraction of videos done when Redis goes away")
    p.add_argument("--in-flight", type=int, default=1, help="... and at least this many jobs started")
    p.add_argument("--heartbeat-interval-s", type=float, default=2.0)
    p.add_argument("--heartbeat-ttl-s", type=float, default=10.0)
    p.add_argument("--maintenance-interval-s", type=float, default=5.0)
    p.add_argument("--job-retries", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=1800.0)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    lib.exit_on_sigterm()
    return lib.report_and_exit_status(run_outage(args), args.json, summary)


if __name__ == "__main__":
    sys.exit(main())
