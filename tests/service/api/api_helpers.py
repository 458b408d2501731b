"""Helpers of the service tests: a real uvicorn server in a thread over the real Redis, scripted engines."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import redis
from fastapi import FastAPI

from treepo.service.codec import ByteCodec, Codec
from treepo.service.config import Settings
from treepo.service.engine.protocol import EngineError, GenerateOutput, GenerateRequest
from treepo.service.engine.scripted import ScriptedEngine
from treepo.service.factory import EngineFactory, printable_script
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

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        if len(self.requests) >= self.num_ok:
            self.requests.append(request)
            raise EngineError("backend exploded")
        return await super().generate(request)


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
