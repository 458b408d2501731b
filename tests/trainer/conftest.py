"""Fixtures shared by the trainer tests."""

from __future__ import annotations

import pytest
import redis


@pytest.fixture
def db(redis_url):
    """A decoded-replies connection to the shared test Redis."""
    connection = redis.Redis.from_url(redis_url, decode_responses=True)
    yield connection
    connection.close()
