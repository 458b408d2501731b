"""Early-stop rules: the boxed regex, repetition, EOS (B4) and the classification order (B2)."""

from __future__ import annotations

import pytest

from treepo.client.schema import TreeParams
from treepo.service.sampler.rules import StopRules, extract_last_boxed, first_stop_index, has_repetition


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{a^{b_{c}}}", "a^{b_{c}}"),  # two levels of nesting
        ("\\boxed{}", ""),
        ("\\boxed{unclosed", None),
        ("boxed{7}", None),
        ("no answer here", None),
    ],
)
def test_extract_last_boxed(text: str, expected: str | None) -> None:
    assert extract_last_boxed(text) == expected


def test_three_levels_of_braces_are_not_matched_whole() -> None:
    assert extract_last_boxed("\\boxed{a{b{c{d}}}}") != "a{b{c{d}}}"


@pytest.mark.parametrize(
    ("text", "window", "count", "expected"),
    [
        ("ab" * 40, 32, 8, True),  # 80 chars: 49 windows, two distinct, each >= 8
        ("ab" * 19, 32, 8, False),  # 38 chars: 7 windows only
        ("abcdefgh" * 5, 8, 5, True),
        ("abcdefgh" * 5, 8, 6, False),
        ("aaaa", 2, 3, True),  # overlapping windows count
        ("short", 32, 2, False),
    ],
)
def test_has_repetition(text: str, window: int, count: int, expected: bool) -> None:
    assert has_repetition(text, window, count) is expected


def test_first_stop_index_checks_index_zero_b4() -> None:
    assert first_stop_index([0, 5, 6], frozenset({0})) == 0
    assert first_stop_index([5, 9, 0, 9], frozenset({0, 9})) == 1
    assert first_stop_index([5, 6], frozenset({0})) is None


def rules(**tree_kwargs: object) -> StopRules:
    return StopRules.from_params(TreeParams(**tree_kwargs), frozenset({0}), max_new_tokens=16)


BOXED = "\\boxed{4}"
REPEATED = "ab" * 40


@pytest.mark.parametrize(
    ("tree_kwargs", "segment", "text", "response_len", "depth", "expected"),
    [
        ({}, [1, 0], BOXED, 4, 1, "answer"),  # boxed_and_eos: both in the segment
        ({}, [1, 2], BOXED, 4, 1, None),  # boxed alone goes on under the release policy
        ({}, [1, 0], "plain", 4, 1, "eos"),
        ({}, [0], "", 1, 1, "eos"),  # B4: EOS as the only token
        ({"answer_stop": "boxed"}, [1, 2], BOXED, 4, 1, "answer"),
        ({"answer_stop": "none"}, [1, 0], BOXED, 4, 1, "eos"),
        ({}, [1, 2], "x", 16, 1, "max_tokens"),
        ({"max_depth": 3}, [1, 2], "x", 8, 3, "max_depth"),
        ({"max_depth": 3}, [1, 2], "x", 16, 3, "max_tokens"),  # length before depth
        ({}, [1, 2], REPEATED, 4, 1, "repetition"),
        # B2: the priority is honoured both ways
        ({"repetition_priority": "first"}, [1, 0], BOXED + REPEATED, 4, 1, "repetition"),
        ({"repetition_priority": "last"}, [1, 0], BOXED + REPEATED, 4, 1, "answer"),
        ({"repetition_priority": "last"}, [1, 0], REPEATED, 4, 1, "eos"),
        ({"repetition_priority": "last"}, [1, 2], REPEATED, 16, 1, "max_tokens"),
        ({"repetition_priority": "last"}, [1, 2], REPEATED, 4, 1, "repetition"),
        ({"repetition_chars": 4, "repetition_count": 3}, [1, 2], "abcdabcdabcd", 4, 1, "repetition"),
    ],
)
def test_classification_order(
    tree_kwargs: dict, segment: list[int], text: str, response_len: int, depth: int, expected: str | None
) -> None:
    assert rules(**tree_kwargs).classify(segment, text, response_len, depth) == expected
