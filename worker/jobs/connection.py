"""How everything reaches Redis: one factory (:func:`redis_from_url`) for every client the worker, the
producer API (``worker.jobs.enqueue``), ``tagstream enqueue``/``status``/``doctor`` make, and the
pre-flight :func:`connect`.

URLs: whatever ``redis.Redis.from_url`` takes (``redis://``, ``rediss://``, ``unix://``), and Redis
Sentinel (:data:`SENTINEL_SCHEME`)::

    redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER_NAME[/DB][?sentinel_password=P&sentinel_username=U]

Interpretations of the Sentinel form:

* the hosts are the *sentinels* (port 26379 when left out; IPv6 as ``[::1]:26379``), at least one;
* ``USER``/``PASSWORD`` in the user info authenticate to the *master* (the data node), as in
  ``redis://``; a user info without ``:`` is taken as the password; the sentinels get ``sentinel_password`` (and ``sentinel_username``) from the query, and no
  credentials when the query has none (Sentinel's ``requirepass`` is separate from the master's);
* ``MASTER_NAME`` is the name the sentinels monitor (``sentinel monitor NAME ...``); ``DB`` defaults to 0;
* any other query option is refused (a typo would otherwise be silently ignored); percent-escapes in
  the user info, master name and query values are decoded.

The client it returns is an ordinary ``redis.Redis`` over redis-py's ``SentinelConnectionPool``: every
new connection asks the sentinels for the master's address, so after a failover the client reaches the
promoted replica. A demoted master's ``READONLY`` reply is turned by redis-py into a ``ConnectionError``
(it disconnects so the next connect asks the sentinels again), which the worker's retry policy
(:mod:`worker.jobs.redis_retry`) already retries. rq keeps this client on its jobs and queues like any
other.

:func:`connect` checks the URL and PINGs with a short timeout, so a wrong URL or an unreachable server is
one :class:`worker.cli_errors.UsageError` or :class:`worker.cli_errors.ServiceUnavailable` naming the
server (never the password) instead of a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

import redis
from redis.sentinel import Sentinel, SentinelConnectionPool

from worker.cli_errors import ServiceUnavailable, UsageError
from worker.config import Settings
from worker.jobs.redis_retry import REDIS_ERRORS

CHECK_TIMEOUT_S = 5.0
SENTINEL_SCHEME = "redis+sentinel://"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", SENTINEL_SCHEME)
SENTINEL_PORT = 26379
SENTINEL_QUERY_OPTIONS = ("sentinel_password", "sentinel_username")


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``redis+sentinel://`` URL (see the module docstring)."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)

    def sentinel_list(self) -> str:
        """``host:port,host:port`` of the sentinels (IPv6 hosts in brackets)."""
        return ",".join(_hostport(host, port) for host, port in self.sentinels)


def _hostport(host: str, port: int) -> str:
    return f"{f'[{host}]' if ':' in host else host}:{port}"


def _parse_host(text: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``; raises ValueError."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not host or (rest and not rest.startswith(":")):
            raise ValueError(f"bad sentinel address {text!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
        if not host:
            raise ValueError(f"bad sentinel address {text!r}")
    if not port_text:
        return host, SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ValueError(f"bad sentinel port in {text!r}")
    return host, int(port_text)


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse a ``redis+sentinel://`` URL; raises ValueError saying what is wrong."""
    if not url.startswith(SENTINEL_SCHEME):
        raise ValueError(f"not a {SENTINEL_SCHEME} URL")
    rest, _, query = url[len(SENTINEL_SCHEME) :].partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        if colon:
            username, password = unquote(user) or None, unquote(pw) or None
        else:  # a lone user info is the password (Redis without ACL users has only a password)
            password = unquote(user) or None
    sentinels = tuple(_parse_host(h) for h in hosts.split(",") if h)
    if not sentinels:
        raise ValueError("no sentinel address (redis+sentinel://HOST:PORT[,HOST:PORT]/MASTER_NAME)")
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ValueError("expected /MASTER_NAME or /MASTER_NAME/DB after the sentinel addresses")
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise ValueError(f"the database must be a number, not {parts[1]!r}")
        db = int(parts[1])
    options: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in SENTINEL_QUERY_OPTIONS:
            raise ValueError(f"unknown query option {key!r} (known: {', '.join(SENTINEL_QUERY_OPTIONS)})")
        options[key] = value
    return SentinelURL(
        sentinels=sentinels, master_name=unquote(parts[0]), db=db, username=username, password=password,
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None,
    )  # fmt: skip


def redis_from_url(url: str, **kwargs: Any) -> redis.Redis:
    """The one way a client is made: ``redis.Redis.from_url(url, **kwargs)`` for ``redis://``,
    ``rediss://`` and ``unix://``; for ``redis+sentinel://`` the master client of
    ``Sentinel(sentinels).master_for(MASTER_NAME, db=DB, username=..., password=..., **kwargs)``.
    ``kwargs`` are connection options (timeouts, ``health_check_interval``); their ``socket_*`` ones
    also apply to the connections to the sentinels. Raises ValueError for a URL it cannot use. Connects
    to nothing yet."""
    if not url.startswith(SENTINEL_SCHEME):
        return redis.Redis.from_url(url, **kwargs)
    parsed = parse_sentinel_url(url)
    sentinel_kwargs: dict[str, Any] = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
    if parsed.sentinel_password is not None:
        sentinel_kwargs["password"] = parsed.sentinel_password
    if parsed.sentinel_username is not None:
        sentinel_kwargs["username"] = parsed.sentinel_username
    sentinel = Sentinel(list(parsed.sentinels), sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(
        parsed.master_name, db=parsed.db, username=parsed.username, password=parsed.password, **kwargs
    )


def sentinel_pool(connection: redis.Redis) -> SentinelConnectionPool | None:
    """The client's ``SentinelConnectionPool`` when it was made from a ``redis+sentinel://`` URL."""
    pool = connection.connection_pool
    return pool if isinstance(pool, SentinelConnectionPool) else None


def sentinel_addresses(pool: SentinelConnectionPool) -> list[str]:
    """``host:port`` of each sentinel the pool asks."""
    out = []
    for client in pool.sentinel_manager.sentinels:
        kw = client.connection_pool.connection_kwargs
        out.append(_hostport(str(kw.get("host", "localhost")), int(kw.get("port", SENTINEL_PORT))))
    return out


def redis_address(connection: redis.Redis) -> str:
    """``host:port`` (``[v6]:port``) or ``unix:PATH`` of a client's server, or for a Sentinel client
    ``master NAME via sentinels H:P,H:P``; never the credentials."""
    pool = sentinel_pool(connection)
    if pool is not None:
        return f"master {pool.service_name!r} via sentinels {','.join(sentinel_addresses(pool))}"
    kwargs = connection.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix:{kwargs['path']}"
    host = str(kwargs.get("host", "localhost"))
    return f"{f'[{host}]' if ':' in host else host}:{kwargs.get('port', 6379)}"


def _reason(exc: BaseException) -> str:
    """The OS's words for a failed connection ('Connection refused', 'Name or service not known') when
    redis wraps an OSError, else redis' own message."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(exc) or type(exc).__name__


def redis_client(settings: Settings, *, timeout_s: float = CHECK_TIMEOUT_S) -> redis.Redis:
    """A client for ``settings.redis_url`` (not connected yet) whose connects and reads time out after
    ``timeout_s``. Raises :class:`UsageError` for a URL redis-py cannot use."""
    url = settings.redis_url
    if not url.startswith(REDIS_SCHEMES):
        raise UsageError(
            "not a Redis URL (expected redis://, rediss://, unix:// or redis+sentinel://)", setting="redis_url",
            value=url,
        )
    try:
        return redis_from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    except ValueError as exc:  # a port that is not a number, an unknown query option, ...
        raise UsageError(f"not a valid Redis URL ({exc})", setting="redis_url", value=url) from exc


def connect(settings: Settings, *, timeout_s: float = CHECK_TIMEOUT_S) -> redis.Redis:
    """A :func:`redis_client` that has answered PING. Raises :class:`UsageError` for a URL redis-py
    cannot use or credentials the server refuses (the setting is wrong), :class:`ServiceUnavailable`
    when the server cannot be reached or does not answer PING (it is down, or a non-Redis service
    answers there)."""
    connection = redis_client(settings, timeout_s=timeout_s)
    where = redis_address(connection)
    try:
        connection.ping()
    except redis.AuthenticationError as exc:
        raise UsageError(f"Redis at {where} refused the credentials ({exc}); check the user and password in the "
                         "Redis URL", setting="redis_url") from exc  # fmt: skip
    except REDIS_ERRORS as exc:
        raise ServiceUnavailable(f"Redis at {where} is unreachable ({_reason(exc)}); start it or set "
                                 "TAGSTREAM_REDIS_URL (or --redis-url)") from exc  # fmt: skip
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"Redis at {where} did not answer PING ({exc})") from exc
    return connection
