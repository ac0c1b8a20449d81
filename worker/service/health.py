"""The worker's HTTP endpoint: ``/metrics``, ``/healthz`` and ``/readyz``.

``/metrics`` is prometheus_client's own WSGI exposition (:func:`prometheus_client.make_wsgi_app`):
the Prometheus text format by default, OpenMetrics when the ``Accept`` header asks for
``application/openmetrics-text``, gzip when ``Accept-Encoding`` allows it, and ``?name[]=...`` to
restrict the families. ``/healthz`` is liveness: 503 once the work loop's
:class:`~worker.jobs.liveness.Liveness` has not
been beaten for its timeout (a stuck loop, not only a dead HTTP thread), else 200; before the first
beat (models still loading) it answers 200, because start-up is covered by ``/readyz`` and the
start-up probe. ``/readyz`` answers 200 only when ``ready()`` is true (models loaded and the last Redis
call succeeded), else 503. Any other path is 404.

The server is wsgiref's, one thread per request (prometheus_client's ``ThreadingWSGIServer``), run in a
daemon thread; an IPv6 ``host`` binds an IPv6 socket.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from worker.jobs.liveness import Liveness

__all__ = ["HealthServer"]

log = logging.getLogger(__name__)

_TEXT = [("Content-Type", "text/plain; charset=utf-8")]


class _QuietHandler(WSGIRequestHandler):
    """Request lines go to the debug log, not to stderr."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server API)
        log.debug("http: " + format, *args)


class _Server(ThreadingWSGIServer):
    """A client that hangs up mid-response is not an error worth a traceback on stderr."""

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("http: error serving %s", client_address, exc_info=True)


def _family(host: str, port: int) -> socket.AddressFamily:
    """The address family to bind ``host`` with (AF_INET6 for an IPv6 address or name)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]


class HealthServer:
    """Serves the endpoints on ``host:port`` (port 0 picks a free one; see :attr:`port`). Binding
    happens in the constructor, so a taken port raises :class:`OSError` there. ``liveness`` (optional)
    makes ``/healthz`` follow the work loop; without it ``/healthz`` is 200 while this server runs."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        liveness: Liveness | None = None,
    ) -> None:
        self.registry = registry
        self.ready = ready
        self.liveness = liveness
        self._metrics_app = make_wsgi_app(registry)

        server_class = type("HealthWSGIServer", (_Server,), {"address_family": _family(host, port)})
        self._server = make_server(host, port, self.app, server_class=server_class, handler_class=_QuietHandler)
        self._thread: threading.Thread | None = None

    # --- the WSGI application ----------------------------------------------------------------------
    def app(self, environ: dict[str, Any], start_response: Callable[..., object]) -> Iterable[bytes]:  # WSGI
        """Route ``/healthz`` and ``/readyz`` here, ``/metrics`` to prometheus_client, the rest to 404."""
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path == "/healthz":
            code, body = self.health()
        elif path == "/readyz":
            try:
                ok = bool(self.ready())
            except Exception:  # noqa: BLE001 - a failing readiness check means not ready
                ok = False
            code, body = (200, "ready\n") if ok else (503, "not ready\n")
        else:
            code, body = 404, "not found\n"
        reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[code]
        data = body.encode()
        start_response(f"{code} {reason}", [*_TEXT, ("Content-Length", str(len(data)))])
        return [data]

    def health(self) -> tuple[int, str]:
        """``/healthz``: (status, body). 503 when the work loop has not iterated for the liveness timeout."""
        if self.liveness is None or self.liveness.alive():
            return 200, "ok\n"
        age = self.liveness.age_s() or 0.0
        return 503, f"work loop stalled: no iteration for {age:.1f} s (limit {self.liveness.timeout_s:g} s)\n"

    # --- lifecycle ----------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="health-http", daemon=True)
        self._thread.start()
        log.info("metrics and health on http://%s:%d/", self._server.server_address[0], self.port)
        return self

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for serve_forever, which only start() runs
            self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
