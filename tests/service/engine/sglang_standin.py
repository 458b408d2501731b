"""A stand-in SGLang server for tests: the same JSON as `sglang.launch_server --skip-tokenizer-init`.

Field names and shapes follow shared/SGLANG.md §1-§4: batch input -> list response; `meta_info` with id,
finish_reason {type, matched|length|message}, prompt_tokens, completion_tokens, cached_tokens (from a
token-id prefix memory filled when a request finishes, capped at input_len - 1), weight_version and
output_token_logprobs [[logprob, token_id, null], ...]; HTTP 400 {"error": {"message"}} for bad input.
Tokens come from a real tiny transformers model (`ModelTokens`) or from a deterministic script.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

TokenStream = Callable[[list[int], dict[str, Any]], Iterator[tuple[int, float]]]
"""(input_ids, sampling_params) -> endless (token id, logprob) pairs."""

ADMIN_ROUTES = {"/update_weights_from_disk", "/flush_cache", "/pause_generation", "/continue_generation"}
OPEN_ROUTES = {"/health", "/health_generate", "/metrics"}


class ModelTokens:
    """Tokens sampled from a local Hugging Face causal LM, reloaded by /update_weights_from_disk."""

    def __init__(self, model_path: str) -> None:
        self.load(model_path)

    def load(self, model_path: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        self.model_path = model_path

    def __call__(self, input_ids: list[int], params: dict[str, Any]) -> Iterator[tuple[int, float]]:
        import torch

        seed = params.get("sampling_seed")
        generator = torch.Generator().manual_seed(
            hash((seed, tuple(input_ids))) & 0xFFFF_FFFF if seed is not None else random.getrandbits(32)
        )
        ids, past = torch.tensor([input_ids]), None
        cache_arg = (
            "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        )
        with torch.no_grad():
            while True:
                out = self.model(input_ids=ids, use_cache=True, **{cache_arg: past})
                past = out["cache"] if "cache" in out else out["past_key_values"]
                token, logprob = _sample(out.logits[0, -1].float(), params, generator)
                yield token, logprob
                ids = torch.tensor([[token]])

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)


def _sample(logits: Any, params: dict[str, Any], generator: Any) -> tuple[int, float]:
    """SGLang order: temperature, top-k, top-p; the logprob is under the unmodified distribution."""
    import torch

    logprobs = torch.log_softmax(logits, dim=-1)
    temperature = float(params.get("temperature", 1.0))
    if temperature < 1e-6:
        token = int(torch.argmax(logits))
        return token, float(logprobs[token])
    probs = torch.softmax(logits / temperature, dim=-1)
    top_k = int(params.get("top_k", -1))
    if top_k > 0:
        probs[probs < torch.topk(probs, min(top_k, probs.numel())).values[-1]] = 0
    sorted_probs, order = torch.sort(probs, descending=True)
    outside = torch.cumsum(sorted_probs, 0) - sorted_probs > float(params.get("top_p", 1.0))
    probs[order[outside]] = 0
    token = int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
    return token, float(logprobs[token])


def script_tokens(script: Callable[[list[int], random.Random], list[int]]) -> TokenStream:
    """Wrap a scripted-engine script: deterministic per (seed, input_ids), logprob -1 - (t % 7) / 7."""

    def stream(input_ids: list[int], params: dict[str, Any]) -> Iterator[tuple[int, float]]:
        rng = random.Random(hash((params.get("sampling_seed"), tuple(input_ids))))
        for token in script(list(input_ids), rng):
            yield token, -1.0 - (token % 7) / 7

    return stream


class PrefixMemory:
    """Token-id trie of sequences whose KV the server holds (SGLang's radix tree, without eviction)."""

    def __init__(self) -> None:
        self.root: dict[int, dict] = {}

    def match(self, input_ids: list[int]) -> int:
        node, depth = self.root, 0
        for token in input_ids[:-1]:  # SGLang recomputes at least one input token
            if token not in node:
                break
            node, depth = node[token], depth + 1
        return depth

    def insert(self, token_ids: list[int]) -> None:
        node = self.root
        for token in token_ids:
            node = node.setdefault(token, {})

    def clear(self) -> None:
        self.root = {}


@dataclass
class StandinState:
    """Server state; tests read and steer it directly (the server runs in a thread of the test process)."""

    tokens: TokenStream
    eos_token_ids: tuple[int, ...] = (0,)
    context_len: int = 512
    vocab_size: int | None = None
    weight_version: str = "default"
    api_key: str | None = None
    admin_api_key: str | None = None
    token_delay_s: float = 0.0  # per decode step, so that /pause_generation can catch requests running
    abort_plan: list[int] = field(default_factory=list)  # next items abort after this many tokens
    fail_weight_update: str | None = None  # message of a refused /update_weights_from_disk
    healthy: bool = True
    paused: bool = False
    inflight: int = 0
    prefix: PrefixMemory = field(default_factory=PrefixMemory)
    generate_bodies: list[dict[str, Any]] = field(default_factory=list)
    weight_updates: list[dict[str, Any]] = field(default_factory=list)


class BadRequest(Exception):
    """Becomes HTTP 400 {"error": {"message": ...}} as in SGLang's _create_error_response."""


def create_app(state: StandinState) -> FastAPI:
    app = FastAPI(title="SGLang stand-in")

    @app.middleware("http")
    async def auth(request: Request, call_next: Any) -> Any:
        path = request.url.path
        admin = path in ADMIN_ROUTES and state.admin_api_key
        wanted = state.admin_api_key if admin else state.api_key
        if wanted and path not in OPEN_ROUTES and request.headers.get("authorization") != f"Bearer {wanted}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return await call_next(request)

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"error": {"message": str(exc)}}, status_code=400)

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request) -> JSONResponse:
        body = await request.json()
        state.generate_bodies.append(body)
        items, is_batch = _expand(body, state)
        while state.paused:
            await asyncio.sleep(0.005)
        state.inflight += 1
        try:
            answers = await _run_batch(state, items)
        finally:
            state.inflight -= 1
        return JSONResponse(answers if is_batch else answers[0])

    @app.post("/update_weights_from_disk")
    async def update_weights(request: Request) -> JSONResponse:
        body = await request.json()
        state.weight_updates.append(body)
        if "model_path" not in body:
            raise BadRequest("model_path is required")
        while state.inflight:  # SGLang's model-update lock waits for running requests
            await asyncio.sleep(0.005)
        try:
            if state.fail_weight_update:
                raise RuntimeError(state.fail_weight_update)
            if isinstance(state.tokens, ModelTokens):
                state.tokens.load(body["model_path"])
        except Exception as exc:
            message = f"Failed to update weights: {exc}.\nRolling back to original weights."
            return JSONResponse({"success": False, "message": message, "num_paused_requests": 0}, 400)
        if body.get("flush_cache", True):
            state.prefix.clear()
        state.weight_version = str(body.get("weight_version", state.weight_version))
        answer = {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}
        return JSONResponse(answer)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> PlainTextResponse:
        if state.inflight:
            return PlainTextResponse("Cache not flushed: requests are running.", status_code=400)
        state.prefix.clear()
        return PlainTextResponse("Cache flushed.")

    @app.post("/pause_generation")
    async def pause(request: Request) -> JSONResponse:
        state.paused = True
        return JSONResponse({"status": "paused"})

    @app.post("/continue_generation")
    async def resume() -> JSONResponse:
        state.paused = False
        return JSONResponse({"status": "resumed"})

    @app.get("/health")
    @app.get("/health_generate")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("", status_code=200 if state.healthy else 503)

    return app


def _expand(body: dict[str, Any], state: StandinState) -> tuple[list[tuple[list[int], dict]], bool]:
    """(input_ids, sampling_params) per item, with SGLang's checks; raises BadRequest."""
    if body.get("text") is not None:
        raise BadRequest("The server runs with skip_tokenizer_init=True: send input_ids, not text.")
    input_ids = body.get("input_ids")
    if not input_ids:
        raise BadRequest("Either text, input_ids or input_embeds should be provided.")
    is_batch = isinstance(input_ids[0], list)
    batch = input_ids if is_batch else [input_ids]
    params = body.get("sampling_params") or {}
    params = params if isinstance(params, list) else [params] * len(batch)
    if len(params) != len(batch):
        raise BadRequest(f"sampling_params has {len(params)} items for a batch of {len(batch)}")
    if body.get("return_logprob") and body.get("logprob_start_len", -1) >= 0:
        raise BadRequest("this stand-in only models logprob_start_len=-1 (output logprobs)")
    for ids, param in zip(batch, params, strict=True):
        _check_item(ids, param, state)
    return list(zip(batch, params, strict=True)), is_batch


def _check_item(ids: list[int], params: dict[str, Any], state: StandinState) -> None:
    if not ids or any(not isinstance(t, int) or t < 0 for t in ids):
        raise BadRequest("input_ids must be a non-empty list of non-negative token ids")
    if state.vocab_size is not None and max(ids) >= state.vocab_size:
        raise BadRequest(f"The input_ids {max(ids)} exceeds the vocabulary size {state.vocab_size}.")
    if params.get("stop"):
        raise BadRequest("stop strings need a tokenizer; with skip_tokenizer_init use stop_token_ids")
    max_new = params.get("max_new_tokens", 128)
    checks = [
        (max_new >= 0, f"max_new_tokens must be at least 0, got {max_new}."),
        (params.get("temperature", 1.0) >= 0, "temperature must be non-negative"),
        (0 < params.get("top_p", 1.0) <= 1, f"top_p must be in (0, 1], got {params.get('top_p')}."),
        (params.get("top_k", -1) == -1 or params.get("top_k", -1) >= 1, "top_k must be -1 or >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise BadRequest(message)
    if len(ids) + max_new > state.context_len:
        raise BadRequest(
            f"Requested token count exceeds the model's maximum context length of {state.context_len} "
            f"tokens. You requested a total of {len(ids) + max_new} tokens: {len(ids)} tokens from the "
            f"input messages and {max_new} tokens for the completion."
        )


async def _run_batch(state: StandinState, items: list[tuple[list[int], dict]]) -> list[dict[str, Any]]:
    """Decode all items step by step; prefix hits are looked up before any item of the batch finishes."""
    started = time.monotonic()
    cached = [state.prefix.match(ids) for ids, _ in items]
    streams = [state.tokens(ids, params) for ids, params in items]
    outputs: list[list[tuple[int, float]]] = [[] for _ in items]
    finish: list[dict[str, Any] | None] = [None] * len(items)
    abort_at = [state.abort_plan.pop(0) if state.abort_plan else math.inf for _ in items]
    for index, (_, params) in enumerate(items):
        if params.get("max_new_tokens", 128) == 0:
            finish[index] = {"type": "length", "length": 0}
    while any(reason is None for reason in finish):
        for index, (_, params) in enumerate(items):
            if finish[index] is None:
                finish[index] = _step(state, params, streams[index], outputs[index], abort_at[index])
        if state.token_delay_s:
            await asyncio.sleep(state.token_delay_s)
        if state.paused:  # pause_generation(mode=abort) returns running requests as aborted
            finish = [
                reason or {"type": "abort", "message": "Abort by pause_generation."} for reason in finish
            ]
    answers = []
    for (ids, _), out, reason, hit in zip(items, outputs, finish, cached, strict=True):
        tokens = [t for t, _ in out]
        state.prefix.insert(ids + tokens[:-1] if tokens else ids)  # the last token's KV is never computed
        meta = {
            "id": uuid.uuid4().hex,
            "finish_reason": reason,
            "prompt_tokens": len(ids),
            "completion_tokens": len(tokens),
            "cached_tokens": hit,
            "weight_version": state.weight_version,
            "output_token_logprobs": [[lp, t, None] for t, lp in out],
            "e2e_latency": time.monotonic() - started,
        }
        answers.append({"output_ids": tokens, "meta_info": meta})
    return answers


def _step(state: StandinState, params: dict, stream: Iterator, out: list, abort_at: float) -> dict | None:
    """Decode one token; the finish reason once the item is done."""
    if len(out) >= abort_at:
        return {"type": "abort", "message": "Abort in waiting queue", "status_code": None}
    token, logprob = next(stream)
    out.append((token, logprob))
    stops = set(params.get("stop_token_ids") or ())
    if not params.get("ignore_eos"):
        stops |= set(state.eos_token_ids)
    if token in stops:
        return {"type": "stop", "matched": token}
    if len(out) >= params.get("max_new_tokens", 128):
        return {"type": "length", "length": len(out)}
    return None


@contextmanager
def serve(state: StandinState, port: int) -> Iterator[str]:
    """Run the stand-in under a real uvicorn in a thread; yields its base URL."""
    config = uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"SGLang stand-in did not start on port {port}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
