"""`TreeSampler`: one TreePO tree per prompt over any `Engine` (TREEPO.md §1) + the baseline."""

from __future__ import annotations

import itertools
import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from treepo.client.schema import SamplingParams, Tree, TreeParams
from treepo.service.engine.protocol import Engine
from treepo.service.sampler.paths import TreeBuilder
from treepo.service.sampler.rules import StopRules
from treepo.service.sampler.schedule import TreeRun
from treepo.service.sampler.sequential import sample_independent

logger = logging.getLogger(__name__)

_start_order = itertools.count()  # trees of this process in the order they started (request priority)


@dataclass(slots=True, frozen=True)
class _Setup:
    base_seed: int
    rules: StopRules


class TreeSampler:
    """Samples trees with every TreePO release rule (bugs B1-B4 fixed). Pure logic over the Engine protocol.

    Many `sample()` coroutines may run at once over one sampler: every path's segment is its own engine
    request (once a tree is full, a path's remaining segments: see schedule.py), so the engine batches all
    trees' requests together, continuously.
    """

    def __init__(self, engine: Engine, decode: Callable[[list[int]], str]) -> None:
        self.engine = engine
        self.decode = decode

    async def sample(
        self,
        prompt_ids: list[int],
        tree: TreeParams,
        sampling: SamplingParams,
        *,
        seed: int | None = None,
        return_logprobs: bool = True,
        tree_id: str | None = None,
        prompt_id: str = "",
        metadata: dict | None = None,
        prompt_text: str = "",
    ) -> Tree:
        """One tree of exactly `tree.width` leaves (fewer only with `fallback="none"`)."""

        async def run(builder: TreeBuilder, base_seed: int) -> None:
            await TreeRun(self.engine, builder, tree, sampling, base_seed=base_seed).run()

        return await self._build(
            run, prompt_ids, tree, sampling, seed, return_logprobs, tree_id, prompt_id, metadata, prompt_text
        )

    async def sample_sequential(
        self,
        prompt_ids: list[int],
        tree: TreeParams,
        sampling: SamplingParams,
        *,
        seed: int | None = None,
        return_logprobs: bool = True,
        tree_id: str | None = None,
        prompt_id: str = "",
        metadata: dict | None = None,
        prompt_text: str = "",
    ) -> Tree:
        """The baseline: `width` independent samples of the prompt, same engine and limits.

        Each trajectory is one engine request for its whole length (as a non-tree RL rollout decodes it),
        stored as a chain of `segment_tokens` chunks so that every node still holds <= l tokens.
        """

        async def run(builder: TreeBuilder, base_seed: int) -> None:
            await sample_independent(self.engine, builder, tree, sampling, base_seed=base_seed)

        return await self._build(
            run, prompt_ids, tree, sampling, seed, return_logprobs, tree_id, prompt_id, metadata, prompt_text
        )

    async def _build(
        self,
        run: Callable[[TreeBuilder, int], Awaitable[None]],
        prompt_ids: list[int],
        tree: TreeParams,
        sampling: SamplingParams,
        seed: int | None,
        return_logprobs: bool,
        tree_id: str | None,
        prompt_id: str,
        metadata: dict | None,
        prompt_text: str,
    ) -> Tree:
        """Validate, run one sampling strategy into a fresh builder, and package the tree."""
        setup = self._setup(prompt_ids, tree, sampling, seed)
        policy_version = self.engine.policy_version
        builder = TreeBuilder(list(prompt_ids), setup.rules, self.decode, priority=next(_start_order))
        await run(builder, setup.base_seed)
        logger.debug("tree %s: %s", tree_id, builder.counts)
        return builder.to_tree(
            tree_id=tree_id or uuid.uuid4().hex,
            prompt_id=prompt_id,
            policy_version=policy_version,
            metadata=metadata or {},
            prompt_text=prompt_text,
            return_logprobs=return_logprobs,
        )

    def _setup(
        self, prompt_ids: list[int], tree: TreeParams, sampling: SamplingParams, seed: int | None
    ) -> _Setup:
        """Check the request against the engine; pick the seed and the length limit."""
        if not prompt_ids:
            raise ValueError("prompt_ids is empty; give at least one prompt token")
        room = self.engine.max_context - len(prompt_ids)
        if room < 1:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens leaves no room in the engine context of "
                f"{self.engine.max_context} tokens; shorten the prompt"
            )
        limit = sampling.max_new_tokens
        if limit is None:  # derived default: l * d, within the context
            limit = min(tree.segment_tokens * tree.max_depth, room)
        elif limit > room:
            raise ValueError(
                f"max_new_tokens={limit} plus the {len(prompt_ids)}-token prompt exceeds the engine context "
                f"of {self.engine.max_context} tokens; lower max_new_tokens to at most {room}"
            )
        stop_ids = frozenset(self.engine.eos_token_ids) | frozenset(sampling.stop_token_ids)
        for candidate in (seed, sampling.seed):
            if candidate is not None:
                base_seed = candidate
                break
        else:
            base_seed = random.SystemRandom().getrandbits(62)
        return _Setup(base_seed, StopRules.from_params(tree, stop_ids, limit))
