"""Reward plugins, the DAPO overlong penalty and DAPO dynamic filtering (TREEPO.md §2.3).

A reward function maps (response text, tree metadata) to a float; the built-ins score +1 for a correct
final answer and -1 otherwise, as the release does. Plugins load from a built-in name, a
`module:function` string, or an entry point in the `treepo.rewards` group.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from treepo.client.schema import Tree

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, dict], float]
ENTRY_POINT_GROUP = "treepo.rewards"
ANSWER_KEY = "answer"  # metadata key of the reference answer

# Public API: built-in rewards


def toy_reward(response_text: str, metadata: dict) -> float:
    """The built-in arithmetic task's exact checker: +1 if the last \\boxed{} equals the answer."""
    from treepo.service.task import check

    return 1.0 if check(response_text, _reference(metadata)) else -1.0


@dataclass(slots=True, frozen=True)
class MathVerifyReward:
    """Math-Verify equivalence of the last \\boxed{} answer with the reference: +1, else -1.

    Any parse error or timeout scores -1. In the main thread Math-Verify's own signal-based timeouts
    interrupt a runaway sympy call; elsewhere the check runs in a daemon thread that is abandoned on
    timeout (it may keep a core busy until it finishes).
    """

    timeout_s: int = 5

    def __post_init__(self) -> None:
        if self.timeout_s < 1:
            raise ValueError(f"timeout_s must be a whole number of seconds >= 1 (got {self.timeout_s})")

    def __call__(self, response_text: str, metadata: dict) -> float:
        from treepo.service.task import extract_boxed

        reference = _reference(metadata)
        answer = extract_boxed(response_text)
        if answer is None or not answer.strip():
            return -1.0
        gold = extract_boxed(reference) if "\\boxed" in reference else reference
        try:
            is_correct = self._verify(answer, gold or reference)
        except Exception as error:  # an error scores as wrong (release: -1 on error or timeout)
            logger.debug("math_verify scored -1 after %s: %s", type(error).__name__, error)
            return -1.0
        return 1.0 if is_correct else -1.0

    def _verify(self, answer: str, gold: str) -> bool:
        if threading.current_thread() is threading.main_thread():
            return _math_equal(answer, gold, self.timeout_s)
        return _in_daemon_thread(lambda: _math_equal(answer, gold, None), self.timeout_s)


math_verify_reward = MathVerifyReward()
BUILTIN_REWARDS: dict[str, RewardFn] = {"toy": toy_reward, "math_verify": math_verify_reward}


def load_reward(spec: str) -> RewardFn:
    """Resolve a built-in name, an entry point of group `treepo.rewards`, or `module:function`."""
    name = spec.strip()
    if name.replace("-", "_") in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name.replace("-", "_")]
    if ":" in name:
        return _load_attribute(name)
    plugins = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name in plugins:
        return _ensure_callable(plugins[name].load(), name)
    options = sorted(set(BUILTIN_REWARDS) | set(plugins))
    raise ValueError(
        f"Unknown reward {spec!r}; expected one of {', '.join(options)} "
        f"(built-ins and '{ENTRY_POINT_GROUP}' entry points) or 'package.module:function'"
    )


# Public API: penalty and filter


@dataclass(slots=True, frozen=True)
class OverlongPenalty:
    """DAPO soft overlong punishment: 0 up to max_length - buffer, then linear down to -factor."""

    max_length: int
    buffer: int
    factor: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.buffer <= self.max_length:
            raise ValueError(
                f"need 0 < buffer <= max_length (got buffer={self.buffer}, max_length={self.max_length})"
            )
        if self.factor < 0:
            raise ValueError(f"factor must be >= 0 (got {self.factor})")

    def __call__(self, length: int) -> float:
        return overlong_penalty(length, self.max_length, self.buffer, self.factor)


def overlong_penalty(length: int, max_length: int, buffer: int, factor: float = 1.0) -> float:
    """min(-(L - (max_length - buffer)) / buffer, 0) * factor, added to the reward (DAPO)."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"need 0 < buffer <= max_length (got buffer={buffer}, max_length={max_length})")
    exceed = length - (max_length - buffer)
    return min(-exceed / buffer, 0.0) * factor


@dataclass(slots=True)
class FilterResult:
    """Which prompts DAPO dynamic sampling keeps, and why the others went."""

    kept: list[int]
    num_all_correct: int = 0
    num_all_wrong: int = 0

    @property
    def num_filtered(self) -> int:
        return self.num_all_correct + self.num_all_wrong


def dynamic_filter(scores_by_prompt: Sequence[Sequence[float]]) -> FilterResult:
    """Keep prompts whose leaves do not all score the same (or that have a single leaf, as released).

    All-equal groups carry no learning signal: every advantage would be zero.
    """
    result = FilterResult(kept=[])
    for index, scores in enumerate(scores_by_prompt):
        if len(scores) == 0:
            raise ValueError(f"prompt {index} has no scored leaves")
        if len(scores) == 1 or min(scores) != max(scores):
            result.kept.append(index)
        elif scores[0] > 0:
            result.num_all_correct += 1
        else:
            result.num_all_wrong += 1
    return result


@dataclass(slots=True)
class TreeScores:
    """Per leaf of one tree, in `tree.leaves` order."""

    leaf_ids: list[str]
    scores: list[float]  # the reward function's values (drive the filter and accuracy)
    rewards: list[float]  # scores plus the overlong penalty (what the advantages use)
    lengths: list[int]  # response tokens


def score_tree(tree: Tree, reward_fn: RewardFn, overlong: OverlongPenalty | None = None) -> TreeScores:
    """Score every leaf's full response text (the concatenated segment texts)."""
    result = TreeScores(leaf_ids=list(tree.leaves), scores=[], rewards=[], lengths=[])
    for leaf in tree.leaves:
        path = tree.path(leaf)
        text = "".join(node.text for node in path)
        length = sum(len(node.token_ids) for node in path)
        score = float(reward_fn(text, dict(tree.metadata)))
        if not math.isfinite(score):
            raise ValueError(f"reward function returned {score} for tree {tree.tree_id} leaf {leaf}")
        result.scores.append(score)
        result.rewards.append(score + (overlong(length) if overlong else 0.0))
        result.lengths.append(length)
    return result


# Internal helpers


def _reference(metadata: dict) -> str:
    if ANSWER_KEY not in metadata or metadata[ANSWER_KEY] is None:
        raise ValueError(
            f"tree metadata has no {ANSWER_KEY!r} (got keys {sorted(metadata)}); submit each prompt with "
            f"metadata={{'{ANSWER_KEY}': <reference answer>}}"
        )
    return str(metadata[ANSWER_KEY])


def _math_equal(answer: str, gold: str, timeout_s: int | None) -> bool:
    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig()]
    gold_parsed = parse(f"\\boxed{{{gold}}}", extraction_config=config, parsing_timeout=timeout_s)
    answer_parsed = parse(f"\\boxed{{{answer}}}", extraction_config=config, parsing_timeout=timeout_s)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=timeout_s))


def _in_daemon_thread(check: Callable[[], bool], timeout_s: float) -> bool:
    """Run `check` with a deadline; a thread that overruns is abandoned (daemon), the call raises."""
    outcome: list[bool | BaseException] = []

    def target() -> None:
        try:
            outcome.append(check())
        except BaseException as error:  # re-raised in the caller
            outcome.append(error)

    worker = threading.Thread(target=target, name="math-verify", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        raise TimeoutError(f"math_verify took longer than {timeout_s} s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _load_attribute(spec: str) -> RewardFn:
    module_name, _, attribute = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import reward module {module_name!r} from {spec!r}: {error}") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r} (reward spec {spec!r})")
        target = getattr(target, part)
    return _ensure_callable(target, spec)


def _ensure_callable(target: Any, spec: str) -> RewardFn:
    if not callable(target):
        raise ValueError(f"reward {spec!r} is not callable; it must be f(response_text, metadata) -> float")
    return target
