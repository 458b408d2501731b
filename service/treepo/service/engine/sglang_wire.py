"""SGLang's native wire format: request bodies out, response items, errors and server limits in.

Checked against a real SGLang 0.5.23 server: tests/sglang/fixtures holds the recorded exchanges.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from treepo.service.engine.protocol import EngineError, EngineRequestError, EngineUnavailable, GenerateRequest

SEED_MASK = 2**31 - 1  # SGLang 0.5.4 overflows int32 on sampling_seed >= 2^31; every version accepts these


@dataclass(slots=True)
class Piece:
    """What one /generate item returned."""

    output_ids: list[int]
    logprobs: list[float]
    finish: Literal["stop", "length", "abort"]
    cached_tokens: int
    prompt_tokens: int
    weight_version: str  # as the worker reports it: "default" (its launch weights) or the pushed version


@dataclass(slots=True)
class PendingRequest:
    """One request across abort resubmissions: tokens received so far are kept and resent as input."""

    request: GenerateRequest
    max_new_tokens: int
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    cached_tokens: int = 0
    prefill_tokens: int = 0
    versions: list[int] = field(default_factory=list)
    finish: Literal["stop", "length"] | None = None
    num_aborts: int = 0

    def next_item(self) -> dict[str, Any]:
        input_ids = self.request.input_ids + self.output_ids
        return generate_item(self.request, input_ids, self.max_new_tokens - len(self.output_ids))

    def absorb(self, piece: Piece, version: int) -> None:
        """Add a piece sampled with policy `version`."""
        self.output_ids += piece.output_ids
        self.logprobs += piece.logprobs
        self.cached_tokens += piece.cached_tokens
        self.prefill_tokens += max(piece.prompt_tokens - piece.cached_tokens, 0)
        self.versions.append(version)
        if piece.finish != "abort":
            self.finish = piece.finish
        elif len(self.output_ids) >= self.max_new_tokens:
            self.finish = "length"  # aborted exactly at the budget: nothing left to resume
        else:
            self.num_aborts += 1


def generate_item(request: GenerateRequest, input_ids: list[int], max_new_tokens: int) -> dict[str, Any]:
    """One request: `input_ids` and its sampling_params."""
    params: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "stop_token_ids": list(request.stop_token_ids),
    }
    if request.seed is not None:  # honoured only with --enable-deterministic-inference (README)
        params["sampling_seed"] = request.seed & SEED_MASK
    return {"input_ids": input_ids, "sampling_params": params}


def warmup_item(input_ids: list[int], eos: tuple[int, ...]) -> dict[str, Any]:
    return {"input_ids": input_ids, "sampling_params": {"max_new_tokens": 0, "stop_token_ids": list(eos)}}


def parse_warmup(item: dict[str, Any]) -> Piece:
    """A prefill-only answer: only its token counts matter (some versions add one logprob and no token)."""
    meta = item.get("meta_info") or {}
    return Piece(
        output_ids=[],
        logprobs=[],
        finish="length",
        cached_tokens=int(meta.get("cached_tokens") or 0),
        prompt_tokens=int(meta.get("prompt_tokens") or 0),
        weight_version=str(meta.get("weight_version", "")),
    )


def parse_item(item: dict[str, Any]) -> Piece:
    """One response object: output_ids (or logprob token ids, or old `token_ids`), meta_info."""
    meta = item.get("meta_info") or {}
    token_logprobs = meta.get("output_token_logprobs") or []
    output_ids = item.get("output_ids")
    if output_ids is None:
        output_ids = [entry[1] for entry in token_logprobs] if token_logprobs else item.get("token_ids", [])
    logprobs = [float(entry[0]) for entry in token_logprobs]
    if len(logprobs) != len(output_ids):
        raise EngineError(
            f"SGLang returned {len(output_ids)} output ids but {len(logprobs)} logprobs; the worker must be "
            "asked with return_logprob (is it an SGLang version that drops them?)"
        )
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind == "abort" and 400 <= int(reason.get("status_code") or 0) < 500:
        raise EngineRequestError(f"SGLang rejected the request: {reason.get('message', reason)}")
    if kind not in ("stop", "length", "abort"):
        raise EngineError(f"SGLang finish_reason {reason!r} is none of stop, length, abort")
    return Piece(
        output_ids=[int(t) for t in output_ids],
        logprobs=logprobs,
        finish=kind,
        cached_tokens=int(meta.get("cached_tokens") or 0),
        prompt_tokens=int(meta.get("prompt_tokens") or 0),
        weight_version=str(meta.get("weight_version", "")),
    )


def raise_for_status(response: httpx.Response, url: str) -> None:
    """400 -> EngineRequestError; 429/502/503/504 -> EngineUnavailable; other non-2xx -> EngineError."""
    if response.is_success:
        return
    answer = json_or_text(response)
    message = answer
    if isinstance(answer, dict):
        error = answer.get("error", answer)
        message = error.get("message", error) if isinstance(error, dict) else error
    text = f"SGLang worker {url or response.request.url} answered HTTP {response.status_code}: {message}"
    if response.status_code == 400:
        raise EngineRequestError(text)
    if response.status_code in (429, 502, 503, 504):
        raise EngineUnavailable(text)
    if response.status_code in (401, 403):
        raise EngineError(text + " (check api_key / admin_api_key)")
    raise EngineError(text)


def context_limit(server_info: dict[str, Any], model_context: int) -> int:
    """The longest prompt + path a worker serves, from its /get_server_info.

    SGLang 0.5.23 rejects an input of `max_req_input_len` tokens or more (context - 6 by default, lower
    with a small KV budget) and input + max_new_tokens above the context (0.5.4: at it), and cuts
    max_new_tokens to context - 2 - input. A path of at most min(max_req_input_len, context - 2) tokens
    never meets any of these: its last request has input < that limit and asks for what fits.
    """
    context = int(server_info.get("context_length") or model_context)
    max_input = server_info.get("max_req_input_len")
    limit = context - 2 if max_input is None else min(int(max_input), context - 2)
    if limit < 2:
        raise EngineError(f"SGLang serves at most {limit} tokens per request ({server_info=!r:.200})")
    return limit


def json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def check_urls(base_urls: str | Sequence[str]) -> list[str]:
    urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
    if not urls:
        raise ValueError("SGLangEngine needs at least one base URL, e.g. http://127.0.0.1:30000")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"SGLang base URL {url!r} must start with http:// or https://")
    return [url.rstrip("/") for url in urls]


def read_model_limits(model_path: str | Path | None) -> tuple[tuple[int, ...], int]:
    """(EOS ids, context length) from a local model directory's generation_config.json / config.json."""
    if model_path is None:
        raise ValueError(
            "give eos_token_ids and max_context, or model_path (a local copy of the served model)"
        )
    root = Path(model_path)
    config = _read_json(root / "config.json")
    generation = (
        _read_json(root / "generation_config.json") if (root / "generation_config.json").exists() else {}
    )
    text_config = config.get("text_config") or {}
    eos = generation.get("eos_token_id", config.get("eos_token_id", text_config.get("eos_token_id")))
    context = config.get("max_position_embeddings", text_config.get("max_position_embeddings"))
    if eos is None or context is None:
        raise ValueError(f"{root} names no eos_token_id or max_position_embeddings; pass them explicitly")
    return (tuple(eos) if isinstance(eos, list) else (int(eos),)), int(context)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ValueError(f"{path} not found: model_path must be a local Hugging Face model directory")
    return json.loads(path.read_text())


def sglang_model_dir(path: Path, model_path: Path | None) -> str:
    """A directory SGLang's /update_weights_from_disk can load for `path`.

    A directory (or a path only the workers can see) goes as it is. A single .safetensors file gets a
    sibling directory `.<stem>.sglang/` holding the served model's config files and a relative link
    `model.safetensors -> ../<file>`, so it resolves on any host that mounts the weights directory.
    """
    if not path.is_file():
        return str(path)
    if path.suffix != ".safetensors" or model_path is None:
        raise ValueError(
            f"{path} is a file: SGLang loads a model directory, or a .safetensors file when the engine was "
            "given model_path (whose config.json goes beside it)"
        )
    target = path.with_name(f".{path.stem}.sglang")
    target.mkdir(exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if (model_path / name).exists():
            shutil.copyfile(model_path / name, target / name)
    link = target / "model.safetensors"
    if not link.is_symlink():
        link.symlink_to(Path("..") / path.name)
    return str(target)
