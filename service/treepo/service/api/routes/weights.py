"""POST /weights (a checkpoint path under the weights directory, or an upload) and GET /weights."""

from __future__ import annotations

import asyncio
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field, ValidationError
from python_multipart.multipart import MultipartParser, parse_options_header

from treepo.client.schema import ErrorBody, WeightsInfo
from treepo.service.api.deps import RuntimeDep
from treepo.service.api.errors import ApiError
from treepo.service.fleet import FleetBusy
from treepo.service.weights_store import (
    MAX_PATH_CHARS,
    MAX_POLICY_VERSION,
    Upload,
    WeightsRefused,
    WeightsStore,
)

router = APIRouter(prefix="/weights", tags=["weights"])
WRITE_BATCH_BYTES = 4 * 2**20  # upload bytes handed to the writer thread at a time
_VERSION = re.compile(r"[0-9]{1,10}")


class WeightsUpdate(BaseModel):
    """JSON body of POST /weights."""

    model_config = {"extra": "forbid"}
    path: str = Field(
        min_length=1,
        max_length=MAX_PATH_CHARS,
        description="Checkpoint (safetensors file or model dir), relative to the weights directory.",
    )
    version: int | None = Field(
        default=None, ge=1, le=MAX_POLICY_VERSION, description="New policy_version; null = current + 1."
    )


_UPLOAD_SCHEMA = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary"},
        "version": {"type": "integer", "minimum": 1, "maximum": MAX_POLICY_VERSION},
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
    200: {"description": "loaded (or already loaded: a retry with the same version and content)"},
    403: {"model": ErrorBody, "description": "path outside the weights directory"},
    409: {
        "model": ErrorBody,
        "description": "version not above the fleet's policy_version (final), or another replica is pushing "
        "weights (with Retry-After)",
    },
    413: {"model": ErrorBody, "description": "JSON body or upload over the configured limit"},
    422: {
        "model": ErrorBody,
        "description": "bad body, path or version; not a safetensors file; NaN/Inf weights; or weights the "
        "engine cannot load",
    },
    503: {"model": ErrorBody, "description": "the engine is not loaded yet or unreachable (Retry-After)"},
}


def get_store(request: Request) -> WeightsStore:
    return request.app.state.weights_store


StoreDep = Annotated[WeightsStore, Depends(get_store)]


@router.get("", response_model=WeightsInfo)
async def get_weights(runtime: RuntimeDep, store: StoreDep) -> WeightsInfo:
    """The fleet's policy_version, which this replica samples, and its checkpoint (relative to the weights
    directory)."""
    return store.public(runtime.weights)


@router.post("", response_model=WeightsInfo, openapi_extra=_OPENAPI, responses=_RESPONSES)
async def update_weights(request: Request, runtime: RuntimeDep, store: StoreDep) -> WeightsInfo:
    """Load new weights atomically between engine calls: the prefix cache is invalidated, policy_version
    bumps, and trees in flight record the version of each of their later segments. Send JSON `{path, version}`
    (path relative to the service's weights directory) or a multipart upload with `file` and `version`.
    Checkpoints are checked first (safetensors header, finite tensors); a retry of a push that already
    happened (same version, same content) answers 200."""
    runtime.loaded  # noqa: B018  (503 before reading a large upload if the engine is not up)
    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            upload, version = await _receive_upload(request, store)
            info = await store.push_upload(runtime, upload, version)
        else:
            update = await _json_update(request)
            info = await store.push_path(runtime, update.path, update.version)
    except WeightsRefused as exc:
        if exc.status == 503:
            retry = request.app.state.settings.retry_after_s
            raise ApiError(503, exc.detail, reason="unavailable", retry_after_s=retry) from None
        raise ApiError(exc.status, exc.detail, reason="invalid") from None
    except FleetBusy as exc:
        retry = request.app.state.settings.retry_after_s
        raise ApiError(409, f"{exc}; retry after the Retry-After delay", retry_after_s=retry) from None
    return store.public(info)


async def _json_update(request: Request) -> WeightsUpdate:
    try:
        return WeightsUpdate.model_validate_json(await request.body())
    except ValidationError as exc:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise WeightsRefused(
            422,
            f'bad weights update ({msgs}); send JSON {{"path": ..., "version": ...}} or a multipart upload',
        ) from None


async def _receive_upload(request: Request, store: WeightsStore) -> tuple[Upload, int | None]:
    """Stream the multipart body into a temporary file of the uploads directory (hashing it on the way),
    writing from a worker thread; the file is deleted if anything goes wrong."""
    _, options = parse_options_header(request.headers["content-type"])
    boundary = options.get(b"boundary")
    if not boundary:
        raise WeightsRefused(422, "multipart body without a boundary; let the HTTP client build the upload")
    upload = store.new_upload()
    form = _UploadForm(upload)
    try:
        with upload.path.open("wb") as out:
            form.out = out
            parser = MultipartParser(boundary, form.callbacks())
            pending: list[bytes] = []
            size = 0
            async for chunk in request.stream():
                pending.append(chunk)
                size += len(chunk)
                if size >= WRITE_BATCH_BYTES:
                    await asyncio.to_thread(parser.write, b"".join(pending))
                    pending, size = [], 0
            await asyncio.to_thread(parser.write, b"".join(pending))
            parser.finalize()
        return upload, form.result()
    except WeightsRefused:
        upload.discard()
        raise
    except ValueError as exc:  # malformed multipart framing
        upload.discard()
        raise WeightsRefused(
            422, f"malformed multipart upload ({exc}); send 'file' and 'version' parts"
        ) from None
    except BaseException:
        upload.discard()
        raise


class _UploadForm:
    """Callbacks of the multipart parser: the `file` part goes to disk, `version` is kept (at most 32 bytes)."""

    def __init__(self, upload: Upload) -> None:
        self.upload = upload
        self.out: Any = None
        self.files = 0
        self.version: bytes | None = None
        self._part = ""
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda data, start, end: self._add("_header_name", data[start:end]),
            "on_header_value": lambda data, start, end: self._add("_header_value", data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
        }

    def _begin(self) -> None:
        self._part, self._disposition = "", b""

    def _add(self, name: str, data: bytes) -> None:
        setattr(self, name, getattr(self, name) + data)

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._part = options.get(b"name", b"").decode("latin-1")
        if self._part == "file":
            self.files += 1
        elif self._part == "version":
            self.version = b""
        if self._part not in ("file", "version") or self.files > 1:
            raise WeightsRefused(
                422,
                "a weights upload has one 'file' part (the safetensors checkpoint) and an optional 'version'",
            )

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._part == "file":
            self.out.write(data[start:end])
            self.upload.sha256.update(data[start:end])
            self.upload.size += end - start
        elif self.version is not None:
            self.version += data[start:end]
            if len(self.version) > 32:
                raise WeightsRefused(422, "version must be a positive integer")

    def result(self) -> int | None:
        if self.files != 1:
            raise WeightsRefused(422, "multipart upload needs a 'file' part with the safetensors checkpoint")
        raw = (self.version or b"").decode("latin-1").strip()
        if not raw:
            return None
        if not _VERSION.fullmatch(raw) or not 1 <= int(raw) <= MAX_POLICY_VERSION:
            raise WeightsRefused(
                422, f"version must be an integer from 1 to {MAX_POLICY_VERSION} (got {raw[:32]!r})"
            )
        return int(raw)
