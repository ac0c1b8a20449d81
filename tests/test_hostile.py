"""Hostile and broken input (tests/hostile.py): every case refused with its reason within its budget,
through the worker's own path (URI policy, then the decoder, isolated or not); and the real worker keeps
tagging good videos enqueued among all of them."""

from __future__ import annotations

import json
import time

import pytest
import redis
from hostile import LIMITS, HostileServer, budget_s, build_corpus, good_inputs, server_files

from worker.config import Settings
from worker.errors import reason_of
from worker.jobs.task import TagArgs, resolve_uri
from worker.media.isolation import DecodePool
from worker.media.open import OpenPolicy, set_thread_policy
from worker.media.records import DecodeLimits
from worker.media.sampling import SamplingPolicy

#: Allowance on top of a case's budget for a loaded CI machine; a hang would blow far past it.
SLACK_S = 15.0

REQUIRED = {
    "zero_bytes", "random_bytes", "truncated", "corrupt_moov", "text", "png", "audio_only", "hls", "ffconcat",
    "oversize_pixels", "aspect_wide", "aspect_tall", "zero_dimensions", "huge_duration", "subtitle_only",
    "billions_of_frames_avi", "nested_playlist", "data_uri", "concat_uri", "symlink_escape",
    "redirect_to_disallowed_host", "slow_loris_headers", "slow_loris_body", "endless_garbage", "endless_stream",
}  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    with HostileServer(server_files(root)) as server:
        cases = build_corpus(root, server.base)
        goods = good_inputs(root, server.base)
        settings = Settings(allowed_roots=[str(root / "media")], allowed_hosts=["127.0.0.1"], hwaccel="none",
                            device="cpu", **LIMITS)
        yield server, cases, goods, settings


def decode_all(uri: str, settings: Settings, pool: DecodePool | None) -> int:
    """What a worker does with one job's URI: policy check, open, decode every chunk. Returns frames."""
    from worker.media.records import FrameChunk
    from worker.media.source import VideoSource

    resolved = resolve_uri(TagArgs("v", uri, ""), settings)
    policy, limits = SamplingPolicy(fps=settings.fps, max_frames=settings.max_frames), DecodeLimits.from_settings(settings)
    source = pool.source(resolved, policy, limits) if pool else VideoSource(resolved, policy, limits)
    with source:
        return sum(len(c.frames) for c in source.chunks() if isinstance(c, FrameChunk))


def test_corpus_is_large_and_covers_the_issue_list(world):
    _, cases, _, _ = world
    kinds = {c.kind for c in cases}
    assert len(cases) >= 30 and len(kinds) == len(cases)
    assert REQUIRED <= kinds, REQUIRED - kinds
    assert {c.reason for c in cases} == {"decode_error", "unsupported_media", "forbidden_media", "forbidden_uri",
                                        "too_large", "too_long", "not_found", "timeout"}


@pytest.mark.parametrize("isolated", [True, False], ids=["isolated", "in_process"])
def test_each_case_is_refused_with_its_reason_within_its_budget(world, isolated):
    server, cases, goods, settings = world
    pool = DecodePool.from_settings(settings, 1) if isolated else None
    set_thread_policy(OpenPolicy.from_settings(settings))
    before = server.hits
    wrong, slow = [], []
    try:
        for case in cases:
            t0 = time.monotonic()
            try:
                decode_all(case.uri, settings, pool)
                got = "tagged"
            except Exception as exc:  # noqa: BLE001 - the reason is what is checked
                got = reason_of(exc)
            elapsed = time.monotonic() - t0
            if got != case.reason:
                wrong.append((case.kind, case.reason, got))
            if elapsed > budget_s(case) + SLACK_S:
                slow.append((case.kind, round(elapsed, 1), budget_s(case)))
        frames = {name: decode_all(uri, settings, pool) for name, uri in goods.items()}
    finally:
        set_thread_policy(None)
        if pool is not None:
            pool.close()
    assert not wrong, wrong
    assert not slow, slow
    assert all(n == 2 for n in frames.values()), frames  # the decoder still works after all of it
    assert server.hits.get("/secret-target", 0) == 0  # the disallowed redirect target was never asked
    # each hop: the refused FFmpeg request and one redirect probe; the loop stops after max_redirects hops
    loop = server.hits["/redirect-loop"] - before.get("/redirect-loop", 0)
    assert loop == 2 * (LIMITS["max_redirects"] + 1)
    if pool is not None:
        assert pool.crashes == 0


def test_worker_keeps_tagging_good_videos_among_hostile_ones(world, redis_url):
    """The real rq worker and pipeline (isolation on, the default) with every hostile case and five good
    videos (three local files, a URL and a URL that redirects within the allowed host) in one queue."""
    from worker_support import shared_models, statuses

    from worker.engine.pipeline import Pipeline
    from worker.jobs.enqueue import submit
    from worker.jobs.worker import TagWorker
    from worker.keys import result_key

    server, cases, goods, base = world
    settings = base.model_copy(update={
        "redis_url": redis_url, "concurrency": 8, "decode_threads": 2, "metrics_port": 0, "job_retries": 0,
        "heartbeat_interval_s": 0.5, "heartbeat_ttl_s": 10, "maintenance_interval_s": 2,
    })  # fmt: skip
    assert settings.decode_isolation
    conn = redis.Redis.from_url(redis_url)
    models = shared_models()
    jobs = {c.kind: c.uri for c in cases} | goods
    for i, (name, uri) in enumerate(jobs.items()):  # good videos spread through the queue
        submit(conn, name, uri, f"video {i}", settings)
    pipeline = Pipeline(settings, models)
    pipeline.start()
    try:
        TagWorker(settings, conn, pipeline, model_version=models.model_version).work(burst=True)
        crashes = pipeline._decode_pool.crashes
    finally:
        pipeline.stop(timeout=10)
    names = list(jobs)
    got = dict(zip(names, statuses(conn, names), strict=True))
    for name in goods:
        assert got[name] == "finished", (name, got[name])
        doc = json.loads(conn.get(result_key(name)))
        assert doc["status"] == "tagged" and doc["media"]["frames"] == 2
    wrong = {}
    for case in cases:
        doc = json.loads(conn.get(result_key(case.kind)))
        if got[case.kind] != "failed" or doc["status"] != "failed" or doc["reason"] != case.reason:
            wrong[case.kind] = (case.reason, got[case.kind], doc.get("reason"))
    assert not wrong, wrong
    assert crashes == 0
    assert server.hits.get("/secret-target", 0) == 0
