"""Opening media safely with PyAV: protocol and demuxer allow-lists, timeouts, typed errors.

Interpretations (docs/ARCHITECTURE.md, "Untrusted input"):

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
- Redirects: FFmpeg is told not to follow any (``max_redirects=0``), so a redirect never makes it send a
  request anywhere. When opening a URL fails, one GET (``Range: bytes=0-0``, no redirect following,
  bounded by ``open_timeout_s``) asks whether the answer was a redirect; the ``Location`` is then checked
  by the :class:`OpenPolicy`'s URI policy (the worker's, so a redirect can only lead where a job could
  point directly; a redirect to a non-HTTP scheme is always refused) and opened
  the same way, at most ``max_redirects`` hops. A refused hop is ``forbidden_uri``.
- Timeouts: PyAV's interrupt callback aborts an open that takes longer than ``open_timeout_s`` and a
  read that takes longer than ``read_timeout_s`` (slow-loris servers); both are ``timeout``, as is an
  open that failed only after its whole ``open_timeout_s`` had passed.
- Endless bodies: a URL whose server gives no length (no ``Content-Length``) AND whose container gives
  no duration is a live or endless stream, ``unsupported_media`` (with ``require_known_length``).
- Stream shape: a video stream whose aspect ratio (long side / short side) exceeds
  ``max_aspect_ratio`` is ``too_large`` (scaling its short side to 256 would make frames of millions of
  pixels; 4096x2 would be 524288x256).

The :class:`OpenPolicy` is plain data (it travels to decoder processes inside a
:class:`~worker.media.records.DecodeRequest`). :func:`open_input` takes it as an argument; without one it
uses the calling thread's (:func:`set_thread_policy`), else the permissive default (redirects to any
http(s) URL followed, up to 5 hops), which suits the local ``tagstream probe``. The worker always passes
the one built from its settings (:meth:`OpenPolicy.from_settings`).
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

import av
import av.error
from av.codec.hwaccel import HWAccel

from worker.errors import (
    DecodeError,
    ForbiddenMediaError,
    ForbiddenUriError,
    MediaTimeoutError,
    NetworkError,
    NotFoundError,
    TooLargeError,
    UnsupportedMediaError,
)
from worker.media.uri_policy import UriPolicy

if TYPE_CHECKING:
    from worker.config import Settings

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
DEFAULT_MAX_ASPECT_RATIO = 10.0
DEFAULT_MAX_REDIRECTS = 5
_REDIRECT_CODES = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class OpenPolicy:
    """Rules for opening media (see the module docstring).

    ``uri_policy`` vets every redirect target (a refused target is ``forbidden_uri``); None allows any
    http(s) target."""

    uri_policy: UriPolicy | None = None
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
    require_known_length: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenPolicy:
        """The worker's policy: redirects vetted by its URI policy, limits from ``settings``."""
        return cls(uri_policy=UriPolicy.from_settings(settings), max_redirects=settings.max_redirects,
                   max_aspect_ratio=settings.max_aspect_ratio)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> OpenPolicy:
        """Inverse of ``dataclasses.asdict`` (JSON lists back to tuples)."""
        uri = raw.get("uri_policy")
        uri_policy = None if uri is None else UriPolicy(**{k: tuple(v) for k, v in uri.items()})
        return cls(**{**raw, "uri_policy": uri_policy})


class _ThreadPolicy(threading.local):
    policy: OpenPolicy | None = None


_thread = _ThreadPolicy()


def set_thread_policy(policy: OpenPolicy | None) -> None:
    """Install ``policy`` for the calling thread (None: back to the permissive default)."""
    _thread.policy = policy


def current_policy() -> OpenPolicy:
    """The calling thread's policy (:func:`set_thread_policy`), else the permissive default."""
    return _thread.policy or OpenPolicy()


_PLAYLIST_MARKERS = (b"#EXTM3U", b"#EXTINF", b"#EXT-X-", b"ffconcat", b"[playlist]", b"<MPD", b"<smil",
                     b"<asx", b"<ASX", b"#EXT", b"file '", b"file \"")  # fmt: skip
# markup or session descriptions that make FFmpeg fetch other resources (DASH, SMIL, ASX, SDP/RTP)
_MANIFEST_MARKERS = (b"<mpd", b"<smil", b"<asx", b"<playlist", b"urn:mpeg:dash")
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
    if (lowered.startswith(b"<") and any(m in lowered for m in _MANIFEST_MARKERS)) or (
        lowered.startswith(b"v=0") and b"\nm=" in lowered  # SDP: describes RTP streams to connect to
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
    if isinstance(exc, av.error.ExitError):  # PyAV's interrupt callback: the open/read timeout ran out
        return MediaTimeoutError(f"I/O timeout: {exc}", detail=detail)
    code = getattr(exc, "errno", None)
    if isinstance(exc, TimeoutError) or code in (errno.ETIMEDOUT, errno.EAGAIN):
        return MediaTimeoutError(f"I/O timeout: {exc}", detail=detail)
    if isinstance(exc, FileNotFoundError) or code == errno.ENOENT:
        return NotFoundError(f"not found: {exc}", detail=detail)
    if isinstance(exc, IsADirectoryError) or code == errno.EISDIR:
        return DecodeError(f"is a directory: {exc}", detail=detail)
    if isinstance(exc, MemoryError) or code == errno.ENOMEM:
        return TooLargeError(f"decoding needs more memory than allowed: {exc}", detail=detail)
    if not local and (
        isinstance(exc, ConnectionError)
        or code in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EIO)
    ):
        return NetworkError(f"network error: {exc}", detail=detail)
    if isinstance(exc, av.error.ProtocolNotFoundError):
        return ForbiddenMediaError(f"protocol not allowed: {exc}", detail=detail)
    return DecodeError(f"cannot read media: {exc}", detail=detail)


def _shutdown(sock: socket.socket | None) -> None:
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def redirect_location(url: str, timeout_s: float) -> str | None:
    """The absolute target of ``url`` when its server answers a GET with a redirect, else None.

    One request (``Range: bytes=0-0``), redirects not followed, the whole exchange bounded by
    ``timeout_s`` (a watchdog shuts the socket down, so a slow-loris server cannot stretch it)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=timeout_s, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    timer = threading.Timer(timeout_s, lambda: _shutdown(conn.sock))
    timer.daemon = True
    timer.start()
    try:
        conn.request("GET", parts._replace(scheme="", netloc="", fragment="").geturl() or "/",
                     headers={"Range": "bytes=0-0", "User-Agent": "tagstream"})
        response = conn.getresponse()
        location = response.getheader("Location") if response.status in _REDIRECT_CODES else None
    except (OSError, http.client.HTTPException) as exc:
        log.debug("redirect check of %s failed: %s", url, exc)
        return None
    finally:
        timer.cancel()
        conn.close()
    return urljoin(url, location.strip()) if location else None


def _follow(url: str, hops: int, policy: OpenPolicy, origin: str) -> str:
    """Vet a redirect target: http(s) only, within ``max_redirects``, allowed by ``policy.uri_policy``."""
    detail = {"uri": origin, "redirect": url[:500]}
    if hops > policy.max_redirects:
        raise ForbiddenUriError(f"more than {policy.max_redirects} redirects", detail=detail)
    if urlsplit(url).scheme.lower() not in ("http", "https"):
        raise ForbiddenUriError("redirect to a non-HTTP URL", detail=detail)
    if policy.uri_policy is None:
        return url
    try:
        return policy.uri_policy.check(url)
    except (ForbiddenUriError, NotFoundError) as exc:
        raise ForbiddenUriError(f"redirect refused: {exc}", detail=detail) from None


def _check_streams(container: av.container.InputContainer, uri: str, policy: OpenPolicy) -> None:
    """Refuse what the decoder must not attempt: a video stream FFmpeg has no decoder for (found by
    fuzzing: a damaged codec tag), extreme aspect ratios."""
    for stream in container.streams.video:
        cc = stream.codec_context
        if cc is None:
            raise UnsupportedMediaError("video stream with an unknown codec", detail={"uri": uri})
        w, h = cc.width, cc.height
        if w > 0 and h > 0 and max(w, h) / min(w, h) > policy.max_aspect_ratio:
            raise TooLargeError(f"aspect ratio of {w}x{h} exceeds max_aspect_ratio {policy.max_aspect_ratio}",
                                detail={"uri": uri, "width": w, "height": h})


def _open_url(uri: str, options: dict[str, str], kwargs: dict[str, Any], open_timeout_s: float, read_timeout_s: float,
              policy: OpenPolicy) -> av.container.InputContainer:
    target, hops = uri, 0
    options = {**options, "protocol_whitelist": NET_PROTOCOLS, "max_redirects": "0",
               "rw_timeout": str(int(read_timeout_s * 1e6)), "reconnect": "1", "reconnect_on_network_error": "1",
               "reconnect_delay_max": str(max(1, int(read_timeout_s)))}  # fmt: skip
    while True:
        t0 = time.monotonic()
        try:
            return av.open(target, "r", options=options, **kwargs)
        except av.error.ArgumentError as exc:  # EINVAL: the probed format is not on format_whitelist
            raise ForbiddenMediaError(f"container format not on the allow-list: {exc}", detail={"uri": uri}) from exc
        except (av.error.FFmpegError, OSError) as exc:
            elapsed = time.monotonic() - t0
            if isinstance(exc, av.error.HTTPError | av.error.HTTPClientError):
                raise map_av_error(exc, uri) from exc
            if elapsed >= 0.95 * open_timeout_s or isinstance(exc, av.error.ExitError):
                raise MediaTimeoutError(f"open took longer than {open_timeout_s} s: {exc}",
                                        detail={"uri": uri}) from exc
            location = redirect_location(target, max(0.5, open_timeout_s - elapsed))
            if location is None:
                if isinstance(exc, av.error.InvalidDataError):
                    raise DecodeError(f"not readable media: {exc}", detail={"uri": uri}) from exc
                raise map_av_error(exc, uri) from exc
            hops += 1
            target = _follow(location, hops, policy, uri)
            log.info("%s redirects to %s (hop %d)", uri, target, hops)


def open_input(uri: str, *, open_timeout_s: float, read_timeout_s: float, max_file_bytes: int,
               hwaccel: HWAccel | None = None, policy: OpenPolicy | None = None) -> av.container.InputContainer:
    """Open ``uri`` (absolute local path or http(s) URL) for reading; raise typed errors.

    Local files are size-checked before opening; URLs after opening (from ``Content-Length`` where
    the server sends one). ``policy`` applies, else the calling thread's (see the module docstring).
    ``hwaccel`` (:func:`worker.media.hwaccel.make_hwaccel`) is handed to FFmpeg's decoders as it is.
    """
    policy = policy or current_policy()
    options = {"format_whitelist": ",".join(ALLOWED_FORMATS)}
    # metadata is whatever the file says: invalid UTF-8 in a tag must not make opening fail (found by fuzzing)
    kwargs: dict[str, Any] = {"timeout": (open_timeout_s, read_timeout_s), "metadata_errors": "replace"}
    if hwaccel is not None:
        kwargs["hwaccel"] = hwaccel
    if is_url(uri):
        container = _open_url(uri, options, kwargs, open_timeout_s, read_timeout_s, policy)
    else:
        path = os.path.abspath(uri.removeprefix("file://") if uri.startswith("file://") else uri)
        if not os.path.exists(path):
            raise NotFoundError(f"no such file: {path}", detail={"uri": uri})
        if os.path.isdir(path):
            raise DecodeError(f"is a directory: {path}", detail={"uri": uri})
        if not os.path.isfile(path):  # a FIFO or device would block or never end
            raise UnsupportedMediaError(f"not a regular file: {path}", detail={"uri": uri})
        size = os.path.getsize(path)
        if size > max_file_bytes:
            raise TooLargeError(f"file is {size} bytes > max_file_bytes {max_file_bytes}", detail={"uri": uri})
        if size == 0:
            raise DecodeError("empty file (zero bytes)", detail={"uri": uri})
        options["protocol_whitelist"] = FILE_PROTOCOLS
        try:
            container = av.open("file:" + path, "r", options=options, **kwargs)
        except av.error.ArgumentError as exc:  # EINVAL: the probed format is not on format_whitelist
            raise _classify_local_failure(path, exc, rejected_format=True) from exc
        except av.error.InvalidDataError as exc:
            raise _classify_local_failure(path, exc, rejected_format=False) from exc
        except (av.error.FFmpegError, OSError) as exc:
            raise map_av_error(exc, uri) from exc
    try:
        names = set(container.format.name.split(","))
        if not names & set(ALLOWED_FORMATS):  # defence in depth; format_whitelist already enforces it
            raise ForbiddenMediaError(f"container format {container.format.name!r} not allowed", detail={"uri": uri})
        if is_url(uri):
            size = container.size
            if size and size > max_file_bytes:
                raise TooLargeError(f"resource is {size} bytes > max_file_bytes {max_file_bytes}",
                                    detail={"uri": uri})
            if policy.require_known_length and (size is None or size <= 0) and not container.duration:
                raise UnsupportedMediaError("endless or live stream: the server gives no length and the "
                                            "container no duration", detail={"uri": uri})
        _check_streams(container, uri, policy)
    except BaseException:
        container.close()
        raise
    return container

