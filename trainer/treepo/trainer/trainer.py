"""One TreePO training step: scored trees -> rows (one per leaf) -> advantages -> DAPO update.

The update follows the release (TREEPO.md §2.3): old log-probs recomputed before the update (or taken
from the sampler), `ppo_epochs` passes over mini-batches of `mini_batch_prompts` prompts, each one AdamW
step accumulated over micro-batches of `micro_batch_rows` trajectories, with warm-up, weight decay and
gradient clipping. Shared prefixes are trained once per descendant leaf, as in the release.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from treepo.client.schema import Tree
from treepo.trainer.advantages import grpo_advantages, tree_token_advantages
from treepo.trainer.config import TrainConfig
from treepo.trainer.loss import dapo_policy_loss
from treepo.trainer.policy import Policy

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Row:
    """One trajectory (tree leaf) as the trainer sees it."""

    tree_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    path: list[str]  # [tree_id, node ids from the root's child down to the leaf]
    reward: float
    is_correct: bool
    sampler_logprobs: list[float] | None = None
    advantage: float = 0.0  # filled by compute_advantages (whitened for treepo)
    old_logprobs: Tensor | None = field(default=None, repr=False)  # (T,)


def rows_from_tree(tree: Tree, rewards: Sequence[float], correct: Sequence[bool] | None = None) -> list[Row]:
    """One row per leaf: response = the path's concatenated segment tokens."""
    if len(rewards) != len(tree.leaves):
        raise ValueError(f"tree {tree.tree_id} has {len(tree.leaves)} leaves but {len(rewards)} rewards")
    correct = correct if correct is not None else [r > 0 for r in rewards]
    rows = []
    for leaf, reward, ok in zip(tree.leaves, rewards, correct, strict=True):
        nodes = tree.path(leaf)
        response = [t for node in nodes for t in node.token_ids]
        has_logprobs = all(node.logprobs is not None for node in nodes)
        logprobs = [lp for node in nodes for lp in (node.logprobs or [])] if has_logprobs else None
        path = [tree.tree_id, *(node.id for node in nodes)]
        rows.append(
            Row(tree.tree_id, list(tree.prompt_token_ids), response, path, float(reward), ok, logprobs)
        )
    return rows


def response_mask_of(rows: Sequence[Row]) -> Tensor:
    """(N, T) ones over each row's response tokens."""
    mask = torch.zeros(len(rows), max(len(r.response_ids) for r in rows))
    for i, row in enumerate(rows):
        mask[i, : len(row.response_ids)] = 1.0
    return mask


def compute_advantages(rows: Sequence[Row], config: TrainConfig) -> None:
    """Per-trajectory advantage on every row: TreePO (subtree baselines + batch whitening) or GRPO."""
    rewards = torch.tensor([r.reward for r in rows], dtype=torch.float64)
    if config.advantage == "grpo":
        values = grpo_advantages([r.tree_id for r in rows], rewards)
    else:
        per_token = tree_token_advantages(
            [r.path for r in rows],
            rewards,
            response_mask_of(rows).to(torch.float64),
            weighting=config.weighting,
            reject_zero_std_subgroups=config.reject_zero_std_subgroups,
        )  # (N, T), constant along each row
        values = per_token[:, 0]
    for row, value in zip(rows, values.tolist(), strict=True):
        row.advantage = value


def batch_metrics(rows: Sequence[Row]) -> dict[str, float]:
    """Reward, accuracy, response length and advantage statistics of a batch of rows."""
    rewards = torch.tensor([r.reward for r in rows])
    lengths = torch.tensor([float(len(r.response_ids)) for r in rows])
    advantages = torch.tensor([r.advantage for r in rows])
    return {
        "reward_mean": rewards.mean().item(),
        "accuracy": sum(r.is_correct for r in rows) / len(rows),
        "response_length_mean": lengths.mean().item(),
        "response_length_max": lengths.max().item(),
        "advantage_mean": advantages.mean().item(),
        "advantage_std": advantages.std().item() if len(rows) > 1 else 0.0,
        "advantage_min": advantages.min().item(),
        "advantage_max": advantages.max().item(),
        "num_trajectories": float(len(rows)),
        "num_prompts": float(len({r.tree_id for r in rows})),
    }


def build_optimizer(
    model: torch.nn.Module, config: TrainConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on biases and norms) with linear warm-up then a constant rate (verl's default)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.dim() < 2 or "norm" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.adam_betas)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    return optimizer, scheduler


class Trainer:
    """Holds the policy and its optimizer; `step(rows)` runs one training step and returns its metrics."""

    def __init__(self, policy: Policy, config: TrainConfig) -> None:
        self.policy = policy
        self.config = config
        self.optimizer, self.scheduler = build_optimizer(policy.model, config)
        self._rng = random.Random(config.seed)

    def step(self, rows: list[Row]) -> dict[str, float]:
        """Advantages, old log-probs, then `ppo_epochs` passes of mini-batch updates."""
        if not rows:
            raise ValueError("a training step needs at least one trajectory")
        started = time.perf_counter()
        compute_advantages(rows, self.config)
        self._fill_old_logprobs(rows)
        self.policy.model.train()
        totals: dict[str, float] = defaultdict(float)
        for _ in range(self.config.ppo_epochs):
            for mini_batch in self._mini_batches(rows):
                for key, value in self._update(mini_batch).items():
                    totals[key] += value
        updates = totals.pop("updates")
        metrics = {key: value / updates for key, value in totals.items()}
        metrics["optimizer_steps"] = updates
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["update_s"] = time.perf_counter() - started
        return metrics

    # Internal helpers

    def _micro_batches(self, rows: Sequence[Row]) -> list[list[Row]]:
        """Similar lengths together, so right padding wastes little compute."""
        ordered = sorted(rows, key=lambda r: len(r.prompt_ids) + len(r.response_ids))
        size = self.config.micro_batch_rows
        return [ordered[i : i + size] for i in range(0, len(ordered), size)]

    def _mini_batches(self, rows: Sequence[Row]) -> list[list[Row]]:
        """Mini-batches of whole prompts (trees), in a seeded random order."""
        by_tree: dict[str, list[Row]] = defaultdict(list)
        for row in rows:
            by_tree[row.tree_id].append(row)
        tree_ids = list(by_tree)
        self._rng.shuffle(tree_ids)
        size = self.config.mini_batch_prompts
        chunks = [tree_ids[i : i + size] for i in range(0, len(tree_ids), size)]
        return [[row for tree_id in chunk for row in by_tree[tree_id]] for chunk in chunks]

    @torch.no_grad()
    def _fill_old_logprobs(self, rows: Sequence[Row]) -> None:
        """Release: recompute under the current weights; option: the sampler's own log-probs."""
        if self.config.old_logprobs == "sampler":
            for row in rows:
                if row.sampler_logprobs is None or len(row.sampler_logprobs) != len(row.response_ids):
                    raise ValueError(
                        f"tree {row.tree_id} has no per-token logprobs; request trees with "
                        "return_logprobs=true or train with old_logprobs=recompute"
                    )
                row.old_logprobs = torch.tensor(row.sampler_logprobs, dtype=torch.float32)
            return
        if self._is_single_update(rows):
            # One optimizer step over the whole batch: the "old" policy is exactly the one the update
            # starts from, so its log-probs come free from the update's own forward pass (detached).
            for row in rows:
                row.old_logprobs = None
            return
        self.policy.model.eval()
        for micro in self._micro_batches(rows):
            logprobs, _ = self.policy.per_token_logprobs(
                [r.prompt_ids for r in micro], [r.response_ids for r in micro]
            )
            for i, row in enumerate(micro):
                row.old_logprobs = logprobs[i, : len(row.response_ids)].cpu()

    def _is_single_update(self, rows: Sequence[Row]) -> bool:
        num_prompts = len({r.tree_id for r in rows})
        return self.config.ppo_epochs == 1 and num_prompts <= self.config.mini_batch_prompts

    def _update(self, rows: Sequence[Row]) -> dict[str, float]:
        """One optimizer step over a mini-batch, accumulated over micro-batches (exact token-mean)."""
        self.optimizer.zero_grad(set_to_none=True)
        total_tokens = sum(len(r.response_ids) for r in rows)
        totals: dict[str, float] = defaultdict(float)
        for micro in self._micro_batches(rows):
            # token-mean: the loss is already divided by the whole mini-batch's tokens (exact accumulation);
            # the seq-mean modes average per sequence, so each micro-batch weighs by its share of rows.
            loss, metrics, tokens = self._micro_loss(micro, total_tokens)
            is_token_mean = self.config.loss_agg_mode == "token-mean"
            (loss if is_token_mean else loss * len(micro) / len(rows)).backward()
            totals["loss"] += loss.item() if is_token_mean else loss.item() * len(micro) / len(rows)
            for key, value in metrics.items():
                if key != "pg_loss":  # per-token rates: weigh by this micro-batch's tokens
                    totals[key] += value * tokens / total_tokens
        params = [p for p in self.policy.model.parameters() if p.grad is not None]
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self.optimizer.step()
        self.scheduler.step()
        totals["updates"] = 1.0
        return totals

    def _micro_loss(self, micro: Sequence[Row], total_tokens: int) -> tuple[Tensor, dict[str, float], int]:
        logprobs, mask = self.policy.per_token_logprobs(
            [r.prompt_ids for r in micro], [r.response_ids for r in micro]
        )
        old = torch.zeros_like(logprobs)  # (B, T)
        for i, row in enumerate(micro):
            if row.old_logprobs is None:  # single update: old policy == current weights
                old[i] = logprobs[i].detach()
            else:
                old[i, : len(row.response_ids)] = row.old_logprobs.to(old.device)
        advantages = torch.tensor([r.advantage for r in micro], device=mask.device)[:, None] * mask  # (B, T)
        loss, metrics = dapo_policy_loss(
            logprobs,
            old,
            advantages,
            mask,
            epsilon_low=self.config.epsilon_low,
            epsilon_high=self.config.epsilon_high,
            clip_ratio_c=self.config.clip_ratio_c,
            loss_agg_mode=self.config.loss_agg_mode,
            num_tokens=float(total_tokens) if self.config.loss_agg_mode == "token-mean" else None,
        )
        return loss, {k: float(v) for k, v in metrics.items()}, int(mask.sum().item())
