"""Redis master SIGKILLed mid-run, Sentinel promotes the replica: what is lost, and what recovers it.

1. Makes tiny real videos; starts one master, one replica and three sentinels
   (:class:`soak_lib.SentinelGroup`: ``down-after-milliseconds`` 1000, ``failover-timeout`` 3000, quorum 2)
   and ``--workers`` worker processes (``real`` = ``tagstream worker``, or ``decode-only``) whose
   ``TAGSTREAM_REDIS_URL`` is the group's ``redis+sentinel://`` URL.
2. A producer thread submits ``--videos`` videos at ``--rate`` per second through a client made by the
   same factory. Its acknowledgement (``--ack wait``, the documented one): after each enqueue,
   ``WAIT 1 <--wait-timeout-ms>``; the job is *acknowledged* when one replica confirmed it. An enqueue
   whose WAIT times out is *unacknowledged* and left to the recovery; one that raises (the master is
   gone, the sentinels are between masters) is submitted again until it answers, as a producer that
   follows the documented recovery does.
3. Once ``--at`` of the videos are tagged, SIGKILLs the master (no shutdown: the replica has only what
   asynchronous replication had already sent) and waits for the sentinels to promote the replica.
4. Before any recovery, counts against the promoted master what the kill lost: acknowledged jobs
   missing (the bar: none), unacknowledged jobs missing, results the workers had written whose key is
   gone. Then the documented recovery: every video with neither a job nor a result is re-submitted
   (``submit`` is idempotent: job id ``tag-<video_id>``). Waits until everything is tagged and checks
   the chaos soak's invariants (one tagged result per video, nothing stuck, nothing stray).

``--cost`` measures Redis commands and bytes per tagged video instead (:func:`redis_cost`).

Also measured, on the same group before the run: the latency of a result-sized SET alone and followed
by ``WAIT 1 <timeout>`` (``--wait-samples``).

Example (the RELIABILITY.md run)::

    python scripts/sentinel_failover.py --videos 500 --workers 2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soak_lib as lib  # noqa: E402

from worker.config import Settings  # noqa: E402
from worker.jobs.connection import redis_from_url  # noqa: E402
from worker.jobs.enqueue import enqueue_video  # noqa: E402
from worker.jobs.redis_retry import REDIS_ERRORS  # noqa: E402
from worker.keys import result_key  # noqa: E402
from worker.tools.local_redis import free_port  # noqa: E402

log = logging.getLogger("failover")


def wait_latency(conn: redis.Redis, samples: int, size: int, timeout_ms: int) -> dict[str, Any]:
    """Milliseconds of ``SET`` of ``size`` bytes alone and of ``SET`` + ``WAIT 1 timeout_ms`` (two round
    trips: the way a producer or a result write would use it), p50/p99 of ``samples`` each."""
    value = b"x" * size
    plain: list[float] = []
    waited: list[float] = []
    replicas_acked = 0
    for i in range(samples):
        start = time.perf_counter()
        conn.set(f"wait-probe:{i}", value)
        plain.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        conn.set(f"wait-probe:{i}", value)
        replicas_acked += int(conn.execute_command("WAIT", 1, timeout_ms) >= 1)
        waited.append((time.perf_counter() - start) * 1000)
    conn.delete(*[f"wait-probe:{i}" for i in range(samples)])

    def stats(values: list[float]) -> dict[str, float]:
        return {"p50_ms": round(lib.percentile(values, 0.5) or 0, 3), "p99_ms": round(lib.percentile(values, 0.99) or 0, 3)}

    return {"samples": samples, "bytes": size, "set": stats(plain), "set_wait1": stats(waited),
            "wait_acknowledged": replicas_acked, "wait_timeout_ms": timeout_ms}  # fmt: skip


class Producer(threading.Thread):
    """Submits ``video_ids`` at ``rate`` per second; each enqueue is followed by ``WAIT 1 timeout_ms``."""

    def __init__(self, conn: redis.Redis, settings: Settings, video_ids: list[str], files: list[Path],
                 rate: float, timeout_ms: int) -> None:  # fmt: skip
        super().__init__(name="producer", daemon=True)
        self.conn, self.settings, self.video_ids, self.files = conn, settings, video_ids, files
        self.rate, self.timeout_ms = rate, timeout_ms
        self.acknowledged: list[str] = []
        self.unacknowledged: list[str] = []
        self.errors = 0

    def run(self) -> None:
        start = time.monotonic()
        for i, vid in enumerate(self.video_ids):
            delay = start + i / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            uri = str(self.files[i % len(self.files)])
            while True:  # an error leaves the outcome unknown: submit again (idempotent) until it answers
                try:
                    enqueue_video(self.conn, vid, uri, f"failover clip {i}", self.settings)
                    acked = int(self.conn.execute_command("WAIT", 1, self.timeout_ms)) >= 1
                    break
                except REDIS_ERRORS as exc:  # the master is gone or the client is between masters
                    log.info("enqueue of %s failed (%s); submitting again", vid, exc)
                    self.errors += 1
                    time.sleep(0.1)
            (self.acknowledged if acked else self.unacknowledged).append(vid)


def tagged_count(conn: redis.Redis, video_ids: list[str]) -> int:
    docs = lib.results(conn, video_ids)
    return sum(1 for d in docs.values() if d is not None and d.get("status") == "tagged")


def run_failover(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tagstream-failover-"))
    files = lib.make_media(workdir / "media", args.files)
    group = lib.SentinelGroup(workdir / "redis", appendonly=True).start()
    report: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    workers: list[lib.WorkerProc] = []
    try:
        conn = redis_from_url(group.url, socket_timeout=5, socket_connect_timeout=2)
        report["wait_latency"] = wait_latency(conn, args.wait_samples, args.result_bytes, args.wait_timeout_ms)
        settings = Settings(
            redis_url=group.url, allowed_roots=[str((workdir / "media").resolve())], concurrency=args.concurrency,
            heartbeat_interval_s=args.heartbeat_interval_s, heartbeat_ttl_s=args.heartbeat_ttl_s,
            maintenance_interval_s=args.maintenance_interval_s, job_retries=args.job_retries, result_ttl_s=86400,
            failure_ttl_s=86400, device="cpu", decode_threads=1, log_level="INFO",
        )  # fmt: skip
        for i in range(args.workers):
            ws = settings.model_copy(update={"metrics_port": free_port()})
            workers.append(lib.spawn_worker(args.worker_kind, ws, f"failover-w{i}", workdir / "logs",
                                            delay_s=args.decode_delay_s))  # fmt: skip
        lib.wait_ready(workers, 600)
        video_ids = [f"failover-{i:05d}" for i in range(args.videos)]
        producer = Producer(conn, settings, video_ids, files, args.rate, args.wait_timeout_ms)
        producer.start()
        if not lib.wait_until(lambda: tagged_count(conn, video_ids) >= args.at * len(video_ids), 1800, 0.1):
            raise RuntimeError("run did not reach the kill point")
        master = group.node("master")
        replica = group.node("replica")
        at_kill = {
            "tagged": tagged_count(conn, video_ids),
            "submitted": len(producer.acknowledged) + len(producer.unacknowledged),
            "replica_repl_offset": int(replica.info("replication")["slave_repl_offset"]),
            "master_repl_offset": int(master.info("replication")["master_repl_offset"]),
        }
        written_before = {v for v, d in lib.results(master, video_ids).items() if d is not None}
        group.kill("master")
        killed_at = time.monotonic()
        report["promotion_s"] = round(group.wait_promoted("replica", timeout_s=60), 2)
        log.info("master killed with %s; replica promoted after %.1f s", at_kill, report["promotion_s"])
        producer.join()
        # what the promoted master has, before any recovery
        statuses = lib.job_statuses(replica, video_ids)
        docs_after = lib.results(replica, video_ids)
        acked, unacked = set(producer.acknowledged), set(producer.unacknowledged)
        missing_job = {v for v in video_ids if statuses[v] is None and docs_after[v] is None}
        report["lost_at_failover"] = {
            **at_kill,
            "replication_lag_bytes_at_kill": at_kill["master_repl_offset"] - at_kill["replica_repl_offset"],
            "acknowledged": len(acked), "unacknowledged": len(unacked), "producer_errors": producer.errors,
            "acknowledged_jobs_missing": len(missing_job & acked),
            "unacknowledged_jobs_missing": len(missing_job & unacked),
            "results_written_before_kill_missing_after": sum(1 for v in written_before if docs_after[v] is None),
        }  # fmt: skip
        # the documented recovery: re-submit what has neither a job nor a result (idempotent)
        resubmitted = 0
        for i, vid in enumerate(video_ids):
            if statuses[vid] is None and docs_after[vid] is None:
                _, created = enqueue_video(conn, vid, str(files[i % len(files)]), f"failover clip {i}", settings)
                resubmitted += int(created)
        report["resubmitted"] = resubmitted

        def drained() -> bool:
            finished = sum(1 for s in lib.job_statuses(conn, video_ids).values() if s == "finished")
            return finished == len(video_ids) and lib.queue_state(conn, settings.queue)["started"] == 0

        report["drained"] = lib.wait_until(drained, args.timeout_s, 0.5)
        report["drained_after_kill_s"] = round(time.monotonic() - killed_at, 1)
        report["worker_exit_codes"] = lib.stop_workers(workers)
        report["verify"] = lib.verify(conn, settings, video_ids, args.job_retries)
        report["worker_log_lines"] = {
            "redis_retries": sum(w.log_count("retrying in") for w in workers),
            "orphan_collections": sum(w.log_count("orphaned job(s)") for w in workers),
        }
        report["total_s"] = round(time.monotonic() - t0, 1)
        lost = report["lost_at_failover"]
        report["ok"] = bool(report["verify"]["ok"] and report["drained"] and lost["acknowledged_jobs_missing"] == 0
                            and report["worker_exit_codes"] == [0] * len(workers))  # fmt: skip
        report["workdir"] = str(workdir)
        return report
    finally:
        for w in workers:
            if w.alive():
                w.kill()
        group.stop()


def redis_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Redis commands and bytes per tagged video: one worker against a private ``redis-server``; the
    statistics are reset (``CONFIG RESETSTAT``) once the worker is ready, then ``--videos`` videos are
    enqueued and tagged; INFO commandstats and ``total_net_input_bytes``/``total_net_output_bytes`` are
    read when the last job finished. Includes the producer's enqueue, the worker's polling, heartbeats
    and maintenance during the run, and this script's polling for completion (one pipelined HGET per
    video each 0.5 s, counted apart as ``poll_commands`` and subtracted)."""
    from worker.tools.local_redis import LocalRedis

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tagstream-cost-"))
    files = lib.make_media(workdir / "media", args.files)
    server = LocalRedis(data_dir=workdir).start()
    conn = redis.Redis.from_url(server.url)
    settings = Settings(redis_url=server.url, allowed_roots=[str((workdir / "media").resolve())], device="cpu",
                        concurrency=args.concurrency, decode_threads=1, metrics_port=free_port())  # fmt: skip
    worker = lib.spawn_worker(args.worker_kind, settings, "cost-w0", workdir / "logs", delay_s=args.decode_delay_s)
    try:
        lib.wait_ready([worker], 600)
        video_ids = [f"cost-{i:05d}" for i in range(args.videos)]
        conn.config_resetstat()
        start = time.monotonic()
        for i, vid in enumerate(video_ids):
            enqueue_video(conn, vid, str(files[i % len(files)]), f"cost clip {i}", settings)
        polls = 0

        def done() -> bool:
            nonlocal polls
            polls += 1
            return all(s == "finished" for s in lib.job_statuses(conn, video_ids).values())

        lib.wait_until(done, args.timeout_s, 0.5)
        elapsed = time.monotonic() - start
        stats = conn.info("commandstats")
        net = conn.info("stats")
        doc_bytes = [conn.strlen(result_key(v)) for v in video_ids[:20]]
    finally:
        worker.kill()
        server.stop()
    poll_commands = polls * args.videos
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    calls["hget"] = calls.get("hget", 0) - poll_commands
    total = sum(calls.values())
    n = args.videos
    return {
        "videos": n, "seconds": round(elapsed, 1), "commands_per_video": round(total / n, 1),
        "top_commands_per_video": {k: round(v / n, 2) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:12]},
        "net_input_bytes_per_video": round(int(net["total_net_input_bytes"]) / n),
        "net_output_bytes_per_video": round(int(net["total_net_output_bytes"]) / n),
        "result_document_bytes_median": sorted(doc_bytes)[len(doc_bytes) // 2], "poll_commands": poll_commands,
        "note": "net bytes include this script's completion polling (small HGET replies)",
    }  # fmt: skip


def summary(r: dict[str, Any]) -> str:
    lost, v, w = r["lost_at_failover"], r["verify"], r["wait_latency"]
    return "\n".join([
        f"Sentinel failover (master SIGKILL): {'OK' if r['ok'] else 'FAILED'}; {r['config']['worker_kind']} workers "
        f"x{r['config']['workers']}, {r['config']['videos']} videos; replica promoted after {r['promotion_s']} s",
        f"  at the kill: {lost['tagged']} tagged, {lost['submitted']} submitted, replication lag "
        f"{lost['replication_lag_bytes_at_kill']} bytes",
        f"  lost before recovery: acknowledged jobs {lost['acknowledged_jobs_missing']}/{lost['acknowledged']}, "
        f"unacknowledged jobs {lost['unacknowledged_jobs_missing']}/{lost['unacknowledged']} (producer errors "
        f"{lost['producer_errors']}), results written before the kill and gone {lost['results_written_before_kill_missing_after']}",
        f"  recovery: re-submitted {r['resubmitted']}; drained {r['drained_after_kill_s']} s after the kill",
        f"  verify: tagged {v['tagged']}/{v['distinct_videos']}, lost {v['lost']}, stuck {v['stuck_started']}, "
        f"written more than once {v['videos_written_more_than_once']}, retried {v['videos_retried']}; "
        f"worker exits {r['worker_exit_codes']}; worker log: {r['worker_log_lines']}; total {r['total_s']} s",
        f"  WAIT: {w['bytes']}-byte SET p50 {w['set']['p50_ms']} ms p99 {w['set']['p99_ms']} ms; SET + WAIT 1 "
        f"{w['wait_timeout_ms']} p50 {w['set_wait1']['p50_ms']} ms p99 {w['set_wait1']['p99_ms']} ms "
        f"({w['wait_acknowledged']}/{w['samples']} acknowledged)",
    ])  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=500)
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--worker-kind", choices=lib.WORKER_KINDS, default="real")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--decode-delay-s", type=float, default=0.0)
    p.add_argument("--rate", type=float, default=25.0, help="videos submitted per second")
    p.add_argument("--at", type=float, default=1 / 3, help="fraction of videos tagged when the master is killed")
    p.add_argument("--wait-timeout-ms", type=int, default=1000)
    p.add_argument("--wait-samples", type=int, default=500)
    p.add_argument("--result-bytes", type=int, default=2048, help="size of the WAIT probe value")
    p.add_argument("--heartbeat-interval-s", type=float, default=2.0)
    p.add_argument("--heartbeat-ttl-s", type=float, default=10.0)
    p.add_argument("--maintenance-interval-s", type=float, default=5.0)
    p.add_argument("--job-retries", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=900.0)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--cost", action="store_true", help="measure Redis commands and bytes per video instead")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    lib.exit_on_sigterm()
    if args.cost:
        return lib.report_and_exit_status(redis_cost(args), args.json, lambda r: json.dumps(r, indent=2))
    return lib.report_and_exit_status(run_failover(args), args.json, summary)


if __name__ == "__main__":
    sys.exit(main())
