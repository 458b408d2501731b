"""Reward plugins, the overlong penalty, dynamic filtering and tree scoring."""

from __future__ import annotations

import threading
import time

import pytest

from treepo.client.schema import Node, Tree
from treepo.trainer.rewards import (
    BUILTIN_REWARDS,
    MathVerifyReward,
    OverlongPenalty,
    dynamic_filter,
    load_reward,
    math_verify_reward,
    overlong_penalty,
    score_tree,
    toy_reward,
)


class TestToyReward:
    @pytest.mark.parametrize(
        ("response", "answer", "expected"),
        [
            ("47 + 23 = 70\nThe answer is \\boxed{70}", "70", 1.0),
            ("The answer is \\boxed{71}", "70", -1.0),
            ("The answer is 70", "70", -1.0),  # no box
            ("\\boxed{70} then \\boxed{12}", "70", -1.0),  # the last box counts
            ("The answer is \\boxed{70", "70", -1.0),  # unclosed
            ("\\boxed{seventy}", "70", -1.0),
        ],
    )
    def test_scores(self, response, answer, expected):
        assert toy_reward(response, {"answer": answer}) == expected

    def test_integer_answer_in_metadata(self):
        assert toy_reward("\\boxed{5}", {"answer": 5}) == 1.0

    def test_missing_reference_is_a_clear_error(self):
        with pytest.raises(ValueError, match="metadata=\\{'answer'"):
            toy_reward("\\boxed{5}", {"question": "x"})


class TestMathVerifyReward:
    @pytest.mark.parametrize(
        ("response", "answer", "expected"),
        [
            ("so \\boxed{\\frac{1}{2}}", "0.5", 1.0),
            ("so \\boxed{x^2+1}", "1+x^2", 1.0),
            ("so \\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", 1.0),
            ("\\boxed{3} and finally \\boxed{4}", "\\boxed{4}", 1.0),  # reference may be boxed too
            ("so \\boxed{2}", "3", -1.0),
            ("no boxed answer: 3", "3", -1.0),
            ("so \\boxed{}", "3", -1.0),
            ("so \\boxed{\\frac{1}{", "3", -1.0),  # malformed
            ("so \\boxed{\\\\\\}}}", "3", -1.0),  # garbage LaTeX
        ],
    )
    def test_scores(self, response, answer, expected):
        assert math_verify_reward(response, {"answer": answer}) == expected

    def test_works_outside_the_main_thread(self):
        results: list[float] = []
        worker = threading.Thread(
            target=lambda: results.extend(
                [math_verify_reward("\\boxed{0.25}", {"answer": "\\frac14"}), toy_reward("x", {"answer": 1})]
            )
        )
        worker.start()
        worker.join(30)
        assert results == [1.0, -1.0]

    def test_deadline_outside_the_main_thread(self):
        from treepo.trainer.rewards import _in_daemon_thread

        assert _in_daemon_thread(lambda: True, 1.0) is True
        with pytest.raises(TimeoutError, match=r"longer than 0\.2 s"):
            _in_daemon_thread(lambda: time.sleep(1.0) or True, 0.2)
        with pytest.raises(ZeroDivisionError):
            _in_daemon_thread(lambda: bool(1 / 0), 1.0)

    def test_bad_timeout(self):
        with pytest.raises(ValueError, match="timeout_s"):
            MathVerifyReward(timeout_s=0)


class TestLoadReward:
    @pytest.mark.parametrize("name", ["toy", "math_verify", "math-verify", " toy "])
    def test_builtins(self, name):
        assert load_reward(name) is BUILTIN_REWARDS[name.strip().replace("-", "_")]

    def test_module_function(self):
        assert load_reward("treepo.trainer.rewards:toy_reward") is toy_reward
        assert load_reward("treepo.trainer.rewards:MathVerifyReward.__call__") is MathVerifyReward.__call__

    def test_entry_point(self, tmp_path, monkeypatch):
        """A real installed-distribution entry point, found through a dist-info folder on sys.path."""
        (tmp_path / "my_rewards.py").write_text("def length(text, metadata):\n    return float(len(text))\n")
        dist = tmp_path / "my_rewards-0.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-rewards\nVersion: 0.1\n")
        (dist / "entry_points.txt").write_text("[treepo.rewards]\nby_length = my_rewards:length\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        reward = load_reward("by_length")
        assert reward("abc", {}) == 3.0

    @pytest.mark.parametrize(
        ("spec", "message"),
        [
            ("nope", "expected one of .*math_verify.*toy.*module:function"),
            ("no_such_module_xyz:f", "cannot import reward module"),
            ("treepo.trainer.rewards:missing", "has no attribute"),
            ("treepo.trainer.rewards:ANSWER_KEY", "not callable"),
        ],
    )
    def test_bad_spec_is_a_clear_error(self, spec, message):
        with pytest.raises(ValueError, match=message):
            load_reward(spec)


class TestOverlongPenalty:
    @pytest.mark.parametrize(
        ("length", "expected"),
        [(100, 0.0), (6656, 0.0), (6912, -0.5), (7168, -1.0)],  # release: max 7168, buffer 512
    )
    def test_release_values(self, length, expected):
        assert overlong_penalty(length, 7168, 512) == pytest.approx(expected)
        assert OverlongPenalty(7168, 512, factor=0.5)(length) == pytest.approx(expected * 0.5)

    @pytest.mark.parametrize(("buffer", "factor"), [(0, 1.0), (9000, 1.0), (512, -1.0)])
    def test_bad_settings(self, buffer, factor):
        with pytest.raises(ValueError, match=r"buffer|factor"):
            OverlongPenalty(7168, buffer, factor)


class TestDynamicFilter:
    def test_counts(self):
        result = dynamic_filter([[1, -1, 1], [1, 1], [-1, -1, -1], [-1], [0.5, 0.5], [-1, -1, 1]])
        assert result.kept == [0, 3, 5]
        assert (result.num_all_correct, result.num_all_wrong, result.num_filtered) == (2, 1, 3)

    def test_empty_prompt_is_an_error(self):
        with pytest.raises(ValueError, match="prompt 1 has no scored leaves"):
            dynamic_filter([[1, -1], []])


def _tree() -> Tree:
    nodes = [
        Node(id="1-0", parent=None, depth=1, token_ids=[1, 2], text="2 + 3 = 5\n"),
        Node(id="2-0", parent="1-0", depth=2, token_ids=[3, 4, 5], text="\\boxed{5}", finish_reason="eos"),
        Node(id="2-1", parent="1-0", depth=2, token_ids=[6], text="\\boxed{6}", finish_reason="eos"),
    ]
    return Tree(
        tree_id="t",
        prompt_id="p",
        policy_version=0,
        metadata={"answer": "5"},
        nodes=nodes,
        leaves=["2-0", "2-1"],
    )


class TestScoreTree:
    def test_scores_whole_path_text(self):
        scores = score_tree(_tree(), toy_reward)
        assert scores.leaf_ids == ["2-0", "2-1"]
        assert scores.scores == [1.0, -1.0]
        assert scores.rewards == [1.0, -1.0]
        assert scores.lengths == [5, 3]

    def test_overlong_penalty_applies_to_rewards_only(self):
        scores = score_tree(_tree(), toy_reward, OverlongPenalty(max_length=5, buffer=4))
        assert scores.scores == [1.0, -1.0]
        assert scores.rewards == pytest.approx([1.0 - 1.0, -1.0 - 0.5])  # lengths 5, 3 past 5 - 4

    def test_non_finite_reward_is_an_error(self):
        with pytest.raises(ValueError, match="returned nan"):
            score_tree(_tree(), lambda text, metadata: float("nan"))
