"""Trainer configuration: one slotted dataclass whose fields carry their help text.

Defaults are the TreePO release values (shared/TREEPO.md §1.7, §2.3: `run_treepo_train.sh`); the demo and
the tiny model override the few that only make sense at 7B scale (lr, batch sizes, tree shape).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Literal

AdvantageEstimator = Literal["treepo", "grpo"]
OldLogprobSource = Literal["recompute", "sampler"]
Weighting = Literal["average", "group_size"]
LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
SamplingMode = Literal["tree", "sequential"]


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


def default_consumer(output_dir: str) -> str:
    """A consumer name that survives a restart (no pid): a resumed run on the same host and run directory
    reads back the entries its predecessor held, while two runs with different directories never share one."""
    digest = hashlib.sha1(os.path.abspath(output_dir).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-{digest}"


@dataclass(slots=True)
class TrainConfig:
    """Everything `treepo train` needs; each field is a command-line option of the same name."""

    # Where things are.
    model_path: str = _help("Local HF checkpoint to train (default: the shipped tiny model).", "")
    service_url: str = _help("Base URL of the rollout service.", "http://127.0.0.1:8000")
    api_token: str | None = _help("Bearer token of the service (TREEPO_API_TOKEN).", None)
    redis_url: str = _help("Redis holding the trees stream.", "redis://127.0.0.1:6379/0")
    key_prefix: str = _help("Redis key prefix shared with the service.", "treepo")
    group: str = _help("Consumer group of this training job.", "trainer")
    read_history: bool = _help(
        "A new consumer group reads the trees already in the stream too (default: only trees published "
        "after it was created, so a new job does not train on another job's leftovers).",
        False,
    )
    consumer: str = _help(
        "Consumer name in the group (default: <host>-<hash of --output-dir>; on --resume the checkpoint's).",
        "",
    )
    output_dir: str = _help("Run directory: metrics.jsonl, checkpoints, plots.", "runs/train")
    weights_dir: str = _help(
        "Shared weights directory the service loads pushed weights from (treepo serve's default too).",
        "weights",
    )
    device: str = _help("Torch device of the trainer.", "cpu")
    torch_threads: int = _help("CPU threads of the trainer's torch (0 = torch's default).", 0)
    seed: int = _help("Seed of the trainer, the feeder and the sampling requests.", 0)
    # Optimisation (TREEPO.md §2.3, release values).
    steps: int = _help("Training steps (one optimizer pass over a batch of trees each).", 100)
    lr: float = _help("AdamW learning rate (release 1e-6 for 7B; the tiny model wants ~5e-4).", 1e-6)
    warmup_steps: int = _help("Linear warm-up steps of the learning rate (optimizer steps).", 10)
    weight_decay: float = _help("AdamW weight decay.", 0.1)
    adam_betas: tuple[float, float] = _help("AdamW betas.", (0.9, 0.999))
    grad_clip: float = _help("Max global gradient norm (0 = off).", 1.0)
    epsilon_low: float = _help("Lower ratio clip (DAPO).", 0.2)
    epsilon_high: float = _help("Upper ratio clip (DAPO clip-higher).", 0.28)
    clip_ratio_c: float = _help("Dual-clip bound for negative advantages.", 10.0)
    loss_agg_mode: LossAggMode = field(
        default="token-mean", metadata={"help": "How token losses are aggregated."}
    )
    ppo_epochs: int = _help("Passes over each training batch.", 1)
    mini_batch_prompts: int = _help("Prompts per optimizer step (ppo_mini_batch_size).", 32)
    micro_batch_rows: int = _help("Trajectories per forward/backward (gradient accumulation).", 16)
    prompts_per_step: int = _help("Prompts per training batch after dynamic filtering.", 512)
    # Sampling requests sent by the feeder (TREEPO.md §1.7).
    sampling_mode: SamplingMode = field(
        default="tree", metadata={"help": "tree: TreePO trees; sequential: width independent samples."}
    )
    width: int = _help("w: trajectories per prompt.", 16)
    branch: int = _help("b: branching budget per node.", 2)
    segment_tokens: int = _help("l: tokens per segment.", 512)
    max_depth: int = _help("d: max segments per trajectory.", 14)
    temperature: float = _help("Sampling temperature.", 1.0)
    inflight_batches: int = _help("Training batches of prompts the feeder keeps in flight.", 2)
    max_staleness: int = _help("Skip trees sampled more than K policy versions ago (0 = on-policy).", 1)
    deterministic: bool = _help(
        "Lockstep schedule: sample each step's prompts after the previous push and batch them in "
        "submission order, so a seed reproduces the run (no sampling/training overlap).",
        False,
    )
    # Scoring and advantages (TREEPO.md §2.2).
    reward: str = _help("Reward plugin: toy, math_verify, module:function or an entry point.", "toy")
    dynamic_filter: bool = _help(
        "DAPO dynamic sampling: drop prompts whose leaves all scored the same (no gradient).", True
    )
    overlong_buffer: int = _help("DAPO overlong penalty buffer in tokens (0 = off).", 0)
    overlong_factor: float = _help("DAPO overlong penalty factor.", 1.0)
    advantage: AdvantageEstimator = field(
        default="treepo", metadata={"help": "treepo: subtree baselines; grpo: group mean/std."}
    )
    weighting: Weighting = field(
        default="average", metadata={"help": "TreePO subgroup weighting (release: average)."}
    )
    reject_zero_std_subgroups: bool = _help("Drop subgroups whose rewards are all equal (Eq. 7).", False)
    old_logprobs: OldLogprobSource = field(
        default="recompute", metadata={"help": "recompute (release) or take the sampler's logprobs."}
    )
    max_gen_batches: int = _help(
        "Give up when this many batches' worth of trees were read without filling one (release: 10).", 10
    )
    # Bookkeeping.
    checkpoint_every: int = _help("Checkpoint (and then XACK) every k steps.", 50)
    push_every: int = _help("Push weights to the service every k steps (<= max_staleness + 1; 0 = never).", 1)
    keep_checkpoints: int = _help("Checkpoints kept on disk.", 2)
    claim_idle_s: float = _help("Take over trees a dead consumer held this long (XAUTOCLAIM).", 600.0)
    lost_after_s: float = _help(
        "Count submitted prompts as lost (and submit them again) when the service produced no tree and no "
        "failure record for them for this long (a service crash).",
        300.0,
    )
    redis_retry_s: float = _help(
        "Keep retrying Redis commands with backoff for this long before failing.", 120.0
    )
    metrics_port: int | None = _help("Serve Prometheus trainer metrics on this port.", None)

    def __post_init__(self) -> None:
        positive = (
            "steps lr claim_idle_s ppo_epochs mini_batch_prompts micro_batch_rows prompts_per_step width "
            "branch segment_tokens max_depth inflight_batches checkpoint_every keep_checkpoints "
            "max_gen_batches lost_after_s redis_retry_s"
        )
        for name in positive.split():
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 (got {getattr(self, name)})")
        for name in (
            "torch_threads",
            "warmup_steps",
            "weight_decay",
            "grad_clip",
            "max_staleness",
            "push_every",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if not 0 <= self.epsilon_low < 1 or self.epsilon_high < 0:
            raise ValueError(
                f"need 0 <= epsilon_low < 1 and epsilon_high >= 0 (got {self.epsilon_low=}, "
                f"{self.epsilon_high=})"
            )
        if self.clip_ratio_c <= 1:
            raise ValueError(f"clip_ratio_c must be > 1 (got {self.clip_ratio_c})")
        self._check_choice("advantage", ("treepo", "grpo"))
        self._check_choice("old_logprobs", ("recompute", "sampler"))
        self._check_choice("weighting", ("average", "group_size"))
        self._check_choice("sampling_mode", ("tree", "sequential"))
        self._check_choice("loss_agg_mode", ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"))
        self._check_push_every()
        if self.mini_batch_prompts > self.prompts_per_step:
            raise ValueError(
                f"mini_batch_prompts ({self.mini_batch_prompts}) cannot exceed prompts_per_step "
                f"({self.prompts_per_step}); lower it or raise prompts_per_step"
            )

    def _check_push_every(self) -> None:
        """Between two pushes the trainer's policy version moves on while the service still samples the last
        pushed one: trees are up to push_every - 1 versions old when they arrive, so push_every must not
        exceed max_staleness + 1 (and 0, never pushing, makes every tree stale after max_staleness + 1
        steps)."""
        limit = self.max_staleness + 1
        if self.push_every == 0 and self.steps > limit:
            raise ValueError(
                f"push_every=0 never updates the service's weights, so after max_staleness + 1 = {limit} steps "
                f"every tree is too stale to train; use --push-every between 1 and {limit} or raise "
                "--max-staleness"
            )
        if self.push_every > limit:
            raise ValueError(
                f"push_every ({self.push_every}) > max_staleness + 1 ({limit}): trees sampled just after a push "
                f"are {self.push_every - 1} versions old by the next one and would be dropped as stale; use "
                f"--push-every <= {limit} or --max-staleness >= {self.push_every - 1}"
            )

    def _check_choice(self, name: str, allowed: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in allowed:
            raise ValueError(f"Unknown {name} {value!r}; expected one of {', '.join(allowed)}")

    @property
    def max_new_tokens(self) -> int:
        return self.segment_tokens * self.max_depth

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)
