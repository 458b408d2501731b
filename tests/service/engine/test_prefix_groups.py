"""shared_prefixes: which prefixes of one call get computed once, and in which order (levels)."""

from __future__ import annotations

import pytest

from treepo.service.engine.prefix_groups import shared_prefixes

A = list(range(10, 20))  # 10 tokens
B = list(range(30, 36))  # 6 tokens


@pytest.mark.parametrize(
    ("inputs", "cached", "expected"),
    [
        ([A, A, A], [0, 0, 0], [[(A[:9], 0)]]),  # identical copies: all but the last token
        ([[*A, 1], [*A, 2]], [0, 0], [[(A, 0)]]),
        ([[*A, 1], [*A, 2]], [8, 8], []),  # only 2 uncached shared tokens: not worth a pass
        ([[*A, 1], [9, 9, 9, 9, 9, 9]], [0, 0], []),  # nothing shared
        ([[*A, 1, 2], [*A, 1, 3], [*A, 5]], [0, 0, 0], [[(A, 1)]]),  # [*A, 1] adds 1 token: skipped
        ([[*A, *B, 1], [*A, *B, 2], [*A, 5]], [0, 0, 0], [[(A, 0)], [([*A, *B], 0)]]),  # nested: 2 levels
        ([[9, *A, 1], [*A, 2], [*A, 3], [9, *A, 4]], [0, 0, 0, 0], [[([9, *A], 0), (A, 1)]]),
        ([[*A, 1], [*A[:6], 7, 7, 7]], [0, 0], [[(A[:6], 0)]]),
        ([[*A, *B, 1], [*A, *B, 2]], [10, 10], [[([*A, *B], 0)]]),  # counts only the uncached part
    ],
)
def test_shared_prefixes(inputs, cached, expected):
    levels = shared_prefixes(inputs, cached)
    assert [sorted((g.token_ids, g.owner) for g in level) for level in levels] == expected


def test_owner_is_the_first_request_of_the_group():
    levels = shared_prefixes([[5, 5], [*A, 1], [*A, 2]], [0, 0, 0])
    assert [(g.token_ids, g.owner) for g in levels[0]] == [(A, 1)]
