"""FastAPI dependencies: the resources built in the lifespan, as `Annotated` aliases for the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from treepo.service.config import Settings
from treepo.service.jobs import QueueJobs
from treepo.service.metrics import ServiceMetrics
from treepo.service.queue import TreeQueue
from treepo.service.runtime import EngineRuntime, Loaded


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


def get_runtime(request: Request) -> EngineRuntime:
    return request.app.state.runtime


def get_queue(request: Request) -> TreeQueue:
    return request.app.state.queue


def get_jobs(request: Request) -> QueueJobs:
    return request.app.state.jobs


async def get_loaded(runtime: Annotated[EngineRuntime, Depends(get_runtime)]) -> Loaded:
    """The engine for new work: 503 + Retry-After while it loads or swaps weights for too long."""
    return await runtime.acquire()


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
RuntimeDep = Annotated[EngineRuntime, Depends(get_runtime)]
QueueDep = Annotated[TreeQueue, Depends(get_queue)]
JobsDep = Annotated[QueueJobs, Depends(get_jobs)]
LoadedDep = Annotated[Loaded, Depends(get_loaded)]
IdempotencyKeyDep = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=256,
        description="A retry with the same key returns the first answer and enqueues nothing twice.",
    ),
]
