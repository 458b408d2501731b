"""A deterministic engine driven by a script: for tests of the sampler and the service without a model."""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
from collections.abc import Callable

from treepo.service.engine.protocol import GenerateOutput, GenerateRequest

Script = Callable[[list[int], random.Random], list[int]]
"""(input_ids, rng seeded from the request) -> the tokens the engine 'would' produce (it truncates them)."""


def random_tokens(vocab_size: int = 50, eos_token_id: int = 0) -> Script:
    """A script of uniformly random non-EOS tokens: paths only stop by length."""

    def script(input_ids: list[int], rng: random.Random) -> list[int]:
        return [rng.randrange(eos_token_id + 1, vocab_size) for _ in range(4096)]

    return script


class ScriptedEngine:
    """An `Engine` whose output is script(input_ids) cut at max_new_tokens or the first stop id.

    The rng of each request is seeded from (request seed, input_ids), so equal inputs give equal outputs.
    `cached_tokens` is the longest prefix of the input seen before as a full (input + output) sequence (the
    last `max_cached_prefixes` prefixes are remembered, LRU; `requests` keeps the last `max_recorded_requests`
    requests, for tests). `latency_s` delays each request; `jitter_s`
    adds a random delay on top (from `jitter_seed`) so that requests return in a shuffled order.
    """

    def __init__(
        self,
        script: Script | None = None,
        *,
        eos_token_id: int = 0,
        max_context: int = 100_000,
        latency_s: float = 0.0,
        jitter_s: float = 0.0,
        jitter_seed: int = 0,
        max_cached_prefixes: int = 100_000,
        max_recorded_requests: int = 10_000,
        segmented: bool = False,
    ) -> None:
        """`segmented`: accept several segments per request (`supports_segment_seeds`), as the embedded
        engine does; each segment's tokens are those a request of its own would give."""
        self.supports_segment_seeds = segmented
        self.script = script or random_tokens(eos_token_id=eos_token_id)
        self._eos = (eos_token_id,)
        self._max_context = max_context
        self._version = 0
        self.latency_s, self.jitter_s = latency_s, jitter_s
        self._jitter = random.Random(jitter_seed)
        self.requests: list[GenerateRequest] = []
        self.max_recorded_requests = max_recorded_requests
        self.in_flight = self.peak_in_flight = 0  # requests being answered at once
        self.max_cached_prefixes = max_cached_prefixes
        self._seen: OrderedDict[tuple[int, ...], None] = OrderedDict()
        self.weights_path: str | None = None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def policy_version(self) -> int:
        return self._version

    @property
    def max_context(self) -> int:
        return self._max_context

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        self.requests.append(request)
        if len(self.requests) > self.max_recorded_requests:  # a long `treepo serve --engine scripted` run
            del self.requests[: len(self.requests) // 2]
        delay = self.latency_s + (self._jitter.uniform(0, self.jitter_s) if self.jitter_s else 0.0)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if delay:
                await asyncio.sleep(delay)
            return self._one(request)
        finally:
            self.in_flight -= 1

    def _one(self, request: GenerateRequest) -> GenerateOutput:
        stops = set(self._eos) | set(request.stop_token_ids)
        pieces = (
            [(seed, request.segment_tokens) for seed in request.segment_seeds]
            if request.segment_seeds
            else [(request.seed, request.max_new_tokens)]
        )
        output: list[int] = []
        for seed, length in pieces:  # each segment as a request of its own would decode it
            context = list(request.input_ids) + output
            rng = random.Random(hash((seed, tuple(context))))
            stream = self.script(context, rng)
            for token in stream[: min(length, request.max_new_tokens - len(output))]:
                output.append(token)
                if token in stops:
                    break
            if (output and output[-1] in stops) or len(output) >= request.max_new_tokens:
                break
        finish = "stop" if output and output[-1] in stops else "length"
        cached = self._cached_prefix(request.input_ids)
        self._remember(request.input_ids + output)
        logprobs = [-1.0 - (t % 7) / 7 for t in output]
        return GenerateOutput(
            output_ids=output,
            logprobs=logprobs,
            finish_reason=finish,
            cached_tokens=cached,
            prefill_tokens=len(request.input_ids) - cached,
            policy_version=self._version,
        )

    def _cached_prefix(self, input_ids: list[int]) -> int:
        for n in range(len(input_ids) - 1, 0, -1):  # like SGLang, at least one input token is computed
            if tuple(input_ids[:n]) in self._seen:
                return n
        return 0

    def _remember(self, sequence: list[int]) -> None:
        for n in range(1, len(sequence) + 1):
            key = tuple(sequence[:n])
            self._seen[key] = None
            self._seen.move_to_end(key)
        while len(self._seen) > self.max_cached_prefixes:
            self._seen.popitem(last=False)

    async def update_weights(self, path: str, version: int) -> None:
        self.weights_path = path
        self._version = version
        self._seen.clear()

    async def health(self) -> bool:
        return True
