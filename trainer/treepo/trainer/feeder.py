"""The feeder: keeps the service busy with training prompts so sampling overlaps training.

It submits prompts of the task's train split to POST /rollout_tree with `delivery="queue"`, in requests of
`prompts_per_request`, until `target` trees are outstanding (submitted but not yet read by the trainer).
Outstanding trees are measured on Redis, not guessed: submitted - (entries the consumer group has read
since the feeder started) - (failure records since then). A background thread polls, so prompts dropped
by dynamic sampling are replaced while the trainer is still assembling its batch.

Surviving its neighbours: a submission that fails (service or Redis down) is retried with backoff for
`retry_s`; prompts the service never turned into a tree or a failure record (it crashed and lost them) are
written off once nothing was produced for `lost_after_s`, so they are submitted again instead of counting as
outstanding for ever (the lockstep schedule re-submits the exact prompts, see `resubmit`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import redis

from treepo.client.client import TreePOClient, TreePOError
from treepo.client.constants import failures_stream, trees_stream
from treepo.client.schema import Prompt, SamplingParams, TreeParams
from treepo.client.stream import connect, repair_entries_read
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
    """Reads how far a consumer group got: entries read by the group, trees published, failure records."""

    def __init__(self, redis_url: str, prefix: str, group: str, *, retry_s: float = 60.0) -> None:
        self._redis = connect(redis_url, retry_s=retry_s)
        self.stream, self.failures_stream, self.group = trees_stream(prefix), failures_stream(prefix), group

    def entries_read(self) -> int:
        try:
            groups = self._redis.xinfo_groups(self.stream)
        except redis.ResponseError:  # no stream yet
            return 0
        for info in groups:
            if _text(info["name"]) == self.group:
                read = info.get("entries-read")
                if read is None:  # unknown after an AOF reload: restore it (else outstanding looks huge)
                    read = repair_entries_read(self._redis, self.stream, self.group)
                return int(read or 0)
        return 0

    def published(self) -> int:
        """Entries ever added to the trees stream (trimming does not lower it)."""
        try:
            return int(self._redis.xinfo_stream(self.stream)["entries-added"])
        except redis.ResponseError:  # no stream yet
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
        lost_after_s: float = 300.0,
        retry_s: float = 120.0,
    ) -> None:
        if target < 1:
            raise ValueError(f"target must be >= 1 outstanding trees (got {target})")
        self.client, self.problems, self.request, self.progress = client, problems, request, progress
        self.target, self.poll_s, self.lost_after_s, self.retry_s = target, poll_s, lost_after_s, retry_s
        self.submitted = 0
        self.feed_id = uuid.uuid4().hex[:12]
        self.num_requests = 0
        self.num_written_off = 0  # prompts counted as lost by a service crash (submitted again)
        self.sent: dict[int, Problem] = {}  # sequence number -> problem, of the last `submit` (resubmit)
        self._base_read = progress.entries_read()
        self._base_failures = progress.failures()
        self._base_published = progress.published()
        self._last_seen = (self._base_published, self._base_failures)
        self._last_change = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def outstanding(self) -> int:
        read = self.progress.entries_read() - self._base_read
        failed = self.progress.failures() - self._base_failures
        return self.submitted - read - failed - self.num_written_off

    def silent_for(self) -> float:
        """Seconds since the service last published a tree or a failure record (or we last submitted)."""
        seen = (self.progress.published(), self.progress.failures())
        if seen != self._last_seen:
            self._last_seen, self._last_change = seen, time.monotonic()
        return time.monotonic() - self._last_change

    def write_off_lost(self) -> int:
        """After `lost_after_s` without anything produced, count prompts the service never answered as
        lost (a crash lost them), so `top_up` submits new ones; returns how many."""
        if self.silent_for() <= self.lost_after_s:
            return 0
        published, failed = self._last_seen
        unanswered = self.submitted - (published - self._base_published) - (failed - self._base_failures)
        lost = unanswered - self.num_written_off
        if lost > 0:
            logger.warning("%d prompts got no tree and no failure record within %.0fs (did the service "
                           "crash?): submitting new ones", lost, self.lost_after_s)  # fmt: skip
            self.num_written_off += lost
        self._last_change = time.monotonic()
        return max(lost, 0)

    def top_up(self) -> int:
        """Submit requests until `target` trees are outstanding; returns prompts submitted."""
        sent = 0
        self.write_off_lost()
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
        self.sent = {}
        while self.submitted < first + count:
            size = min(first + count - self.submitted, self.request.prompts_per_request)
            problems = [next(self.problems) for _ in range(size)]
            self.sent.update((self.submitted + i, p) for i, p in enumerate(problems))
            self._submit(problems)
        return first

    def resubmit(self, seqs: list[int]) -> None:
        """Submit the prompts of these sequence numbers of the last `submit` again, each with its own seed
        (the lockstep schedule, when the service lost them)."""
        for seq in seqs:
            self._send([self._prompt(seq, self.sent[seq])], seq)

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
        prompts = [self._prompt(self.submitted + i, p) for i, p in enumerate(problems)]
        self._send(prompts, self.submitted)
        self.submitted += len(prompts)

    def _prompt(self, seq: int, problem: Problem) -> Prompt:
        metadata = {"answer": problem.answer, SEQ_KEY: seq, FEED_KEY: self.feed_id}
        return Prompt(id=f"train-{seq}", text=problem.prompt, metadata=metadata)

    def _send(self, prompts: list[Prompt], first_seq: int) -> None:
        """POST the prompts, retrying with backoff for `retry_s` while the service or its Redis is down."""
        # The service seeds prompt i with seed + i: every prompt's seed is then base + its sequence
        # number, whatever request it travelled in.
        seed = self.request.seed * 1_000_003 + first_seq
        sampling = self.request.sampling.model_copy(update={"seed": seed})
        deadline, delay = time.monotonic() + self.retry_s, 0.5
        while True:
            try:
                self.client.rollout_tree(prompts, tree=self.request.tree, sampling=sampling, delivery="queue")
                break
            except (TreePOError, httpx.TransportError) as error:
                transient = (
                    not isinstance(error, TreePOError) or error.status >= 500 or error.status in (409, 429)
                )
                if not transient or time.monotonic() + delay > deadline or self._stop.is_set():
                    raise
                logger.warning(
                    "submitting %d prompts failed (%s); retrying in %.1fs", len(prompts), error, delay
                )
                time.sleep(delay)
                delay = min(2 * delay, 10.0)
        self.num_requests += 1
        self._last_change = time.monotonic()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
