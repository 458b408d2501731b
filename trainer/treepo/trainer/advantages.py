"""Advantage estimators: TreePO subtree baselines (TreePO Eq. 5/6/7), batch whitening and GRPO.

Pure functions over tensors, no trainer state. The normative definition is shared/TREEPO.md §2.2, i.e. what
the TreePO release (`compute_tree_reinforce_plus_plus_baseline_outcome_advantage`) computes; TV1 of §5
is a test vector.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Literal

import torch
from torch import Tensor

Weighting = Literal["average", "group_size"]
WEIGHTINGS: tuple[Weighting, ...] = ("average", "group_size")

# Public API


def tree_advantages(
    paths: Sequence[Sequence[str]],
    rewards: Sequence[float] | Tensor,
    *,
    weighting: Weighting = "average",
    reject_zero_std_subgroups: bool = False,
) -> Tensor:
    """Raw per-leaf TreePO advantages (before whitening), shape (N,).

    Args:
        paths: leaf i's node ids from the root, the first element naming the prompt (or tree), so the
            release uid "P#1-0#2-0" is ["P", "1-0", "2-0"]. Batches may mix prompts.
        rewards: leaf i's scalar outcome reward.
        weighting: "average" (release, Eq. 5) or "group_size" (Eq. 6).
        reject_zero_std_subgroups: skip subgroups whose rewards are all equal (Eq. 7); never the root.
    """
    reward_values = _check_tree_inputs(paths, rewards, weighting)
    out_dtype = (
        rewards.dtype if isinstance(rewards, Tensor) and rewards.is_floating_point() else torch.float32
    )
    num_levels = max(len(path) for path in paths) - 1  # D, batch-global (harmless, §2.2)
    numerator = torch.zeros_like(reward_values)
    denominator = torch.zeros_like(reward_values)
    group_ids = torch.zeros(len(paths), dtype=torch.long)
    for depth in range(num_levels):
        group_ids = _child_group_ids(paths, group_ids, depth)  # G_i(depth): same path[: depth + 1]
        mean, count, is_constant = _group_stats(reward_values, group_ids)
        # TreePO Eq. 5: A_ij = R_i - mean(R[G_j]); a singleton group's mean is 0 (release).
        term = reward_values - torch.where(count > 1, mean, torch.zeros_like(mean))
        included = count > 1
        if reject_zero_std_subgroups:  # TreePO Eq. 7: drop subgroups with std(R[G_j]) == 0
            included &= ~is_constant
        if depth == 0:
            included = torch.ones_like(included)  # the root group always counts
        # TreePO Eq. 6 weighs each term by |G_j|; Eq. 5 ("average") weighs all terms by 1.
        weight = count if weighting == "group_size" else torch.ones_like(count)
        weight = weight * included
        numerator += weight * term
        denominator += weight
    return (numerator / denominator).to(out_dtype)


def masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(v - mu) / sqrt(var + eps) with the token-weighted batch mean and unbiased variance (§2.2).

    Entries outside `mask` are transformed too; multiply by the mask to zero them.
    """
    if values.shape != mask.shape:
        raise ValueError(
            f"values and mask must have the same shape (got {tuple(values.shape)} and {tuple(mask.shape)})"
        )
    mask = mask.to(values.dtype)
    num_tokens = mask.sum()
    if num_tokens <= 1:
        raise ValueError(
            f"masked_whiten needs at least 2 valid tokens to estimate a variance "
            f"(got {num_tokens.item():g}); check the response mask"
        )
    mean = (values * mask).sum() / (num_tokens + 1e-8)
    variance = ((values - mean) ** 2 * mask).sum() / (num_tokens + 1e-8)
    variance = variance * num_tokens / (num_tokens - 1)  # Bessel's correction over valid tokens
    return (values - mean) * torch.rsqrt(variance + eps)


def tree_token_advantages(
    paths: Sequence[Sequence[str]],
    rewards: Sequence[float] | Tensor,
    response_mask: Tensor,
    *,
    weighting: Weighting = "average",
    reject_zero_std_subgroups: bool = False,
    whiten: bool = True,
) -> Tensor:
    """Per-token TreePO advantages, shape (N, T): the leaf's advantage on every valid response token,
    whitened over the whole batch (the REINFORCE++-style sigma of TreePO Eq. 5), zero on padding."""
    if response_mask.dim() != 2 or response_mask.shape[0] != len(paths):
        raise ValueError(
            f"response_mask must have shape (num_leaves={len(paths)}, T) (got {tuple(response_mask.shape)})"
        )
    raw = tree_advantages(
        paths, rewards, weighting=weighting, reject_zero_std_subgroups=reject_zero_std_subgroups
    )
    mask = response_mask.to(raw.dtype)
    per_token = raw[:, None] * mask  # (N, 1) * (N, T) -> (N, T)
    if whiten:
        per_token = masked_whiten(per_token, mask)
    return per_token * mask


def grpo_advantages(
    group_ids: Sequence[Hashable],
    rewards: Sequence[float] | Tensor,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> Tensor:
    """GRPO outcome advantages (R - mean_g) / (std_g + eps), for comparison runs.

    Like the release (verl), a singleton group has mean 0 and std 1; std is unbiased.
    """
    if len(group_ids) != len(rewards):
        raise ValueError(f"group_ids and rewards differ in length ({len(group_ids)} vs {len(rewards)})")
    if len(group_ids) == 0:
        raise ValueError("grpo_advantages needs at least one reward")
    reward_values = torch.as_tensor(rewards, dtype=torch.float64)
    out_dtype = (
        rewards.dtype if isinstance(rewards, Tensor) and rewards.is_floating_point() else torch.float32
    )
    ids = _group_ids(list(group_ids))
    mean, count, _ = _group_stats(reward_values, ids)
    is_group = count > 1
    centred = reward_values - torch.where(is_group, mean, torch.zeros_like(mean))
    if scale_by_std:
        std = _group_std(reward_values, ids, mean, count)
        centred = centred / (torch.where(is_group, std, torch.ones_like(std)) + eps)
    return centred.to(out_dtype)


# Internal helpers


def _check_tree_inputs(
    paths: Sequence[Sequence[str]], rewards: Sequence[float] | Tensor, weighting: str
) -> Tensor:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"Unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
    if len(paths) != len(rewards):
        raise ValueError(f"paths and rewards differ in length ({len(paths)} vs {len(rewards)})")
    if len(paths) == 0:
        raise ValueError("tree_advantages needs at least one leaf")
    if min(len(path) for path in paths) < 2:
        raise ValueError("each path needs the prompt id followed by at least one node id (e.g. ['P', '1-0'])")
    if len({tuple(path) for path in paths}) != len(paths):
        raise ValueError("leaf paths must be unique: two leaves with the same path are the same leaf")
    reward_values = torch.as_tensor(rewards, dtype=torch.float64).detach().cpu()
    if reward_values.dim() != 1:
        raise ValueError(f"rewards must be 1-D, one per leaf (got shape {tuple(reward_values.shape)})")
    if not torch.isfinite(reward_values).all():
        raise ValueError("rewards must be finite (found NaN or inf)")
    return reward_values


def _group_ids(keys: Sequence[Hashable]) -> Tensor:
    """Dense group index per element, in order of first appearance."""
    index: dict[Hashable, int] = {}
    return torch.tensor([index.setdefault(key, len(index)) for key in keys], dtype=torch.long)


def _child_group_ids(paths: Sequence[Sequence[str]], parent_ids: Tensor, depth: int) -> Tensor:
    """Group ids at `depth` from those at depth - 1: same parent group and same node at `depth`.

    A path shorter than depth + 1 stays its whole self, a group of its own (leaf paths are unique).
    """
    index: dict[tuple[int, str | None], int] = {}
    parents = parent_ids.tolist()
    return torch.tensor(
        [
            index.setdefault((parent, path[depth] if depth < len(path) else None), len(index))
            for parent, path in zip(parents, paths, strict=True)
        ],
        dtype=torch.long,
    )


def _group_stats(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per element: its group's mean, size, and whether all its group's values are equal."""
    num_groups = int(group_ids.max()) + 1
    count = torch.bincount(group_ids, minlength=num_groups).to(values.dtype)
    total = torch.zeros(num_groups, dtype=values.dtype).index_add_(0, group_ids, values)
    mean = (total / count)[group_ids]
    high = torch.full((num_groups,), -torch.inf, dtype=values.dtype).scatter_reduce(
        0, group_ids, values, "amax"
    )
    low = torch.full((num_groups,), torch.inf, dtype=values.dtype).scatter_reduce(
        0, group_ids, values, "amin"
    )
    is_constant = (high == low)[group_ids]  # exact: std == 0 iff every value is the same
    return mean, count[group_ids], is_constant


def _group_std(values: Tensor, group_ids: Tensor, mean: Tensor, count: Tensor) -> Tensor:
    """Per element: its group's unbiased std (0 for singletons)."""
    num_groups = int(group_ids.max()) + 1
    squares = torch.zeros(num_groups, dtype=values.dtype).index_add_(0, group_ids, (values - mean) ** 2)
    dof = (count - 1).clamp(min=1)
    return torch.sqrt(squares[group_ids] / dof)
