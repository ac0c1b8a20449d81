"""Chaos soak: many tiny videos, 3 worker processes, SIGKILLs, a SIGTERM and Redis restarts.

What it does (issue 7, "Chaos soak"):

1. Makes ``--files`` tiny real videos (64x64, 1 s, H.264 + AAC) and starts a private ``redis-server``
   with ``appendonly yes`` / ``appendfsync everysec`` on a free port with its own data directory.
2. Enqueues ``--videos`` distinct video ids (through :func:`worker.jobs.enqueue.enqueue_video`, i.e.
   ``unique=True`` + ``Retry``), each pointing at one of the files; ``--duplicates`` of them are
   enqueued a second time right away and again once a quarter of the videos are done.
3. Starts ``--workers`` worker processes (``--worker-kind real`` = ``tagstream worker``, the default;
   ``decode-only`` = the same rq worker with a decode-only pipeline, see ``soak_lib.py``).
4. While videos remain: every ``--kill-every`` seconds (uniform in the range) a random worker among
   those holding jobs is SIGKILLed (the kill waits while none holds any, e.g. all still loading their
   models) and a new one started; at 1/3 and 2/3 of the
   videos Redis is restarted (``--redis-restarts term,kill``: the first a clean shutdown, the second a
   crash, which may lose up to a second of writes under ``everysec``); at half way one worker gets
   SIGTERM and is replaced once it has exited.
5. Afterwards (workers stopped): every distinct video must have exactly one result document
   (``tagstream:tags:{id}``, status ``tagged``), its rq job ``finished``, nothing queued, nothing in
   the intermediate list, nothing ``started``, no failed job and no result for any other id.

Reported: enqueues and refused duplicates, videos tagged/lost/stuck, videos whose result was written
more than once (at-least-once re-runs), retries spent, each orphaned job's recovery time (kill ->
its job picked up again, and kill -> finished) as p50/max, the SIGTERM hand-back, total run time.
``--json PATH`` writes the full report. Exit status 0 only when every invariant holds.

Example (the RELIABILITY.md run)::

    python scripts/chaos.py --videos 1000 --workers 3 --kill-every 10 20
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soak_lib as lib  # noqa: E402

from worker.config import Settings  # noqa: E402
from worker.jobs.enqueue import enqueue_video  # noqa: E402
from worker.tools.local_redis import LocalRedis, free_port  # noqa: E402

log = logging.getLogger("chaos")

REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)


@dataclass
class ChaosConfig:
    videos: int = 1000
    duplicates: int = 100
    files: int = 50
    workers: int = 3
    worker_kind: str = "real"
    concurrency: int = 8
    decode_delay_s: float = 0.0  # decode-only workers: stand-in model time per video
    kill_every_s: tuple[float, float] = (10.0, 20.0)
    max_kills: int = 0  # 0: no limit
    redis_restarts: tuple[str, ...] = ("term", "kill")
    redis_down_s: float = 2.0
    sigterms: int = 1
    heartbeat_interval_s: float = 1.0
    heartbeat_ttl_s: float = 5.0
    maintenance_interval_s: float = 2.0
    shutdown_grace_s: float = 5.0
    job_retries: int = 10
    timeout_s: float = 1800.0
    seed: int = 0
    workdir: Path | None = None
    metrics: bool = False  # give each worker a metrics port


@dataclass
class Orphan:
    job_id: str
    kill: int
    killed_at: float
    victim_execution_ids: set[str]
    picked_up_s: float | None = None
    finished_s: float | None = None


@dataclass
class Run:
    """Mutable state of one chaos run."""

    config: ChaosConfig
    conn: redis.Redis
    server: LocalRedis
    settings: Settings
    log_dir: Path
    video_ids: list[str]
    t0: float = field(default_factory=time.monotonic)
    slots: list[lib.WorkerProc | None] = field(default_factory=list)
    generation: int = 0
    kills: list[dict] = field(default_factory=list)
    orphans: list[Orphan] = field(default_factory=list)
    redis_events: list[dict] = field(default_factory=list)
    sigterm_events: list[dict] = field(default_factory=list)
    unexpected_exits: list[dict] = field(default_factory=list)
    terminating: dict[int, dict] = field(default_factory=dict)
    worker_names: list[str] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.t0


def spawn(run: Run, slot: int) -> lib.WorkerProc:
    run.generation += 1
    name = f"chaos-w{slot}-g{run.generation}"
    port = free_port() if run.config.metrics else 0
    settings = run.settings.model_copy(update={"metrics_port": port})
    worker = lib.spawn_worker(run.config.worker_kind, settings, name, run.log_dir, delay_s=run.config.decode_delay_s)
    run.slots[slot] = worker
    run.worker_names.append(name)
    log.info("%6.1f s  started %s (pid %d)", run.now(), name, worker.pid)
    return worker


def enqueue_all(run: Run, ids: list[str], files: list[Path]) -> tuple[int, int]:
    """Enqueue ``ids`` (retrying while Redis is away); returns (created, refused as duplicates)."""
    created = refused = 0
    for vid in ids:
        uri = str(files[int(vid.rsplit("-", 1)[1]) % len(files)])
        while True:
            try:
                _, new = enqueue_video(run.conn, vid, uri, f"chaos clip {vid}", run.settings)
                break
            except REDIS_ERRORS:
                time.sleep(0.2)
        created += int(new)
        refused += int(not new)
    return created, refused


def _execution_ids(conn: redis.Redis, job_id: str) -> set[str]:
    return {m.decode() for m in conn.zrange(f"rq:executions:{job_id}", 0, -1)}


def kill_one(run: Run, rng: random.Random, *, holders_only: bool) -> bool:
    """SIGKILL a random live worker, one holding jobs if there is one; with ``holders_only`` and
    none holding jobs (all still loading models, say), kill nothing and return False."""
    live = [i for i, w in enumerate(run.slots) if w is not None and w.alive() and i not in run.terminating]
    if not live:
        return False
    try:
        holding = [i for i in live if lib.worker_jobs(run.conn, run.slots[i].name)]
    except REDIS_ERRORS:
        holding = []
    if holders_only and not holding:
        return False
    slot = rng.choice(holding or live)
    victim = run.slots[slot]
    try:
        held = sorted(lib.worker_jobs(run.conn, victim.name))
        executions = {job: _execution_ids(run.conn, job) for job in held}
    except REDIS_ERRORS:
        held, executions = [], {}
    victim.kill()
    at = run.now()
    index = len(run.kills)
    run.kills.append({"at_s": round(at, 1), "worker": victim.name, "jobs_held": len(held),
                      "worker_age_s": round(time.monotonic() - victim.started_at, 1)})  # fmt: skip
    run.orphans += [Orphan(job, index, time.monotonic(), executions.get(job, set())) for job in held]
    log.info("%6.1f s  SIGKILL %s holding %d job(s)", at, victim.name, len(held))
    spawn(run, slot)
    return True


def sigterm_one(run: Run, rng: random.Random) -> None:
    live = [i for i, w in enumerate(run.slots) if w is not None and w.alive() and i not in run.terminating]
    if not live:
        return
    try:
        holding = [i for i in live if lib.worker_jobs(run.conn, run.slots[i].name)]
    except REDIS_ERRORS:
        holding = []
    slot = rng.choice(holding or live)
    worker = run.slots[slot]
    try:
        held = len(lib.worker_jobs(run.conn, worker.name))
    except REDIS_ERRORS:
        held = -1
    worker.term()
    run.terminating[slot] = {"at_s": round(run.now(), 1), "worker": worker.name, "jobs_held": held,
                             "sent": time.monotonic()}  # fmt: skip
    log.info("%6.1f s  SIGTERM %s holding %d job(s)", run.now(), worker.name, held)


def check_terminating(run: Run) -> None:
    for slot, event in list(run.terminating.items()):
        worker = run.slots[slot]
        if worker is None or worker.alive():
            continue
        event = dict(event)
        event["exit_s"] = round(time.monotonic() - event.pop("sent"), 1)
        event["exit_code"] = worker.proc.returncode
        event["handed_back"] = worker.log_count("handed back to")
        run.sigterm_events.append(event)
        del run.terminating[slot]
        log.info("%6.1f s  %s exited %s after %.1f s, handed back %d", run.now(), worker.name,
                 event["exit_code"], event["exit_s"], event["handed_back"])  # fmt: skip
        spawn(run, slot)


def restart_redis(run: Run, mode: str) -> None:
    at = run.now()
    if mode == "kill":
        run.server.stop(kill=True)
    else:
        run.server.stop()
    time.sleep(run.config.redis_down_s)
    run.server.start()
    run.redis_events.append({"at_s": round(at, 1), "mode": mode, "down_s": round(run.now() - at, 1)})
    log.info("%6.1f s  Redis restarted (%s), down %.1f s", at, mode, run.now() - at)


def track_orphans(run: Run) -> None:
    pending = [o for o in run.orphans if o.finished_s is None]
    if not pending:
        return
    with run.conn.pipeline(transaction=False) as pipe:
        for o in pending:
            pipe.hget(f"rq:job:{o.job_id}", "status")
            pipe.zrange(f"rq:executions:{o.job_id}", 0, -1)
        values = pipe.execute()
    now = time.monotonic()
    for i, o in enumerate(pending):
        status = values[2 * i].decode() if values[2 * i] else None
        executions = {m.decode() for m in values[2 * i + 1]}
        if o.picked_up_s is None and (status != "started" or executions - o.victim_execution_ids):
            o.picked_up_s = now - o.killed_at
        if status in ("finished", "failed"):  # failed: the verification reports it
            o.finished_s = now - o.killed_at
            if o.picked_up_s is None:
                o.picked_up_s = o.finished_s


def progress(run: Run) -> float | None:
    try:
        states = lib.job_statuses(run.conn, run.video_ids)
    except REDIS_ERRORS:
        return None
    done = sum(1 for s in states.values() if s in ("finished", "failed"))
    return done / len(run.video_ids)


def drained(run: Run) -> bool:
    try:
        qs = lib.queue_state(run.conn, run.settings.queue)
    except REDIS_ERRORS:
        return False
    return qs["queued"] == 0 and qs["intermediate"] == 0 and qs["started"] == 0


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _stats(values: list[float]) -> dict[str, float | None]:
    p50, mx = lib.percentile(values, 0.5), (max(values) if values else None)
    return {"n": len(values), "p50_s": None if p50 is None else round(p50, 2), "max_s": None if mx is None else round(mx, 2)}


def run_chaos(config: ChaosConfig) -> dict[str, Any]:
    """Run the soak described in the module docstring; returns the report (``report["ok"]``)."""
    t0 = time.monotonic()
    rng = random.Random(config.seed)
    workdir = Path(config.workdir or tempfile.mkdtemp(prefix="tagstream-chaos-"))
    media_dir = workdir / "media"
    t_media = time.monotonic()
    files = lib.make_media(media_dir, config.files)
    log.info("made %d tiny videos in %.1f s", len(files), time.monotonic() - t_media)
    (workdir / "redis").mkdir(parents=True, exist_ok=True)
    server = LocalRedis(appendonly=True, data_dir=workdir / "redis").start()
    conn = redis.Redis.from_url(server.url, socket_timeout=10)
    settings = Settings(
        redis_url=server.url, allowed_roots=[str(media_dir.resolve())], concurrency=config.concurrency,
        heartbeat_interval_s=config.heartbeat_interval_s, heartbeat_ttl_s=config.heartbeat_ttl_s,
        maintenance_interval_s=config.maintenance_interval_s, shutdown_grace_s=config.shutdown_grace_s,
        job_retries=config.job_retries, result_ttl_s=86400, failure_ttl_s=86400, device="cpu", decode_threads=1,
        metrics_port=0, log_level="INFO",
    )  # fmt: skip
    video_ids = [f"chaos-{i:05d}" for i in range(config.videos)]
    dup_ids = rng.sample(video_ids, min(config.duplicates, len(video_ids)))
    run = Run(config, conn, server, settings, workdir / "logs", video_ids, t0=t0, slots=[None] * config.workers)
    report: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}}
    try:
        # Duplicates are interleaved with the originals, right after each.
        dup_set = set(dup_ids)
        order = [v for vid in video_ids for v in ([vid, vid] if vid in dup_set else [vid])]
        created, refused = enqueue_all(run, order, files)
        time.sleep(1.5)  # everything enqueued is on disk (appendfsync everysec) before any crash
        for slot in range(config.workers):
            spawn(run, slot)
        next_kill = run.now() + rng.uniform(*config.kill_every_s)
        restarts = list(config.redis_restarts)
        thresholds = [(i + 1) / (len(restarts) + 1) for i in range(len(restarts))]
        sigterms_left, late_dups_done, late = config.sigterms, False, (0, 0)
        done_at = None
        deadline = time.monotonic() + config.timeout_s
        while time.monotonic() < deadline:
            time.sleep(0.25)
            frac = progress(run)
            try:
                track_orphans(run)
            except REDIS_ERRORS:
                pass
            check_terminating(run)
            for slot, worker in enumerate(run.slots):
                if worker is not None and not worker.alive() and slot not in run.terminating:
                    run.unexpected_exits.append({"at_s": round(run.now(), 1), "worker": worker.name,
                                                 "code": worker.proc.returncode})  # fmt: skip
                    log.warning("%s exited unexpectedly (%s); replacing it", worker.name, worker.proc.returncode)
                    spawn(run, slot)
            if frac is None:
                continue
            if frac >= 1.0 and drained(run) and not run.terminating and all(o.finished_s is not None for o in run.orphans):
                done_at = run.now()
                break
            if frac >= 0.25 and not late_dups_done:
                late = enqueue_all(run, dup_ids, files)
                late_dups_done = True
                log.info("%6.1f s  re-enqueued %d duplicates: %d created, %d refused", run.now(), len(dup_ids), *late)
                time.sleep(1.5)  # durable before the crash restart
            if restarts and frac >= thresholds[len(config.redis_restarts) - len(restarts)] and frac < 1.0:
                restart_redis(run, restarts.pop(0))
                continue
            if sigterms_left and frac >= 0.5 and frac < 1.0 and not run.terminating:
                sigterm_one(run, rng)
                sigterms_left -= 1
            if run.now() >= next_kill and frac < 1.0 and (not config.max_kills or len(run.kills) < config.max_kills):
                # Only a worker holding jobs is killed (one still loading models orphans nothing, and
                # killing those could starve the run); when none holds any, the kill waits.
                if kill_one(run, rng, holders_only=True):
                    next_kill = run.now() + rng.uniform(*config.kill_every_s)
        report["timed_out"] = done_at is None
        report["drain_s"] = None if done_at is None else round(done_at, 1)
        for worker in run.slots:
            if worker is not None:
                worker.term()
        for worker in run.slots:
            if worker is not None and worker.alive():
                try:
                    worker.proc.wait(config.shutdown_grace_s + 30)
                except Exception:
                    worker.kill()
        report["total_s"] = round(run.now(), 1)
        report["verify"] = lib.verify(conn, settings, video_ids, config.job_retries)
        report["enqueue"] = {"calls": len(order) + len(dup_ids), "created": created + late[0],
                             "refused_duplicates": refused + late[1]}  # fmt: skip
        report["kills"] = run.kills
        report["redis_restarts"] = run.redis_events
        report["sigterms"] = run.sigterm_events
        report["unexpected_exits"] = run.unexpected_exits
        report["worker_processes"] = len(run.worker_names)
        report["orphaned_jobs"] = len(run.orphans)
        report["orphan_picked_up"] = _stats([o.picked_up_s for o in run.orphans if o.picked_up_s is not None])
        report["orphan_finished"] = _stats([o.finished_s for o in run.orphans if o.finished_s is not None])
        report["orphans_unrecovered"] = sum(1 for o in run.orphans if o.finished_s is None)
        report["orphans"] = [{"job": o.job_id, "kill": o.kill, "picked_up_s": _round(o.picked_up_s),
                              "finished_s": _round(o.finished_s)} for o in run.orphans]  # fmt: skip
        report["max_retries_spent_by_one_video"] = max(
            (config.job_retries - left for left in lib.retries_left(conn, video_ids).values() if left is not None),
            default=0,
        )
        v = report["verify"]
        report["ok"] = bool(
            v["ok"] and not report["timed_out"] and report["orphans_unrecovered"] == 0
            and report["enqueue"]["created"] == len(video_ids)
            and all(e["exit_code"] == 0 for e in run.sigterm_events)
        )  # fmt: skip
        report["workdir"] = str(workdir)
        return report
    finally:
        for worker in run.slots:
            if worker is not None and worker.alive():
                worker.kill()
        server.stop()


def summary(report: dict[str, Any]) -> str:
    v, c = report["verify"], report["config"]
    lines = [
        f"chaos soak: {'OK' if report['ok'] else 'FAILED'} in {report['total_s']} s "
        f"({c['worker_kind']} workers x{c['workers']}, K={c['concurrency']})",
        f"  videos: {v['distinct_videos']} distinct, {report['enqueue']['calls']} enqueue calls "
        f"({report['enqueue']['refused_duplicates']} refused as duplicates)",
        f"  tagged {v['tagged']}, lost {v['lost']}, failed {v['failed']}, stuck in started {v['stuck_started']}, "
        f"left queued {v['left_in_queue']}, intermediate {v['left_in_intermediate']}, stray results {v['stray_results']}",
        f"  result written more than once: {v['videos_written_more_than_once']} videos "
        f"({v['result_writes']} writes); retried after a crash: {v['videos_retried']} videos "
        f"({v['retries_spent']} retries spent, at most {report['max_retries_spent_by_one_video']} by one video "
        f"of {c['job_retries']})",
        f"  SIGKILLs: {len(report['kills'])} (jobs held: {sum(k['jobs_held'] for k in report['kills'])}); "
        f"Redis restarts: {', '.join(e['mode'] for e in report['redis_restarts']) or 'none'}; "
        f"worker processes started: {report['worker_processes']}",
        f"  orphaned jobs: {report['orphaned_jobs']}; picked up again after kill: p50 "
        f"{report['orphan_picked_up']['p50_s']} s, max {report['orphan_picked_up']['max_s']} s; finished: p50 "
        f"{report['orphan_finished']['p50_s']} s, max {report['orphan_finished']['max_s']} s "
        f"(heartbeat TTL {c['heartbeat_ttl_s']} s, maintenance {c['maintenance_interval_s']} s)",
    ]
    for e in report["sigterms"]:
        lines.append(f"  SIGTERM {e['worker']} holding {e['jobs_held']}: exit {e['exit_code']} after "
                     f"{e['exit_s']} s, handed back {e['handed_back']}")  # fmt: skip
    if report["unexpected_exits"]:
        lines.append(f"  unexpected worker exits: {report['unexpected_exits']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = ChaosConfig()
    p.add_argument("--videos", type=int, default=d.videos)
    p.add_argument("--duplicates", type=int, default=d.duplicates, help="videos enqueued a second (and third) time")
    p.add_argument("--files", type=int, default=d.files, help="distinct tiny video files")
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--worker-kind", choices=lib.WORKER_KINDS, default=d.worker_kind)
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--decode-delay-s", type=float, default=d.decode_delay_s)
    p.add_argument("--kill-every", type=float, nargs=2, default=d.kill_every_s, metavar=("MIN_S", "MAX_S"))
    p.add_argument("--max-kills", type=int, default=d.max_kills, help="stop killing after this many (0: no limit)")
    p.add_argument("--redis-restarts", default=",".join(d.redis_restarts), help="comma list of term|kill ('' = none)")
    p.add_argument("--redis-down-s", type=float, default=d.redis_down_s)
    p.add_argument("--sigterms", type=int, default=d.sigterms)
    p.add_argument("--heartbeat-interval-s", type=float, default=d.heartbeat_interval_s)
    p.add_argument("--heartbeat-ttl-s", type=float, default=d.heartbeat_ttl_s)
    p.add_argument("--maintenance-interval-s", type=float, default=d.maintenance_interval_s)
    p.add_argument("--shutdown-grace-s", type=float, default=d.shutdown_grace_s)
    p.add_argument("--job-retries", type=int, default=d.job_retries)
    p.add_argument("--timeout-s", type=float, default=d.timeout_s)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="write the full report here")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("worker.jobs.enqueue").setLevel(logging.WARNING)  # one line per refused duplicate otherwise
    lib.exit_on_sigterm()
    modes = tuple(m for m in args.redis_restarts.split(",") if m)
    if any(m not in ("term", "kill") for m in modes):
        p.error("--redis-restarts takes term and kill")
    config = ChaosConfig(
        videos=args.videos, duplicates=args.duplicates, files=args.files, workers=args.workers,
        worker_kind=args.worker_kind, concurrency=args.concurrency, decode_delay_s=args.decode_delay_s,
        kill_every_s=tuple(args.kill_every), max_kills=args.max_kills, redis_restarts=modes, redis_down_s=args.redis_down_s,
        sigterms=args.sigterms, heartbeat_interval_s=args.heartbeat_interval_s, heartbeat_ttl_s=args.heartbeat_ttl_s,
        maintenance_interval_s=args.maintenance_interval_s, shutdown_grace_s=args.shutdown_grace_s,
        job_retries=args.job_retries, timeout_s=args.timeout_s, seed=args.seed, workdir=args.workdir,
    )  # fmt: skip
    return lib.report_and_exit_status(run_chaos(config), args.json, summary)


if __name__ == "__main__":
    sys.exit(main())
