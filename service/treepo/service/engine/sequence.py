"""One request inside the embedded engine: its tokens, its progress and how it samples (no tensors)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

_ids = itertools.count()


@dataclass(slots=True, eq=False)
class Sequence:
    """A request's token row: `token_ids` = input + output so far; KV exists for the first `num_computed`."""

    token_ids: list[int]
    max_new_tokens: int
    stop_token_ids: frozenset[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int  # the k-th new token is drawn with counter_uniforms(seed, k) (see token_sampling)
    deliver: Callable[[Any], None] = lambda result: None  # called once, from the worker, with the result
    seq_id: int = field(default_factory=lambda: next(_ids))
    priority: int = 0  # lower is admitted first; ties in arrival order
    keep_cached: bool = False  # its output will probably be continued (see GenerateRequest)
    segment_seeds: tuple[int, ...] = ()  # one seed per segment of `segment_tokens` (see GenerateRequest)
    segment_tokens: int = 0
    num_input_tokens: int = 0
    num_cached_tokens: int = 0  # input tokens served from the prefix cache at admission
    num_computed: int = 0  # leading tokens whose KV sits in pool slots
    num_scheduled: int = 0  # tokens fed in the current step
    logprobs: list[float] = field(default_factory=list)
    finish_reason: Literal["stop", "length"] | None = None

    def __post_init__(self) -> None:
        self.num_input_tokens = len(self.token_ids)
        assert self.num_input_tokens >= 1 and self.max_new_tokens >= 1, (
            f"{self.token_ids=} {self.max_new_tokens=}"
        )

    def next_draw(self) -> tuple[int, int]:
        """(seed, counter) of the uniform the next token is drawn with (see token_sampling)."""
        k = len(self.token_ids) - self.num_input_tokens
        if self.segment_tokens:
            segment, k = divmod(k, self.segment_tokens)
            return self.segment_seeds[segment], k
        return self.seed, k

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_input_tokens :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < self.num_input_tokens

    @property
    def max_slots(self) -> int:
        """KV slots the row can ever hold: input + output except the last sampled token (never fed)."""
        return self.num_input_tokens + self.max_new_tokens - 1

    def append(self, token: int, logprob: float) -> bool:
        """Record a sampled token; returns True when the row is finished."""
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        if token in self.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.token_ids) - self.num_input_tokens >= self.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None
