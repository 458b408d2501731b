"""Shared fixtures: a real Redis with a unique key prefix per test, free ports."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

REDIS_URL = os.environ.get("TREEPO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SGLANG_SUITE = Path(__file__).parent / "sglang"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/sglang runs real SGLang servers: only when named on the command line (`make test-sglang`)."""
    if collection_path != SGLANG_SUITE:
        return None
    named = [Path(arg.split("::")[0]).resolve() for arg in config.args]
    return not any(path == SGLANG_SUITE or SGLANG_SUITE in path.parents for path in named)


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
def key_prefix():
    """A unique key prefix; every key under it is deleted after the test."""
    import redis

    prefix = f"treepo-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
