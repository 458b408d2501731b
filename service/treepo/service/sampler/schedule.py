"""The segment loop of one tree, level-synchronous (the paper) or asynchronous (no barrier).

Both schedules run the same rules: every group of segments that comes back together is classified, then its
live paths share `step_budget(...)` children split by the split policy; a prompt with nothing in flight and
fewer than w leaves falls back. `sync` submits a whole frontier as one engine call and waits for all of it,
so a group is a level (TREEPO.md §1.2). `async` submits each path as its own call: paths whose segments come
back together (one engine batch) form a group, and their children are submitted at once while the tree's
other requests are still running; budget that finished paths donate (`b` each) is pooled and goes to the next
group with live paths.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from treepo.client.schema import SamplingParams, TreeParams
from treepo.service.engine.batcher import BatchingEngine
from treepo.service.engine.protocol import GenerateOutput, GenerateRequest
from treepo.service.sampler.budget import split_budget, step_budget
from treepo.service.sampler.fallback import reopen
from treepo.service.sampler.paths import Path, TreeBuilder, make_request


@dataclass(slots=True)
class _Flight:
    seq: int
    paths: list[Path]
    labels: list[str]


class TreeRun:
    """Samples one tree into `builder`; `run()` returns when the tree is complete."""

    def __init__(
        self,
        engine: BatchingEngine,
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
        self.is_async = tree.schedule == "async"
        self.round = 0  # node ids are "<round>-<k>": round of submission, position in it
        self.num_submitted = 0
        self.reserved = 0  # requests of this tree in flight
        self.pool = 0  # async only: budget donated by finished paths, not yet used
        self.in_flight: dict[asyncio.Task, _Flight] = {}

    async def run(self) -> None:
        self._submit(self._initial_paths())
        try:
            while self.in_flight:
                done, _ = await asyncio.wait(self.in_flight, return_when=asyncio.FIRST_COMPLETED)
                flights = sorted(
                    ((self.in_flight.pop(task), task) for task in done), key=lambda ft: ft[0].seq
                )
                # 1) decode results 2) early stop 3) branch
                children = self._process([(flight, task.result()) for flight, task in flights])
                # 4) fallback
                if not children and not self.in_flight:
                    children = reopen(self.builder, self.tree, self.rng)
                self._submit(children)
        finally:
            for task in self.in_flight:
                task.cancel()

    # Internal helpers

    def _initial_paths(self) -> list[Path]:
        """`init_branch` copies of the prompt: fixed, or U{min..max} (B1 fixed), capped at width."""
        init = self.tree.init_branch
        count = self.rng.randint(init[0], init[1]) if isinstance(init, tuple) else init
        return [Path(node_id=None, depth=0) for _ in range(min(count, self.tree.width))]

    def _submit(self, paths: list[Path]) -> None:
        if not paths:
            return
        self.round += 1
        labels = [f"{self.round}-{k}" for k in range(len(paths))]
        self.reserved += len(paths)
        chunks = [[i] for i in range(len(paths))] if self.is_async else [list(range(len(paths)))]
        for chunk in chunks:
            requests = [self._request(paths[i], labels[i]) for i in chunk]
            task = asyncio.create_task(self.engine.generate_tracked(requests))
            self.in_flight[task] = _Flight(
                self.num_submitted, [paths[i] for i in chunk], [labels[i] for i in chunk]
            )
            self.num_submitted += 1

    def _request(self, path: Path, label: str) -> GenerateRequest:
        room = self.builder.rules.max_new_tokens - len(path.response_ids)
        assert room >= 1, f"a live path has no room left: {room=}"
        input_ids = self.builder.prompt_ids + path.response_ids
        segment = min(self.tree.segment_tokens, room)
        return make_request(self.sampling, input_ids, segment, self.base_seed, label)

    def _process(
        self, results: list[tuple[_Flight, tuple[list[GenerateOutput], tuple[int, ...]]]]
    ) -> list[Path]:
        """Grow the returned segments; give the group's live paths their children."""
        survivors: list[Path] = []
        num_finished = 0
        for flight, (outputs, batch_ids) in results:
            self.builder.batch_ids.update(batch_ids)
            for path, label, output in zip(flight.paths, flight.labels, outputs, strict=True):
                self.reserved -= 1
                child, reason = self.builder.grow(path, label, output)
                if reason is None:
                    survivors.append(child)
                else:
                    num_finished += 1
        return self._branch(survivors, num_finished)

    def _branch(self, survivors: list[Path], num_finished: int) -> list[Path]:
        branch = self.tree.branch
        donated = branch * num_finished + self.pool
        if not survivors:
            self.pool = donated if self.is_async else 0
            return []
        total = step_budget(
            width=self.tree.width,
            num_finished=self.builder.num_leaves,
            num_reserved=self.reserved,
            group_finished=num_finished,
            group_alive=len(survivors),
            branch=branch,
            pool=self.pool,
        )
        if self.is_async:
            self.pool = max(0, donated - max(0, total - branch * len(survivors)))
        counts = split_budget(
            self.tree.split, [p.score() for p in survivors], total, self.tree.split_temperature
        )
        return [path for path, count in zip(survivors, counts, strict=True) for _ in range(count)]
