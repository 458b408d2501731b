"""Early-stop rules of a path after each segment (TREEPO.md §1.2, §1.4), in the documented order."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from treepo.client.schema import FinishReason, TreeParams

# \boxed{...} with up to two levels of nested braces, as in the release's extract_last_boxed.
BOXED_RE = re.compile(r"\\boxed\{((?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*)\}")


def extract_last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{} in `text`, or None."""
    matches = BOXED_RE.findall(text)
    return matches[-1] if matches else None


def has_repetition(text: str, window_chars: int = 32, min_count: int = 8) -> bool:
    """True if some `window_chars`-character substring occurs `min_count`+ times (overlaps count)."""
    if len(text) < window_chars:
        return False
    counts = Counter(text[i : i + window_chars] for i in range(len(text) - window_chars + 1))
    return max(counts.values()) >= min_count


def first_stop_index(token_ids: Sequence[int], stop_ids: frozenset[int]) -> int | None:
    """Index of the first stop token, index 0 included (the release's reverse search skipped it: B4)."""
    for index, token in enumerate(token_ids):
        if token in stop_ids:
            return index
    return None


@dataclass(slots=True, frozen=True)
class StopRules:
    """The classification of a path after a new segment; first match wins.

    Order: repetition (if `repetition_first`), answer, EOS, length, depth, repetition (if last).
    """

    answer_stop: str
    stop_ids: frozenset[int]
    max_new_tokens: int
    max_depth: int
    repetition_chars: int = 32
    repetition_count: int = 8
    repetition_first: bool = True

    @classmethod
    def from_params(cls, tree: TreeParams, stop_ids: frozenset[int], max_new_tokens: int) -> StopRules:
        return cls(
            answer_stop=tree.answer_stop,
            stop_ids=stop_ids,
            max_new_tokens=max_new_tokens,
            max_depth=tree.max_depth,
            repetition_chars=tree.repetition_chars,
            repetition_count=tree.repetition_count,
            repetition_first=tree.repetition_priority == "first",
        )

    def classify(
        self, segment_ids: Sequence[int], text: str, response_len: int, depth: int
    ) -> FinishReason | None:
        """Why the path stops after this segment, or None if it goes on."""
        repeated = has_repetition(text, self.repetition_chars, self.repetition_count)
        if self.repetition_first and repeated:
            return "repetition"
        has_eos = first_stop_index(segment_ids, self.stop_ids) is not None
        if self._is_answer(text, has_eos):
            return "answer"
        if has_eos:
            return "eos"
        if response_len >= self.max_new_tokens:
            return "max_tokens"
        if depth >= self.max_depth:
            return "max_depth"
        if repeated:
            return "repetition"
        return None

    def _is_answer(self, text: str, has_eos: bool) -> bool:
        if self.answer_stop == "none":
            return False
        boxed = extract_last_boxed(text) is not None
        return boxed and (has_eos or self.answer_stop == "boxed")
