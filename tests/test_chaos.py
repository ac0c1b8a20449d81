"""CI-sized chaos soak (``scripts/chaos.py``): real redis-server with AOF, 3 worker processes, SIGKILLs,
a SIGTERM, a clean Redis restart and a Redis crash, then the invariants.

The workers are ``decode-only`` (see ``scripts/soak_lib.py``): the production rq worker, result sink
and decoder, without the models, so a killed worker is replaced within about a second; the full-size
run with ``tagstream worker`` processes is recorded in RELIABILITY.md. No timing is asserted.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from chaos import ChaosConfig, run_chaos, summary  # noqa: E402


def test_chaos_soak_loses_nothing_and_leaves_nothing_started(tmp_path):
    config = ChaosConfig(
        videos=80, duplicates=10, files=6, workers=3, worker_kind="decode-only", concurrency=2,
        decode_delay_s=0.5, kill_every_s=(3.0, 5.0), max_kills=2, redis_restarts=("term", "kill"),
        redis_down_s=0.5, sigterms=1, heartbeat_interval_s=0.5, heartbeat_ttl_s=2.0, maintenance_interval_s=1.0,
        shutdown_grace_s=1.0, job_retries=10, timeout_s=150, workdir=tmp_path,
    )  # fmt: skip
    report = run_chaos(config)
    print(summary(report))
    v = report["verify"]
    assert not report["timed_out"], report
    # every distinct video: exactly one tagged result, its job finished; nothing lost, stuck or stray
    assert v["tagged"] == v["distinct_videos"] == 80, v
    assert v["lost"] == 0 and v["failed"] == 0 and v["jobs_not_finished"] == {}, v
    assert v["stuck_started"] == 0 and v["left_in_queue"] == 0 and v["left_in_intermediate"] == 0, v
    assert v["failed_registry"] == 0 and v["stray_results"] == 0 and v["result_keys"] == 80, v
    assert v["videos_without_event"] == 0, v
    # duplicates were refused, never became second jobs
    assert report["enqueue"] == {"calls": 100, "created": 80, "refused_duplicates": 20}
    # the faults really happened, and every orphaned job was recovered
    assert len(report["kills"]) == 2 and report["orphaned_jobs"] >= 1, report["kills"]
    assert report["orphans_unrecovered"] == 0
    assert [e["mode"] for e in report["redis_restarts"]] == ["term", "kill"]
    assert len(report["sigterms"]) == 1 and report["sigterms"][0]["exit_code"] == 0, report["sigterms"]
    assert report["unexpected_exits"] == []
    assert report["ok"]


def test_redis_outage_longer_than_heartbeat_ttl_reruns_nothing(tmp_path):
    """Redis away for twice the heartbeat TTL while 4 jobs are in flight on 2 worker processes: both
    stay up and report it (redis_up 0, not ready, error counter), every job completes once (nobody's
    maintenance mistakes the other's lapsed heartbeats for a dead worker), nothing is lost."""
    from redis_outage import parser, run_outage, summary

    args = parser().parse_args([
        "--videos", "4", "--files", "2", "--workers", "2", "--worker-kind", "decode-only", "--concurrency", "2",
        "--decode-delay-s", "18", "--at", "0", "--in-flight", "4", "--outage-s", "10", "--heartbeat-interval-s", "5",
        "--heartbeat-ttl-s", "6", "--maintenance-interval-s", "1", "--timeout-s", "120", "--workdir", str(tmp_path),
    ])  # fmt: skip
    report = run_outage(args)
    print(summary(report))
    d, v = report["during"], report["verify"]
    assert report["in_flight_at_outage"] == 4
    assert d["all_workers_alive"] and report["workers_alive_after"], report
    assert d["redis_up_at_end"] == [0.0, 0.0] and d["ready_at_end"] == [False, False], d
    assert all(e > 0 for e in d["redis_errors_at_end"]), d
    assert report["redis_up_after"] == [1.0, 1.0]
    assert v["tagged"] == 4 and v["lost"] == 0 and v["stuck_started"] == 0 and v["ok"], v
    assert v["videos_written_more_than_once"] == 0 and v["retries_spent"] == 0, v
    assert report["worker_exit_codes"] == [0, 0]
    assert report["ok"]
