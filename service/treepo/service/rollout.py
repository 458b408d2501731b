"""From a RolloutTreeRequest to trees: tokenize and validate every prompt, then sample them concurrently.

The sampler calls of all prompts (and of all concurrent requests) share one batching engine, so the engine
always sees the live paths of every in-flight tree together.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from treepo.client.schema import Prompt, RolloutTreeRequest, Tree
from treepo.service.codec import Codec
from treepo.service.engine.protocol import EngineUnavailable
from treepo.service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)
FailureKind = Literal["input", "unavailable", "engine"]  # -> HTTP 422, 503, 500 for inline delivery


class RolloutInputError(ValueError):
    """Request fields that only the model can judge (lengths, vocabulary), as FastAPI-style error dicts."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(e["msg"] for e in errors))
        self.errors = errors


@dataclass(slots=True)
class PreparedPrompt:
    index: int
    prompt_id: str
    tree_id: str
    input_ids: list[int]
    prompt_text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None


@dataclass(slots=True)
class TreeFailure:
    """A prompt whose tree could not be sampled."""

    prompt: PreparedPrompt
    error: str
    kind: FailureKind = "engine"

    def record(self, request_id: str) -> dict[str, Any]:
        return {
            "request_id": request_id,
            "tree_id": self.prompt.tree_id,
            "prompt_id": self.prompt.prompt_id,
            "prompt_index": self.prompt.index,
            "error": self.error,
            "metadata": self.prompt.metadata,
        }


def prepare(
    request: RolloutTreeRequest, codec: Codec, max_context: int, request_id: str
) -> list[PreparedPrompt]:
    """Tokenize the prompts and check them against the model; RolloutInputError lists every problem."""
    errors: list[dict[str, Any]] = []
    _check_limits(request, codec.vocab_size, max_context, errors)
    prepared = []
    for index, prompt in enumerate(request.prompts):
        loc = ["body", "prompts", index]
        try:
            input_ids, text = _tokenize(prompt, codec)
        except ValueError as exc:
            errors.append(_error([*loc, "messages"], str(exc), None))
            continue
        _check_prompt(input_ids, codec.vocab_size, max_context, loc, prompt, errors)
        seed = None if request.sampling.seed is None else request.sampling.seed + index
        prompt_id = prompt.id if prompt.id is not None else f"{request_id}:{index}"
        prepared.append(
            PreparedPrompt(index, prompt_id, uuid.uuid4().hex, input_ids, text, dict(prompt.metadata), seed)
        )
    if errors:
        raise RolloutInputError(errors)
    return prepared


async def sample_trees(
    sampler: Any, prompts: list[PreparedPrompt], request: RolloutTreeRequest, metrics: ServiceMetrics
) -> AsyncIterator[Tree | TreeFailure]:
    """Sample every prompt's tree concurrently; yield each tree (or failure) as soon as it completes."""
    tasks = [asyncio.create_task(_sample_one(sampler, p, request, metrics)) for p in prompts]
    try:
        for next_done in asyncio.as_completed(tasks):
            yield await next_done
    finally:
        for task in tasks:
            task.cancel()


async def _sample_one(
    sampler: Any, prompt: PreparedPrompt, request: RolloutTreeRequest, metrics: ServiceMetrics
) -> Tree | TreeFailure:
    metrics.inflight_trees.inc()
    try:
        tree = await sampler.sample(
            prompt.input_ids,
            request.tree,
            request.sampling,
            seed=prompt.seed,
            return_logprobs=request.return_logprobs,
            tree_id=prompt.tree_id,
            prompt_id=prompt.prompt_id,
            metadata=prompt.metadata,
            prompt_text=prompt.prompt_text,
        )
    except Exception as exc:  # one failed tree must not take its siblings down; it is reported instead
        logger.exception("tree %s (prompt %s) failed", prompt.tree_id, prompt.prompt_id)
        return TreeFailure(prompt, f"{type(exc).__name__}: {exc}", _failure_kind(exc))
    finally:
        metrics.inflight_trees.dec()
    metrics.observe_tree(tree)
    return tree


def _failure_kind(exc: Exception) -> FailureKind:
    if isinstance(exc, EngineUnavailable):
        return "unavailable"
    return "input" if isinstance(exc, ValueError) else "engine"  # includes EngineRequestError


def _tokenize(prompt: Prompt, codec: Codec) -> tuple[list[int], str]:
    if prompt.text is not None:
        return codec.encode(prompt.text), prompt.text
    if prompt.messages is not None:
        input_ids = codec.encode_chat(prompt.messages)
        return input_ids, codec.decode(input_ids)
    assert prompt.input_ids is not None, "the schema guarantees one input"
    return list(prompt.input_ids), codec.decode([t for t in prompt.input_ids if t < codec.vocab_size])


def _check_limits(request: RolloutTreeRequest, vocab_size: int, max_context: int, errors: list) -> None:
    tree, sampling = request.tree, request.sampling
    if tree.segment_tokens >= max_context:
        msg = (
            f"segment_tokens must be smaller than the model context {max_context} (got {tree.segment_tokens})"
        )
        errors.append(_error(["body", "tree", "segment_tokens"], msg, tree.segment_tokens))
    if sampling.max_new_tokens is not None and sampling.max_new_tokens >= max_context:
        msg = (
            f"max_new_tokens must be smaller than the model context {max_context} "
            f"(got {sampling.max_new_tokens})"
        )
        errors.append(_error(["body", "sampling", "max_new_tokens"], msg, sampling.max_new_tokens))
    if sampling.top_k > vocab_size:
        msg = f"top_k must be -1 or at most the vocabulary size {vocab_size} (got {sampling.top_k})"
        errors.append(_error(["body", "sampling", "top_k"], msg, sampling.top_k))
    bad_stops = [t for t in sampling.stop_token_ids if not 0 <= t < vocab_size]
    if bad_stops:
        msg = f"stop_token_ids must be in [0, {vocab_size}) (the vocabulary); got {bad_stops}"
        errors.append(_error(["body", "sampling", "stop_token_ids"], msg, bad_stops))


def _check_prompt(
    input_ids: list[int], vocab_size: int, max_context: int, loc: list, prompt: Prompt, errors: list
) -> None:
    field_name = (
        "text" if prompt.text is not None else "messages" if prompt.messages is not None else "input_ids"
    )
    if not input_ids:
        errors.append(
            _error([*loc, field_name], "the prompt encodes to no tokens; send a non-empty prompt", "")
        )
    elif len(input_ids) >= max_context:
        msg = (
            f"the prompt is {len(input_ids)} tokens; it must be shorter than the model context {max_context} "
            "to leave room for a response"
        )
        errors.append(_error([*loc, field_name], msg, len(input_ids)))
    outside = sorted({t for t in input_ids if t >= vocab_size})
    if outside:
        msg = f"token ids {outside[:10]} are outside the vocabulary [0, {vocab_size})"
        errors.append(_error([*loc, field_name], msg, outside[:10]))


def _error(loc: list, msg: str, value: Any) -> dict[str, Any]:
    return {"type": "value_error", "loc": loc, "msg": msg, "input": value}
