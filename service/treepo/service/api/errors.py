"""Every refusal the API gives, as exceptions mapped to status codes with clear messages and metrics."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from treepo.service.engine.protocol import EngineUnavailable
from treepo.service.rollout import RolloutInputError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """A refusal with a status, a message saying how to fix it, and an optional metric reason."""

    def __init__(
        self, status: int, detail: str, *, reason: str | None = None, retry_after_s: int | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.detail, self.reason, self.retry_after_s = status, detail, reason, retry_after_s


def install_error_handlers(app: FastAPI) -> None:
    """Map validation, rollout-input, engine and API errors to 4xx/503 responses (never a 500 for input)."""

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        _count(request, "invalid")
        assert isinstance(exc, RequestValidationError), f"{exc=}"
        return await request_validation_exception_handler(request, exc)

    async def on_rollout_input(request: Request, exc: Exception) -> JSONResponse:
        _count(request, "invalid")
        assert isinstance(exc, RolloutInputError), f"{exc=}"
        return JSONResponse({"detail": exc.errors}, status_code=422)

    async def on_unavailable(request: Request, exc: Exception) -> JSONResponse:
        _count(request, "engine_unavailable")
        retry = request.app.state.settings.retry_after_s
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": str(retry)})

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError), f"{exc=}"
        if exc.reason:
            _count(request, exc.reason)
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(RolloutInputError, on_rollout_input)
    app.add_exception_handler(EngineUnavailable, on_unavailable)
    app.add_exception_handler(ApiError, on_api_error)


def _count(request: Request, reason: str) -> None:
    request.app.state.metrics.rejected.labels(reason=reason).inc()
