"""A corpus of hostile and broken inputs, each with the reason a worker must refuse it with.

:func:`build_corpus` writes files under ``root/media`` (the allowed root), a few outside it
(``root/outside``), and returns :class:`Case` objects: what a job names (``uri``), the expected reason
code, and which limit bounds the time to refuse it (``budget``: ``"instant"`` for URI-policy and header
checks, ``"open"`` for ``open_timeout_s``, ``"decode"`` for ``open_timeout_s + decode_budget_s``).
Network cases point at a :class:`HostileServer` (threads on 127.0.0.1), the one allowed host; redirect
targets use the host name ``localhost``, which the policy does not allow.

The limits the expectations assume are :data:`LIMITS` (set them in the Settings the corpus runs with).
Crafted files are real encoded media with header fields patched (Matroska ``Duration``, MP4 ``stsz``
sample counts, AVI ``dwLength``, zero frame dimensions); see each builder.
"""

from __future__ import annotations

import http.server
import os
import socketserver
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from media import bad_inputs, make_audio, make_video

#: Settings the expectations assume (small, so timeouts are short and limits are easy to cross).
LIMITS = {
    "max_pixels": 320 * 240,
    "max_file_bytes": 1 << 30,
    "max_duration_s": 3600.0,
    "open_timeout_s": 2.0,
    "read_timeout_s": 2.0,
    "decode_budget_s": 4.0,
    "max_aspect_ratio": 10.0,
    "max_redirects": 3,
}


@dataclass(frozen=True)
class Case:
    kind: str
    reason: str
    uri: str
    budget: str = "instant"  # "instant" | "open" | "decode"
    note: str = ""


def budget_s(case: Case, limits: dict = LIMITS) -> float:
    """The limit that bounds how long refusing ``case`` may take (before any slack)."""
    return {"instant": 0.0, "open": limits["open_timeout_s"],
            "decode": limits["open_timeout_s"] + limits["decode_budget_s"]}[case.budget]  # fmt: skip


# --- MP4 / AVI header surgery ------------------------------------------------------------------------
_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf"}


def mp4_boxes(data: bytes | bytearray, start: int = 0, end: int | None = None, path: str = "") -> list[tuple[str, int, int]]:
    """``(path, offset, size)`` of every box, descending into the usual container boxes."""
    out = []
    end = len(data) if end is None else min(end, len(data))
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if size < 8:
            break
        name = f"{path}/{kind.decode('latin-1')}"
        out.append((name, pos, size))
        if kind in _CONTAINERS:
            out.extend(mp4_boxes(data, pos + 8, pos + size, name))
        elif kind == b"stsd":
            out.extend(mp4_boxes(data, pos + 16, pos + size, name))
        pos += size
    return out


def _patch_u32(data: bytearray, box_suffix: str, offset: int, value: int, boxes: list | None = None) -> int:
    hits = 0
    for name, pos, _size in boxes or mp4_boxes(data):
        if name.endswith(box_suffix):
            struct.pack_into(">I", data, pos + offset, value)
            hits += 1
    assert hits, f"no {box_suffix} box"
    return hits


def huge_duration_mkv(path: Path) -> Path:
    """A Matroska file whose segment Duration claims 1e15 ms (about 31,700 years).

    (An MP4's mvhd/mdhd/tkhd durations are not enough: FFmpeg recomputes them from the sample tables.)"""
    make_video(path, seconds=1.0, fps=10)
    data = bytearray(path.read_bytes())
    at = data.find(b"\x44\x89\x88")  # EBML id Duration, size 8 (a double)
    assert at > 0, "no 8-byte Duration element"
    struct.pack_into(">d", data, at + 3, 1e15)
    path.write_bytes(bytes(data))
    return path


def billions_of_frames_mp4(path: Path, source: Path) -> Path:
    """The sample-size table claims 2**31 - 1 samples of a constant size (no per-sample table)."""
    data = bytearray(source.read_bytes())
    _patch_u32(data, "/stsz", 12, 1000)  # size type ver/flags SAMPLE_SIZE SAMPLE_COUNT
    _patch_u32(data, "/stsz", 16, 0x7FFFFFFF)
    path.write_bytes(bytes(data))
    return path


def billions_of_frames_avi(path: Path) -> Path:
    """An MJPEG AVI whose main header and stream header claim 2**31 - 1 frames."""
    make_video(path, seconds=1.0, fps=10, codec="mjpeg")
    data = bytearray(path.read_bytes())
    avih = data.find(b"avih")
    struct.pack_into("<I", data, avih + 8 + 16, 0x7FFFFFFF)  # dwTotalFrames
    strh = data.find(b"strh")
    struct.pack_into("<I", data, strh + 8 + 32, 0x7FFFFFFF)  # dwLength
    path.write_bytes(bytes(data))
    return path


def zero_dimension_avi(path: Path) -> Path:
    """Uncompressed video in AVI whose headers say 0x0 frames (the raw decoder has no other source)."""
    with av.open(str(path), "w", format="avi") as out:
        vs = out.add_stream("rawvideo", rate=10)
        vs.width, vs.height, vs.pix_fmt = 32, 24, "bgr24"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((24, 32, 3), i * 20, np.uint8), format="bgr24")
            frame.pts = i
            for packet in vs.encode(frame):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
    data = bytearray(path.read_bytes())
    avih = data.find(b"avih")
    struct.pack_into("<II", data, avih + 8 + 32, 0, 0)  # dwWidth, dwHeight
    strf = data.find(b"strf")
    struct.pack_into("<ii", data, strf + 8 + 4, 0, 0)  # BITMAPINFOHEADER biWidth, biHeight
    path.write_bytes(bytes(data))
    return path


def subtitle_only_mkv(path: Path) -> Path:
    """A Matroska file whose only stream is SubRip subtitles (remuxed from a real .srt)."""
    srt = path.with_suffix(".srt")
    srt.write_text("1\n00:00:00,000 --> 00:00:01,000\nHello\n\n2\n00:00:01,500 --> 00:00:02,500\nWorld\n\n")
    with av.open(str(srt)) as inp, av.open(str(path), "w", format="matroska") as out:
        stream = out.add_stream_from_template(inp.streams[0])
        for packet in inp.demux(inp.streams[0]):
            if packet.dts is None:
                continue
            packet.stream = stream
            out.mux(packet)
    srt.unlink()
    return path


def still_images(d: Path) -> dict[str, Path]:
    import PIL.Image

    img = PIL.Image.fromarray(np.random.default_rng(5).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    out = {"jpeg": d / "photo.jpg", "gif": d / "anim.gif"}
    img.save(out["jpeg"], quality=80)
    frames = [img, img.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(out["gif"], save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out


# --- a hostile HTTP server -----------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: C901 - one branch per endpoint
        srv, path = self.server, self.path.split("?")[0]
        with srv.lock:
            srv.hits[path] = srv.hits.get(path, 0) + 1
        try:
            if path in srv.files:
                return self._file(srv.files[path])
            if path == "/redirect-ok":
                return self._redirect("/good.mp4")
            if path == "/redirect-evil":  # to a host the policy does not allow
                return self._redirect(f"http://localhost:{srv.server_address[1]}/secret-target")
            if path == "/redirect-file":
                return self._redirect("file:///etc/passwd")
            if path == "/redirect-loop":
                return self._redirect("/redirect-loop")
            if path == "/slow-headers":  # slow-loris: one header byte every 0.2 s, never finished
                for b in b"HTTP/1.0 200 OK\r\nContent-Type: video/mp4\r\nX-Padding: " + b"a" * 10_000:
                    if srv.stopping.is_set():
                        return
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.2)
                return
            if path == "/slow-body":  # headers at once, then 100 bytes every 0.5 s
                return self._trickle(srv.files["/good.mp4"], fast=0, step=100, pause=0.5)
            if path == "/slow-stream":  # moov up front and fast, then the media trickles
                return self._trickle(srv.files["/good-faststart.mp4"], fast=4096, step=50, pause=0.5)
            if path == "/endless-garbage":
                return self._endless(np.random.default_rng(9).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes())
            if path == "/endless-stream":  # a valid MPEG-TS clip, looped for ever, no Content-Length
                return self._endless(srv.files["/good.ts"])
            if path == "/endless-null":  # TS sync bytes but only null packets after the first few
                ts = srv.files["/good.ts"]
                null = (b"\x47\x1f\xff\x10" + b"\xff" * 184) * 512
                return self._endless(null, head=ts[: 188 * 8])
            if path == "/huge-length":
                self.send_response(200)
                self.send_header("Content-Length", str(10**13))
                self.end_headers()
                return self._endless(srv.files["/good.ts"], headers=False)
            self.send_error(404)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass

    def _file(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _trickle(self, data: bytes, *, fast: int, step: int, pause: float) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:fast])
        for i in range(fast, len(data), step):
            if self.server.stopping.wait(pause):
                return
            self.wfile.write(data[i : i + step])
            self.wfile.flush()

    def _endless(self, block: bytes, *, head: bytes = b"", headers: bool = True) -> None:
        if headers:
            self.send_response(200)
            self.end_headers()
        self.wfile.write(head)
        sent = 0
        while not self.server.stopping.is_set() and sent < (4 << 30):
            self.wfile.write(block)
            sent += len(block)


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class HostileServer:
    """A threaded HTTP server on 127.0.0.1 with good, redirecting, slow and endless endpoints."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self._srv = _Server(("127.0.0.1", 0), _Handler)
        self._srv.files = files
        self._srv.hits = {}
        self._srv.lock = threading.Lock()
        self._srv.stopping = threading.Event()
        self.base = f"http://127.0.0.1:{self._srv.server_address[1]}"
        self._thread = threading.Thread(target=self._srv.serve_forever, name="hostile-http", daemon=True)

    @property
    def hits(self) -> dict[str, int]:
        with self._srv.lock:
            return dict(self._srv.hits)

    def __enter__(self) -> HostileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._srv.stopping.set()
        self._srv.shutdown()
        self._srv.server_close()


def server_files(d: Path) -> dict[str, bytes]:
    """What :class:`HostileServer` serves: good clips, and an HLS playlist pointing at a local file."""
    good = make_video(d / "srv_good.mp4", seconds=2.0, fps=10, audio="aac")
    fast = make_video(d / "srv_good_fast.mp4", seconds=20.0, fps=10, faststart=True)
    ts = make_video(d / "srv_good.ts", seconds=2.0, fps=10)
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\nfile://{good}\n#EXT-X-ENDLIST\n"
    return {"/good.mp4": good.read_bytes(), "/good-faststart.mp4": fast.read_bytes(), "/good.ts": ts.read_bytes(),
            "/playlist.m3u8": playlist.encode()}  # fmt: skip


# --- the corpus --------------------------------------------------------------------------------------------
def build_corpus(root: Path, http_base: str) -> list[Case]:
    """Write the hostile files under ``root`` and return every case (local, URI and network)."""
    media, outside = root / "media", root / "outside"
    media.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(kind: str, reason: str, target: Path | str, budget: str = "open", note: str = "") -> None:
        cases.append(Case(kind, reason, str(target), budget, note))

    # the decoder issue's list (tests/media.py)
    names = {"zero_bytes": "zero bytes", "random_bytes": "64 KiB of random bytes", "truncated": "mp4 cut in half",
             "corrupt_moov": "sample tables overwritten", "text": "meeting notes", "png": "a photo",
             "audio_only": "AAC in MP4, no video", "hls": "HLS playlist naming a local file",
             "ffconcat": "ffconcat script naming a local file", "hls_as_mp4": "HLS playlist named .mp4"}  # fmt: skip
    for key, path in bad_inputs(media / "classic").items():
        reason, kind = key.split(":")
        add(kind, reason, path, note=names.get(kind, ""))
    good = make_video(media / "base.mp4", seconds=2.0, fps=10)
    good_fast = make_video(media / "base_fast.mp4", seconds=2.0, fps=10, faststart=True)

    # more "not a video"
    (media / "page.mp4").write_text("<!doctype html><html><body>404 Not Found</body></html>\n" * 20)
    add("html_as_mp4", "decode_error", media / "page.mp4", note="an error page saved as .mp4")
    add("zero_dimensions", "decode_error", zero_dimension_avi(media / "zero_dims.avi"), note="raw video, 0x0 frames")
    for kind, path in still_images(media).items():
        add(kind, "unsupported_media", path, note={"jpeg": "a JPEG photo", "gif": "an animated GIF"}[kind])
    add("audio_only_wav", "unsupported_media", make_audio(media / "tone.wav", seconds=1.0, codec="pcm_s16le"),
        note="PCM WAV, no video")
    add("subtitle_only", "unsupported_media", subtitle_only_mkv(media / "subs.mkv"), note="Matroska with SubRip only")

    # containers that pull in other resources
    inner = media / "inner.m3u8"
    inner.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{good}\n#EXT-X-ENDLIST\n")
    nested = media / "nested.m3u8"
    nested.write_text(f"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=100000\n{inner}\n")
    add("nested_playlist", "forbidden_media", nested, note="master playlist -> playlist -> local file")
    remote = media / "remote.m3u8"
    remote.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{http_base}/good.ts\n#EXT-X-ENDLIST\n")
    add("playlist_to_url", "forbidden_media", remote, note="HLS naming an http URL")
    mpd = media / "manifest.mp4"
    mpd.write_text('<?xml version="1.0"?>\n<MPD xmlns="urn:mpeg:dash:schema:mpd:2011"><Period><AdaptationSet>'
                   f'<Representation><BaseURL>file://{good}</BaseURL></Representation></AdaptationSet></Period></MPD>\n')
    add("dash_manifest", "forbidden_media", mpd, note="DASH MPD naming a local file")
    sdp = media / "session.mp4"
    sdp.write_text("v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=video 5004 RTP/AVP 96\n"
                   "a=rtpmap:96 H264/90000\n")
    add("sdp_rtp", "forbidden_media", sdp, note="SDP: would listen for RTP")
    concat = media / "list.mp4"
    concat.write_text(f"file '{good}'\nfile '{good}'\n")
    add("concat_list", "forbidden_media", concat, note="concat list without the ffconcat header")
    add("raw_h264", "forbidden_media", make_video(media / "raw.h264", seconds=1.0, fps=10, container="h264"),
        note="elementary stream: demuxer not on the allow-list")

    # limits
    add("oversize_pixels", "too_large", make_video(media / "big.mp4", seconds=0.5, fps=10, size=(640, 480)),
        note="640x480 over max_pixels")
    add("aspect_wide", "too_large", make_video(media / "wide.mp4", seconds=0.5, fps=5, size=(2048, 2)),
        note="2048x2: short side 256 would make 262144x256 frames")
    add("aspect_tall", "too_large", make_video(media / "tall.mp4", seconds=0.5, fps=5, size=(2, 2048)), note="2x2048")
    sparse = media / "sparse.mp4"
    with open(sparse, "wb") as fh:
        fh.write(good.read_bytes())
        fh.truncate(LIMITS["max_file_bytes"] + (1 << 20))  # sparse: no disk blocks
    add("oversize_file", "too_large", sparse, budget="instant", note="sparse file over max_file_bytes")
    add("huge_duration", "too_long", huge_duration_mkv(media / "forever.mkv"), note="Duration claims 1e15 ms")
    add("billions_of_frames_avi", "too_long", billions_of_frames_avi(media / "billions.avi"),
        note="avih/strh claim 2**31-1 frames")
    add("billions_of_frames_mp4", "decode_error", billions_of_frames_mp4(media / "billions.mp4", good_fast),
        note="stsz claims 2**31-1 samples of 1000 bytes")

    # URI policy
    secret = outside / "secret.mp4"
    secret.write_bytes(good.read_bytes())
    os.symlink(secret, media / "escape.mp4")
    os.symlink(outside, media / "escape_dir")
    os.symlink("/dev/zero", media / "zero_device.mp4")
    os.mkfifo(media / "pipe.mp4")
    (media / "folder.mp4").mkdir()
    for kind, uri, note in [
        ("data_uri", "data:video/mp4;base64,AAAAGGZ0eXBtcDQy", "bytes inline in the URI"),
        ("concat_uri", f"concat:{good}|{secret}", "FFmpeg concat protocol, second part outside the root"),
        ("subfile_uri", f"subfile:,,start,0,end,0,,:{secret}", "FFmpeg subfile protocol"),
        ("symlink_escape", media / "escape.mp4", "symlink in the root to a file outside it"),
        ("symlink_dir_escape", media / "escape_dir" / "secret.mp4", "through a symlinked directory"),
        ("dotdot_escape", f"{media}/../outside/secret.mp4", "`..` out of the root"),
        ("percent_dotdot", f"file://{media}/%2e%2e/outside/secret.mp4", "percent-encoded `..`"),
        ("file_other_host", f"file://fileserver{good}", "file URI naming a host"),
        ("relative_path", "media/base.mp4", "relative path"),
        ("device_symlink", media / "zero_device.mp4", "symlink to /dev/zero"),
        ("fifo", media / "pipe.mp4", "named pipe in the root (open would block)"),
        ("directory", media / "folder.mp4", "a directory named .mp4"),
        ("disallowed_host", "http://media.evil.example/v.mp4", "host not on the allow-list"),
        ("credentials_in_url", f"http://user:pw@{http_base.split('//')[1]}/good.mp4", "user:password@ in the URL"),
        ("ftp_scheme", "ftp://127.0.0.1/v.mp4", "scheme not allowed"),
    ]:
        add(kind, "forbidden_uri", uri, budget="instant", note=note)
    add("missing_file", "not_found", media / "missing.mp4", budget="instant", note="no such file in the root")

    # network (HostileServer)
    for kind, reason, path, budget, note in [
        ("redirect_to_disallowed_host", "forbidden_uri", "/redirect-evil", "open", "302 to http://localhost/..."),
        ("redirect_to_file", "forbidden_uri", "/redirect-file", "open", "302 to file:///etc/passwd"),
        ("redirect_loop", "forbidden_uri", "/redirect-loop", "open", "302 to itself"),
        ("http_404", "not_found", "/nothing-here.mp4", "open", "404"),
        ("slow_loris_headers", "timeout", "/slow-headers", "open", "one header byte every 0.2 s"),
        ("slow_loris_body", "timeout", "/slow-body", "open", "100 bytes every 0.5 s"),
        ("slow_stream", "timeout", "/slow-stream", "decode", "moov at once, then 50 bytes every 0.5 s"),
        ("endless_garbage", "decode_error", "/endless-garbage", "open", "random bytes for ever, no length"),
        ("endless_stream", "unsupported_media", "/endless-stream", "open", "a TS clip looped for ever, no length"),
        ("endless_null_packets", "unsupported_media", "/endless-null", "open", "TS null packets for ever"),
        ("huge_content_length", "too_large", "/huge-length", "open", "Content-Length: 10**13"),
        ("http_playlist", "forbidden_media", "/playlist.m3u8", "open", "HLS over HTTP naming a local file"),
    ]:
        add(kind, reason, http_base + path, budget, note)
    kinds = [c.kind for c in cases]
    assert len(kinds) == len(set(kinds)), "duplicate case kinds"
    return cases


def good_inputs(root: Path, http_base: str) -> dict[str, str]:
    """Good videos to mix with the corpus: local files in the allowed root and URLs on the server."""
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    out = {f"good_local_{i}": str(make_video(media / f"good{i}.mp4", seconds=2.0, fps=10, audio="aac" if i % 2 else None))
           for i in range(3)}  # fmt: skip
    out["good_url"] = f"{http_base}/good.mp4"
    out["good_redirect"] = f"{http_base}/redirect-ok"
    return out
