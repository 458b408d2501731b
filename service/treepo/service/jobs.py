"""Queue-mode sampling as background tasks that outlive their HTTP request; every accepted tree ends up
in the trees stream or, failing that, as a record in the failures stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from treepo.client.schema import RolloutTreeRequest, Tree
from treepo.service.metrics import ServiceMetrics
from treepo.service.queue import TreeQueue
from treepo.service.rollout import PreparedPrompt, TreeFailure, sample_trees
from treepo.service.runtime import Loaded

logger = logging.getLogger(__name__)


class QueueJobs:
    """Owns the running queue jobs; on shutdown gives them a grace period, then records what is left."""

    def __init__(self, queue: TreeQueue, metrics: ServiceMetrics) -> None:
        self.queue = queue
        self.metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def num_running(self) -> int:
        return len(self._tasks)

    def submit(
        self, loaded: Loaded, prompts: list[PreparedPrompt], request: RolloutTreeRequest, request_id: str
    ) -> asyncio.Task[None]:
        task = asyncio.create_task(
            self._run(loaded, prompts, request, request_id), name=f"rollout-{request_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self, grace_s: float) -> None:
        """Let running jobs finish for `grace_s`, then cancel them (they write failure records)."""
        if not self._tasks:
            return
        logger.info("waiting up to %.0f s for %d queue jobs", grace_s, len(self._tasks))
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def _run(
        self, loaded: Loaded, prompts: list[PreparedPrompt], request: RolloutTreeRequest, request_id: str
    ) -> None:
        unfinished = {prompt.tree_id: prompt for prompt in prompts}
        try:
            async for result in sample_trees(loaded.sampler, prompts, request, self.metrics):
                await self._deliver(result, request_id)
                unfinished.pop(result.tree_id if isinstance(result, Tree) else result.prompt.tree_id)
        except asyncio.CancelledError:
            await self._fail_all(
                unfinished.values(), "the service stopped before this tree was sampled", request_id
            )
            raise
        except (
            Exception
        ) as exc:  # e.g. Redis down for good: record what can be recorded, never vanish silently
            logger.exception("queue job %s failed", request_id)
            await self._fail_all(unfinished.values(), f"{type(exc).__name__}: {exc}", request_id)

    async def _deliver(self, result: Tree | TreeFailure, request_id: str) -> None:
        if isinstance(result, Tree):
            await self.queue.publish(result)
        else:
            await self.queue.publish_failure(result.record(request_id))

    async def _fail_all(self, prompts: Iterable[PreparedPrompt], error: str, request_id: str) -> None:
        for prompt in list(prompts):
            try:
                await self.queue.publish_failure(TreeFailure(prompt, error).record(request_id))
            except Exception:  # Redis is gone too: the log is the last record left
                logger.exception("could not record the failure of tree %s: %s", prompt.tree_id, error)
