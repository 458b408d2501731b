"""The feeder: keeps the service busy with training prompts so sampling overlaps training.

It submits prompts of the task's train split to POST /rollout_tree with `delivery="queue"`, in requests of
`prompts_per_request`, until `target` trees are outstanding (submitted but not yet read by the trainer).
Outstanding trees are measured on Redis, not guessed: submitted - (entries the consumer group has read
since the feeder started) - (failure records since then). A background thread polls, so prompts dropped
by dynamic sampling are replaced while the trainer is still assembling its batch.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import redis

from treepo.client.client import TreePOClient
from treepo.client.constants import failures_stream, trees_stream
from treepo.client.schema import Prompt, SamplingParams, TreeParams
from treepo.service.task import Problem

logger = logging.getLogger(__name__)

SEQ_KEY = "seq"  # prompt metadata: the prompt's position in the feeder's sequence (0, 1, 2, ...)
FEED_KEY = "feed"  # prompt metadata: which feeder numbered it (a resumed run restarts the sequence)


@dataclass(slots=True)
class FeedRequest:
    """What every submitted prompt is sampled with."""

    tree: TreeParams
    sampling: SamplingParams
    prompts_per_request: int = 8
    seed: int = 0  # prompt n is sampled with seed * 1_000_003 + n


class StreamProgress:
    """Reads how far a consumer group got: entries read by the group, failure records written."""

    def __init__(self, redis_url: str, prefix: str, group: str) -> None:
        self._redis = redis.Redis.from_url(redis_url)
        self.stream, self.failures_stream, self.group = trees_stream(prefix), failures_stream(prefix), group

    def entries_read(self) -> int:
        try:
            groups = self._redis.xinfo_groups(self.stream)
        except redis.ResponseError:  # no stream yet
            return 0
        for info in groups:
            if _text(info["name"]) == self.group:
                return int(info.get("entries-read") or 0)
        return 0

    def failures(self) -> int:
        return int(self._redis.xlen(self.failures_stream))

    def close(self) -> None:
        self._redis.close()


class Feeder:
    """Submits prompts until `target` trees are outstanding; `start()` runs it on a daemon thread."""

    def __init__(
        self,
        client: TreePOClient,
        problems: Iterator[Problem],
        request: FeedRequest,
        progress: StreamProgress,
        *,
        target: int,
        poll_s: float = 0.2,
    ) -> None:
        if target < 1:
            raise ValueError(f"target must be >= 1 outstanding trees (got {target})")
        self.client, self.problems, self.request, self.progress = client, problems, request, progress
        self.target, self.poll_s = target, poll_s
        self.submitted = 0
        self.feed_id = uuid.uuid4().hex[:12]
        self.num_requests = 0
        self._base_read = progress.entries_read()
        self._base_failures = progress.failures()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def outstanding(self) -> int:
        read = self.progress.entries_read() - self._base_read
        failed = self.progress.failures() - self._base_failures
        return self.submitted - read - failed

    def top_up(self) -> int:
        """Submit requests until `target` trees are outstanding; returns prompts submitted."""
        sent = 0
        while (missing := self.target - self.outstanding()) > 0 and not self._stop.is_set():
            count = min(missing, self.request.prompts_per_request)
            self._submit([next(self.problems) for _ in range(count)])
            sent += count
        return sent

    def submit(self, count: int) -> int:
        """Submit the next `count` prompts of the sequence now (the lockstep schedule); returns the first
        sequence number sent."""
        if count < 1:
            raise ValueError(f"count must be >= 1 prompts (got {count})")
        first = self.submitted
        while self.submitted < first + count:
            size = min(first + count - self.submitted, self.request.prompts_per_request)
            self._submit([next(self.problems) for _ in range(size)])
        return first

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="treepo-feeder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def check(self) -> None:
        """Re-raise a feeder failure in the training loop (a dead feeder would stall it silently)."""
        if self.error is not None:
            raise RuntimeError(f"the feeder stopped: {self.error}") from self.error

    # Internal helpers

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.top_up()
                self._stop.wait(self.poll_s)
        except Exception as error:  # reported to the loop by check()
            logger.exception("feeder failed")
            self.error = error

    def _submit(self, problems: list[Problem]) -> None:
        prompts = [
            Prompt(
                id=f"train-{self.submitted + i}",
                text=p.prompt,
                metadata={"answer": p.answer, SEQ_KEY: self.submitted + i, FEED_KEY: self.feed_id},
            )
            for i, p in enumerate(problems)
        ]
        # The service seeds prompt i with seed + i: every prompt's seed is then base + its sequence
        # number, whatever request it travelled in.
        seed = self.request.seed * 1_000_003 + self.submitted
        sampling = self.request.sampling.model_copy(update={"seed": seed})
        self.client.rollout_tree(prompts, tree=self.request.tree, sampling=sampling, delivery="queue")
        self.submitted += len(prompts)
        self.num_requests += 1


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
