"""Load: a burst of enqueues drains with stable worker memory, and Redis memory returns to its
baseline once results expire.

1. Makes ``--files`` tiny real videos (plus one truncated file that fails with ``decode_error``, so
   the failed registry and failure TTLs are exercised), starts a private ``redis-server`` and
   ``--workers`` worker processes (``real`` = ``tagstream worker``; ``decode-only``) with short TTLs
   (``--result-ttl-s``, ``--failure-ttl-s``) and a small stream cap (``--stream-maxlen``), and waits
   until every ``/readyz`` answers 200.
2. Baseline: Redis ``INFO memory`` ``used_memory`` and key families, with the workers idle.
3. Enqueues ``--jobs`` jobs as fast as ``--enqueuers`` producer threads can (distinct video ids over the few files;
   ``--corrupt`` of them point at the broken file), then samples every ``--sample-s`` seconds: queue
   depth, Redis ``used_memory``, each worker's RSS (``/proc``).
4. Once drained, waits for the TTLs to lapse and maintenance to clean rq's registries, and measures
   Redis again.

Reported: enqueue rate, drain time and videos/s, Redis used_memory baseline/peak/after expiry and the
keys left by family, each worker's RSS at 10 %, 50 % and 100 % of the burst and its peak.

Example (the RELIABILITY.md run)::

    python scripts/burst.py --jobs 10000 --workers 1 --concurrency 32
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soak_lib as lib  # noqa: E402

from worker.config import Settings  # noqa: E402
from worker.jobs.enqueue import enqueue_video  # noqa: E402
from worker.keys import RESULT_PREFIX  # noqa: E402
from worker.tools.local_redis import LocalRedis, free_port  # noqa: E402

log = logging.getLogger("burst")
MB = 1024 * 1024


def _rss_at(samples: list[dict], fraction: float, total: int) -> list[float | None]:
    for s in samples:
        if s["done"] >= fraction * total:
            return [None if r is None else round(r / MB, 1) for r in s["rss"]]
    return []


def run_burst(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tagstream-burst-"))
    files = lib.make_media(workdir / "media", args.files)
    corrupt = lib.make_corrupt(workdir / "media" / "broken.mp4", files[0])
    server = LocalRedis(data_dir=workdir).start()
    conn = redis.Redis.from_url(server.url, socket_timeout=30)
    settings = Settings(
        redis_url=server.url, allowed_roots=[str((workdir / "media").resolve())], concurrency=args.concurrency,
        result_ttl_s=args.result_ttl_s, failure_ttl_s=args.failure_ttl_s, tagged_stream_maxlen=args.stream_maxlen,
        heartbeat_interval_s=2, heartbeat_ttl_s=10, maintenance_interval_s=args.maintenance_interval_s,
        job_retries=3, device="cpu", decode_threads=args.decode_threads, log_level="WARNING",
    )  # fmt: skip
    workers: list[lib.WorkerProc] = []
    try:
        for i in range(args.workers):
            ws = settings.model_copy(update={"metrics_port": free_port()})
            workers.append(lib.spawn_worker(args.worker_kind, ws, f"burst-w{i}", workdir / "logs"))
        lib.wait_ready(workers, 900)
        time.sleep(3)  # heartbeats and queue metrics settle
        baseline = lib.memory_info(conn)
        baseline_keys = lib.key_families(conn)
        rss_idle = [w.rss_bytes() for w in workers]

        bad_every = int(1 / args.corrupt) if args.corrupt > 0 else 0

        def enqueue(i: int) -> None:
            uri = str(corrupt) if bad_every and i % bad_every == bad_every - 1 else str(files[i % len(files)])
            enqueue_video(conn, f"burst-{i:06d}", uri, f"burst clip {i}", settings)

        t_enq = time.monotonic()
        with ThreadPoolExecutor(args.enqueuers) as pool:  # redis-py clients are thread-safe
            list(pool.map(enqueue, range(args.jobs)))
        enqueue_s = time.monotonic() - t_enq
        after_enqueue = lib.memory_info(conn)

        samples: list[dict] = []
        t_drain = time.monotonic()
        while True:
            qs = lib.queue_state(conn, settings.queue)
            done = args.jobs - qs["queued"] - qs["started"] - qs["intermediate"]
            mem = lib.memory_info(conn)
            samples.append({"t": round(time.monotonic() - t_drain, 1), "done": done, "queued": qs["queued"],
                            "used_memory": mem["used_memory"], "rss": [w.rss_bytes() for w in workers]})  # fmt: skip
            if qs["queued"] == 0 and qs["started"] == 0 and qs["intermediate"] == 0:
                break
            if not all(w.alive() for w in workers):
                raise RuntimeError("a worker died during the burst")
            time.sleep(args.sample_s)
        drain_s = time.monotonic() - t_drain
        drained = lib.memory_info(conn)
        drained_keys = lib.key_families(conn)
        tagged = sum(1 for _ in conn.scan_iter(match=f"{RESULT_PREFIX}*", count=1000))

        # Expiry: results/jobs by TTL, registries by maintenance. Wait until no result and no job key
        # remains (or TTL + 5 maintenance intervals + 60 s).
        t_exp = time.monotonic()
        limit = max(args.result_ttl_s, args.failure_ttl_s) + 5 * args.maintenance_interval_s + 60
        while time.monotonic() - t_exp < limit:
            fam = lib.key_families(conn)
            if not fam.get("tagstream:tags") and not fam.get("rq:job") and not fam.get("rq:results"):
                break
            time.sleep(args.sample_s)
        time.sleep(2 * args.maintenance_interval_s + 2)  # one more maintenance pass for the registries
        expired = lib.memory_info(conn)
        expired_keys = lib.key_families(conn)
        stream_len = conn.xlen("tagstream:tagged")
        rss_end = [w.rss_bytes() for w in workers]
        exit_codes = lib.stop_workers(workers)
        peak = max(s["used_memory"] for s in samples)
        rss_peak = [max((s["rss"][i] or 0) for s in samples) for i in range(len(workers))]
        report = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "jobs": args.jobs, "corrupt_jobs": args.jobs // bad_every if bad_every else 0,
            "enqueue_s": round(enqueue_s, 1), "enqueues_per_s": round(args.jobs / enqueue_s, 1),
            "done_when_enqueued": samples[0]["done"], "drain_s": round(drain_s, 1),
            "drain_phase_videos_per_s": round((args.jobs - samples[0]["done"]) / drain_s, 2),
            "end_to_end_s": round(enqueue_s + drain_s, 1), "videos_per_s": round(args.jobs / (enqueue_s + drain_s), 2),
            "results_after_drain": tagged,
            "redis_used_memory_mb": {
                "baseline": round(baseline["used_memory"] / MB, 2), "after_enqueue": round(after_enqueue["used_memory"] / MB, 2),
                "peak": round(peak / MB, 2), "drained": round(drained["used_memory"] / MB, 2),
                "after_expiry": round(expired["used_memory"] / MB, 2),
            },
            "redis_keys": {"baseline": baseline["keys"], "drained": drained["keys"], "after_expiry": expired["keys"]},
            "key_families": {"baseline": baseline_keys, "drained": drained_keys, "after_expiry": expired_keys},
            "tagged_stream_len_after": stream_len,
            "expiry_wait_s": round(time.monotonic() - t_exp, 1),
            "worker_rss_mb": {
                "idle": [None if r is None else round(r / MB, 1) for r in rss_idle],
                "at_10pct": _rss_at(samples, 0.1, args.jobs), "at_50pct": _rss_at(samples, 0.5, args.jobs),
                "at_100pct": _rss_at(samples, 1.0, args.jobs), "peak": [round(r / MB, 1) for r in rss_peak],
                "after_expiry": [None if r is None else round(r / MB, 1) for r in rss_end],
            },
            "worker_exit_codes": exit_codes,
            "samples": samples,
            "total_s": round(time.monotonic() - t0, 1),
            "workdir": str(workdir),
        }  # fmt: skip
        return report
    finally:
        lib.kill_all(workers, server)


def summary(r: dict[str, Any]) -> str:
    m, k, rss = r["redis_used_memory_mb"], r["key_families"]["after_expiry"], r["worker_rss_mb"]
    return "\n".join([
        f"burst of {r['jobs']} jobs ({r['corrupt_jobs']} corrupt), {r['config']['worker_kind']} workers "
        f"x{r['config']['workers']} K={r['config']['concurrency']}: enqueued in {r['enqueue_s']} s "
        f"({r['enqueues_per_s']}/s, {r['done_when_enqueued']} already done by then), the rest drained in "
        f"{r['drain_s']} s ({r['drain_phase_videos_per_s']} videos/s); all done {r['end_to_end_s']} s after the "
        f"first enqueue ({r['videos_per_s']} videos/s)",
        f"  Redis used_memory MB: baseline {m['baseline']}, after enqueue {m['after_enqueue']}, peak {m['peak']}, "
        f"drained {m['drained']}, after expiry {m['after_expiry']} (TTL {r['config']['result_ttl_s']} s)",
        f"  keys: baseline {r['redis_keys']['baseline']}, drained {r['redis_keys']['drained']}, after expiry "
        f"{r['redis_keys']['after_expiry']} {k}; tagged stream {r['tagged_stream_len_after']} entries "
        f"(cap ~{r['config']['stream_maxlen']})",
        f"  worker RSS MB: idle {rss['idle']}, 10% {rss['at_10pct']}, 50% {rss['at_50pct']}, "
        f"100% {rss['at_100pct']}, peak {rss['peak']}",
        f"  total {r['total_s']} s; worker exits {r['worker_exit_codes']}",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--enqueuers", type=int, default=4, help="producer threads enqueueing the burst")
    p.add_argument("--corrupt", type=float, default=0.01, help="fraction of jobs pointing at a broken file")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--worker-kind", choices=lib.WORKER_KINDS, default="real")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--decode-threads", type=int, default=2)
    p.add_argument("--result-ttl-s", type=int, default=60)
    p.add_argument("--failure-ttl-s", type=int, default=60)
    p.add_argument("--stream-maxlen", type=int, default=1000)
    p.add_argument("--maintenance-interval-s", type=float, default=5.0)
    p.add_argument("--sample-s", type=float, default=2.0)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    lib.exit_on_sigterm()
    return lib.report_and_exit_status(run_burst(args), args.json, summary)


if __name__ == "__main__":
    sys.exit(main())
