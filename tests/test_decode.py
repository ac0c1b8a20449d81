"""VideoSource on real encoded media: which frames are sampled, timestamps, audio, limits, errors."""

from __future__ import annotations

import numpy as np
import pytest
from media import bad_inputs, frame_index_of, make_audio, make_video, oversize_video

from worker.errors import MediaTimeoutError, TagstreamError, TooLargeError, TooLongError
from worker.media.records import AudioChunk, DecodeLimits, FrameChunk
from worker.media.sampling import Layout, SamplingPolicy, plan_strategy
from worker.media.source import VideoSource

LIMITS = DecodeLimits(max_duration_s=3600, max_pixels=4096 * 2304, max_file_bytes=1 << 33,
                      open_timeout_s=5, read_timeout_s=5, decode_budget_s=60)


def decode_all(path, policy=None, limits=LIMITS, **kw):
    policy = policy or SamplingPolicy()
    frames, times, audio = [], [], []
    with VideoSource(str(path), policy, limits, **kw) as src:
        for chunk in src.chunks():
            if isinstance(chunk, FrameChunk):
                assert chunk.frames.dtype == np.uint8 and chunk.frames.shape[1:] == (224, 224, 3)
                assert chunk.timestamps.dtype == np.float64 and len(chunk.timestamps) == len(chunk.frames)
                frames.extend(chunk.frames)
                times.extend(chunk.timestamps)
            else:
                assert isinstance(chunk, AudioChunk)
                audio.append(chunk)
        return src, np.array(times), frames, audio


def check_samples(src, times, frames, fps_video, policy):
    targets = policy.target_times(src.info.duration_s)
    tol = policy.tolerance_s(src.info.duration_s)
    assert len(times) == len(targets)
    assert np.all(np.abs(times - targets) <= tol + 1e-6), (times, targets)
    for t, f in zip(times, frames, strict=True):
        # the content is the frame shown at the reported timestamp
        assert frame_index_of(f) == round(t * fps_video) % 256, (t, frame_index_of(f))


@pytest.mark.parametrize("gop,fps_s,expected", [(25, 1.0, "keyframes"), (250, 1.0, None), (5, 2.0, None)])
def test_samples_are_right_frames_for_each_gop(tmp_path, gop, fps_s, expected):
    path = make_video(tmp_path / "v.mp4", seconds=4, fps=25, gop=gop)
    policy = SamplingPolicy(fps=fps_s)
    src, times, frames, _ = decode_all(path, policy)
    check_samples(src, times, frames, 25, policy)
    if expected:
        assert src.stats.strategy == expected
    assert src.stats.frames_decoded <= 100


def test_one_second_gop_decodes_few_frames(tmp_path):
    path = make_video(tmp_path / "v.mp4", seconds=6, fps=25, gop=25)
    src, times, frames, _ = decode_all(path, SamplingPolicy(fps=1.0), decode_audio=False)
    assert src.stats.strategy == "keyframes"
    assert src.stats.frames_decoded <= 7  # vs 150 frames in the file


def test_long_gop_sparse_targets_uses_seek(tmp_path):
    # keyframes every 2 s, 1 sample every 4 s: seek to each keyframe and decode 0.5 s forward
    path = make_video(tmp_path / "v.mp4", seconds=16, fps=10, gop=20)
    policy = SamplingPolicy(fps=0.25)
    src, times, frames, _ = decode_all(path, policy, decode_audio=False)
    check_samples(src, times, frames, 10, policy)
    assert src.stats.strategy in ("seek", "keyframes")
    assert src.stats.frames_decoded < 160 / 2


def test_uniform_sampling_past_max_frames(tmp_path):
    path = make_video(tmp_path / "v.mkv", seconds=6, fps=20, gop=20)
    policy = SamplingPolicy(fps=10.0, max_frames=12)
    targets = policy.target_times(6.0)
    assert len(targets) == 12 and np.allclose(np.diff(targets), 0.5) and targets[0] == pytest.approx(0.25)
    src, times, frames, _ = decode_all(path, policy)
    check_samples(src, times, frames, 20, policy)


def test_target_times_edge_cases():
    p = SamplingPolicy(fps=1.0, max_frames=300)
    assert np.allclose(p.target_times(2.5), [0.5, 1.5, 2.25])
    assert np.allclose(p.target_times(0.2), [0.1])
    assert len(p.target_times(3600)) == 300 and p.interval_s(3600) == pytest.approx(12.0)


def test_plan_prefers_sequential_for_long_gop():
    frames = np.arange(250) / 25
    targets = SamplingPolicy().target_times(10.0)
    plan = plan_strategy(Layout.from_times(frames, [0.0]), targets, 0.5, codec="h264", stream_fps=25)
    assert plan.strategy == "sequential_nonref" and plan.skip_frame == "NONREF"
    assert plan.costs["seek_nonref"] <= 250 and plan.costs["sequential_nonref"] < plan.costs["seek_nonref"]
    # dense keyframes: keyframe-only, one keyframe packet per target and nothing else
    plan = plan_strategy(Layout.from_times(frames, np.arange(10.0)), targets, 0.5)
    assert plan.strategy == "keyframes" and plan.send.sum() == 10 and plan.detail["seeks"] == 0
    assert np.allclose(plan.aims, np.arange(10.0))
    # keyframes every 0.5 s: only every other keyframe is decoded
    plan = plan_strategy(Layout.from_times(frames, np.arange(20) / 2), targets, 0.5)
    assert plan.strategy == "keyframes" and plan.send.sum() == 10


def test_plan_keyframe_or_nearest_frame_per_target():
    # 2 s GOP, 1 sample/s: odd targets take the next keyframe (0.5 s away), even ones the nearest frame
    frames = np.arange(250) / 25
    targets = SamplingPolicy().target_times(10.0)
    plan = plan_strategy(Layout.from_times(frames, np.arange(0, 10, 2.0)), targets, 0.5, codec="h264",
                         stream_fps=25)
    assert plan.strategy == "seek_nonref" and plan.skip_frame == "NONREF"
    assert np.all(np.abs(plan.aims - targets) <= 0.5) and np.all(np.diff(plan.aims) > 0)
    assert plan.send.sum() < 250 / 3 and plan.costs["seek_nonref"] < plan.costs["sequential_nonref"]
    # sparse samples on a long video: far-apart runs are reached by seeking
    # (keyframes every 40 s, a sample every 30 s: most targets take a keyframe, every 4th one a frame 15 s
    # into a GOP)
    frames = np.arange(25 * 600) / 25
    targets = SamplingPolicy(fps=1 / 30).target_times(600.0)
    plan = plan_strategy(Layout.from_times(frames, np.arange(0, 600, 40.0)), targets, 15.0)
    assert plan.strategy == "seek" and plan.detail["seeks"] >= 10 and plan.send.sum() < 25 * 600 / 6
    assert np.all(np.abs(plan.aims - targets) <= 15.0) and np.all(np.diff(plan.aims) > 0)


def test_plan_drops_leading_pictures_after_a_gap():
    # open GOP with reordering: decode order I0 P3 B1 B2 | I6 B4 B5 P9 B7 B8 ... (B4, B5 lead I6)
    times = np.array([0, 3, 1, 2, 6, 4, 5, 9, 7, 8, 12, 10, 11], float)
    keys = np.zeros(len(times), bool)
    keys[[0, 4, 10]] = True
    plan = plan_strategy(Layout(times, keys), np.array([0.4, 7.0]), 0.5, force="seek")
    assert list(np.flatnonzero(plan.send)) == [0, 4, 7, 8]  # I6 P9 B7 without B4, B5
    assert np.allclose(plan.aims, [0.0, 7.0])
    # a target on a leading picture needs the GOP before it
    plan = plan_strategy(Layout(times, keys), np.array([5.0]), 0.3, force="seek")
    assert list(np.flatnonzero(plan.send)) == [0, 1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("codec,suffix,threads", [("libx264", "mp4", 1), ("libx264", "mkv", 2),
                                                   ("libx265", "mp4", 1), ("libvpx-vp9", "webm", 1)])
def test_two_second_gop_samples_right_frames(tmp_path, codec, suffix, threads):
    # B-frames (x264 veryfast: 3, pyramid), open GOP (x265 default), VP9 alt-ref: the seek plan's frames
    opts = {"preset": "veryfast"} if codec == "libx264" else None
    path = make_video(tmp_path / f"v.{suffix}", seconds=8, fps=25, gop=50, codec=codec, options=opts)
    policy = SamplingPolicy(fps=1.0)
    src, times, frames, _ = decode_all(path, policy, decode_audio=False, codec_threads=threads)
    check_samples(src, times, frames, 25, policy)
    assert src.stats.strategy == ("seek" if codec == "libvpx-vp9" else "seek_nonref") and src.stats.fallbacks == 0
    assert len(set(np.round(times, 3))) == len(times)  # every sample its own frame
    assert src.stats.frames_decoded <= 200 / 3


def test_nonref_fallback_when_references_are_too_far_apart(tmp_path):
    # 16 non-reference B-frames in a row, 5 samples/s (0.1 s tolerance): NONREF leaves gaps of 17 frames,
    # so the decoder must notice the miss and decode the rest without skipping
    params = "keyint=250:min-keyint=250:scenecut=0:bframes=16:b-adapt=0:b-pyramid=none"
    path = make_video(tmp_path / "b16.mp4", seconds=4, fps=25, gop=250, options={"x264-params": params})
    policy = SamplingPolicy(fps=5.0)
    src, times, frames, _ = decode_all(path, policy, decode_audio=False, strategy="sequential_nonref")
    assert src.stats.fallbacks == 1
    check_samples(src, times, frames, 25, policy)


def test_nonref_only_when_tolerance_spans_many_frames(tmp_path):
    targets = SamplingPolicy(fps=0.5).target_times(20.0)
    assert plan_strategy(None, targets, 1.0, codec="h264", stream_fps=25).strategy == "sequential_nonref"
    assert plan_strategy(None, targets, 0.2, codec="h264", stream_fps=25).strategy == "sequential"
    assert plan_strategy(None, targets, 1.0, codec="mjpeg", stream_fps=25).strategy == "sequential"
    # real B-frame video decoded with NONREF still meets the tolerance
    path = make_video(tmp_path / "b.mkv", seconds=8, fps=25, gop=250, bframes=3,
                      options={"preset": "fast"})
    policy = SamplingPolicy(fps=0.5)
    src, times, frames, _ = decode_all(path, policy, decode_audio=False)
    # one GOP: the samples are the first anchors of their bins, B-frames skipped on the way
    assert src.stats.strategy == "seek_nonref" and src.stats.fallbacks == 0
    assert src.stats.frames_decoded < 190 / 2  # non-reference B-frames were skipped
    targets = policy.target_times(src.info.duration_s)
    assert np.all(np.abs(times - targets) <= policy.tolerance_s(src.info.duration_s))
    for t, f in zip(times, frames, strict=True):
        assert frame_index_of(f) == round(t * 25)


def test_audio_length_and_format(tmp_path):
    path = make_video(tmp_path / "a.mp4", seconds=3, fps=10, audio="aac", audio_rate=8000, audio_layout="mono")
    src, times, frames, audio = decode_all(path, audio_chunk_s=1.0)
    samples = np.concatenate([a.samples for a in audio])
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(samples.size / 16000 - 3.0) < 0.1
    assert np.abs(samples).max() <= 1.0 and np.abs(samples).max() > 0.2  # the 0.3-amplitude tone
    starts = [a.start_s for a in audio]
    assert starts == pytest.approx([i * 1.0 for i in range(len(audio))])  # contiguous 1 s chunks
    assert src.stats.audio_seconds == pytest.approx(samples.size / 16000)
    # 440 Hz tone survives resampling to 16 kHz
    spectrum = np.abs(np.fft.rfft(samples[4000:20000]))
    assert abs(np.argmax(spectrum) * 16000 / 16000 - 440) < 5


def test_surround_audio_downmixed(tmp_path):
    path = make_video(tmp_path / "s.mp4", seconds=2, fps=10, audio="aac", audio_layout="5.1")
    src, _, _, audio = decode_all(path)
    assert src.info.audio_channels == 6
    assert abs(sum(a.samples.size for a in audio) / 16000 - 2.0) < 0.1


def test_no_audio_gives_no_audio_chunks(tmp_path):
    src, times, frames, audio = decode_all(make_video(tmp_path / "n.mp4", seconds=2))
    assert audio == [] and not src.info.has_audio and src.stats.audio_seconds == 0


def test_rotation_is_honoured(tmp_path):
    path = make_video(tmp_path / "r.mp4", seconds=1, fps=10, size=(160, 96), rotate=90, pattern="orient")
    src, times, frames, _ = decode_all(path)
    assert src.info.rotation == 90 and (src.info.width, src.info.height) == (96, 160)
    f = frames[0].astype(int)
    # the band along the coded top edge is on the left after a 90 degree counter-clockwise rotation
    assert f[:, :5].mean() > 240 and f[:, -5:].mean() < 200 and f[:5].mean() < 240
    plain = make_video(tmp_path / "p.mp4", seconds=1, fps=10, size=(160, 96), pattern="orient")
    _, _, frames, _ = decode_all(plain)
    assert frames[0][:3].mean() > 240 and frames[0][:, :5].mean() < 240


def test_vfr_timestamps(tmp_path):
    path = make_video(tmp_path / "vfr.mkv", seconds=4, fps=10, vfr=True)
    policy = SamplingPolicy(fps=2.0)
    src, times, frames, _ = decode_all(path, policy)
    targets = policy.target_times(src.info.duration_s)
    assert np.all(np.abs(times - targets) <= policy.tolerance_s(src.info.duration_s))
    # frame i sits at (i // 2) * 0.2 + (i % 2) * 0.05
    for t, f in zip(times, frames, strict=True):
        i = frame_index_of(f)
        assert (i // 2) * 0.2 + (i % 2) * 0.05 == pytest.approx(t, abs=1e-3)


def test_crop_size_and_resize(tmp_path):
    path = make_video(tmp_path / "o.mkv", seconds=1, fps=10, size=(161, 121))
    with VideoSource(str(path), SamplingPolicy(), LIMITS, crop_size=96, resize_short=112) as src:
        chunk = next(c for c in src.chunks() if isinstance(c, FrameChunk))
    assert chunk.frames.shape[1:] == (96, 96, 3)


def test_audio_only_allowed_by_configuration(tmp_path):
    path = make_audio(tmp_path / "t.m4a", seconds=2)
    limits = DecodeLimits(**{**LIMITS.__dict__, "allow_audio_only": True})
    src, times, frames, audio = decode_all(path, limits=limits)
    assert len(times) == 0 and abs(sum(a.samples.size for a in audio) / 16000 - 2) < 0.1


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return bad_inputs(tmp_path_factory.mktemp("bad"))


def test_bad_inputs_have_reasons(bad):
    assert len(bad) >= 9
    for key, path in bad.items():
        reason = key.split(":")[0]
        with pytest.raises(TagstreamError) as info:
            decode_all(path)
        assert info.value.reason == reason, (key, info.value)


def test_limits(tmp_path):
    big = oversize_video(tmp_path / "big.mp4")
    with pytest.raises(TooLargeError):
        VideoSource(str(big), SamplingPolicy(), DecodeLimits(**{**LIMITS.__dict__, "max_pixels": 640 * 479}))
    with pytest.raises(TooLargeError):
        VideoSource(str(big), SamplingPolicy(), DecodeLimits(**{**LIMITS.__dict__, "max_file_bytes": 100}))
    long = make_video(tmp_path / "long.mp4", seconds=3, fps=5)
    with pytest.raises(TooLongError):
        VideoSource(str(long), SamplingPolicy(), DecodeLimits(**{**LIMITS.__dict__, "max_duration_s": 2.0}))
    src = VideoSource(str(long), SamplingPolicy(fps=5), DecodeLimits(**{**LIMITS.__dict__, "decode_budget_s": 0.0}))
    with pytest.raises(MediaTimeoutError), src:
        list(src.chunks())


def test_hwaccel_cuda_falls_back_to_software(tmp_path):
    path = make_video(tmp_path / "h.mp4", seconds=2, fps=10)
    src, times, frames, _ = decode_all(path, hwaccel="cuda")
    assert len(frames) == 2 and src.stats.hwaccel in ("none", "cuda")


def test_cuda_primary_context_probe(monkeypatch, caplog):
    """The probe really asks FFmpeg for a CUDA device (it fails with FFmpeg's OSError without a GPU, not
    with a programming error), runs once per process, and shares the primary context only when it got it."""
    import logging

    import torch

    from worker.media import hwaccel as media_hwaccel

    monkeypatch.setattr(media_hwaccel, "_cuda_shared", None)
    monkeypatch.setattr(media_hwaccel, "_cuda_keepalive", None)
    with caplog.at_level(logging.INFO, logger="worker.media.hwaccel"):
        first = media_hwaccel.cuda_device_options()
        assert media_hwaccel.cuda_device_options() == first
    probes = [r for r in caplog.records if "primary context" in r.getMessage()]
    if first:
        assert first == {"primary_ctx": "1"} and media_hwaccel._cuda_keepalive is not None and not probes
    else:
        assert len(probes) == 1 and isinstance(probes[0].args[0], OSError), probes
        assert media_hwaccel._cuda_keepalive is None
    if not torch.cuda.is_available():
        assert first == {}


def test_limits_from_settings():
    from worker.config import Settings

    limits = DecodeLimits.from_settings(Settings(max_pixels=123, decode_budget_s=7))
    assert limits.max_pixels == 123 and limits.decode_budget_s == 7


@pytest.mark.parametrize("size", [(640, 360), (1920, 1080), (360, 640), (162, 98)])
def test_crop_first_conversion_matches_scale_then_crop(size):
    import av

    from worker.media.rgb import to_rgb

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)  # smooth, position-dependent content
    img = np.stack([128 + 120 * np.sin(7 * xx), 128 + 120 * np.cos(5 * yy), 255 * xx * yy], -1)
    frame = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24").reformat(format="yuv420p")
    fast = to_rgb(frame, 256, 224).astype(int)  # crops the planes, then scales
    whole = to_rgb(frame.reformat(format="yuv444p"), 256, 224).astype(int)  # scales all, then crops
    assert fast.shape == whole.shape == (224, 224, 3)
    assert np.abs(fast - whole).mean() < 1.0, np.abs(fast - whole).mean()  # a 3-pixel shift gives 1.5
    assert np.array_equal(to_rgb(frame, 256, 224, rotation=90), np.rot90(to_rgb(frame, 256, 224)))


def test_audio_format_change_mid_stream(tmp_path):
    # two MPEG-TS segments joined byte for byte (as segmenters and cat do): 44.1 kHz stereo MP2, then
    # 48 kHz mono. The resampler is rebuilt at the change instead of failing the video (a fuzzing finding).
    a = make_video(tmp_path / "a.ts", seconds=2, audio="mp2", audio_rate=44100, container="mpegts")
    b = make_video(tmp_path / "b.ts", seconds=2, audio="mp2", audio_rate=48000, audio_layout="mono",
                   container="mpegts")
    joined = tmp_path / "joined.ts"
    joined.write_bytes(a.read_bytes() + b.read_bytes())
    src, times, frames, audio = decode_all(joined)
    assert len(frames) >= 2
    assert 3.8 <= src.stats.audio_seconds <= 4.3  # both segments' audio, at 16 kHz


def test_truncated_file_samples_what_decodes_and_says_so(tmp_path):
    # a Matroska file cut in half still declares 10 s: the samples stop where the frames stop (no copies
    # of the last frame for the missing bins) and the stats say where
    path = make_video(tmp_path / "v.mkv", seconds=10, fps=25, audio="aac", container="matroska")
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    src, times, frames, _ = decode_all(cut)
    assert src.info.duration_s > 9.5 and src.stats.ended_early_s is not None
    assert 3.0 < src.stats.ended_early_s < 7.0
    assert len(times) == len(set(np.round(times, 3))) and times.max() <= src.stats.ended_early_s
    policy = SamplingPolicy()
    targets = policy.target_times(src.info.duration_s)
    assert len(times) < len(targets)
    assert np.all(np.abs(times - targets[: len(times)]) <= policy.tolerance_s(src.info.duration_s) + 1e-6)
    full, _, _, _ = decode_all(path)
    assert full.stats.ended_early_s is None
