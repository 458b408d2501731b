"""A real uvicorn server in a thread, on a free port, over the real Redis (unique key prefix per test)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI

from treepo.service.app import create_app
from treepo.service.codec import ByteCodec, Codec
from treepo.service.config import Settings
from treepo.service.engine.protocol import EngineError, GenerateOutput, GenerateRequest
from treepo.service.engine.scripted import ScriptedEngine
from treepo.service.factory import EngineFactory, build_engine, printable_script
from treepo.service.server import BackgroundServer

SMALL_TREE = {"width": 4, "branch": 2, "segment_tokens": 6, "max_depth": 3}


@dataclass
class Service:
    url: str
    app: FastAPI
    settings: Settings
    redis: redis.Redis
    server: BackgroundServer

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    @property
    def engine(self) -> Any:
        """The innermost engine (the factory's), for assertions."""
        return self.app.state.runtime.loaded.metered.inner


class FailingEngine(ScriptedEngine):
    """A scripted engine whose generate() calls after the first `num_ok` fail (a broken backend)."""

    def __init__(self, num_ok: int = 0, **kwargs: Any) -> None:
        super().__init__(printable_script(), **kwargs)
        self.num_ok = num_ok

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateOutput]:
        if len(self.calls) >= self.num_ok:
            self.calls.append(list(requests))
            raise EngineError("backend exploded")
        return await super().generate(requests)


def factory_of(make: Callable[[], ScriptedEngine], delay_s: float = 0.0) -> EngineFactory:
    """A factory returning `make()` with a byte codec, after `delay_s` (a slow engine load)."""

    def factory(settings: Settings) -> tuple[ScriptedEngine, Codec]:
        time.sleep(delay_s)
        return make(), ByteCodec()

    return factory


def wait_ready(service: Service, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    with service.client(
        service.settings.api_token.get_secret_value() if service.settings.api_token else None
    ) as c:
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "service never became ready"
            time.sleep(0.05)


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
