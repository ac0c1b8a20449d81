"""The Redis checks of ``tagstream doctor``: the server, its eviction policy and persistence, the queue and
the intake stream.

Interpretations:

* Unreachable (connection refused, timeout, wrong password, TLS failure) is FAIL; the other Redis checks
  are then not run. The URL in the report has its password replaced by ``***``.
* rq dequeues with BLMOVE, so a server older than 6.2 is FAIL.
* ``maxmemory-policy`` must be ``noeviction``: under any other policy Redis may evict rq's queue list and
  job hashes when it reaches ``maxmemory``, and jobs vanish without a failure anywhere. WARN, whatever
  ``maxmemory`` is now (a limit set later starts evicting at once). Read from ``INFO memory``, which
  managed services that disable CONFIG still answer.
* Persistence: AOF on is OK; AOF off with an RDB ``save`` schedule is OK (a crash loses the writes since
  the last snapshot; the detail says so); neither is WARN (a restart loses the queue, the jobs and the
  results). When CONFIG GET is refused and AOF is off, the schedule is unknown: WARN saying so.
* Sentinel (a ``redis+sentinel://`` URL): the ``redis`` line says the master was reached through
  Sentinel and at which address; ``redis-sentinel`` gives each sentinel's view (``SENTINEL MASTER``: the
  address it holds for the master, its flags, replicas, other sentinels, quorum). OK when every sentinel
  answers and they agree on the address; WARN when one is unreachable, they disagree, or the master has no
  replica (a failover then has nothing to promote); FAIL when none answers.
* The queue list (``rq:queue:<queue>``) and the intake stream (``tagstream:uploads``) are information:
  absent is OK (the first job or worker creates them); a key of another type is FAIL for the queue (rq
  cannot use it) and WARN for the stream (only the bridge from the stream stops).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import redis

from worker.cli_errors import redact
from worker.config import Settings
from worker.jobs.connection import redis_address, redis_from_url, sentinel_pool
from worker.jobs.queue_metrics import queue_key
from worker.keys import UPLOADS_GROUP, UPLOADS_STREAM
from worker.service.doctor_checks import Check, error_text, fail, ok, plural, warn

log = logging.getLogger(__name__)

MIN_REDIS = (6, 2)
CONNECT_TIMEOUT_S = 5.0


def redact_url(url: str) -> str:
    """``url`` as the report shows it: passwords masked by the CLI's one rule (:func:`worker.cli_errors.redact`)."""
    return redact(url)


def connect(url: str) -> redis.Redis:
    """A client with short timeouts, so an unreachable server fails the check quickly."""
    return redis_from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=CONNECT_TIMEOUT_S)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def check_server(connection: redis.Redis, url: str) -> tuple[Check, dict[str, Any] | None]:
    """``redis``: reachable, version, mode. Returns the INFO dict for the other checks (None: unreachable)."""
    shown = redact_url(url)
    try:
        info = connection.info()
    except (redis.RedisError, OSError) as exc:
        return fail("redis", f"cannot reach {shown}: {error_text(exc)}"), None
    version = _text(info.get("redis_version", "?"))
    mode = _text(info.get("redis_mode", "standalone"))
    detail = f"Redis {version} ({mode}) at {shown}"
    pool = sentinel_pool(connection)
    if pool is not None:
        host, port = pool.get_master_address()
        detail = (f"Redis {version} ({mode}), master {pool.service_name!r} at {host}:{port} reached through "
                  f"Sentinel ({redis_address(connection).split(' via sentinels ')[1]})")  # fmt: skip
    if _version_tuple(version) < MIN_REDIS:
        return fail(
            "redis", f"{detail}: rq needs Redis {MIN_REDIS[0]}.{MIN_REDIS[1]} or newer (BLMOVE)"
        ), info
    if mode == "cluster":
        return warn("redis", f"{detail}: rq does not support Redis Cluster"), info
    return ok("redis", detail), info


def _sentinel_view(client: redis.Redis, name: str) -> dict[str, Any]:
    """``SENTINEL MASTER name`` from one sentinel, as text."""
    raw = client.execute_command("SENTINEL MASTER", name)
    if isinstance(raw, dict):
        return {_text(k): _text(v) for k, v in raw.items()}
    return {_text(k): _text(v) for k, v in zip(raw[::2], raw[1::2], strict=True)}


def check_sentinels(connection: redis.Redis) -> Check | None:
    """``redis-sentinel``: each sentinel's view of the master (see the module docstring); None when the
    client is not a Sentinel one."""
    pool = sentinel_pool(connection)
    if pool is None:
        return None
    name = pool.service_name
    views: list[str] = []
    addresses: set[str] = set()
    answered = problems = 0
    replicas = 0
    for client in pool.sentinel_manager.sentinels:
        kw = client.connection_pool.connection_kwargs
        where = f"{kw.get('host')}:{kw.get('port')}"
        try:
            view = _sentinel_view(client, name)
        except (redis.RedisError, OSError) as exc:
            problems += 1
            views.append(f"{where}: unreachable ({error_text(exc)})")
            continue
        answered += 1
        address = f"{view.get('ip')}:{view.get('port')}"
        addresses.add(address)
        replicas = max(replicas, int(view.get("num-slaves", 0) or 0))
        views.append(f"{where}: master at {address}, flags {view.get('flags')}, {view.get('num-slaves')} replica(s), "
                     f"{view.get('num-other-sentinels')} other sentinel(s), quorum {view.get('quorum')}")  # fmt: skip
    text = "; ".join(views)
    if answered == 0:
        return fail("redis-sentinel", f"no sentinel answers for master {name!r}: {text}")
    if problems or len(addresses) > 1:
        return warn("redis-sentinel", f"sentinels disagree or are missing: {text}")
    if replicas == 0:
        return warn("redis-sentinel", f"master {name!r} has no replica, a failover has nothing to promote: {text}")
    return ok("redis-sentinel", text)


def check_maxmemory_policy(info: dict[str, Any]) -> Check:
    policy = _text(info.get("maxmemory_policy", "unknown"))
    limit = int(info.get("maxmemory", 0) or 0)
    limit_text = f"maxmemory {limit / 2**20:.0f} MiB" if limit else "no maxmemory set"
    if policy == "noeviction":
        return ok("redis-maxmemory-policy", f"noeviction ({limit_text})")
    return warn(
        "redis-maxmemory-policy",
        f"{policy} ({limit_text}): Redis may EVICT queued jobs silently when "
        "memory runs out; rq needs noeviction (CONFIG SET maxmemory-policy noeviction, and in redis.conf)",
    )


def _config(connection: redis.Redis, name: str) -> str | None:
    """``CONFIG GET name``, or None when refused (managed services, ACLs)."""
    try:
        return _text(connection.config_get(name).get(name, ""))
    except redis.RedisError as exc:
        log.debug("CONFIG GET %s refused: %s", name, exc)
        return None


def check_persistence(info: dict[str, Any], save: str | None, appendfsync: str | None = None) -> Check:
    """See the module docstring. ``save`` is the RDB schedule (``""``: off; None: unknown)."""
    if int(info.get("aof_enabled", 0) or 0):
        rdb = f"; RDB save {save!r}" if save else ""
        return ok("redis-persistence", f"AOF on (appendfsync {appendfsync or '?'}){rdb}")
    if save:
        return ok(
            "redis-persistence",
            f"RDB snapshots (save {save!r}), AOF off: a crash loses the writes since the last snapshot",
        )
    if save is None:
        return warn(
            "redis-persistence",
            "AOF off and the RDB schedule is unknown (CONFIG GET refused): make sure "
            "this Redis persists, or a restart loses the queue",
        )
    return warn(
        "redis-persistence",
        "AOF and RDB snapshots are both off: a Redis restart loses the queue, "
        "queued jobs and results (appendonly yes)",
    )


def check_queue(connection: redis.Redis, queue: str) -> Check:
    key = queue_key(queue)
    kind = _text(connection.type(key))
    workers = connection.scard(f"rq:workers:{queue}")
    if kind == "none":
        return ok(
            "queue", f"{key} does not exist yet (no job waiting); {plural(workers, 'worker')} registered"
        )
    if kind != "list":
        return fail("queue", f"{key} holds a {kind}, not a list: rq cannot use it")
    return ok(
        "queue",
        f"{key}: {plural(connection.llen(key), 'job')} waiting; {plural(workers, 'worker')} registered",
    )


def check_intake_stream(connection: redis.Redis) -> Check:
    kind = _text(connection.type(UPLOADS_STREAM))
    if kind == "none":
        return ok(
            "intake-stream",
            f"{UPLOADS_STREAM} does not exist yet (a worker creates it with group {UPLOADS_GROUP})",
        )
    if kind != "stream":
        return warn(
            "intake-stream", f"{UPLOADS_STREAM} holds a {kind}, not a stream: the bridge cannot read it"
        )
    groups = {_text(g.get("name")): g for g in connection.xinfo_groups(UPLOADS_STREAM)}
    group = groups.get(UPLOADS_GROUP)
    state = (
        f"group {UPLOADS_GROUP} present, {group.get('pending', 0)} pending"
        if group
        else (f"no group {UPLOADS_GROUP} yet")
    )
    entries = connection.xlen(UPLOADS_STREAM)
    return ok(
        "intake-stream", f"{UPLOADS_STREAM}: {plural(entries, 'entry', 'entries')} not bridged yet; {state}"
    )


def redis_checks(
    settings: Settings, connection: redis.Redis | None = None, *, with_keys: bool = True
) -> list[Check]:
    """All Redis checks; ``with_keys=False`` leaves out the queue and stream (start-up needs none)."""
    connection = connection if connection is not None else connect(settings.redis_url)
    server, info = check_server(connection, settings.redis_url)
    if info is None:
        return [server]
    sentinels = check_sentinels(connection)
    checks = [
        server,
        *([sentinels] if sentinels is not None else []),
        check_maxmemory_policy(info),
        check_persistence(info, _config(connection, "save"), _config(connection, "appendfsync")),
    ]
    if with_keys:
        try:
            checks += [check_queue(connection, settings.queue), check_intake_stream(connection)]
        except redis.RedisError as exc:
            checks.append(warn("queue", f"could not inspect the queue and stream: {error_text(exc)}"))
    return checks
