"""The arithmetic task: exact checker, generators, splits, difficulty knob."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treepo.service.task import (
    SPLITS,
    TaskConfig,
    check,
    extract_boxed,
    generate_problems,
    make_problem,
    score,
    split_of,
)


class TestCheck:
    @pytest.mark.parametrize(
        ("response", "reference", "expected"),
        [
            ("47+23=70\n\\boxed{70}", "70", True),
            ("\\boxed{ 70 }", "70", True),
            ("\\boxed{070}", "70", True),
            ("\\boxed{71}", "70", False),
            ("\\boxed{-5}", "-5", True),
            ("the answer is 70", "70", False),  # no box
            ("", "70", False),
            ("\\boxed{70", "70", False),  # unbalanced braces
            ("\\boxed{70}}", "70", True),  # trailing brace after a closed box is ignored
            ("\\boxed{{70}", "70", False),
            ("\\boxed{12}\n\\boxed{70}", "70", True),  # several boxes: the last counts
            ("\\boxed{70}\n\\boxed{12}", "70", False),
            ("\\boxed{70}\n\\boxed{12", "70", False),  # the last box is malformed: no fallback
            ("\\boxed{seventy}", "70", False),  # non-numeric
            ("\\boxed{70.0}", "70", False),
            ("\\boxed{}", "70", False),
            ("\\boxed{7 0}", "70", False),
            ("\\boxed{{70}}", "70", False),
            ("\\boxed{70}", "seventy", False),
        ],
    )
    def test_cases(self, response: str, reference: str, expected: bool) -> None:
        assert check(response, reference) is expected

    def test_score_is_plus_minus_one(self) -> None:
        assert score("\\boxed{3}", "3") == 1.0
        assert score("\\boxed{4}", "3") == -1.0
        assert score("no box", "3") == -1.0

    def test_extract_boxed_nested(self) -> None:
        assert extract_boxed("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
        assert extract_boxed("nothing here") is None


class TestProblems:
    def test_gold_solution_passes_and_is_step_by_step(self) -> None:
        for problem in generate_problems("train", 200, seed=3):
            assert check(problem.solution, problem.answer)
            lines = problem.solution.split("\n")
            assert lines[-1] == f"\\boxed{{{problem.answer}}}"
            num_ops = problem.prompt.count("+") + problem.prompt.count("-")
            assert len(lines) == num_ops + 1
            for line in lines[:-1]:
                left, op, right, result = re.fullmatch(r"(\d+)([+-])(\d+)=(\d+)", line).groups()
                assert int(result) == (int(left) + int(right) if op == "+" else int(left) - int(right))

    def test_lengths_matter_for_segments(self) -> None:
        lengths = [len(p.solution) for p in generate_problems("train", 500, seed=0)]
        assert min(lengths) >= 25  # several 8-token segments per response
        assert max(lengths) <= 150

    def test_deterministic_for_a_seed(self) -> None:
        assert generate_problems("validation", 20, seed=7) == generate_problems("validation", 20, seed=7)
        assert generate_problems("validation", 20, seed=7) != generate_problems("validation", 20, seed=8)

    @pytest.mark.parametrize("seed", [0, 1])
    def test_splits_are_disjoint(self, seed: int) -> None:
        prompts = {split: {p.prompt for p in generate_problems(split, 300, seed=seed)} for split in SPLITS}
        assert not prompts["train"] & prompts["validation"]
        assert not prompts["train"] & prompts["test"]
        assert not prompts["validation"] & prompts["test"]
        for split in SPLITS:
            assert all(split_of(p) == split for p in generate_problems(split, 50, seed=seed))
            assert len(prompts[split]) > 250  # few duplicates inside a split

    def test_split_disjoint_across_seeds(self) -> None:
        train = {p.prompt for p in generate_problems("train", 500, seed=1)}
        test = {p.prompt for p in generate_problems("test", 500, seed=2)}
        assert not train & test

    def test_difficulty_knob(self) -> None:
        config = TaskConfig(
            min_ops=2, max_ops=2, min_start=100, max_start=200, min_operand=10, max_operand=99
        )
        for problem in generate_problems("test", 50, seed=0, config=config):
            assert len(problem.solution.split("\n")) == 3
            start, *operands = [int(x) for x in re.findall(r"\d+", problem.prompt)]
            assert 100 <= start <= 200
            assert len(operands) == 2 and all(10 <= x <= 99 for x in operands)

    def test_default_difficulty(self) -> None:
        for problem in generate_problems("train", 100, seed=0):
            start, *operands = [int(x) for x in re.findall(r"\d+", problem.prompt)]
            assert 10 <= start <= 99
            assert 3 <= len(operands) <= 5 and all(1 <= x <= 9 for x in operands)

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"min_ops": 0},
            {"min_ops": 4, "max_ops": 3},
            {"min_operand": -1},
            {"min_operand": 9, "max_operand": 5},
            {"min_start": 50, "max_start": 20},
        ],
    )
    def test_bad_config_is_rejected(self, kwargs: dict) -> None:
        with pytest.raises(ValueError, match="Need"):
            TaskConfig(**kwargs)

    def test_unknown_split_is_rejected(self) -> None:
        with pytest.raises(ValueError, match="expected one of train, validation, test"):
            generate_problems("dev", 1)  # type: ignore[arg-type]

    @settings(max_examples=50, deadline=None)
    @given(st.integers(min_value=0, max_value=10_000))
    def test_answer_is_never_negative(self, seed: int) -> None:
        problem = make_problem(random.Random(seed))
        assert int(problem.answer) >= 0
        assert check(problem.solution, problem.answer)
