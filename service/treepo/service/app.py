"""The FastAPI application: `create_app(settings)` wires settings, metrics, Redis, the engine and routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import redis.asyncio as aioredis
from fastapi import FastAPI
from starlette.routing import BaseRoute

from treepo.service.api.errors import install_error_handlers
from treepo.service.api.middleware import (
    AuthMiddleware,
    BodyLimitMiddleware,
    CancelOnDisconnectMiddleware,
    MetricsMiddleware,
)
from treepo.service.api.routes import include_routes
from treepo.service.config import Settings
from treepo.service.factory import EngineFactory, build_engine
from treepo.service.fleet import Fleet, FleetFollower
from treepo.service.jobs import QueueJobs
from treepo.service.jobstore import JobStore
from treepo.service.metrics import ServiceMetrics
from treepo.service.queue import Retention, TreeQueue
from treepo.service.retention import Housekeeper
from treepo.service.runtime import EngineRuntime
from treepo.service.weights_store import WEIGHTS_JSON_MAX_BYTES, WeightsStore

logger = logging.getLogger(__name__)
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]
DESCRIPTION = """TreePO rollout-as-a-service: tree-structured sampling (arXiv 2508.17445) for RL on reasoning
LLMs. Trees are returned inline, streamed as NDJSON, or XADDed to a Redis stream for trainers."""


def create_app(settings: Settings | None = None, *, engine_factory: EngineFactory = build_engine) -> FastAPI:
    """A new app with its own metrics registry; the engine loads in the background once it starts."""
    settings = settings or Settings()
    app = FastAPI(
        title="TreePO rollout service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=_lifespan(settings, engine_factory),
    )
    routers = include_routes(app, token_required=settings.api_token is not None)
    # Routes with their full paths (FastAPI nests included routers), for bounded `route` label values.
    flat_routes = [r for r in app.routes if hasattr(r, "path")] + [r for rt in routers for r in rt.routes]
    metrics = ServiceMetrics(routes=_route_methods(flat_routes))
    app.state.settings, app.state.metrics = settings, metrics
    install_error_handlers(app)
    token = settings.api_token.get_secret_value() if settings.api_token else None
    app.state.weights_store = WeightsStore(settings.weights_dir)
    # Added innermost first: metrics see every answer, auth runs before the body is read.
    app.add_middleware(
        CancelOnDisconnectMiddleware, paths=frozenset({"/rollout_tree"}), retry_after_s=settings.retry_after_s
    )
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        metrics=metrics,
        path_limits={"/weights": WEIGHTS_JSON_MAX_BYTES},
        upload_limits={"/weights": settings.max_upload_bytes},
    )
    app.add_middleware(AuthMiddleware, token=token, metrics=metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=flat_routes)
    return app


def _lifespan(settings: Settings, engine_factory: EngineFactory) -> Lifespan:
    """Redis, the queue, the engine runtime and the queue jobs live as long as the server."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = aioredis.Redis.from_url(
            settings.redis_url, decode_responses=True, socket_connect_timeout=2.0, socket_timeout=10.0
        )
        queue = TreeQueue(redis, settings.key_prefix, _retention(settings), settings.training_groups)
        store = JobStore(
            redis, settings.key_prefix, lease_s=settings.job_lease_s, job_ttl_s=settings.job_ttl_s
        )
        runtime = EngineRuntime(settings, app.state.metrics, engine_factory)
        jobs = QueueJobs(queue, store, app.state.metrics, retry_window_s=settings.redis_retry_window_s)
        housekeeper = Housekeeper(
            redis,
            settings.key_prefix,
            settings.training_groups,
            app.state.metrics,
            failures_retention_s=settings.failures_retention_s,
        )
        app.state.queue, app.state.runtime, app.state.jobs = queue, runtime, jobs
        app.state.housekeeper = housekeeper
        app.state.weights_store.fleet = fleet = Fleet(redis, settings.key_prefix)
        app.state.fleet = follower = FleetFollower(
            fleet, runtime, app.state.weights_store, poll_s=settings.fleet_poll_s
        )
        loader = asyncio.create_task(runtime.load(before_ready=follower.start), name="engine-load")
        following = asyncio.create_task(follower.run(), name="fleet-weights")
        maintainer = asyncio.create_task(jobs.maintain(runtime), name="job-maintenance")
        trimmer = asyncio.create_task(housekeeper.run(settings.trim_interval_s), name="redis-trim")
        try:
            yield
        finally:
            await jobs.drain(_grace_left(app, settings))  # accepted trees finish or are left to recovery
            background = (loader, maintainer, trimmer, following)
            for task in background:
                task.cancel()
            _, stuck = await asyncio.wait(background, timeout=5.0)  # a stop never hangs on them
            for task in stuck:
                logger.warning("background task %s did not stop within 5 s; leaving it", task.get_name())
            await runtime.close()
            await redis.aclose()

    return lifespan


def _grace_left(app: FastAPI, settings: Settings) -> float:
    """What is left of the shutdown grace period (GracefulServer stamps its deadline when the stop began)."""
    deadline = getattr(app.state, "shutdown_deadline", None)
    return settings.shutdown_grace_s if deadline is None else max(0.0, deadline - time.monotonic())


def _retention(settings: Settings) -> Retention:
    return Retention(
        tree_ttl_s=settings.tree_ttl_s,
        idempotency_ttl_s=settings.idempotency_ttl_s,
        pending_lease_s=settings.idempotency_lease_s,
        max_copy_bytes=settings.max_copy_bytes,
    )


def _route_methods(routes: list[BaseRoute]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for route in routes:
        for method in sorted(getattr(route, "methods", None) or ()):
            if method != "HEAD":
                pairs.append((getattr(route, "path", ""), method))
    return tuple(pairs)
