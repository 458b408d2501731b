"""The training loop of `treepo train`: feed prompts, pull scored trees, step, push weights, checkpoint, ack.

Order per step (why): 1) assemble a batch from the queue (the feeder keeps sampling meanwhile);
2) claim its trees in the fenced ledger (fencing.py) and drop those another consumer holds or trained;
3) one training step; 4) push the new weights so sampling moves on at once; 5) every `checkpoint_every`
steps save a checkpoint, and only then commit (ledger done + XACK, one Lua script) the trees the
checkpointed steps used. A crash before 5) redelivers those trees to the resumed run (same consumer
name), whose weights predate them and which re-claims them: each is trained once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import torch

from treepo.client.client import RetryPolicy, TreePOClient
from treepo.client.schema import SamplingParams, TreeParams
from treepo.client.stream import TreeStream
from treepo.service.task import iter_problems
from treepo.trainer.checkpoint import (
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from treepo.trainer.config import TrainConfig, default_consumer
from treepo.trainer.consumer import Batch, BatchCounts, TreeConsumer
from treepo.trainer.feeder import Feeder, FeedRequest, StreamProgress
from treepo.trainer.lockstep import LockstepAssembler
from treepo.trainer.metrics import MetricsLog, TrainerMetrics
from treepo.trainer.policy import Policy
from treepo.trainer.rewards import OverlongPenalty, RewardFn, load_reward
from treepo.trainer.trainer import Trainer, batch_metrics, rows_from_tree
from treepo.trainer.weights import WeightPusher

logger = logging.getLogger(__name__)

StepCallback = Callable[[dict[str, Any]], None]
FAULT_ENV = "TREEPO_TRAINER_FAULT"  # "<point>:<step>[:stop]": kill -9 / freeze there (the fault tests)
_FAULTS_SEEN: set[str] = set()


def tree_params(config: TrainConfig) -> TreeParams:
    """The feeder's tree shape; `sequential` = `width` independent chains (no shared prefix)."""
    if config.sampling_mode == "sequential":
        return TreeParams(
            width=config.width,
            init_branch=config.width,
            branch=1,
            segment_tokens=config.segment_tokens,
            max_depth=config.max_depth,
        )
    return TreeParams(
        width=config.width,
        branch=config.branch,
        init_branch=config.branch,
        segment_tokens=config.segment_tokens,
        max_depth=config.max_depth,
    )


@dataclass(slots=True)
class TrainingRun:
    """Everything one `treepo train` process holds; `run()` trains up to `config.steps`."""

    config: TrainConfig
    policy: Policy
    trainer: Trainer
    client: TreePOClient
    consumer: TreeConsumer
    feeder: Feeder
    pusher: WeightPusher
    log: MetricsLog
    prometheus: TrainerMetrics
    reward_fn: RewardFn
    state: TrainerState = field(default_factory=TrainerState)
    stall_timeout_s: float = 600.0
    lockstep: LockstepAssembler | None = None  # the deterministic schedule (config.deterministic)

    def run(self, on_step: StepCallback | None = None) -> TrainerState:
        if self.lockstep is None:
            self.feeder.start()
        try:
            while self.state.step < self.config.steps:
                record = self.step()
                if on_step is not None:
                    on_step(record)
        finally:
            self.feeder.stop()
        return self.state

    def step(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.consumer.fence.touch(self.state.entry_ids)  # held across steps: not idle, not taken over
        batch = self._assemble()
        with self._heartbeat(self.state.entry_ids + batch.entry_ids):
            _fault_point("train", self.state.step + 1)  # claimed, not trained
            waited = time.perf_counter() - started
            rows = [row for t in batch.trees for row in rows_from_tree(t.tree, t.rewards, t.is_correct)]
            record = {"step": self.state.step + 1, **self.trainer.step(rows), **batch_metrics(rows)}
            self.state.step += 1
            self.state.policy_version += 1  # monotonic even across resumes (the service refuses going back)
            self.state.entry_ids += batch.entry_ids
            self.state.tree_ids += batch.tree_ids
            record["weight_push_s"] = self._maybe_push()
            record.update(
                _batch_record(batch, waited, time.perf_counter() - started, self.state.policy_version)
            )
            # Logged before the checkpoint: every checkpointed step has its record in metrics.jsonl (a step
            # a crash makes redo is logged again; its last record counts). checkpoint_s is not in the file.
            self.log.append(record)
            record["checkpoint_s"] = self._maybe_checkpoint()
        self.prometheus.observe_step(record)
        return record

    @contextmanager
    def _heartbeat(self, entry_ids: list[str]) -> Iterator[None]:
        """Touch the claimed entries every claim_idle_s / 3 while the step trains, pushes and checkpoints:
        a slow-but-alive trainer is never taken over (only one that stops beating for claim_idle_s is)."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(max(self.config.claim_idle_s / 3, 0.01)):
                try:
                    self.consumer.fence.touch(entry_ids)
                except redis.RedisError as error:  # retried inside; the next beat tries again
                    logger.warning("heartbeat failed: %s", error)

        thread = threading.Thread(target=beat, name="treepo-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _assemble(self) -> Batch:
        """Wait for a full batch, failing loudly if the feeder died or nothing arrives for too long."""
        if self.lockstep is not None:
            batch = self.lockstep.assemble(
                self.config.prompts_per_step,
                self.reward_fn,
                current_version=self.state.policy_version,
                give_up=self._too_many_reads,
            )
            _fault_point("claim", self.state.step + 1)  # read, not claimed
            return self.consumer.claim(batch)
        batch = Batch([], BatchCounts(), is_full=False)
        last_progress = time.monotonic()
        while len(batch.trees) < self.config.prompts_per_step:
            self.feeder.check()
            read = self.consumer.assemble_batch(
                self.config.prompts_per_step - len(batch.trees),
                self.reward_fn,
                current_version=self.state.policy_version,
                timeout_s=2.0,
            )
            if read.trees:
                _fault_point("claim", self.state.step + 1)  # read, not claimed
            more = self.consumer.claim(read)
            batch.trees += more.trees
            batch.counts.add(more.counts)
            if self._too_many_reads(batch):
                break
            if more.counts.num_read:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > self.stall_timeout_s:
                raise RuntimeError(
                    f"no tree arrived for {self.stall_timeout_s:.0f}s; is the service sampling?"
                )
        return batch

    def _too_many_reads(self, batch: Batch) -> bool:
        """DAPO's `max_num_gen_batches`: after that many batches' worth of trees, train on the partial
        batch (a policy that solves nearly everything leaves few mixed groups), or stop if it is empty."""
        limit = self.config.max_gen_batches * self.config.prompts_per_step
        if batch.counts.num_read <= limit:
            return False
        c = batch.counts
        if not batch.trees:
            raise RuntimeError(
                f"read {c.num_read} trees and kept none (all correct {c.num_all_correct}, all wrong "
                f"{c.num_all_wrong}, stale {c.num_stale}): the reward cannot tell the leaves apart; use a "
                "model that solves some but not all problems, a wider tree, or a larger --max-staleness"
            )
        logger.warning("only %d of %d prompts kept after reading %d trees; training on a partial batch",
                       len(batch.trees), self.config.prompts_per_step, c.num_read)  # fmt: skip
        return True

    def _maybe_push(self) -> float | None:
        every = self.config.push_every
        if every == 0 or self.state.step % every:
            return None
        return self.pusher.push(self.policy.model, self.state.policy_version).total_s

    def _maybe_checkpoint(self) -> float | None:
        is_last = self.state.step >= self.config.steps
        if self.state.step % self.config.checkpoint_every and not is_last:
            return None
        _fault_point("checkpoint", self.state.step)  # trained and logged, not checkpointed
        started = time.perf_counter()
        root = Path(self.config.output_dir) / "checkpoints"
        save_checkpoint(
            root,
            self.policy.model,
            self.trainer.optimizer,
            self.trainer.scheduler,
            self.state,
            keep=self.config.keep_checkpoints,
        )
        _fault_point("commit", self.state.step)  # checkpointed, not committed
        self.consumer.commit(self.state.entry_ids, self.state.tree_ids)  # ledger done + XACK only now
        self.state.entry_ids, self.state.tree_ids = [], []
        return time.perf_counter() - started


def _fault_point(point: str, step: int) -> None:
    """Crash (SIGKILL, as `kill -9` would) or freeze (SIGSTOP, a trainer stalled until SIGCONT) at a named
    point of a step when FAULT_ENV says `<point>:<step>` or `<point>:<step>:stop`: the fault tests need the
    exact moments before a claim, between claim and train, and between checkpoint and commit."""
    wanted = os.environ.get(FAULT_ENV, "")
    if wanted in (f"{point}:{step}", f"{point}:{step}:stop") and wanted not in _FAULTS_SEEN:
        _FAULTS_SEEN.add(wanted)  # once per process
        logger.warning("%s=%s: signalling this process", FAULT_ENV, wanted)
        os.kill(os.getpid(), signal.SIGSTOP if wanted.endswith(":stop") else signal.SIGKILL)


def _batch_record(batch: Batch, waited_s: float, step_s: float, version: int) -> dict[str, Any]:
    counts = batch.counts
    stats = [t.tree.stats for t in batch.trees]
    # Accuracy over every scored tree, filtered ones included: the learning curve dynamic filtering hides.
    kept_correct = sum(sum(t.is_correct) for t in batch.trees)
    kept_leaves = sum(len(t.tree.leaves) for t in batch.trees)
    leaves_per_tree = kept_leaves / max(1, len(batch.trees))
    scored = kept_leaves + (counts.num_all_correct + counts.num_all_wrong) * leaves_per_tree
    correct = kept_correct + counts.num_all_correct * leaves_per_tree
    return {
        "accuracy_unfiltered": correct / scored if scored else 0.0,
        "policy_version": version,
        "wait_s": waited_s,
        "step_s": step_s,
        "trees_consumed": counts.num_read,
        "trees_trained": len(batch.trees),
        "filtered_prompts": counts.num_filtered,
        "all_correct_prompts": counts.num_all_correct,
        "all_wrong_prompts": counts.num_all_wrong,
        "stale_trees": counts.num_stale,
        "duplicate_trees": counts.num_duplicates,
        "fenced_trees": counts.num_fenced,  # taken over by another consumer before this step's claim
        "staleness_mean": batch.mean_staleness(),
        "decoded_tokens": sum(s.decoded_tokens for s in stats),
        "independent_tokens": sum(s.independent_tokens for s in stats),
        "sampling_s_mean": sum(s.wall_s for s in stats) / max(1, len(stats)),
        "time": time.time(),
    }


def build_run(config: TrainConfig, *, resume: bool = False, log_every_push: bool = True) -> TrainingRun:
    """Load the policy (and the latest checkpoint with `resume`), connect to the service and Redis."""
    torch.manual_seed(config.seed)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    policy = Policy.from_pretrained(config.model_path or _default_model(), device=config.device)
    trainer = Trainer(policy, config)
    client = _service_client(config)
    claim_idle_ms = max(1, int(config.claim_idle_s * 1000))
    checkpoint = _latest(config) if resume else None
    saved = read_state(checkpoint) if checkpoint is not None else TrainerState()
    name = config.consumer or saved.consumer or default_consumer(config.output_dir)
    stream = TreeStream(
        config.redis_url,
        config.group,
        name,
        config.key_prefix,
        block_ms=500,
        claim_idle_ms=claim_idle_ms,
        retry_s=config.redis_retry_s,
    )
    stream.ensure_group(start="0" if config.read_history else "$")
    overlong = (
        OverlongPenalty(config.max_new_tokens, config.overlong_buffer, config.overlong_factor)
        if config.overlong_buffer > 0
        else None
    )
    consumer = TreeConsumer(
        stream, max_staleness=config.max_staleness, enable_filter=config.dynamic_filter, overlong=overlong
    )
    pusher = WeightPusher(client, config.weights_dir or Path(config.output_dir) / "weights")
    state = _restore(checkpoint, trainer, consumer) if checkpoint is not None else TrainerState()
    _sync_service_version(client, pusher, policy, state, resumed=resume)
    state.consumer = name
    consumer.version_gaps = state.version_gaps  # one list: saved with every checkpoint
    feeder = _build_feeder(config, client, state)
    prometheus = TrainerMetrics()
    if config.metrics_port is not None:
        prometheus.serve(config.metrics_port)
    log = MetricsLog(Path(config.output_dir) / "metrics.jsonl")
    lockstep = LockstepAssembler(feeder, consumer, config.max_staleness) if config.deterministic else None
    return TrainingRun(
        config,
        policy,
        trainer,
        client,
        consumer,
        feeder,
        pusher,
        log,
        prometheus,
        load_reward(config.reward),
        state,
        lockstep=lockstep,
    )


def _service_client(config: TrainConfig) -> TreePOClient:
    """A client that rides out a service or Redis restart (503, refused connections) for about
    `redis_retry_s`: backoff 0.5 s doubling to 10 s."""
    attempts = 6 + max(0, int((config.redis_retry_s - 15.5) // 10) + 1)
    retry = RetryPolicy(max_attempts=attempts, base_delay_s=0.5, max_delay_s=10.0)
    return TreePOClient(config.service_url, token=config.api_token, retry=retry)


def _default_model() -> str:
    from treepo.service.tinymodel import default_model_path

    return str(default_model_path())


def _latest(config: TrainConfig) -> Path:
    path = latest_checkpoint(Path(config.output_dir) / "checkpoints")
    if path is None:
        raise ValueError(
            f"--resume: no checkpoint under {config.output_dir}/checkpoints; start without --resume"
        )
    return path


def _restore(path: Path, trainer: Trainer, consumer: TreeConsumer) -> TrainerState:
    state = load_checkpoint(path, trainer.policy.model, trainer.optimizer, trainer.scheduler)
    # A crash may have come between checkpoint and commit; the claims are under the checkpoint's name.
    consumer.commit(state.entry_ids, state.tree_ids, claimant=state.consumer or None)
    state.entry_ids, state.tree_ids = [], []
    if state.consumer and state.consumer != consumer.stream.consumer:
        # Resumed under another name (another host, or an explicit --consumer): the old process is dead,
        # so what it held is ours now, re-read at once instead of after claim_idle_s.
        consumer.stream.take_over(state.consumer)
    return state


def _sync_service_version(
    client: TreePOClient, pusher: WeightPusher, policy: Policy, state: TrainerState, *, resumed: bool
) -> None:
    """Make the service sample our weights: a fresh run on a fresh service shares the base model (version
    0); otherwise push ours under a version above both the service's and the checkpoint's."""
    served = client.weights().policy_version
    if not resumed and served == 0:
        return
    restored = state.policy_version
    state.policy_version = max(served, restored) + 1
    if resumed:  # versions restored+1 .. new stand for the checkpoint's weights (TreeConsumer.staleness)
        state.version_gaps.append((restored + 1, state.policy_version))
    pusher.push(policy.model, state.policy_version)


def _build_feeder(config: TrainConfig, client: TreePOClient, state: TrainerState) -> Feeder:
    sampling = SamplingParams(temperature=config.temperature, max_new_tokens=config.max_new_tokens)
    request = FeedRequest(
        tree_params(config),
        sampling,
        prompts_per_request=min(8, config.prompts_per_step),
        seed=config.seed * 7919 + state.step,
    )
    problems = iter_problems("train", seed=config.seed * 7919 + state.step)
    progress = StreamProgress(config.redis_url, config.key_prefix, config.group, retry_s=config.redis_retry_s)
    return Feeder(
        _service_client(config),
        problems,
        request,
        progress,
        target=config.inflight_batches * config.prompts_per_step,
        lost_after_s=config.lost_after_s,
        retry_s=config.redis_retry_s,
    )
