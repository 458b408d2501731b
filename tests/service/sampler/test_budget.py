"""Budget transfer and split allocations (TREEPO.md §1.3 and the §5 tables)."""

from __future__ import annotations

import pytest

from treepo.service.sampler.budget import (
    PathScore,
    largest_remainder,
    split_budget,
    split_fixed_avg,
    split_weights,
    step_budget,
)

# last-segment mean logprobs of the §5 vector
SCORES = [PathScore(m, m * 4, 4) for m in (-0.5, -1.0, -2.0)]


@pytest.mark.parametrize(
    ("total", "paths", "expected"),
    [(5, 3, [1, 1, 3]), (8, 3, [2, 2, 4]), (3, 3, [1, 1, 1]), (16, 8, [2] * 8), (15, 8, [1] * 7 + [8])],
)
def test_fixed_avg(total: int, paths: int, expected: list[int]) -> None:
    assert split_fixed_avg(total, paths) == expected


@pytest.mark.parametrize(
    ("policy", "weights", "alloc8", "alloc16"),
    [
        ("low_prob", [0.2272, 0.2918, 0.4810], [2, 3, 3], [4, 5, 7]),
        ("high_prob", [0.4442, 0.3460, 0.2098], [3, 3, 2], [7, 5, 4]),
    ],
)
def test_probability_splits_match_vector(
    policy: str, weights: list[float], alloc8: list[int], alloc16: list[int]
) -> None:
    assert split_weights(policy, SCORES, temperature=2.0) == pytest.approx(weights, abs=1e-4)
    assert split_budget(policy, SCORES, 8, 2.0) == alloc8
    assert split_budget(policy, SCORES, 16, 2.0) == alloc16


def test_whole_path_variants_use_path_logprobs() -> None:
    # last segments say path 0 is likeliest; whole paths say path 2 is
    scores = [PathScore(-0.1, -9.0, 10), PathScore(-0.5, -5.0, 10), PathScore(-1.0, -1.0, 10)]
    low_last = split_weights("low_prob", scores, 1.0)
    assert low_last[2] > low_last[1] > low_last[0]
    low_path = split_weights("low_path_prob", scores, 1.0)
    assert low_path[0] > low_path[1] > low_path[2]
    high_mean = split_weights("high_path_mean_prob", scores, 1.0)
    assert high_mean[2] > high_mean[1] > high_mean[0]
    assert split_weights("low_path_mean_prob", scores, 1.0) == pytest.approx(
        split_weights("low_path_prob", [PathScore(0, s.path_logprob / 10, 1) for s in scores], 1.0)
    )


def test_temperature_flattens_weights() -> None:
    sharp = split_weights("high_prob", SCORES, 0.1)
    flat = split_weights("high_prob", SCORES, 100.0)
    assert sharp[0] > 0.99
    assert max(flat) - min(flat) < 0.02


@pytest.mark.parametrize("total", [3, 4, 7, 20])
def test_largest_remainder_sums_and_gives_one_each(total: int) -> None:
    counts = largest_remainder([0.98, 0.01, 0.01], total)
    assert sum(counts) == total and min(counts) >= 1


@pytest.mark.parametrize(
    ("finished", "group_finished", "alive", "expected"),
    [
        (0, 0, 2, 4),  # no stops: binary branching
        (1, 1, 1, 4),  # worked example: survivor gets min(15, 2 + 2) = 4
        (0, 0, 8, 16),
        (0, 0, 16, 16),  # in-flight + finished = w: no branching
        (14, 0, 2, 2),
        (15, 0, 3, 3),  # >= 1 child each even past w (cannot happen in a run, kept by the formula)
    ],
)
def test_step_budget_release_formula(finished: int, group_finished: int, alive: int, expected: int) -> None:
    total = step_budget(
        width=16,
        num_finished=finished,
        group_finished=group_finished,
        group_alive=alive,
        branch=2,
    )
    assert total == expected


def test_unknown_policy_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="Unknown probability split"):
        split_weights("fixed_avg", SCORES, 1.0)
