"""Opening media safely with PyAV: protocol and demuxer allow-lists, timeouts, typed errors.

Interpretations (DESIGN.md section 7):

- Local files are opened as ``file:<absolute path>`` with ``protocol_whitelist=file`` so a path can
  never be read as another FFmpeg protocol (``concat:``, ``subfile:``, ``data:``...). URLs get
  ``protocol_whitelist=http,https,tcp,tls`` and an ``rw_timeout``.
- Demuxers are restricted with FFmpeg's ``format_whitelist`` (:data:`ALLOWED_FORMATS`). FFmpeg checks
  it after probing and BEFORE reading the header, so an HLS playlist, ffconcat script, DASH manifest
  or image sequence is refused without opening anything it points at.
- When the open fails, a local file's first bytes classify the failure: a playlist / concat script is
  ``forbidden_media``; a still image (PNG, JPEG, GIF, BMP, WebP, TIFF) is ``unsupported_media`` (it is
  readable, but it is not a video); anything else that FFmpeg cannot read (text, random bytes, a
  truncated file, a corrupt ``moov``, zero bytes) is ``decode_error``. For URLs nothing is re-read: a
  demuxer outside the allow-list is ``forbidden_media`` and unreadable data is ``decode_error``.
"""

from __future__ import annotations

import errno
import logging
import os
from urllib.parse import urlsplit

import av
import av.error

from worker.errors import (
    DecodeError,
    ForbiddenMediaError,
    MediaTimeoutError,
    NetworkError,
    NotFoundError,
    TooLargeError,
    UnsupportedMediaError,
)

log = logging.getLogger(__name__)

#: Demuxer names a video file may be read with (FFmpeg ``AVInputFormat.name`` tokens).
ALLOWED_FORMATS: tuple[str, ...] = (
    "mov", "mp4", "m4a", "3gp", "3g2", "mj2",
    "matroska", "webm",
    "avi", "flv", "mpegts", "ogg", "mpeg", "asf", "ivf", "mxf",
    # audio-only containers: opened so audio-only files get a clear unsupported_media (or are decoded
    # when allow_audio_only is set)
    "mp3", "wav", "flac", "aac",
)  # fmt: skip

FILE_PROTOCOLS = "file"
NET_PROTOCOLS = "http,https,tcp,tls"

_PLAYLIST_MARKERS = (b"#EXTM3U", b"#EXTINF", b"#EXT-X-", b"ffconcat", b"[playlist]", b"<MPD", b"<smil",
                     b"<asx", b"<ASX", b"#EXT", b"file '", b"file \"")  # fmt: skip
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def is_url(uri: str) -> bool:
    return urlsplit(uri).scheme.lower() in ("http", "https")


def sniff(head: bytes) -> str:
    """Classify the first bytes of a file: ``"playlist"``, ``"image"``, ``"text"`` or ``"binary"``."""
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    lowered = stripped[:4096].lower()
    if any(stripped.startswith(m) for m in _PLAYLIST_MARKERS) or b"#extm3u" in lowered[:64] or (
        lowered.startswith(b"file ") or b"\nfile '" in lowered
    ):
        return "playlist"
    if any(head.startswith(m) for m in _IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if head and sum(32 <= b < 127 or b in (9, 10, 13) for b in head[:4096]) >= 0.95 * min(len(head), 4096):
        return "text"
    return "binary"


def _classify_local_failure(path: str, exc: Exception, rejected_format: bool) -> Exception:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8192)
    except OSError:
        head = b""
    kind = sniff(head)
    if not head:
        return DecodeError("empty file (zero bytes)", detail={"uri": path})
    if kind == "playlist":
        return ForbiddenMediaError("file is a playlist or concat script; refusing to follow it", detail={"uri": path})
    if kind == "image":
        return UnsupportedMediaError("file is a still image, not a video", detail={"uri": path})
    if rejected_format and kind == "binary":
        return ForbiddenMediaError(f"container format not on the allow-list: {exc}", detail={"uri": path})
    return DecodeError(f"not readable media ({kind}): {exc}", detail={"uri": path})


def map_av_error(exc: BaseException, uri: str) -> Exception:
    """Map a PyAV/OS exception raised while opening or reading ``uri`` to a worker.errors class."""
    local = not is_url(uri)
    detail = {"uri": uri}
    if isinstance(exc, av.error.HTTPNotFoundError | av.error.HTTPForbiddenError | av.error.HTTPUnauthorizedError):
        return NotFoundError(f"HTTP refused: {exc}", detail=detail)
    if isinstance(exc, av.error.HTTPServerError | av.error.HTTPTooManyRequestsError):
        return NetworkError(f"HTTP server error: {exc}", detail=detail)
    if isinstance(exc, av.error.HTTPClientError):
        return NotFoundError(f"HTTP client error: {exc}", detail=detail)
    code = getattr(exc, "errno", None)
    if isinstance(exc, TimeoutError) or code in (errno.ETIMEDOUT, errno.EAGAIN):
        return MediaTimeoutError(f"I/O timeout: {exc}", detail=detail)
    if isinstance(exc, FileNotFoundError) or code == errno.ENOENT:
        return NotFoundError(f"not found: {exc}", detail=detail)
    if isinstance(exc, IsADirectoryError) or code == errno.EISDIR:
        return DecodeError(f"is a directory: {exc}", detail=detail)
    if not local and (
        isinstance(exc, ConnectionError)
        or code in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EIO)
    ):
        return NetworkError(f"network error: {exc}", detail=detail)
    if isinstance(exc, av.error.ProtocolNotFoundError):
        return ForbiddenMediaError(f"protocol not allowed: {exc}", detail=detail)
    return DecodeError(f"cannot read media: {exc}", detail=detail)


def open_input(uri: str, *, open_timeout_s: float, read_timeout_s: float, max_file_bytes: int,
               hwaccel: object | None = None) -> av.container.InputContainer:
    """Open ``uri`` (absolute local path or http(s) URL) for reading; raise typed errors.

    Local files are size-checked before opening; URLs after opening (from ``Content-Length`` where
    the server sends one).
    """
    options = {"format_whitelist": ",".join(ALLOWED_FORMATS)}
    if is_url(uri):
        target = uri
        options.update({
            "protocol_whitelist": NET_PROTOCOLS,
            "rw_timeout": str(int(read_timeout_s * 1e6)),
            "reconnect": "1",
            "reconnect_on_network_error": "1",
            "reconnect_delay_max": str(max(1, int(read_timeout_s))),
        })  # fmt: skip
    else:
        path = os.path.abspath(uri.removeprefix("file://") if uri.startswith("file://") else uri)
        if not os.path.exists(path):
            raise NotFoundError(f"no such file: {path}", detail={"uri": uri})
        if os.path.isdir(path):
            raise DecodeError(f"is a directory: {path}", detail={"uri": uri})
        size = os.path.getsize(path)
        if size > max_file_bytes:
            raise TooLargeError(f"file is {size} bytes > max_file_bytes {max_file_bytes}", detail={"uri": uri})
        if size == 0:
            raise DecodeError("empty file (zero bytes)", detail={"uri": uri})
        target = "file:" + path
        options["protocol_whitelist"] = FILE_PROTOCOLS
    kwargs: dict = {"options": options, "timeout": (open_timeout_s, read_timeout_s)}
    if hwaccel is not None:
        kwargs["hwaccel"] = hwaccel
    try:
        container = av.open(target, "r", **kwargs)
    except av.error.ArgumentError as exc:  # EINVAL: the probed format is not on format_whitelist
        if is_url(uri):
            raise ForbiddenMediaError(f"container format not on the allow-list: {exc}", detail={"uri": uri}) from exc
        raise _classify_local_failure(target[5:], exc, rejected_format=True) from exc
    except av.error.InvalidDataError as exc:
        if is_url(uri):
            raise DecodeError(f"not readable media: {exc}", detail={"uri": uri}) from exc
        raise _classify_local_failure(target[5:], exc, rejected_format=False) from exc
    except (av.error.FFmpegError, OSError) as exc:
        raise map_av_error(exc, uri) from exc
    names = set(container.format.name.split(","))
    if not names & set(ALLOWED_FORMATS):  # defence in depth; format_whitelist already enforces it
        container.close()
        raise ForbiddenMediaError(f"container format {container.format.name!r} not allowed", detail={"uri": uri})
    size = container.size if is_url(uri) else 0
    if size and size > max_file_bytes:
        container.close()
        raise TooLargeError(f"resource is {size} bytes > max_file_bytes {max_file_bytes}", detail={"uri": uri})
    return container


def make_hwaccel(kind: str) -> object | None:
    """An ``HWAccel`` for ``kind`` ("cuda", or "auto" = cuda when FFmpeg lists it), else None.

    Returns None (software decoding) on any error; the caller also falls back when opening with it fails.
    """
    if kind not in ("cuda", "auto"):
        return None
    try:
        from av.codec.hwaccel import HWAccel, hwdevices_available

        if kind == "auto" and "cuda" not in hwdevices_available():
            return None
        return HWAccel("cuda", allow_software_fallback=True)
    except Exception as exc:  # noqa: BLE001 - any failure means software decoding
        log.info("hardware decoding unavailable (%s); using software", exc)
        return None
