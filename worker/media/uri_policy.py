"""Which URIs a queued job may name (docs/ARCHITECTURE.md, "Untrusted input").

Rules (interpretations):

- The scheme must be in ``schemes`` (default ``file``, ``http``, ``https``). A bare path counts as
  ``file``. Every other scheme (``data:``, ``concat:``, ``ftp:``, ``subfile:``, ``pipe:``...) is refused.
- http(s): the host (lower-cased, without port or credentials) must equal an entry of ``hosts``,
  or be a sub-domain of an entry written ``.example.com``; an empty list allows no host. URLs with
  user info are refused (credentials do not belong in queue payloads), and so are hosts that are not
  plain ASCII names or IP literals (no IDNA look-alikes, no percent-encoding, no backslashes).
- Local: the path must be absolute (``file:///...`` or ``/...``); it is resolved with
  ``os.path.realpath`` (symlinks and ``..`` collapsed) and the REAL path must lie inside one of the
  real ``roots``; an empty list allows no local file. A missing file is ``not_found`` (checked after the
  root check, so the policy does not reveal what exists outside the roots); anything that is not a
  regular file (a directory, FIFO, socket or device, which would block or never end) is ``forbidden_uri``.
- ``check`` returns what to open: the normalised URL, or the absolute real path.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from worker.errors import ForbiddenUriError, NotFoundError

_HOST = re.compile(r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$|^\[[0-9a-f:.]+\]$")


@dataclass(frozen=True)
class UriPolicy:
    schemes: tuple[str, ...] = ("file", "http", "https")
    hosts: tuple[str, ...] = ()
    roots: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings) -> UriPolicy:
        return cls(
            schemes=tuple(s.lower() for s in settings.allowed_schemes),
            hosts=tuple(h.lower() for h in settings.allowed_hosts),
            roots=tuple(settings.allowed_roots),
        )

    def check(self, uri: str) -> str:
        """Return the URI/real path to open; raise ForbiddenUriError or NotFoundError."""
        if not isinstance(uri, str) or not uri or "\x00" in uri or any(ord(ch) < 32 for ch in uri):
            raise ForbiddenUriError("empty or malformed URI", detail={"uri": repr(uri)[:200]})
        if uri.startswith("/"):
            scheme, path = "file", uri
        else:
            parts = urlsplit(uri)
            scheme = parts.scheme.lower()
            if not scheme or len(scheme) == 1:  # relative path or a Windows drive letter
                raise ForbiddenUriError("relative paths are not allowed", detail={"uri": uri})
            if scheme not in self.schemes or scheme not in ("file", "http", "https"):
                raise ForbiddenUriError(f"scheme {scheme!r} not allowed", detail={"uri": uri})
            if scheme in ("http", "https"):
                return self._check_url(uri)
            if parts.netloc not in ("", "localhost"):
                raise ForbiddenUriError("file URIs must not name a host", detail={"uri": uri})
            path = unquote(parts.path)
        if "file" not in self.schemes:
            raise ForbiddenUriError("local files are not allowed", detail={"uri": uri})
        return self._check_path(path, uri)

    def _check_url(self, uri: str) -> str:
        parts = urlsplit(uri)
        if parts.username or parts.password:
            raise ForbiddenUriError("credentials in URLs are not allowed", detail={"uri": uri})
        try:
            host = (parts.hostname or "").lower().rstrip(".")
            port = parts.port
        except ValueError as exc:
            raise ForbiddenUriError(f"malformed URL: {exc}", detail={"uri": uri}) from exc
        if not host:
            raise ForbiddenUriError("URL has no host", detail={"uri": uri})
        if not _HOST.match(host if ":" not in host else f"[{host}]"):
            raise ForbiddenUriError(f"host {host!r} is not a plain host name or IP address", detail={"uri": uri})
        allowed = any(host == h or (h.startswith(".") and host.endswith(h)) for h in self.hosts)
        if not allowed:
            raise ForbiddenUriError(f"host {host!r} not allowed", detail={"uri": uri})
        name = f"[{host}]" if ":" in host else host
        netloc = name if port is None else f"{name}:{port}"
        return parts._replace(scheme=parts.scheme.lower(), netloc=netloc, fragment="").geturl()

    def _check_path(self, path: str, uri: str) -> str:
        if not os.path.isabs(path):
            raise ForbiddenUriError("relative paths are not allowed", detail={"uri": uri})
        real = os.path.realpath(path)
        for root in self.roots:
            real_root = os.path.realpath(root)
            if real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep):
                break
        else:
            raise ForbiddenUriError("path is outside the allowed roots", detail={"uri": uri})
        try:
            mode = os.stat(real).st_mode
        except OSError:
            raise NotFoundError(f"no such file: {uri}", detail={"uri": uri}) from None
        if not stat.S_ISREG(mode):
            raise ForbiddenUriError("not a regular file", detail={"uri": uri})
        return real
