"""Fixtures of the service tests: a real uvicorn server in a thread, on a free port, over the real Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from api_helpers import Service, wait_ready

from treepo.service.app import create_app
from treepo.service.config import Settings
from treepo.service.factory import EngineFactory, build_engine
from treepo.service.server import BackgroundServer


@pytest.fixture
def make_service(
    redis_url: str, key_prefix: str, free_port: int, tmp_path
) -> Iterator[Callable[..., Service]]:
    """make_service(engine_factory=..., wait=True, **settings) -> a running Service (stopped after)."""
    running: list[tuple[BackgroundServer, Service]] = []

    def make(engine_factory: EngineFactory = build_engine, wait: bool = True, **overrides: Any) -> Service:
        fields = {
            "engine": "scripted",
            "redis_url": redis_url,
            "key_prefix": key_prefix,
            "port": free_port,
            "weights_dir": tmp_path / "weights",
            "retry_after_s": 1,
            "shutdown_grace_s": 5.0,
            **overrides,
        }
        settings = Settings(**fields)
        settings.weights_dir.mkdir(parents=True, exist_ok=True)
        app = create_app(settings, engine_factory=engine_factory)
        server = BackgroundServer(app, port=settings.port).start()
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        service = Service(server.url, app, settings, client, server)
        running.append((server, service))
        if wait:
            wait_ready(service)
        return service

    yield make
    for server, service in running:
        server.stop()
        service.redis.close()


@pytest.fixture
def service(make_service: Callable[..., Service]) -> Service:
    return make_service()
