"""One router per resource; `include_routes` mounts them with what every route shares: the bearer-token
scheme and its 401 (declared only when the service has a token, so the document says what the service
does), the 400 of a body FastAPI cannot parse, and the work budget of rollout requests."""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI
from fastapi.security import HTTPBearer

from treepo.client.schema import ErrorBody

_BEARER = HTTPBearer(
    auto_error=False,  # enforced by AuthMiddleware (when TREEPO_API_TOKEN is set); declared here for OpenAPI
    description="Authorization: Bearer <TREEPO_API_TOKEN>, when the service has a token.",
)


def json_error(description: str) -> dict:
    """A documented error answer that is JSON `ErrorBody` even on routes whose success is HTML."""
    return {"description": description, "content": {"application/json": {"schema": _ERROR_BODY}}}


_ERROR_BODY = {"$ref": "#/components/schemas/ErrorBody"}
UNAUTHORIZED: dict[int | str, dict] = {
    401: json_error("missing or wrong bearer token (the service has a token)")
}
BODY_NOT_PARSED: dict[int | str, dict] = {
    400: {"model": ErrorBody, "description": "the body could not be parsed (not UTF-8 JSON)"}
}


def include_routes(app: FastAPI, *, token_required: bool) -> tuple[APIRouter, ...]:
    """Mount every router on `app`; returns them (for the metrics' route labels)."""
    from treepo.service.api.deps import check_work_budget
    from treepo.service.api.routes import health, rollout, trees, weights

    protected = [Depends(_BEARER)] if token_required else []
    unauthorized = UNAUTHORIZED if token_required else {}
    app.include_router(
        rollout.router,
        dependencies=[*protected, Depends(check_work_budget)],  # bounded work per request
        responses={**unauthorized, **BODY_NOT_PARSED},
    )
    for router in (weights.router, trees.router):
        app.include_router(router, dependencies=protected, responses=unauthorized)
    app.include_router(health.router)  # probes and /metrics: never behind the token
    return rollout.router, weights.router, trees.router, health.router
