"""The wire schema of the TreePO rollout service: one set of models shared by the server and every client.

Defaults are the TreePO release values (arXiv 2508.17445, `recipe/treepo/run_treepo_train.sh`), with the
release bugs B1-B4 fixed (see shared/TREEPO.md §1.8).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FinishReason = Literal["answer", "eos", "max_tokens", "max_depth", "repetition"]
"""Why a leaf stopped. Release names: FINISHED, EARLY_STOPPED_BY_EOS, MAX_OUTPUT_TOKENS, MAX_INFER_STEPS,
REPETITION_STOP."""

SplitPolicy = Literal[
    "fixed_avg",  # release: total // A each, remainder to the last path
    "low_prob",  # "Low Prob Encourage" (node_logprob_weighted_div): favour the least likely last segment
    "high_prob",  # "High Prob Encourage" (inverse_node_logprob_weighted_div)
    "low_path_prob",  # logprob_weighted_div: summed whole-path logprob
    "high_path_prob",  # inverse_logprob_weighted_div
    "low_path_mean_prob",  # norm_logprob_weighted_div: mean whole-path logprob
    "high_path_mean_prob",  # norm_inv_logprob_weighted_div
]
Delivery = Literal["inline", "queue", "stream"]
LOGPROB_FLOOR = -1e4
"""Non-finite logprobs (-inf of a token the engine deemed impossible) are clamped to this finite floor, so
every Tree serialises to standard JSON and parses back."""
MAX_METADATA_DEPTH = 32
MAX_METADATA_ITEMS = 10_000


class _Strict(BaseModel):
    """Request models: unknown fields, NaN and +-Infinity are refused (422), never passed to the engine."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def check_json_value(value: Any, where: str) -> None:
    """Refuse what cannot round-trip through UTF-8 JSON: lone surrogates, non-finite floats, nesting deeper
    than MAX_METADATA_DEPTH or more than MAX_METADATA_ITEMS values. Iterative: no recursion limit."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    seen = 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if depth > MAX_METADATA_DEPTH or seen > MAX_METADATA_ITEMS:
            raise ValueError(
                f"{where} is nested deeper than {MAX_METADATA_DEPTH} levels or holds more than "
                f"{MAX_METADATA_ITEMS} values; send a smaller object"
            )
        if isinstance(item, str):
            _check_text(item, where)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{where} holds {item}; only finite numbers are valid JSON")
        elif isinstance(item, dict):
            stack.extend((k, depth + 1) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list | tuple):
            stack.extend((v, depth + 1) for v in item)


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"{where} is not valid UTF-8 text (a lone surrogate); send well-formed Unicode"
        ) from None


class ChatMessage(_Strict):
    role: str = Field(min_length=1, max_length=256)
    content: str

    @field_validator("role", "content")
    @classmethod
    def _utf8(cls, value: str) -> str:
        _check_text(value, "a chat message")
        return value


class Prompt(_Strict):
    """One prompt: exactly one of `text`, `input_ids` or chat `messages`."""

    id: str | None = Field(default=None, max_length=256, description="Caller's id; echoed as prompt_id.")
    text: str | None = None
    input_ids: list[int] | None = Field(default=None, min_length=1)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Opaque; passed through untouched (e.g. the reference answer)."
    )

    @field_validator("id", "text")
    @classmethod
    def _utf8(cls, value: str | None) -> str | None:
        if value is not None:
            _check_text(value, "the prompt id/text")
        return value

    @field_validator("metadata", mode="before")
    @classmethod
    def _bounded_metadata(cls, value: Any) -> Any:
        check_json_value(value, "metadata")
        return value

    @model_validator(mode="after")
    def _exactly_one_input(self) -> Prompt:
        given = [name for name in ("text", "input_ids", "messages") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of 'text', 'input_ids' or 'messages' per prompt (got {given or 'none'})"
            )
        if self.input_ids is not None and min(self.input_ids) < 0:
            raise ValueError("input_ids must be non-negative token ids")
        return self


class TreeParams(_Strict):
    """Tree shape and TreePO heuristics. Names follow the paper: w = width, b = branch, l = segment_tokens,
    d = max_depth."""

    width: int = Field(default=16, ge=1, le=1024, description="w: trajectories (leaves) per prompt.")
    branch: int = Field(default=2, ge=1, le=64, description="b: branching budget per node.")
    segment_tokens: int = Field(default=512, ge=1, description="l: max new tokens per segment.")
    max_depth: int = Field(default=14, ge=1, le=4096, description="d: max segments per trajectory.")
    init_branch: int | tuple[int, int] = Field(
        default=2,
        description="Copies of the prompt at step 1: a fixed count, or [min, max] drawn uniformly per prompt "
        "(the paper's 'More Init Divergence' 2..8; capped at width).",
    )
    split: SplitPolicy = Field(default="fixed_avg", description="How a step's budget is split among paths.")
    split_temperature: float = Field(
        default=1.0, gt=0, description="Softmax temperature of the probability-based splits (paper: 2.0)."
    )
    answer_stop: Literal["boxed_and_eos", "boxed", "none"] = Field(
        default="boxed_and_eos",
        description="boxed_and_eos (release): a \\boxed{} answer and EOS in the same segment finish the path; "
        "boxed: a \\boxed{} answer alone does; none: only EOS.",
    )
    repetition_chars: int = Field(default=32, ge=1, description="Repetition window in characters.")
    repetition_count: int = Field(default=8, ge=2, description="Occurrences of one window that stop a path.")
    repetition_priority: Literal["first", "last"] = Field(
        default="first",
        description="first: checked before the answer rule (release script's intent, B2 fixed); last: checked "
        "after length and depth (code default).",
    )
    fallback: Literal["random", "none"] = Field(
        default="random",
        description="random: when a prompt has no live path and fewer than width leaves, re-open answered/EOS "
        "leaves at a random segment boundary; none: stop with fewer leaves.",
    )
    fallback_candidates: Literal["answer_or_eos", "any"] = Field(
        default="answer_or_eos", description="Which leaves may be re-opened (release: soft_boxed_and_eos)."
    )
    fallback_window: int | None = Field(
        default=None, ge=1, description="Fallback cut granularity in tokens; null = segment_tokens (paper)."
    )
    schedule: Literal["sync", "async"] = Field(
        default="sync",
        description="sync: level-synchronous segment steps (paper); async: a path branches and re-enters the "
        "engine as soon as its own segment ends.",
    )

    @model_validator(mode="after")
    def _check(self) -> TreeParams:
        if isinstance(self.init_branch, tuple):
            low, high = self.init_branch
            if not 1 <= low <= high:
                raise ValueError(f"init_branch [min, max] needs 1 <= min <= max (got [{low}, {high}])")
        elif self.init_branch < 1:
            raise ValueError(f"init_branch must be >= 1 (got {self.init_branch})")
        return self


class SamplingParams(_Strict):
    """Token sampling, with SGLang/OpenAI names."""

    temperature: float = Field(default=1.0, ge=0, description="0 = greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=-1, description="-1 = whole vocabulary.")
    max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Max response tokens per trajectory; null = segment_tokens * max_depth.",
    )
    stop_token_ids: list[int] = Field(default_factory=list, description="Stop ids besides the model's EOS.")
    seed: int | None = Field(default=None, description="Same seed, same engine, same weights: same trees.")

    @model_validator(mode="after")
    def _check(self) -> SamplingParams:
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (whole vocabulary) or >= 1 (got {self.top_k})")
        return self


class RolloutTreeRequest(_Strict):
    prompts: list[Prompt] = Field(min_length=1)
    tree: TreeParams = Field(default_factory=TreeParams)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    return_logprobs: bool = True
    delivery: Delivery = "inline"


class Node(BaseModel):
    """One segment of at most `segment_tokens` tokens. A leaf's trajectory is the path root -> leaf."""

    id: str
    parent: str | None = Field(description="null for a child of the prompt (depth 1).")
    depth: int
    token_ids: list[int]
    logprobs: list[float] | None = None
    text: str = ""
    finish_reason: FinishReason | None = Field(default=None, description="Set on leaves only.")
    policy_version: int = 0

    @field_validator("logprobs", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        return _floor_logprobs(value) if isinstance(value, list) else value


def _floor_logprobs(values: list) -> list:
    """-inf/NaN (or null from an older writer) -> LOGPROB_FLOOR: the tree always serialises and parses."""
    try:  # the common case, checked in C: finite numbers above the floor pass as they are
        if math.isfinite(sum(values)) and (not values or min(values) >= LOGPROB_FLOOR):
            return values
    except TypeError:  # a null inside
        pass
    return [_floored(v) for v in values]


def _floored(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return LOGPROB_FLOOR
    return max(value, LOGPROB_FLOOR) if isinstance(value, int | float) else value


class TreeStats(BaseModel):
    num_nodes: int = 0
    num_leaves: int = 0
    decoded_tokens: int = 0
    independent_tokens: int = Field(
        default=0,
        description="Tokens independent sampling decodes for the same leaves (sum of leaf lengths).",
    )
    prefill_tokens: int = Field(default=0, description="Input tokens the engine computed (cache misses).")
    cached_tokens: int = Field(default=0, description="Input tokens served from the prefix cache.")
    engine_calls: int = 0
    num_fallbacks: int = 0
    finish_reasons: dict[str, int] = Field(default_factory=dict)
    wall_s: float = 0.0


class Tree(BaseModel):
    tree_id: str
    prompt_id: str
    policy_version: int = Field(description="Weights version the tree started with (see nodes for each).")
    metadata: dict[str, Any] = Field(default_factory=dict)
    prompt_token_ids: list[int] = Field(default_factory=list)
    prompt_text: str = ""
    nodes: list[Node]
    leaves: list[str] = Field(description="Leaf node ids, one per trajectory.")
    stats: TreeStats = Field(default_factory=TreeStats)

    def node_map(self) -> dict[str, Node]:
        return {node.id: node for node in self.nodes}

    def path(self, leaf_id: str) -> list[Node]:
        """Nodes from the root's child down to `leaf_id`."""
        nodes = self.node_map()
        path = [nodes[leaf_id]]
        while path[-1].parent is not None:
            path.append(nodes[path[-1].parent])
        return path[::-1]

    def trajectories(self) -> list[tuple[str, list[int]]]:
        """(leaf id, response token ids) for every leaf."""
        return [(leaf, [t for node in self.path(leaf) for t in node.token_ids]) for leaf in self.leaves]


class RolloutTreeResponse(BaseModel):
    trees: list[Tree]


class RolloutAccepted(BaseModel):
    """202 answer of `delivery=queue`: each tree lands in the stream when complete."""

    request_id: str
    tree_ids: list[str]
    stream: str


class WeightsInfo(BaseModel):
    policy_version: int
    path: str | None = None
    loaded_at: float | None = None


class ErrorBody(BaseModel):
    detail: Any
