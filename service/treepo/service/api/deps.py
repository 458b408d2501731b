"""FastAPI dependencies: the resources built in the lifespan, as `Annotated` aliases for the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from treepo.client.schema import SamplingParams, TreeParams
from treepo.service.api.errors import ApiError
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


async def check_work_budget(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> None:
    """413 before any work when a rollout request may decode more than `max_request_tokens` tokens
    (prompts x width x tokens per trajectory). Reads the JSON that FastAPI already parsed (Starlette caches
    it); a body the schema refuses is left to the route's 422."""
    try:
        body = await request.json()
    except ValueError:  # not JSON (another content type, bad bytes): the route's validation answers
        return
    work = _work(body) if isinstance(body, dict) else None
    if work is None or work[0] <= settings.max_request_tokens:
        return
    total, prompts, width, per_path = work
    fit = max(1, settings.max_request_tokens // (width * per_path))
    raise ApiError(
        413,
        f"this request may decode up to {total:,} tokens ({prompts} prompts x width {width} x {per_path} tokens "
        f"per trajectory); the limit is {settings.max_request_tokens:,} (TREEPO_MAX_REQUEST_TOKENS): split it "
        f"into requests of at most {fit} prompts, or lower width or max_new_tokens",
        reason="too_large",
    )


def _work(body: dict) -> tuple[int, int, int, int] | None:
    tree, sampling = body.get("tree", {}), body.get("sampling", {})
    prompts = body.get("prompts")
    if not (isinstance(prompts, list) and isinstance(tree, dict) and isinstance(sampling, dict)):
        return None
    width = tree.get("width", TreeParams.model_fields["width"].default)
    segment = tree.get("segment_tokens", TreeParams.model_fields["segment_tokens"].default)
    depth = tree.get("max_depth", TreeParams.model_fields["max_depth"].default)
    cap = sampling.get("max_new_tokens", SamplingParams.model_fields["max_new_tokens"].default)
    if not _positive(width, segment, depth) or not (cap is None or _positive(cap)):
        return None
    per_path = segment * depth if cap is None else min(cap, segment * depth)
    return len(prompts) * width * per_path, len(prompts), width, per_path


def _positive(*values: object) -> bool:
    return all(type(v) is int and v > 0 for v in values)


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
