"""The weights directory behind POST /weights: confined paths, checked checkpoints, idempotent pushes, pruned
uploads, and answers that name files relative to the directory (never an absolute server path)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from treepo.client.schema import WeightsInfo
from treepo.service.checkpoint import CheckpointError, check_checkpoint, check_file
from treepo.service.engine.protocol import EngineUnavailable
from treepo.service.fleet import Fleet, FleetWeights
from treepo.service.runtime import EngineRuntime, VersionConflict

logger = logging.getLogger(__name__)

MAX_PATH_CHARS = 255
MAX_POLICY_VERSION = 2**31 - 1
MAX_VERSION_STEP = 1_000_000  # one push may not jump further: a typo must not block every later push
UPLOADS = "uploads"
WEIGHTS_JSON_MAX_BYTES = 64 * 2**10  # a JSON push names a file: a few hundred bytes


class WeightsRefused(Exception):
    """A push that is not loaded: `status` and a message that says how to fix it (no server paths)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass(slots=True)
class Upload:
    """An uploaded checkpoint streamed to a temporary file in the uploads directory."""

    path: Path
    sha256: Any = field(default_factory=hashlib.sha256)
    size: int = 0

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


class WeightsStore:
    """Pushes are serialised; the current checkpoint's hash makes a retried push (same version, same
    content) answer 200 instead of 409; uploads other than the current and previous weights are deleted.
    With a `fleet` (set once Redis is up) pushes are serialised across replicas and recorded there."""

    def __init__(self, weights_dir: Path) -> None:
        self.root = weights_dir.resolve()
        self.uploads = self.root / UPLOADS
        self.fleet: Fleet | None = None
        self._lock = asyncio.Lock()
        self._digest: str | None = None  # of the weights loaded as the current policy_version
        self._loaded: deque[Path] = deque(maxlen=2)  # current and previous checkpoints

    def new_upload(self) -> Upload:
        self.uploads.mkdir(parents=True, exist_ok=True)
        return Upload(self.uploads / f".incoming-{uuid.uuid4().hex}")

    def resolve(self, raw_path: str) -> Path:
        """The checkpoint `raw_path` names (relative to the weights dir, or absolute inside it)."""
        shown = "an absolute path" if raw_path.startswith("/") else repr(raw_path[:80])
        if len(raw_path) > MAX_PATH_CHARS or any(ord(c) < 32 for c in raw_path):
            raise WeightsRefused(
                422,
                f"path must be at most {MAX_PATH_CHARS} characters without control characters (NUL...); "
                "name the checkpoint relative to the weights directory",
            )
        try:
            candidate = Path(raw_path)
            resolved = (candidate if candidate.is_absolute() else self.root / candidate).resolve()
            exists = resolved.exists()
        except (OSError, ValueError):
            raise WeightsRefused(422, f"path {shown} is not a usable file name") from None
        if not resolved.is_relative_to(self.root):
            raise WeightsRefused(
                403,
                f"path {shown} is outside the weights directory; save the checkpoint under it (or upload the file)",
            )
        if not exists:
            raise WeightsRefused(422, f"no checkpoint at {shown} in the weights directory")
        return resolved

    def public(self, info: WeightsInfo) -> WeightsInfo:
        """`info` with its path relative to the weights dir (or only its file name if outside)."""
        if info.path is None:
            return info
        path = Path(info.path)
        shown = path.relative_to(self.root) if path.is_relative_to(self.root) else Path(path.name)
        return info.model_copy(update={"path": shown.as_posix()})

    async def push_path(self, runtime: EngineRuntime, raw_path: str, version: int | None) -> WeightsInfo:
        path = self.resolve(raw_path)
        name = path.relative_to(self.root).as_posix() or "."
        async with self._pushing(runtime):
            new_version = self._check_version(runtime, version)
            digest = await _checked(path, name)
            if self._is_retry(runtime, version, digest):
                return await self._recorded(runtime.weights, digest)
            self._check_fresh(runtime, new_version)
            return await self._swap(runtime, path, new_version, digest)

    async def push_upload(self, runtime: EngineRuntime, upload: Upload, version: int | None) -> WeightsInfo:
        """Check, then load the upload under a stable name; it is deleted unless it became the weights."""
        try:
            async with self._pushing(runtime):
                new_version = self._check_version(runtime, version)
                try:
                    await asyncio.to_thread(check_file, upload.path, "the upload")
                except CheckpointError as exc:
                    raise WeightsRefused(422, str(exc)) from None
                digest = upload.sha256.hexdigest()
                if self._is_retry(runtime, version, digest):
                    return await self._recorded(runtime.weights, digest)
                self._check_fresh(runtime, new_version)
                final = self.uploads / f"v{new_version:010d}-{digest[:16]}.safetensors"
                os.replace(upload.path, final)
                try:
                    return await self._swap(runtime, final, new_version, digest)
                except BaseException:
                    final.unlink(missing_ok=True)
                    raise
        finally:
            upload.discard()

    async def adopt(self, runtime: EngineRuntime, record: FleetWeights) -> None:
        """Serve the fleet's weights, pushed by another replica: shared SGLang workers already serve them
        (the engine only takes the version), an engine of its own loads them from the weights directory."""
        if runtime.shares_weights:  # no await between the version check and the new numbers: no lock
            await self._catch_up(runtime, record)
            return
        async with self._lock:
            await self._catch_up(runtime, record)

    @contextlib.asynccontextmanager
    async def _pushing(self, runtime: EngineRuntime) -> AsyncIterator[None]:
        """One push at a time on this replica and, with a fleet, in the fleet; starts from the fleet's version."""
        async with self._lock:
            if self.fleet is None:
                yield
                return
            async with self.fleet.locked():
                record = await self.fleet.read()
                if record is not None:
                    await self._catch_up(runtime, record)
                yield

    async def _catch_up(self, runtime: EngineRuntime, record: FleetWeights) -> None:
        if record.version <= runtime.weights.policy_version:
            return
        path = self.root / record.path
        if runtime.shares_weights:
            runtime.adopt(str(path), record.version)
        else:
            await runtime.update_weights(str(path), record.version)
        self._loaded_now(path, record.digest)

    def _loaded_now(self, path: Path, digest: str) -> None:
        self._digest = digest
        self._loaded.append(path)

    def _check_version(self, runtime: EngineRuntime, version: int | None) -> int:
        current = runtime.weights.policy_version
        if version is None:
            return current + 1
        if version > current + MAX_VERSION_STEP:
            raise WeightsRefused(
                422,
                f"version {version} jumps more than {MAX_VERSION_STEP} past the current policy_version {current}; "
                "send the trainer's next version (or omit it for current + 1)",
            )
        return version

    def _is_retry(self, runtime: EngineRuntime, version: int | None, digest: str) -> bool:
        """The push already happened (its answer was lost): same version, same content."""
        return version == runtime.weights.policy_version and digest == self._digest

    def _check_fresh(self, runtime: EngineRuntime, version: int) -> None:
        current = runtime.weights.policy_version
        if version == current and self._digest is not None:
            raise WeightsRefused(
                409,
                f"policy_version {current} is already loaded with different weights; push under a version above "
                f"{current} (or omit it)",
            )

    async def _swap(self, runtime: EngineRuntime, path: Path, version: int, digest: str) -> WeightsInfo:
        try:
            info = await runtime.update_weights(str(path), version)
        except VersionConflict as exc:
            raise WeightsRefused(409, str(exc)) from None
        except EngineUnavailable as exc:  # not the checkpoint's fault: retry once the engine is back
            raise WeightsRefused(
                503,
                f"the engine could not be reached ({exc}); policy_version stays "
                f"{runtime.weights.policy_version}; retry after the Retry-After delay",
            ) from None
        except Exception as exc:  # the engine could not load them; the previous weights stay
            logger.exception("weight update from %s failed", path)
            raise WeightsRefused(
                422,
                f"the engine could not load the weights ({type(exc).__name__}: {exc}); "
                f"policy_version stays {runtime.weights.policy_version}",
            ) from None
        self._loaded_now(path, digest)
        self._prune()
        return await self._recorded(info, digest)

    async def _recorded(self, info: WeightsInfo, digest: str) -> WeightsInfo:
        """`info` once the fleet records it (a retry records what a Redis error kept from the record)."""
        if self.fleet is not None and info.path is not None:
            path = self.public(info).path or "."
            await self.fleet.record(FleetWeights(version=info.policy_version, path=path, digest=digest))
        return info

    def _prune(self) -> None:
        """Delete finished uploads that are neither the current nor the previous weights."""
        keep = set(self._loaded)
        for old in self.uploads.glob("v*.safetensors"):
            if old not in keep:
                old.unlink(missing_ok=True)


async def _checked(path: Path, name: str) -> str:
    try:
        return await asyncio.to_thread(check_checkpoint, path, name)
    except CheckpointError as exc:
        raise WeightsRefused(422, str(exc)) from None
