"""Redis Sentinel: the ``redis+sentinel://`` URL (:mod:`worker.jobs.connection`), and a real group of one
master, one replica and three sentinels (``scripts/soak_lib.py`` :class:`SentinelGroup`) through which
``tagstream enqueue``, ``tagstream status`` and the doctor's Redis checks work; after a SIGKILL of the
master, a client made by the factory before the kill reaches the promoted replica.

The full failover run with worker processes and 500 videos is ``scripts/sentinel_failover.py``
(RELIABILITY.md, "Sentinel failover").
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
from pathlib import Path

import pytest
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from soak_lib import SentinelGroup  # noqa: E402

from worker.cli import main  # noqa: E402
from worker.cli_errors import UsageError, redact  # noqa: E402
from worker.config import Settings  # noqa: E402
from worker.jobs.connection import (  # noqa: E402
    connect,
    parse_sentinel_url,
    redis_address,
    redis_client,
    redis_from_url,
    sentinel_pool,
)
from worker.jobs.redis_retry import retry_redis  # noqa: E402
from worker.service.doctor_redis import redact_url, redis_checks  # noqa: E402


# --- the URL -------------------------------------------------------------------------------------------
def test_sentinel_url_parts():
    url = "redis+sentinel://app:s%40cret@10.0.0.1:26380,sentinel-b,[::1]:26381/my%20master/3?sentinel_password=sp"
    parsed = parse_sentinel_url(url)
    assert parsed.sentinels == (("10.0.0.1", 26380), ("sentinel-b", 26379), ("::1", 26381))
    assert parsed.master_name == "my master" and parsed.db == 3
    assert (parsed.username, parsed.password) == ("app", "s@cret")
    assert (parsed.sentinel_username, parsed.sentinel_password) == (None, "sp")
    assert "s@cret" not in repr(parsed) and "sp" not in repr(parsed).replace("sentinels", "")


def test_sentinel_url_defaults_and_lone_password():
    parsed = parse_sentinel_url("redis+sentinel://pw@h1:1,h2:2/mymaster")
    assert parsed.db == 0 and parsed.username is None and parsed.password == "pw"
    assert parsed.sentinel_password is None


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis+sentinel:///mymaster", "no sentinel address"),
        ("redis+sentinel://h:1", "MASTER_NAME"),
        ("redis+sentinel://h:1/m/0/extra", "MASTER_NAME"),
        ("redis+sentinel://h:1/m/zero", "must be a number"),
        ("redis+sentinel://h:port/m", "bad sentinel port"),
        ("redis+sentinel://h:1/m?sentinel_pasword=x", "unknown query option"),
    ],
)
def test_bad_sentinel_urls_are_usage_errors(url, words):
    with pytest.raises(ValueError, match=words):
        parse_sentinel_url(url)
    with pytest.raises(UsageError, match="not a valid Redis URL"):
        redis_client(Settings(redis_url=url))


def test_sentinel_client_and_redaction_without_servers():
    url = "redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/mymaster/2?sentinel_password=sp"
    client = redis_from_url(url, socket_timeout=1)
    pool = sentinel_pool(client)
    assert pool is not None and pool.service_name == "mymaster"
    assert pool.connection_kwargs["db"] == 2 and pool.connection_kwargs["password"] == "pw"
    assert all(s.connection_pool.connection_kwargs["password"] == "sp" for s in pool.sentinel_manager.sentinels)
    assert redis_address(client) == "master 'mymaster' via sentinels 127.0.0.1:1,127.0.0.1:2"
    for masked in (redact(url), redact_url(url)):
        assert "pw" not in masked.replace("sentinel_password", "") and "=sp" not in masked, masked
    assert redis_from_url("redis://127.0.0.1:1/0").connection_pool.connection_kwargs["port"] == 1


def give_up_after(seconds: float) -> threading.Event:
    """An event set after ``seconds``: :func:`retry_redis` then raises instead of retrying."""
    event = threading.Event()
    timer = threading.Timer(seconds, event.set)
    timer.daemon = True
    timer.start()
    return event


# --- a real group --------------------------------------------------------------------------------------
@pytest.fixture
def group(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server (7.x, with --sentinel) on PATH")
    with SentinelGroup(tmp_path / "sentinel", master_name="tagstream") as g:
        yield g


def test_enqueue_status_doctor_and_failover_through_sentinel(group, tmp_path, capsys):
    url = group.url
    flags = ["--redis-url", url, "--queue", "sentinel-test"]
    assert main(["enqueue", "vid-1", "--uri", "/data/vid-1.mp4", *flags]) == 0
    assert capsys.readouterr().out.strip() == "tag-vid-1 enqueued"
    master = group.node("master")
    assert master.exists("rq:job:tag-vid-1") and master.llen("rq:queue:sentinel-test") == 1  # on the master

    assert main(["status", "vid-1", *flags]) == 0
    assert json.loads(capsys.readouterr().out)["job_status"] == "queued"

    checks = {c.name: c for c in redis_checks(Settings(redis_url=url, queue="sentinel-test"))}
    server, sentinels = checks["redis"], checks["redis-sentinel"]
    assert server.status == "OK" and "reached through Sentinel" in server.detail, server
    assert f"127.0.0.1:{group.ports['master']}" in server.detail and "'tagstream'" in server.detail
    assert sentinels.status == "OK", sentinels
    assert sentinels.detail.count(f"master at 127.0.0.1:{group.ports['master']}") == 3, sentinels.detail
    assert "1 replica(s), 2 other sentinel(s), quorum 2" in sentinels.detail
    assert checks["queue"].status == "OK" and "1 job waiting" in checks["queue"].detail

    # the replica has the job before the master dies (asynchronous replication; WAIT makes it certain)
    assert master.execute_command("WAIT", 1, 2000) == 1
    client = connect(Settings(redis_url=url))  # made before the failover, as a worker's is
    group.kill("master")
    group.wait_promoted("replica", timeout_s=20)
    # the pooled connection to the dead master fails; the next connection asks the sentinels, which may
    # still be settling (MasterNotFoundError, a ConnectionError): the worker's retry policy retries both
    retry_redis(lambda: client.set("after-failover", "1"), give_up=give_up_after(10.0))
    assert client.connection_pool.get_master_address() == ("127.0.0.1", group.ports["replica"])
    assert client.info("server")["tcp_port"] == group.ports["replica"]
    assert group.node("replica").get("after-failover") == b"1"

    assert main(["status", "vid-1", *flags]) == 0  # the job survived on the promoted replica
    assert json.loads(capsys.readouterr().out)["job_status"] == "queued"
    assert main(["enqueue", "vid-1", *flags]) == 0  # idempotent re-submission after the failover
    assert capsys.readouterr().out.strip() == "tag-vid-1 already queued"
    with pytest.raises(redis.ConnectionError):
        group.node("master").ping()
