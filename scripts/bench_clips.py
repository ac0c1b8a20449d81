"""The benchmark clip set shared by ``bench_worker.py``, ``bench_pipeline.py`` and ``loadtest.py``.

Twenty 1280x720 25 fps H.264 (x264 ``veryfast``, 2 B-frames) + AAC clips, 4 to 30 s long (294 s in all),
with keyframe intervals cycling through 1, 2 and 4 s (the intervals phones and upload re-encoders use).
Frames are a moving block texture with per-frame grain, tinted per clip (so P-frames cost a realistic share
of an I-frame and the image features differ between clips); audio is a stereo 44.1 kHz chirp plus noise.

Clips are generated with PyAV once and cached in ``cache_dir`` (a clip is rebuilt when its file is missing).
Generation costs about one core-second per second of video.
"""

from __future__ import annotations

import fractions
import tempfile
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

SECONDS = (4, 6, 8, 10, 12, 15, 18, 20, 24, 30) * 2
GOPS_S = (1, 2, 4)
FPS = 25
SIZE = (1280, 720)


@dataclass(frozen=True)
class Clip:
    video_id: str
    path: Path
    seconds: float
    gop_s: float
    title: str


def default_cache() -> Path:
    return Path(tempfile.gettempdir()) / "tagstream-bench" / "worker-clips"


def clip_specs(cache_dir: Path, n: int = 20) -> list[Clip]:
    """The first ``n`` clips of the set (paths inside ``cache_dir``; nothing is generated)."""
    out = []
    for i in range(n):
        seconds = SECONDS[i % len(SECONDS)]
        gop = GOPS_S[i % len(GOPS_S)]
        vid = f"clip{i:02d}"
        out.append(Clip(vid, cache_dir / f"{vid}_{seconds}s_gop{gop}.mp4", float(seconds), float(gop),
                        f"benchmark clip {i} with a moving texture"))
    return out


def _encode(clip: Clip, seed: int) -> None:
    width, height = SIZE
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height // 8 + 1, 2 * width // 8 + 1, 3), dtype=np.uint8)
    tint = rng.integers(-40, 41, 3, dtype=np.int16)
    texture = np.kron(base, np.ones((8, 8, 1), np.uint8))[:height, : 2 * width].astype(np.int16) + tint
    grains = [np.random.default_rng(seed * 31 + k).integers(-12, 13, (height, width, 3), dtype=np.int16)
              for k in range(11)]
    tmp = clip.path.with_suffix(".part.mp4")
    gop = int(clip.gop_s * FPS)
    with av.open(str(tmp), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=FPS)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        vs.options = {"preset": "veryfast", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=2"}
        aus = out.add_stream("aac", rate=44100, layout="stereo")
        frames = int(round(clip.seconds * FPS))
        for i in range(frames):
            shift = (3 * i) % width
            img = np.clip(texture[:, shift : shift + width] + grains[i % 11], 0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for packet in vs.encode(frame):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        _encode_audio(out, aus, clip.seconds, rng)
    tmp.replace(clip.path)


def _encode_audio(out: av.container.OutputContainer, aus: av.audio.stream.AudioStream, seconds: float,
                  rng: np.random.Generator) -> None:
    rate, size = 44100, aus.codec_context.frame_size or 1024
    total = int(round(seconds * rate))
    f0 = float(rng.uniform(200, 800))
    fmt = aus.codec_context.format.name
    for start in range(0, total, size):
        t = np.arange(start, min(start + size, total)) / rate
        mono = 0.3 * np.sin(2 * np.pi * f0 * t * (1 + 0.05 * t)) + 0.02 * rng.standard_normal(len(t))
        data = np.repeat(mono.astype(np.float32)[None, :], 2, axis=0)
        if not fmt.endswith("p"):
            data = data.T.reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = rate, start, fractions.Fraction(1, rate)
        for packet in aus.encode(frame):
            out.mux(packet)
    for packet in aus.encode():
        out.mux(packet)


def make_clips(cache_dir: Path | None = None, n: int = 20) -> list[Clip]:
    """The first ``n`` clips, generating the missing ones."""
    cache_dir = cache_dir or default_cache()
    cache_dir.mkdir(parents=True, exist_ok=True)
    clips = clip_specs(cache_dir, n)
    for i, clip in enumerate(clips):
        if not clip.path.is_file():
            _encode(clip, seed=i + 1)
    return clips
