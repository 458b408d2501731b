"""TreePO advantages against the public test vector TV1 (TREEPO.md §5) and hand-worked trees."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from treepo.trainer.advantages import (
    grpo_advantages,
    masked_whiten,
    tree_advantages,
    tree_token_advantages,
)

TV1_UIDS = [
    "P#1-0#2-0#3-0#4-0",
    "P#1-0#2-0#3-1#4-1",
    "P#1-0#2-1#3-2#4-2",
    "P#1-0#2-1#3-3#4-3",
    "P#1-1#2-2#3-4#4-4",
    "P#1-1#2-2#3-5#4-5",
    "P#1-1#2-3#3-6#4-6",
    "P#1-1#2-3#3-7#4-7",
]
TV1_PATHS = [uid.split("#") for uid in TV1_UIDS]
TV1_REWARDS = [1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0]
TV1_ROWS = [
    # (weighting, reject, raw, whitened)
    (
        "average",
        False,
        [0.916667, -1.083333, 0.583333, 0.583333, -0.25, -0.25, -0.25, -0.25],
        [1.5051, -1.7787, 0.9578, 0.9578, -0.4105, -0.4105, -0.4105, -0.4105],
    ),
    (
        "group_size",
        False,
        [1.0, -1.0, 0.857143, 0.857143, -0.428571, -0.428571, -0.428571, -0.428571],
        [1.3741, -1.3741, 1.1778, 1.1778, -0.5889, -0.5889, -0.5889, -0.5889],
    ),
    (
        "average",
        True,
        [0.916667, -1.083333, 0.875, 0.875, -0.75, -0.75, -0.75, -0.75],
        [1.3087, -1.0843, 1.2588, 1.2588, -0.6855, -0.6855, -0.6855, -0.6855],
    ),
]


TV1_EXACT_RAW = [
    [11 / 12, -13 / 12, 7 / 12, 7 / 12, -1 / 4, -1 / 4, -1 / 4, -1 / 4],
    [1.0, -1.0, 6 / 7, 6 / 7, -3 / 7, -3 / 7, -3 / 7, -3 / 7],
    [11 / 12, -13 / 12, 7 / 8, 7 / 8, -3 / 4, -3 / 4, -3 / 4, -3 / 4],
]


def _whiten_equal_lengths(raw: list[float], length: int) -> list[float]:
    """§2.2 whitening by hand for rows of equal length: N tokens, unbiased variance, eps 1e-8."""
    num_tokens = len(raw) * length
    mean = sum(raw) * length / num_tokens
    variance = sum((a - mean) ** 2 for a in raw) * length / (num_tokens - 1)
    return [(a - mean) / (variance + 1e-8) ** 0.5 for a in raw]


def _advantages(paths, rewards, **kwargs) -> list[float]:
    return tree_advantages(paths, torch.tensor(rewards, dtype=torch.float64), **kwargs).tolist()


class TestTV1:
    @pytest.mark.parametrize(("weighting", "reject", "raw", "white"), TV1_ROWS)
    def test_raw(self, weighting, reject, raw, white):
        got = _advantages(TV1_PATHS, TV1_REWARDS, weighting=weighting, reject_zero_std_subgroups=reject)
        assert got == pytest.approx(raw, abs=1e-5)

    @pytest.mark.parametrize(("weighting", "reject", "raw", "white"), TV1_ROWS)
    def test_whitened(self, weighting, reject, raw, white):
        mask = torch.ones(8, 16, dtype=torch.float64)
        tokens = tree_token_advantages(
            TV1_PATHS,
            torch.tensor(TV1_REWARDS, dtype=torch.float64),
            mask,
            weighting=weighting,
            reject_zero_std_subgroups=reject,
        )
        assert tokens.shape == (8, 16)
        # The table gives 4 decimals; every token of a leaf carries the same value.
        assert tokens[:, 0].tolist() == pytest.approx(white, abs=1e-4)
        assert torch.equal(tokens, tokens[:, :1].expand(8, 16))

    @pytest.mark.parametrize(("row", "exact_raw"), enumerate(TV1_EXACT_RAW))
    def test_exact_to_1e5(self, row, exact_raw):
        """The table rounds to 4-6 decimals; against exact fractions both columns hold to 1e-5."""
        weighting, reject, _, _ = TV1_ROWS[row]
        got = _advantages(TV1_PATHS, TV1_REWARDS, weighting=weighting, reject_zero_std_subgroups=reject)
        assert got == pytest.approx(exact_raw, abs=1e-5)
        tokens = tree_token_advantages(
            TV1_PATHS, TV1_REWARDS, torch.ones(8, 16), weighting=weighting, reject_zero_std_subgroups=reject
        )
        assert tokens[:, 0].tolist() == pytest.approx(_whiten_equal_lengths(exact_raw, 16), abs=1e-5)

    def test_float32_close_to_float64(self):
        got = tree_advantages(TV1_PATHS, torch.tensor(TV1_REWARDS, dtype=torch.float32))
        assert got.dtype == torch.float32
        assert got.tolist() == pytest.approx(TV1_ROWS[0][2], abs=1e-5)


class TestTreeRules:
    def test_worked_example_leaf0(self):
        # root 1-(-0.25)=1.25; 1-0 group 1-0.5=0.5; 2-0 group 1-0=1; average 0.91667 (TREEPO.md §5).
        assert _advantages(TV1_PATHS, TV1_REWARDS)[0] == pytest.approx((1.25 + 0.5 + 1.0) / 3)

    def test_early_stop_leaves_of_different_depths(self):
        # Leaf a stopped at depth 1; b, c share node 1-1; d is deeper under 1-1/2-1 alone with c.
        paths = [["P", "1-0"], ["P", "1-1", "2-0"], ["P", "1-1", "2-1", "3-0"], ["P", "1-1", "2-1", "3-1"]]
        rewards = [1.0, -1.0, 1.0, -1.0]
        got = _advantages(paths, rewards)
        # a: root only (its depth-1 group {a} is a singleton, skipped)
        assert got[0] == pytest.approx(1.0)
        # b: root (-1 - 0) and 1-1 group {b,c,d} mean -1/3 -> -2/3; its own node is a singleton
        assert got[1] == pytest.approx((-1.0 + (-1 + 1 / 3)) / 2)
        # c: root 1, 1-1 group 1 + 1/3, 2-1 group {c,d} mean 0 -> 1
        assert got[2] == pytest.approx((1.0 + 4 / 3 + 1.0) / 3)
        assert got[3] == pytest.approx((-1.0 - 2 / 3 - 1.0) / 3)

    def test_single_child_level_is_counted_twice(self):
        # Node 1-0 has one child 2-0, which branches: the groups at d=1 and d=2 are the same set.
        paths = [["P", "1-0", "2-0", "3-0"], ["P", "1-0", "2-0", "3-1"], ["P", "1-1"], ["P", "1-2"]]
        rewards = [1.0, -1.0, -1.0, -1.0]
        got = _advantages(paths, rewards)
        root_mean = -0.5
        # leaf 0: root 1.5, then the {0,1} group (mean 0) twice -> (1.5 + 1 + 1) / 3
        assert got[0] == pytest.approx((1 - root_mean + 1 + 1) / 3)
        sized = _advantages(paths, rewards, weighting="group_size")
        assert sized[0] == pytest.approx((4 * 1.5 + 2 * 1 + 2 * 1) / (4 + 2 + 2))

    def test_two_prompts_in_one_batch_are_independent(self):
        other = [["Q", "1-0", "2-0"], ["Q", "1-0", "2-1"], ["Q", "1-1", "2-2"]]
        other_rewards = [1.0, 1.0, -1.0]
        mixed = _advantages(TV1_PATHS + other, TV1_REWARDS + other_rewards)
        assert mixed[:8] == pytest.approx(_advantages(TV1_PATHS, TV1_REWARDS))
        assert mixed[8:] == pytest.approx(_advantages(other, other_rewards))
        # Q leaf 0: root 1 - 1/3, group 1-0 {1, 1} mean 1 -> 0
        assert mixed[8] == pytest.approx((2 / 3 + 0.0) / 2)

    def test_same_node_ids_under_different_prompts_do_not_mix(self):
        paths = [["P", "1-0"], ["P", "1-1"], ["Q", "1-0"], ["Q", "1-1"]]
        got = _advantages(paths, [1.0, -1.0, 1.0, 1.0])
        assert got == pytest.approx([1.0, -1.0, 0.0, 0.0])

    @pytest.mark.parametrize(
        ("reject", "expected_leaf0"),
        [(False, (2 / 3 + 0.0) / 2), (True, 2 / 3)],
    )
    def test_zero_std_subgroup_rejection(self, reject, expected_leaf0):
        paths = [["P", "1-0", "2-0"], ["P", "1-0", "2-1"], ["P", "1-1", "2-2"]]
        got = _advantages(paths, [1.0, 1.0, -1.0], reject_zero_std_subgroups=reject)
        assert got[0] == pytest.approx(expected_leaf0)

    def test_rejection_never_drops_the_root_group(self):
        paths = [["P", "1-0", "2-0"], ["P", "1-0", "2-1"], ["P", "1-1", "2-2"], ["P", "1-1", "2-3"]]
        got = _advantages(paths, [1.0] * 4, reject_zero_std_subgroups=True)
        assert got == [0.0, 0.0, 0.0, 0.0]

    def test_singleton_root_group_has_zero_baseline(self):
        # One leaf for a prompt: the root group is a singleton, counted with mean 0 (release).
        got = _advantages([["P", "1-0"], ["Q", "1-0"], ["Q", "1-1"]], [1.0, 1.0, -1.0])
        assert got == pytest.approx([1.0, 1.0, -1.0])
        assert _advantages([["P", "1-0", "2-0"]], [-1.0], weighting="group_size") == [-1.0]

    @pytest.mark.parametrize(
        ("paths", "rewards", "message"),
        [
            ([], [], "at least one leaf"),
            ([["P", "1-0"]], [1.0, 2.0], "differ in length"),
            ([["P"]], [1.0], "prompt id followed by"),
            ([["P", "1-0"], ["P", "1-0"]], [1.0, 0.0], "unique"),
            ([["P", "1-0"]], [float("nan")], "finite"),
        ],
    )
    def test_bad_input_is_a_clear_error(self, paths, rewards, message):
        with pytest.raises(ValueError, match=message):
            tree_advantages(paths, rewards)

    def test_unknown_weighting_lists_options(self):
        with pytest.raises(ValueError, match="average, group_size"):
            tree_advantages(TV1_PATHS, TV1_REWARDS, weighting="mean")  # type: ignore[arg-type]


@st.composite
def _random_trees(draw):
    """A random forest of leaf paths (unique, prefix-free) with +-1 or real rewards."""
    num_prompts = draw(st.integers(1, 3))
    paths: list[list[str]] = []
    for prompt in range(num_prompts):
        frontier = [[f"p{prompt}"]]
        counter = 0
        while frontier:
            node = frontier.pop()
            is_leaf = len(node) > 1 and (len(node) > 4 or draw(st.booleans()))
            if is_leaf:
                paths.append(node)
                continue
            for _ in range(draw(st.integers(1, 3))):
                counter += 1
                frontier.append([*node, f"{len(node)}-{counter}"])
    rewards = draw(st.lists(st.sampled_from([-1.0, 1.0, 0.5]), min_size=len(paths), max_size=len(paths)))
    return paths, rewards


class TestProperties:
    @settings(max_examples=60, deadline=None)
    @given(_random_trees(), st.randoms(use_true_random=False), st.sampled_from(["average", "group_size"]))
    def test_permutation_equivariant(self, tree, rng, weighting):
        paths, rewards = tree
        order = list(range(len(paths)))
        rng.shuffle(order)
        base = _advantages(paths, rewards, weighting=weighting)
        shuffled = _advantages([paths[i] for i in order], [rewards[i] for i in order], weighting=weighting)
        assert shuffled == pytest.approx([base[i] for i in order], abs=1e-12)

    @settings(max_examples=40, deadline=None)
    @given(_random_trees(), st.sampled_from([-1.0, 1.0]), st.booleans())
    def test_equal_rewards_in_multi_leaf_prompts_give_zero(self, tree, value, reject):
        paths, _ = tree
        roots = [path[0] for path in paths]
        paths = [path for path in paths if roots.count(path[0]) > 1]
        if not paths:
            return
        got = _advantages(paths, [value] * len(paths), reject_zero_std_subgroups=reject)
        assert got == pytest.approx([0.0] * len(paths), abs=1e-12)

    @settings(max_examples=40, deadline=None)
    @given(_random_trees())
    def test_sign_follows_reward_for_two_valued_rewards(self, tree):
        """With rewards in {-1, +1}, every baseline lies in [-1, 1]: a correct leaf never gets A < 0."""
        paths, rewards = tree
        rewards = [1.0 if r > 0.7 else -1.0 for r in rewards]
        for advantage, reward in zip(_advantages(paths, rewards), rewards, strict=True):
            assert advantage * reward >= -1e-12


class TestMaskedWhiten:
    def test_token_weighted_mean_and_unbiased_variance(self):
        values = torch.tensor([[1.0, 1.0, 0.0], [3.0, 0.0, 0.0]], dtype=torch.float64)
        mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
        out = masked_whiten(values, mask)
        # valid values 1, 1, 3: mean 5/3, unbiased var = (4/9+4/9+16/9)/2 = 4/3
        expected = (torch.tensor([1.0, 1.0, 3.0], dtype=torch.float64) - 5 / 3) / (4 / 3 + 1e-8) ** 0.5
        assert out[mask.bool()].tolist() == pytest.approx(expected.tolist(), abs=1e-7)

    def test_longer_sequences_weigh_more(self):
        values = torch.tensor([[1.0] * 6, [-1.0, 0, 0, 0, 0, 0]])
        mask = torch.tensor([[1] * 6, [1, 0, 0, 0, 0, 0]])
        assert masked_whiten(values, mask)[0, 0] < 1.0  # mean pulled towards the long row

    def test_constant_values_whiten_to_zero(self):
        out = masked_whiten(torch.full((2, 3), 0.5), torch.ones(2, 3))
        assert torch.allclose(out, torch.zeros(2, 3))

    @pytest.mark.parametrize("num_valid", [0, 1])
    def test_too_few_tokens_is_an_error(self, num_valid):
        mask = torch.zeros(2, 3)
        mask[0, :num_valid] = 1
        with pytest.raises(ValueError, match="at least 2 valid tokens"):
            masked_whiten(torch.ones(2, 3), mask)

    def test_shape_mismatch_is_an_error(self):
        with pytest.raises(ValueError, match="same shape"):
            masked_whiten(torch.ones(2, 3), torch.ones(2, 4))

    def test_token_advantages_zero_on_padding(self):
        mask = torch.tensor([[1, 1, 0, 0]] * 4 + [[1, 1, 1, 1]] * 4)
        out = tree_token_advantages(TV1_PATHS, TV1_REWARDS, mask)
        assert torch.all(out[mask == 0] == 0)
        assert out[mask.bool()].mean().abs() < 1e-6


class TestGRPO:
    def test_group_mean_and_std(self):
        got = grpo_advantages(["a"] * 4 + ["b"] * 2, [1.0, -1.0, -1.0, -1.0, 1.0, 1.0])
        std_a = torch.tensor([1.0, -1.0, -1.0, -1.0]).std().item()
        assert got[:4].tolist() == pytest.approx(
            [1.5 / std_a, -0.5 / std_a, -0.5 / std_a, -0.5 / std_a], abs=1e-5
        )
        assert got[4:].tolist() == [0.0, 0.0]  # zero std: 0 / (0 + eps)

    def test_no_std_scaling_and_singletons(self):
        got = grpo_advantages([0, 0, 1], [1.0, 0.0, 2.0], scale_by_std=False)
        assert got.tolist() == pytest.approx([0.5, -0.5, 2.0])

    def test_length_mismatch(self):
        with pytest.raises(ValueError, match="differ in length"):
            grpo_advantages([0], [1.0, 2.0])
