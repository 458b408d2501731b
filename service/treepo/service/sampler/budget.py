"""Branching budget ("budget transfer", TREEPO.md §1.3) and how a step's budget is split among live paths."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from treepo.client.schema import SplitPolicy


@dataclass(slots=True, frozen=True)
class PathScore:
    """The logprob summaries a probability-based split needs from one live path."""

    last_mean_logprob: float  # mean logprob of the path's last segment
    path_logprob: float  # summed logprob of the whole path
    path_tokens: int

    @property
    def path_mean_logprob(self) -> float:
        return self.path_logprob / self.path_tokens if self.path_tokens else 0.0


def step_budget(*, width: int, num_finished: int, group_finished: int, group_alive: int, branch: int) -> int:
    """Children for the live paths of one complete level (`by_fixed_div`): `max(min(w - F, b*f_t + b*A), A)`.

    F = leaves so far, f_t = paths of this level that finished, A = paths of this level still alive.
    """
    remaining = max(width - num_finished, 0)
    return max(min(remaining, branch * (group_finished + group_alive)), group_alive)


def split_fixed_avg(total: int, num_paths: int) -> list[int]:
    """`total // A` each, the remainder to the LAST path, at least 1 each (release `fixed_avg`)."""
    assert num_paths >= 1 and total >= num_paths, f"{total=} {num_paths=}"
    counts = [max(total // num_paths, 1)] * num_paths
    counts[-1] += total - sum(counts)
    return counts


def largest_remainder(weights: Sequence[float], total: int) -> list[int]:
    """1 per path, the rest by the largest-remainder method (ties go to the lower index)."""
    assert len(weights) >= 1 and total >= len(weights), f"{total=} {len(weights)=}"
    rest = total - len(weights)
    quotas = [w * rest for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_fraction = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_fraction[: rest - sum(counts)]:
        counts[i] += 1
    return [c + 1 for c in counts]


def softmax(values: Sequence[float], temperature: float) -> list[float]:
    top = max(values)
    exps = [math.exp((v - top) / temperature) for v in values]
    norm = sum(exps)
    return [e / norm for e in exps]


def split_weights(policy: SplitPolicy, scores: Sequence[PathScore], temperature: float) -> list[float]:
    """softmax(shifted / T): `low_*` favours the least likely paths, `high_*` the most likely."""
    if policy in ("low_prob", "high_prob"):
        values = [s.last_mean_logprob for s in scores]
    elif policy in ("low_path_prob", "high_path_prob"):
        values = [s.path_logprob for s in scores]
    elif policy in ("low_path_mean_prob", "high_path_mean_prob"):
        values = [s.path_mean_logprob for s in scores]
    else:
        raise ValueError(
            f"Unknown probability split {policy!r}; expected low_/high_ prob, path_prob or path_mean_prob"
        )
    lowest = min(values)
    sign = -1.0 if policy.startswith("low_") else 1.0
    return softmax([sign * (v - lowest) for v in values], temperature)


def split_budget(
    policy: SplitPolicy, scores: Sequence[PathScore], total: int, temperature: float
) -> list[int]:
    """Children per live path, in path order; sums to `total`, at least 1 each."""
    if policy == "fixed_avg":
        return split_fixed_avg(total, len(scores))
    return largest_remainder(split_weights(policy, scores, temperature), total)
