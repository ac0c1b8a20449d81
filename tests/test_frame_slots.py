"""Frames from decoder processes through shared memory (worker/media/frame_slots.py, worker/media/isolation.py):
the same frames as the socket and in the thread, slots that come back when the last view of their frames is
gone and are reused, the socket when none is free or a chunk does not fit, a child that names a slot it was
not offered is a protocol error, and frames held from a child that died stay intact."""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import asdict

import numpy as np
import pytest
from media import make_video

from worker.config import Settings
from worker.errors import DecoderCrashError
from worker.media import isolation
from worker.media.frame_slots import DEFAULT_SLOTS
from worker.media.isolation import DecodePool, DecoderProcess
from worker.media.records import DecodeLimits, FrameChunk, MediaInfo
from worker.media.sampling import SamplingPolicy
from worker.media.source import VideoSource

LIMITS = DecodeLimits(max_duration_s=3600, max_pixels=4096 * 2304, max_file_bytes=1 << 30, open_timeout_s=5,
                      read_timeout_s=5, decode_budget_s=60)  # fmt: skip
POLICY = SamplingPolicy(fps=5.0, max_frames=300)
K = DEFAULT_SLOTS


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("slots")
    return {
        "av": make_video(d / "av.mp4", seconds=3.0, fps=10, audio="aac"),  # 15 samples
        "long": make_video(d / "long.mp4", seconds=60.0, fps=10, size=(96, 64)),  # 300 samples, 19 chunks of 16
    }


@pytest.fixture(scope="module")
def reference(clips):
    """``{name: (timestamps, frames)}`` decoded in the thread."""
    out = {}
    for name, path in clips.items():
        with VideoSource(str(path), POLICY, LIMITS, decode_audio=False) as src:
            chunks = [c for c in src.chunks() if isinstance(c, FrameChunk)]
        out[name] = (np.concatenate([c.timestamps for c in chunks]), np.concatenate([c.frames for c in chunks]))
    return out


def drain(source, check=lambda: None) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps and frames of ``source``, each chunk copied out and dropped (as the engine's batcher does)."""
    times, frames = [], []
    with source:
        for chunk in source.chunks():
            check()
            if isinstance(chunk, FrameChunk):
                times.append(chunk.timestamps)
                frames.append(chunk.frames.copy())
    return np.concatenate(times), np.concatenate(frames)


def test_frames_through_slots_are_the_frames_through_the_socket(clips, reference):
    uri, (t_ref, f_ref) = str(clips["av"]), reference["av"]
    shared, plain = DecodePool(1), DecodePool(1, frame_slots=0)
    try:
        t1, f1 = drain(shared.source(uri, POLICY, LIMITS, chunk_frames=4))
        t2, f2 = drain(plain.source(uri, POLICY, LIMITS, chunk_frames=4))
        assert (shared.slot_chunks, shared.socket_chunks) == (4, 0)
        assert (plain.slot_chunks, plain.socket_chunks) == (0, 4)
    finally:
        shared.close()
        plain.close()
    assert len(t_ref) == 15
    assert np.array_equal(t1, t_ref) and np.array_equal(t2, t_ref)
    assert np.array_equal(f1, f_ref) and np.array_equal(f2, f_ref)


def test_slots_are_reused_and_all_come_back(clips, reference):
    pool = DecodePool(1)
    try:
        (pid,) = pool.pids()
        seen: list[int] = []

        def check() -> None:
            seen.append(pool.free_slots()[pid])

        for name in ("av", "long", "av", "long"):
            t, f = drain(pool.source(str(clips[name]), POLICY, LIMITS), check)
            assert np.array_equal(t, reference[name][0]) and np.array_equal(f, reference[name][1]), name
            assert pool.free_slots() == {pid: K}
        assert (pool.slot_chunks, pool.socket_chunks) == (1 + 19 + 1 + 19, 0)
        assert max(seen) <= K and min(seen) == K - 1  # only the chunk in hand holds a slot
    finally:
        pool.close()


def test_a_consumer_that_keeps_every_chunk_gets_the_rest_on_the_socket(clips, reference):
    pool = DecodePool(1)
    try:
        (pid,) = pool.pids()
        with pool.source(str(clips["long"]), POLICY, LIMITS, decode_audio=False) as source:
            chunks = list(source.chunks())
        assert (pool.slot_chunks, pool.socket_chunks) == (K, 19 - K)
        assert pool.free_slots() == {pid: 0}
        assert np.array_equal(np.concatenate([c.frames for c in chunks]), reference["long"][1])
        del chunks
        assert pool.free_slots() == {pid: K}
    finally:
        pool.close()


def test_a_slot_is_lent_while_any_view_of_its_frames_lives(clips, reference):
    """Only slices of each chunk's frames are kept, the chunks themselves are dropped: the slots stay lent
    (the rest of the video comes on the socket) and the slices are never overwritten."""
    pool = DecodePool(1)
    try:
        (pid,) = pool.pids()
        kept = []
        with pool.source(str(clips["long"]), POLICY, LIMITS, decode_audio=False) as source:
            for chunk in source.chunks():
                kept.append(chunk.frames[3:5].reshape(-1)[::7])
        assert (pool.slot_chunks, pool.socket_chunks) == (K, 19 - K)
        ref = reference["long"][1]
        for i, piece in enumerate(kept):
            assert np.array_equal(piece, ref[16 * i + 3 : 16 * i + 5].reshape(-1)[::7]), i
        del kept, chunk
        assert pool.free_slots() == {pid: K}
    finally:
        pool.close()


def test_a_chunk_that_does_not_fit_its_slot_comes_on_the_socket(clips, reference):
    pool = DecodePool(1, slot_bytes=3 * 224 * 224 * 3)
    try:
        t, f = drain(pool.source(str(clips["av"]), POLICY, LIMITS, chunk_frames=4))  # 4 + 4 + 4 + 3 frames
        assert (pool.slot_chunks, pool.socket_chunks) == (1, 3)
        assert np.array_equal(t, reference["av"][0]) and np.array_equal(f, reference["av"][1])
        assert list(pool.free_slots().values()) == [K]  # the slots offered for the large chunks came back
    finally:
        pool.close()


def test_frames_held_from_a_killed_decoder_stay_intact(clips, reference):
    pool = DecodePool(1)
    try:
        uri = str(clips["long"])
        source = pool.source(uri, POLICY, LIMITS, decode_audio=False)
        chunks = source.chunks()
        held = [next(chunks), next(chunks)]
        pid = pool.active()[uri]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(DecoderCrashError) as info:
            for _ in chunks:
                pass
        assert info.value.detail["signal"] == "SIGKILL" and pool.crashes == 1
        (new_pid,) = pool.pids()
        assert new_pid != pid
        t, f = drain(pool.source(uri, POLICY, LIMITS, decode_audio=False))  # the replacement, its own slots
        assert np.array_equal(f, reference["long"][1]) and pool.slot_chunks == 2 + 19
        assert np.array_equal(np.concatenate([c.frames for c in held]), reference["long"][1][:32])
        assert pool.free_slots() == {new_pid: K}
    finally:
        pool.close()


def test_slots_fit_under_the_default_address_space_limit(clips, reference):
    settings = Settings(metrics_port=0)
    assert settings.decode_memory_limit_mb > 0
    pool = DecodePool.from_settings(settings, 1)
    try:
        assert pool.memory_limit_mb == settings.decode_memory_limit_mb
        t, f = drain(pool.source(str(clips["av"]), POLICY, LIMITS))
        assert np.array_equal(f, reference["av"][1]) and pool.slot_chunks == 1 and pool.crashes == 0
    finally:
        pool.close()


# --- a child that misuses the slots ------------------------------------------------------------------------
#: A decoder child speaking the protocol with a real region: per ``next`` it writes two frames of 0..255 into
#: a slot and answers ``frames`` naming the slot ``argv[2]`` says: the offered one ("offered"), the next one
#: ("other"), one past the last ("outside"), the offered one as a float ("float") or as true ("bool"), none
#: ("missing"), or the offered one with more frames than a slot holds ("overflow") or with timestamps that are
#: pairs ("ts-pairs") or text ("ts-text"). Then it waits.
FAKE_CHILD = """
import json, mmap, socket, sys
import numpy as np
from worker.media.wire import recv_header, send
sock = socket.socket(fileno=int(sys.argv[1]))
mode, info = sys.argv[2], json.loads(sys.argv[3])
fd, count, size = (int(v) for v in sys.argv[5::2])
region = mmap.mmap(fd, count * size)
send(sock, {"t": "ready", "pid": 0})
recv_header(sock)
send(sock, {"t": "open", "info": info})
try:
    while True:
        offered = recv_header(sock)["slot"]
        n = size // (8 * 8 * 3) + 1 if mode == "overflow" else 2
        slot = {"offered": offered, "overflow": offered, "other": (offered + 1) % count, "outside": count,
                "float": float(offered), "bool": True, "missing": None}.get(mode, offered)
        if mode == "offered":
            region[offered * size : offered * size + n * 192] = bytes(range(192)) * n
        ts = [[0.5 * i] * 2 if mode == "ts-pairs" else "soon" if mode == "ts-text" else 0.5 * i for i in range(n)]
        header = {"t": "frames", "n": n, "ts": ts}
        send(sock, header if slot is None else {**header, "slot": slot})
except (EOFError, OSError):
    pass
"""
INFO = MediaInfo(container="mp4", video_codec="h264", audio_codec=None, duration_s=2.0, width=64, height=64,
                 rotation=0, avg_fps=10.0, has_audio=False, audio_sample_rate=None, audio_channels=None,
                 keyframe_interval_s=1.0, size_bytes=1000)  # fmt: skip


def fake_pool(monkeypatch, mode: str) -> DecodePool:
    class FakeDecoder(DecoderProcess):
        def command(self, fd: int, memory_limit_mb: int) -> list[str]:
            return [sys.executable, "-c", FAKE_CHILD, str(fd), mode, json.dumps(asdict(INFO)), *self.slots.child_args()]

    monkeypatch.setattr(isolation, "DecoderProcess", FakeDecoder)
    return DecodePool(1, prestart=False, slot_bytes=4 * 8 * 8 * 3)


def test_frames_in_the_offered_slot_are_received(monkeypatch):
    pool = fake_pool(monkeypatch, "offered")
    try:
        chunks = pool.source("fake.mp4", POLICY, LIMITS, crop_size=8).chunks()
        first, second = next(chunks), next(chunks)
        assert first.frames.shape == (2, 8, 8, 3) and np.array_equal(first.timestamps, [0.0, 0.5])
        pattern = np.tile(np.arange(192, dtype=np.uint8), 2).reshape(2, 8, 8, 3)
        assert np.array_equal(first.frames, pattern) and np.array_equal(second.frames, pattern)
        assert pool.slot_chunks == 2 and pool.socket_chunks == 0
        chunks.close()
    finally:
        pool.close()


@pytest.mark.parametrize("mode", ["other", "outside", "float", "bool", "missing", "overflow", "ts-pairs", "ts-text"])
def test_frames_anywhere_but_the_offered_slot_are_a_protocol_error(monkeypatch, mode):
    pool = fake_pool(monkeypatch, mode)
    try:
        source = pool.source("fake.mp4", POLICY, LIMITS, crop_size=8)
        with pytest.raises(DecoderCrashError) as info:
            list(source.chunks())
        assert "broke the protocol" in str(info.value) and info.value.detail["uri"] == "fake.mp4"
        assert pool.active() == {} and pool.slot_chunks == 0
    finally:
        pool.close()
