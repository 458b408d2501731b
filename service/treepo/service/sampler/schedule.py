"""The segment loop of one tree: level by level (TREEPO.md §1.2), each path's segment an engine request.

Every rule of a level (early stop, budget, split, fallback) is decided when that tree's level is complete: a
per-tree barrier, never a global one, since other trees' requests keep the engine busy meanwhile. Both
schedules therefore build the same tree for the same seed, whatever the engine's batching and timing:

- `sync` submits a level's paths together and waits for all of them (the paper's loop);
- `async` also gives each surviving path its first child the moment its segment returns (every live path
  gets at least one child, whatever the split), so a path never waits for its level's slowest sibling to
  start decoding again; the rest of its children follow when the level is complete.

A path's request seed comes from its lineage (the child indices from the root), not from when it was sent;
node ids are "<level>-<k>" with k the position in the level in lineage order, as in the release.

Once a tree is full (finished leaves + live paths = width) the budget gives every survivor exactly one
child, whatever finishes: total = max(min(w - F, b f + b A), A) = A. From there, on an engine that takes
several segments per request (`supports_segment_seeds`), a path's remaining segments are one request, each
segment with the seed its own request would have had: the same tokens, a fraction of the requests. The
levels are still decided one by one from the segments; segments decoded past a path's stop are counted as
decoded, not kept. A request spans at most WHOLE_PATH_TOKENS: the engine reserves KV for all of its tokens
when it admits it, and a few short segments already amortize a request's cost (long segments: no change).
An `async` head start is whole-path as soon as the next level is sure to be full (b * paths >= w - F).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, replace

from treepo.client.schema import SamplingParams, TreeParams
from treepo.service.engine.protocol import Engine, GenerateOutput, GenerateRequest
from treepo.service.sampler.budget import split_budget, step_budget
from treepo.service.sampler.fallback import reopen
from treepo.service.sampler.paths import Outcome, Path, TreeBuilder, derive_seed, make_request

WHOLE_PATH_TOKENS = 128  # the most tokens one whole-path request decodes (whole segments, at least one)

Lineage = tuple[
    int, ...
]  # (origin, child index, child index, ...); origin 0 = the prompt, r = fallback round r


@dataclass(slots=True)
class _Member:
    """A path of the current level and where it comes from."""

    path: Path
    lineage: Lineage


class TreeRun:
    """Samples one tree into `builder`; `run()` returns when the tree is complete."""

    def __init__(
        self,
        engine: Engine,
        builder: TreeBuilder,
        tree: TreeParams,
        sampling: SamplingParams,
        *,
        base_seed: int,
    ) -> None:
        self.engine = engine
        self.builder = builder
        self.tree = tree
        self.sampling = sampling
        self.base_seed = base_seed
        self.rng = random.Random(f"{base_seed}:sampler")
        self.head_start = tree.schedule == "async"
        self.level = 0
        self._tasks: dict[Lineage, asyncio.Task[GenerateOutput]] = {}  # requests in flight, by lineage
        self._outcomes: dict[Lineage, Outcome] = {}  # segments classified early (async head starts)
        self.segmented = bool(getattr(engine, "supports_segment_seeds", False))
        self._ahead: dict[Lineage, GenerateOutput] = {}  # their later segments, by the lineage they are for

    async def run(self) -> None:
        members = [_Member(path, (0, i)) for i, path in enumerate(self._initial_paths())]
        try:
            while members:
                self.level += 1
                outputs = await self._run_level(members)
                members = self._next_level(members, outputs)
        finally:
            for task in self._tasks.values():
                task.cancel()
            for unused in self._ahead.values():  # decoded past a path's stop: engine work all the same
                self.builder.counts.decoded_tokens += len(unused.output_ids)

    # Internal helpers

    def _initial_paths(self) -> list[Path]:
        """`init_branch` copies of the prompt: fixed, or U{min..max} (B1 fixed), capped at width."""
        init = self.tree.init_branch
        count = self.rng.randint(init[0], init[1]) if isinstance(init, tuple) else init
        return [Path(node_id=None, depth=0) for _ in range(min(count, self.tree.width))]

    async def _run_level(self, members: list[_Member]) -> dict[Lineage, GenerateOutput]:
        """Every member's segment (head starts included); with `async`, survivors' first children go early."""
        whole = self.segmented and self.builder.num_leaves + len(members) == self.tree.width
        # the next level is full whatever this one gives (budget = w - F once b * members >= w - F), so a
        # survivor's first child will be an only child from there on
        next_whole = (
            self.segmented and self.tree.branch * len(members) >= self.tree.width - self.builder.num_leaves
        )
        outputs: dict[Lineage, GenerateOutput] = {}
        for member in members:
            if member.lineage in self._ahead:
                outputs[member.lineage] = self._ahead.pop(member.lineage)
            elif member.lineage not in self._tasks:
                self._submit(member.path, member.lineage, whole=whole)
        waiting = {self._tasks[m.lineage]: m for m in members if m.lineage not in outputs}
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                member = waiting.pop(task)
                del self._tasks[member.lineage]
                outputs[member.lineage] = output = self._first_segment(member.lineage, task.result())
                if self.head_start and (*member.lineage, 0) not in self._ahead:  # else already decoded
                    self._submit_first_child(member, output, whole=next_whole)
        return outputs

    def _first_segment(self, lineage: Lineage, output: GenerateOutput) -> GenerateOutput:
        """A whole-path request's output cut into segments: the first is this level's, the others wait in
        `_ahead` for the single children that will continue the path (lineage + (0,) per level). Only a
        whole-path request answers more than one segment."""
        size = self.tree.segment_tokens
        if len(output.output_ids) <= size:
            return output
        pieces = [output.output_ids[i : i + size] for i in range(0, len(output.output_ids), size)]
        for j, tokens in enumerate(pieces[1:], start=1):
            self._ahead[(*lineage, *(0,) * j)] = GenerateOutput(
                output_ids=tokens,
                logprobs=output.logprobs[j * size : j * size + len(tokens)],
                finish_reason=output.finish_reason if j == len(pieces) - 1 else "length",
                cached_tokens=0,  # no request of its own: nothing was looked up or prefilled
                prefill_tokens=0,
                policy_version=output.policy_version,
            )
        return replace(output, output_ids=pieces[0], logprobs=output.logprobs[:size], finish_reason="length")

    def _submit_first_child(self, member: _Member, output: GenerateOutput, *, whole: bool) -> None:
        """A survivor's first child, sent before its level is complete; with `whole` (the next level is
        full, so it is an only child from there on) it takes the path's remaining segments at once."""
        outcome = self._outcomes[member.lineage] = self.builder.outcome(member.path, output)
        tokens, _, _, reason = outcome
        if reason is None:  # the same classification `grow` makes when the level is complete
            child = Path(None, member.path.depth + 1, member.path.response_ids + tokens)
            self._submit(child, (*member.lineage, 0), whole=whole)

    def _submit(self, path: Path, lineage: Lineage, *, whole: bool = False) -> None:
        self.builder.num_requests += 1
        request = self._request(path, lineage, whole)
        self._tasks[lineage] = asyncio.ensure_future(self.engine.generate(request))

    def _request(self, path: Path, lineage: Lineage, whole: bool) -> GenerateRequest:
        """This level's segment of `path`; with `whole`, every segment left to it up to the depth limit."""
        room = self.builder.rules.max_new_tokens - len(path.response_ids)
        assert room >= 1, f"a live path has no room left: {room=}"
        input_ids = self.builder.prompt_ids + path.response_ids
        size = self.tree.segment_tokens
        label = _label(lineage)
        left = max(1, self.tree.max_depth - path.depth)  # segments until the depth limit, this one included
        segments = min(left, max(1, WHOLE_PATH_TOKENS // size)) if whole else 1
        max_new = min(size * segments, room)
        continued = segments < left and max_new < room  # children may follow: the engine keeps it cached
        if segments == 1 or max_new <= size:
            return make_request(
                self.sampling, input_ids, min(size, room), self.base_seed, label, self.builder.priority,
                keep_cached=continued,
            )  # fmt: skip
        # segment j is the j-th only child's: the seed its own request would have (make_request's)
        seeds = tuple(
            derive_seed(self.base_seed, _label((*lineage, *(0,) * j))) for j in range(-(-max_new // size))
        )
        return make_request(
            self.sampling, input_ids, max_new, self.base_seed, label, self.builder.priority,
            segment_seeds=seeds, segment_tokens=size, keep_cached=continued,
        )  # fmt: skip

    def _next_level(self, members: list[_Member], outputs: dict[Lineage, GenerateOutput]) -> list[_Member]:
        """Grow the level's segments in lineage order; give its live paths their children, or fall back."""
        members = sorted(members, key=lambda m: m.lineage)
        survivors: list[_Member] = []
        for k, member in enumerate(members):
            outcome = self._outcomes.pop(member.lineage, None)
            child, reason = self.builder.grow(
                member.path, f"{self.level}-{k}", outputs[member.lineage], outcome
            )
            if reason is None:
                survivors.append(_Member(child, member.lineage))
        if survivors:
            total = step_budget(
                width=self.tree.width,
                num_finished=self.builder.num_leaves,
                group_finished=len(members) - len(survivors),
                group_alive=len(survivors),
                branch=self.tree.branch,
            )
            scores = [m.path.score() for m in survivors]
            counts = split_budget(self.tree.split, scores, total, self.tree.split_temperature)
            return [
                _Member(member.path, (*member.lineage, j))
                for member, count in zip(survivors, counts, strict=True)
                for j in range(count)
            ]
        origin = self.level + 1  # fallback paths start a new lineage (nothing is in flight here)
        return [
            _Member(path, (origin, i)) for i, path in enumerate(reopen(self.builder, self.tree, self.rng))
        ]


def _label(lineage: Lineage) -> str:
    """A path's request label, from which its seed derives: "0.1.0" for the prompt's 2nd child's 1st child."""
    return ".".join(map(str, lineage))
