"""How commands reach Redis: ``tagstream enqueue``, ``tagstream status`` and a worker's pre-flight.

:func:`connect` checks the URL and PINGs with a short timeout, so a wrong URL or an unreachable server is
one :class:`worker.cli_errors.UsageError` or :class:`worker.cli_errors.ServiceUnavailable` naming the
server (never the password) instead of a traceback.
"""

from __future__ import annotations

import redis

from worker.cli_errors import ServiceUnavailable, UsageError
from worker.config import Settings
from worker.jobs.redis_retry import REDIS_ERRORS

CHECK_TIMEOUT_S = 5.0
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def redis_address(connection: redis.Redis) -> str:
    """``host:port`` (``[v6]:port``) or ``unix:PATH`` of a client's server; never the credentials."""
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
            "not a Redis URL (expected redis://, rediss:// or unix://)", setting="redis_url", value=url
        )
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
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
