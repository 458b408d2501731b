"""Queue-mode sampling as durable jobs: recorded in Redis before the 202 (JobStore), sampled by background
tasks, resumed by any replica when their owner dies. Every accepted tree ends up, once, in the trees stream
or as a record in the failures stream."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterable
from typing import Any

from redis.exceptions import RedisError

from treepo.client import constants as names
from treepo.client.schema import RolloutTreeRequest, Tree
from treepo.service.jobstore import JobStore, StoredJob
from treepo.service.metrics import ServiceMetrics
from treepo.service.queue import TreeQueue, with_retries
from treepo.service.rollout import PreparedPrompt, TreeFailure, sample_trees
from treepo.service.runtime import EngineRuntime, Loaded

logger = logging.getLogger(__name__)


def job_record(request: RolloutTreeRequest, prompts: list[PreparedPrompt], request_id: str) -> dict[str, Any]:
    """What a replica needs to re-sample the job's unfinished trees with the same ids and seeds."""
    return {
        "request_id": request_id,
        "request": request.model_dump(mode="json"),
        "prompts": [dataclasses.asdict(p) for p in prompts],
    }


class QueueJobs:
    """Runs this process's jobs, keeps their leases (and held idempotency keys) alive, resumes dead ones."""

    def __init__(
        self, queue: TreeQueue, store: JobStore, metrics: ServiceMetrics, *, retry_window_s: float
    ) -> None:
        self.queue, self.store, self.metrics = queue, store, metrics
        self.retry_window_s = retry_window_s
        self.held_keys: set[str] = set()  # idempotency keys of inline/stream requests running here
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._draining = False
        # renew well before the shorter of the two leases runs out
        self.interval_s = min(store.lease_s, queue.retention.pending_lease_s) / 3

    @property
    def num_running(self) -> int:
        return len(self._tasks)

    def start(
        self, loaded: Loaded, job_id: str, prompts: list[PreparedPrompt], request: RolloutTreeRequest
    ) -> asyncio.Task[None]:
        task = asyncio.create_task(self._run(loaded, job_id, prompts, request), name=f"rollout-{job_id}")
        return self._track(job_id, task)

    def _track(self, job_id: str, task: asyncio.Task[None]) -> asyncio.Task[None]:
        """Renew the job's lease while `task` runs."""
        self._tasks[job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job_id, None))
        return task

    async def maintain(self, runtime: EngineRuntime) -> None:
        """Forever: renew our leases and held keys, then take over jobs whose owner stopped renewing
        (not while draining: a replica that is stopping only finishes what it has)."""
        while True:
            try:
                await self.store.renew(list(self._tasks))
                await self.queue.hold(self.held_keys)
                if runtime.state == "ready" and not self._draining:
                    for job in await self.store.claim_expired():
                        self._resume(runtime.loaded, job)
            except (RedisError, OSError):
                logger.warning("job maintenance could not reach Redis; retrying", exc_info=True)
            except Exception:  # the loop that keeps leases alive must never end
                logger.exception("job maintenance failed; retrying")
            await asyncio.sleep(self.interval_s)

    async def drain(self, grace_s: float) -> None:
        """Let running jobs finish for `grace_s`, then cancel them: their unfinished trees stay in Redis and
        their leases are given up, so the next replica (or this service restarted) re-samples them."""
        self._draining = True
        tasks = set(self._tasks.values())
        if not tasks:
            return
        logger.info("waiting up to %.0f s for %d queue jobs", grace_s, len(tasks))
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    def _resume(self, loaded: Loaded, job: StoredJob) -> None:
        if job.job_id in self._tasks:
            return
        try:
            request = RolloutTreeRequest.model_validate(job.record["request"])
            prompts = [PreparedPrompt(**p) for p in job.record["prompts"] if p["tree_id"] in job.todo]
        except (KeyError, TypeError, ValueError) as exc:  # e.g. written by an incompatible version
            logger.error("job %s cannot be resumed (%s); recording its trees as failures", job.job_id, exc)
            self._track(job.job_id, asyncio.create_task(self._abandon(job, f"unreadable job record: {exc}")))
            return
        logger.info("resuming job %s: %d unfinished trees", job.job_id, len(prompts))
        self.metrics.jobs_resumed.inc()
        self.metrics.trees_resumed.inc(len(prompts))
        self.start(loaded, job.job_id, prompts, request)

    async def _abandon(self, job: StoredJob, error: str) -> None:
        """Failure records for the unpublished trees of a job that cannot be sampled again."""
        for tree_id in sorted(job.todo):
            payload = self.queue.failure_payload(
                {"request_id": job.job_id, "tree_id": tree_id, "error": error}
            )

            async def publish(tree_id: str = tree_id, payload: str = payload) -> bool:
                return await self.store.publish(
                    job.job_id, tree_id, self.queue.failures, names.FAILURE_FIELD, payload, 0
                )

            try:
                await with_retries(publish, self.retry_window_s)
            except (RedisError, OSError):  # the lease lapses; a later recovery round tries again
                logger.exception("could not record the failure of tree %s of job %s", tree_id, job.job_id)
                return

    async def _run(
        self, loaded: Loaded, job_id: str, prompts: list[PreparedPrompt], request: RolloutTreeRequest
    ) -> None:
        unfinished = {prompt.tree_id: prompt for prompt in prompts}
        try:
            async for result in sample_trees(loaded.sampler, prompts, request, self.metrics):
                await self._deliver(job_id, result)
                unfinished.pop(result.tree_id if isinstance(result, Tree) else result.prompt.tree_id)
        except asyncio.CancelledError:
            logger.info(
                "job %s stopped with %d trees unsampled; leaving it to recovery", job_id, len(unfinished)
            )
            with contextlib.suppress(RedisError, OSError):  # else its lease lapses by itself
                await self.store.release(job_id)
            raise
        except RedisError:  # Redis down past the retry window: the lease lapses and a replica re-samples
            logger.exception("job %s could not publish; leaving it to recovery", job_id)
        except Exception as exc:  # never vanish silently: record what can be recorded
            logger.exception("queue job %s failed", job_id)
            await self._fail_all(job_id, unfinished.values(), f"{type(exc).__name__}: {exc}")

    async def _deliver(self, job_id: str, result: Tree | TreeFailure) -> None:
        """Publish a tree (or its failure record) unless it was published already; Redis connection errors
        are retried for the retry window."""
        if isinstance(result, Tree):
            stream, field, payload = self.queue.stream, names.TREE_FIELD, result.model_dump_json()
            tree_id, copy_ttl = result.tree_id, self.queue.copy_ttl(payload)
        else:
            stream, field, payload = (
                self.queue.failures,
                names.FAILURE_FIELD,
                self.queue.failure_payload(result.record(job_id)),
            )
            tree_id, copy_ttl = result.prompt.tree_id, 0

        async def publish() -> bool:
            return await self.store.publish(job_id, tree_id, stream, field, payload, copy_ttl)

        if not await with_retries(publish, self.retry_window_s):
            logger.info("tree %s of job %s was already published; not adding it twice", tree_id, job_id)

    async def _fail_all(self, job_id: str, prompts: Iterable[PreparedPrompt], error: str) -> None:
        for prompt in list(prompts):
            try:
                await self._deliver(job_id, TreeFailure(prompt, error))
            except (RedisError, OSError):  # Redis is gone too: the lease lapses, recovery re-samples it
                logger.exception("could not record the failure of tree %s: %s", prompt.tree_id, error)
