"""Probes and Prometheus metrics (never behind auth)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from treepo.service.api.deps import MetricsDep, QueueDep, RuntimeDep
from treepo.service.api.errors import redact_paths
from treepo.service.runtime import EngineRuntime

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
ENGINE_HEALTH_TIMEOUT_S = 2.0


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "engine not loaded or Redis unreachable"}})
async def readyz(request: Request, runtime: RuntimeDep, queue: QueueDep) -> JSONResponse:
    """Ready when the engine is loaded and healthy, serves the fleet's policy_version, and Redis answers."""
    engine_ok = runtime.state == "ready" and await _engine_health(runtime)
    redis_ok = await queue.ping()
    fleet_error = request.app.state.fleet.error
    workers_down = runtime.workers_down
    if runtime.state != "ready":
        engine = runtime.state
    elif not engine_ok:
        engine = "unhealthy"
    else:  # ready; "degraded" while some workers are down (their requests run on the others)
        engine = "degraded" if workers_down else "ready"
    body = {
        "engine": engine,
        "engine_error": redact_paths(runtime.error) if runtime.error else None,
        "redis": "ok" if redis_ok else "unreachable",
        "policy_version": runtime.weights.policy_version,
        "swapping_weights": runtime.gate.is_swapping,
        "fleet": redact_paths(fleet_error) if fleet_error else "ok",
    }
    if workers_down is not None:
        body["workers_down"] = workers_down
    ready = engine_ok and redis_ok and fleet_error is None
    headers = None if ready else {"Retry-After": str(runtime.settings.retry_after_s)}
    return JSONResponse({"ready": ready, **body}, status_code=200 if ready else 503, headers=headers)


async def _engine_health(runtime: EngineRuntime) -> bool:
    """The engine's own health check, bounded: a probe answers in time even when the engine does not."""
    try:
        return await asyncio.wait_for(runtime.health(), timeout=ENGINE_HEALTH_TIMEOUT_S)
    except TimeoutError:
        logger.warning("engine health check did not answer within %.0f s", ENGINE_HEALTH_TIMEOUT_S)
        return False


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, metrics: MetricsDep, queue: QueueDep) -> Response:
    """Prometheus exposition; the queue and Redis gauges are refreshed from Redis on each scrape."""
    try:
        reserved = await request.app.state.jobs.store.num_reserved()  # admitted, not yet published
        stats = await asyncio.wait_for(queue.stats(reserved), timeout=2.0)
        metrics.queue_depth.set(stats.depth)
        metrics.queue_oldest_age.set(stats.oldest_age_s)
        await asyncio.wait_for(request.app.state.housekeeper.observe(), timeout=2.0)
    except (RedisError, OSError, TimeoutError):
        logger.warning("could not refresh the queue and Redis gauges", exc_info=True)
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
