"""POST /rollout_tree: one tree per prompt, delivered inline, to the Redis stream, or as NDJSON."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response, StreamingResponse
from redis.exceptions import RedisError

from treepo.client.schema import ErrorBody, RolloutAccepted, RolloutTreeRequest, RolloutTreeResponse, Tree
from treepo.service.api.deps import IdempotencyKeyDep, JobsDep, LoadedDep, MetricsDep, QueueDep, SettingsDep
from treepo.service.api.errors import ApiError
from treepo.service.config import Settings
from treepo.service.jobs import QueueJobs, job_record
from treepo.service.metrics import ServiceMetrics
from treepo.service.queue import IdempotencyRecord, TreeQueue
from treepo.service.rollout import PreparedPrompt, TreeFailure, prepare, sample_trees
from treepo.service.runtime import Loaded

logger = logging.getLogger(__name__)
router = APIRouter(tags=["rollout"])
NDJSON = "application/x-ndjson"

_RESPONSES: dict[int | str, dict] = {
    200: {
        "description": 'inline: the trees; stream: one Tree JSON per line (NDJSON), or {"error": ...} lines',
        "content": {NDJSON: {}},
    },
    202: {
        "model": RolloutAccepted,
        "description": "queue: the job is recorded in Redis; each tree is XADDed to the stream once",
        "headers": {
            "Job-Remaining-Trees": {
                "description": "on a replay (Idempotent-Replayed: true): trees of the job not yet published",
                "schema": {"type": "string"},
            }
        },
    },
    409: {"model": ErrorBody, "description": "the same Idempotency-Key is still being processed"},
    410: {
        "model": ErrorBody,
        "description": "the first answer to this Idempotency-Key was too large to keep, or its trees expired",
    },
    413: {"model": ErrorBody, "description": "request body or prompt count over the configured limit"},
    429: {"model": ErrorBody, "description": "the trees stream is over its configured depth (Retry-After)"},
    503: {"model": ErrorBody, "description": "engine loading/swapping or Redis unreachable (Retry-After)"},
}


@router.post("/rollout_tree", response_model=RolloutTreeResponse, responses=_RESPONSES)
async def rollout_tree(
    body: RolloutTreeRequest,
    settings: SettingsDep,
    metrics: MetricsDep,
    loaded: LoadedDep,
    queue: QueueDep,
    jobs: JobsDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> Response:
    """Sample one TreePO tree per prompt. `delivery`: `inline` answers 200 with the trees, `queue` answers
    202 and XADDs each tree to the Redis stream as it completes, `stream` answers NDJSON, one tree per line
    in completion order. With `Idempotency-Key`, a retry returns the first answer and enqueues nothing
    twice."""
    if len(body.prompts) > settings.max_prompts_per_request:
        raise ApiError(
            413,
            f"{len(body.prompts)} prompts in one request; the limit is "
            f"{settings.max_prompts_per_request}: split the batch",
            reason="too_large",
        )
    fingerprint = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    if idempotency_key:
        earlier = await queue.claim(idempotency_key, fingerprint)
        if earlier is not None:
            return await _replay(earlier, fingerprint, settings.retry_after_s, jobs)
        if body.delivery != "stream":  # a stream holds its key while its body runs (never started: lapses)
            jobs.held_keys.add(idempotency_key)
    call = _Rollout(body, loaded, metrics, queue, settings, jobs, idempotency_key, fingerprint)
    try:
        prompts = prepare(body, loaded.codec, loaded.metered.max_context, call.request_id)
        response = await call.deliver(prompts)
    except BaseException:
        await call.release()
        raise
    finally:
        if body.delivery != "stream" and idempotency_key:
            jobs.held_keys.discard(idempotency_key)
    metrics.rollout_prompts.labels(delivery=body.delivery).inc(len(prompts))
    return response


@dataclass(slots=True)
class _Rollout:
    """One accepted request on its way to the caller, the stream, or both."""

    body: RolloutTreeRequest
    loaded: Loaded
    metrics: ServiceMetrics
    queue: TreeQueue
    settings: Settings
    jobs: QueueJobs
    idempotency_key: str | None
    fingerprint: str
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    async def deliver(self, prompts: list[PreparedPrompt]) -> Response:
        if self.body.delivery == "queue":
            return await self._queued(prompts)
        if self.body.delivery == "inline":
            return await self._inline(prompts)
        return StreamingResponse(self._ndjson(prompts), media_type=NDJSON)

    async def release(self) -> None:
        if self.idempotency_key:
            self.jobs.held_keys.discard(self.idempotency_key)
            await self.queue.release(self.idempotency_key)

    async def _queued(self, prompts: list[PreparedPrompt]) -> Response:
        """Record the job (and the idempotency record pointing at it) in Redis, then answer 202."""
        tree_ids = [p.tree_id for p in prompts]
        accepted = RolloutAccepted(request_id=self.request_id, tree_ids=tree_ids, stream=self.queue.stream)
        response = JSONResponse(accepted.model_dump(), status_code=202)
        idem = None
        if self.idempotency_key:
            record = IdempotencyRecord(self.fingerprint, True, 202, "application/json", "", self.request_id)
            record.body = bytes(response.body).decode()
            idem = self.queue.done_record(self.idempotency_key, record)
        admission = await self.jobs.store.admit(
            self.request_id,
            job_record(self.body, prompts, self.request_id),
            tree_ids,
            max_depth=self.settings.max_queue_depth,
            groups=self.queue.groups,
            idempotency=idem,
        )
        self.metrics.queue_depth.set(admission.depth)
        if not admission.accepted:
            raise ApiError(
                429,
                f"the queue holds {admission.depth} unconsumed or reserved trees; {len(prompts)} more would "
                f"pass the limit {self.settings.max_queue_depth}: retry after the trainer catches up",
                reason="queue_full",
                retry_after_s=self.settings.retry_after_s,
            )
        self.jobs.start(self.loaded, self.request_id, prompts, self.body)
        return response

    async def _inline(self, prompts: list[PreparedPrompt]) -> Response:
        payloads: dict[int, tuple[str, str]] = {}  # prompt index -> (tree id, tree JSON)
        failures: list[TreeFailure] = []
        index = {p.tree_id: p.index for p in prompts}
        kept: set[str] = set()
        async for result in sample_trees(self.loaded.sampler, prompts, self.body, self.metrics):
            if isinstance(result, Tree):
                payload = result.model_dump_json()
                payloads[index[result.tree_id]] = (result.tree_id, payload)
                if await self.queue.remember(result, payload):
                    kept.add(result.tree_id)
            else:
                failures.append(result)
        if failures:
            await self.release()  # a retry samples again
            return _failed(failures, len(prompts), self.request_id, self.settings.retry_after_s)
        ordered = [payloads[i] for i in sorted(payloads)]
        body = _trees_json([payload for _, payload in ordered])
        await self._remember(200, "application/json", body, [tree_id for tree_id, _ in ordered], kept)
        return Response(body, media_type="application/json")

    async def _ndjson(self, prompts: list[PreparedPrompt]) -> AsyncIterator[str]:
        """One line per tree as it completes; a failed tree becomes an {"error": {...}} line."""
        lines: list[str] = []
        tree_ids: list[str] = []
        error_lines: list[str] = []
        kept: set[str] = set()
        try:
            if self.idempotency_key:
                self.jobs.held_keys.add(self.idempotency_key)
            async for result in sample_trees(self.loaded.sampler, prompts, self.body, self.metrics):
                if isinstance(result, Tree):
                    payload = result.model_dump_json()
                    tree_ids.append(result.tree_id)
                    if await self.queue.remember(result, payload):
                        kept.add(result.tree_id)
                    line = payload + "\n"
                else:
                    line = json.dumps({"error": result.record(self.request_id)}) + "\n"
                    error_lines.append(line)
                lines.append(line)
                yield line
        except BaseException:
            await self.release()
            raise
        if self.idempotency_key:
            self.jobs.held_keys.discard(self.idempotency_key)
            if kept.issuperset(tree_ids):  # trees replayed from their copies; only error lines kept here
                await self._remember(200, NDJSON, "".join(error_lines), tree_ids, kept)
            else:
                await self._remember(200, NDJSON, "".join(lines), [], set())

    async def _remember(
        self, status: int, media_type: str, body: str, tree_ids: list[str], kept: set[str]
    ) -> None:
        """Keep a successful answer for replays. Trees that have a GET /trees copy are kept once: the
        record lists their ids and a replay rebuilds the answer from the copies."""
        if not self.idempotency_key:
            return
        record = IdempotencyRecord(self.fingerprint, True, status, media_type, body)
        if tree_ids and kept.issuperset(tree_ids):
            record.trees = tree_ids
            if media_type != NDJSON:
                record.body = ""
        await _best_effort(self.queue.complete(self.idempotency_key, record))


def _trees_json(payloads: list[str]) -> str:
    """A RolloutTreeResponse body from the trees' JSON, byte for byte what a replay rebuilds."""
    return '{"trees":[' + ",".join(payloads) + "]}"


async def _best_effort(write: Awaitable[None]) -> None:
    """Sampled trees are answered even when Redis cannot keep the replay record (its claim then lapses)."""
    try:
        await write
    except (RedisError, OSError):
        logger.warning("could not store an idempotency record (Redis unreachable)")


def _failed(failures: list[TreeFailure], num_prompts: int, request_id: str, retry_after_s: int) -> Response:
    """Inline answer when trees failed: 422 if the sampler refused the input, 503 if the engine is down,
    502 if the engine answered with an error (the fault is upstream of this service, not in the request)."""
    kinds = {failure.kind for failure in failures}
    status, headers = 502, None
    if kinds == {"input"}:
        status = 422
    elif "unavailable" in kinds:
        status, headers = 503, {"Retry-After": str(retry_after_s)}
    records = [failure.record(request_id) for failure in failures]
    detail = {"message": f"{len(failures)} of {num_prompts} trees could not be sampled", "failures": records}
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _replay(
    record: IdempotencyRecord, fingerprint: str, retry_after_s: int, jobs: QueueJobs
) -> Response:
    if record.fingerprint != fingerprint:
        raise ApiError(
            422,
            "this Idempotency-Key was used with a different request body; use a new key for a new request",
            reason="invalid",
        )
    if not record.is_done:
        raise ApiError(
            409,
            "a request with this Idempotency-Key is still running; retry later",
            retry_after_s=retry_after_s,
        )
    if record.status < 0:
        raise ApiError(
            410,
            "the first answer to this Idempotency-Key was too large to keep (max_copy_bytes); "
            "fetch its trees with GET /trees/{id} or send the request again with a new key",
            reason="invalid",
        )
    headers = {"Idempotent-Replayed": "true"}
    if record.job:  # the job's real state, not just its 202
        headers["Job-Remaining-Trees"] = str(await jobs.store.remaining(record.job))
    body = record.body
    if record.trees is not None:
        copies = await jobs.queue.tree_copies(record.trees)
        if copies is None:
            raise ApiError(
                410,
                "the trees of the first answer to this Idempotency-Key have expired (tree_ttl_s); "
                "send the request again with a new key",
                reason="invalid",
            )
        body = (
            "".join(c + "\n" for c in copies) + body if record.media_type == NDJSON else _trees_json(copies)
        )
    return Response(body, status_code=record.status, media_type=record.media_type, headers=headers)
