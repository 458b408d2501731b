"""POST /weights (a checkpoint path under the weights directory, or an upload) and GET /weights."""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile

from treepo.client.schema import ErrorBody, WeightsInfo
from treepo.service.api.deps import RuntimeDep, SettingsDep
from treepo.service.api.errors import ApiError
from treepo.service.runtime import EngineRuntime, VersionConflict

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/weights", tags=["weights"])


class WeightsUpdate(BaseModel):
    """JSON body of POST /weights."""

    model_config = {"extra": "forbid"}
    path: str = Field(
        min_length=1, description="Checkpoint (safetensors file or model dir), under weights_dir."
    )
    version: int | None = Field(default=None, ge=1, description="New policy_version; null = current + 1.")


_UPLOAD_SCHEMA = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary"},
        "version": {"type": "integer", "minimum": 1},
    },
}
_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": WeightsUpdate.model_json_schema()},
            "multipart/form-data": {"schema": _UPLOAD_SCHEMA},
        },
    }
}
_RESPONSES: dict[int | str, dict] = {
    403: {"model": ErrorBody, "description": "path outside the weights directory"},
    409: {"model": ErrorBody, "description": "version not above the current policy_version"},
    413: {"model": ErrorBody, "description": "upload over the configured limit"},
    422: {"model": ErrorBody, "description": "bad body, missing file, or weights the engine cannot load"},
    503: {"model": ErrorBody, "description": "the engine is not loaded yet (Retry-After)"},
}


@router.get("", response_model=WeightsInfo)
async def get_weights(runtime: RuntimeDep) -> WeightsInfo:
    """The policy_version being sampled and where its weights came from."""
    return runtime.weights


@router.post("", response_model=WeightsInfo, openapi_extra=_OPENAPI, responses=_RESPONSES)
async def update_weights(request: Request, runtime: RuntimeDep, settings: SettingsDep) -> WeightsInfo:
    """Load new weights atomically between engine batches: the prefix cache is invalidated, policy_version
    bumps, and trees in flight record the version of each of their later segments. Send JSON `{path, version}`
    (path under the service's weights directory) or a multipart upload with `file` and `version`."""
    runtime.loaded  # noqa: B018  (503 before reading a large upload if the engine is not up)
    weights_dir = settings.weights_dir.resolve()
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        path, version = await _save_upload(request, weights_dir)
    else:
        update = await _json_update(request)
        path, version = _inside(weights_dir, update.path), update.version
    return await _swap(runtime, path, version)


async def _json_update(request: Request) -> WeightsUpdate:
    try:
        return WeightsUpdate.model_validate_json(await request.body())
    except ValidationError as exc:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise ApiError(
            422,
            f'bad weights update ({msgs}); send JSON {{"path": ..., "version": ...}} or a multipart upload',
            reason="invalid",
        ) from None


def _inside(weights_dir: Path, raw_path: str) -> Path:
    """Resolve `raw_path` (relative to the weights dir) and refuse anything outside it or missing."""
    candidate = Path(raw_path)
    resolved = (candidate if candidate.is_absolute() else weights_dir / candidate).resolve()
    if not resolved.is_relative_to(weights_dir):
        raise ApiError(
            403,
            f"path {raw_path!r} is outside the weights directory {weights_dir}; save the "
            "checkpoint under it (or upload the file)",
            reason="invalid",
        )
    if not resolved.exists():
        raise ApiError(422, f"no checkpoint at {raw_path!r} under {weights_dir}", reason="invalid")
    return resolved


async def _save_upload(request: Request, weights_dir: Path) -> tuple[Path, int | None]:
    form = await request.form(max_files=1, max_fields=4)
    upload, raw_version = form.get("file"), form.get("version")
    if not isinstance(upload, UploadFile):
        raise ApiError(
            422, "multipart upload needs a 'file' part with the safetensors checkpoint", reason="invalid"
        )
    version = None
    if raw_version not in (None, ""):
        if not isinstance(raw_version, str) or not raw_version.isdigit() or int(raw_version) < 1:
            raise ApiError(422, f"version must be a positive integer (got {raw_version!r})", reason="invalid")
        version = int(raw_version)
    target = weights_dir / "uploads" / f"{uuid.uuid4().hex}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        shutil.copyfileobj(upload.file, out)
    await upload.close()
    return target, version


async def _swap(runtime: EngineRuntime, path: Path, version: int | None) -> WeightsInfo:
    new_version = runtime.weights.policy_version + 1 if version is None else version
    try:
        return await runtime.update_weights(str(path), new_version)
    except VersionConflict as exc:
        raise ApiError(409, str(exc)) from None
    except Exception as exc:  # the engine could not load them; the previous weights stay
        logger.exception("weight update from %s failed", path)
        raise ApiError(422, _load_failure(path, exc, runtime), reason="invalid") from None


def _load_failure(path: Path, exc: Exception, runtime: EngineRuntime) -> str:
    return (
        f"the engine could not load weights from {path} ({type(exc).__name__}: {exc}); policy_version stays "
        f"{runtime.weights.policy_version}"
    )
