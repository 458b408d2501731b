"""The built-in synthetic, verifiable task: chains of additions and subtractions, written step by step.

A problem reads `47+5-8+6=?` and its gold solution is written one step per line, ending in
`\\boxed{ANSWER}` (the model then emits EOS):

    47+5=52
    52-8=44
    44+6=50
    \\boxed{50}

The default difficulty (a two-digit start, 3-5 one-digit operations) and the compact notation are
chosen so that the tiny model learns the task within minutes on 2 shared CPU cores; `TaskConfig`
makes it harder (e.g. two-digit operands).

Answers are exact integers, so `check` is an exact checker. Splits never overlap: a problem belongs to
the split chosen by a hash of its prompt text, whatever seed or stream produced it.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")

# Share of the hash space (out of 100 buckets) owned by each split.
_SPLIT_BUCKETS: dict[Split, range] = {
    "train": range(0, 90),
    "validation": range(90, 95),
    "test": range(95, 100),
}
# Distinct seed offsets per split so that streams differ even before the hash filter.
_SPLIT_SALT: dict[Split, int] = {"train": 0, "validation": 1_000_003, "test": 2_000_029}
_INTEGER = re.compile(r"[+-]?\d+")
_BOX = "\\boxed{"


@dataclass(slots=True, frozen=True)
class TaskConfig:
    """Difficulty knob: how many operations, how large the starting number and the operands are."""

    min_ops: int = 3
    max_ops: int = 5
    min_start: int = 10
    max_start: int = 99
    min_operand: int = 1
    max_operand: int = 9

    def __post_init__(self) -> None:
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"Need 1 <= min_ops <= max_ops, got {self.min_ops=} {self.max_ops=}.")
        if not 0 <= self.min_start <= self.max_start:
            raise ValueError(f"Need 0 <= min_start <= max_start, got {self.min_start=} {self.max_start=}.")
        if not 0 <= self.min_operand <= self.max_operand:
            raise ValueError(
                f"Need 0 <= min_operand <= max_operand, got {self.min_operand=} {self.max_operand=}."
            )


@dataclass(slots=True, frozen=True)
class Problem:
    """One task instance: the prompt, the reference answer and the gold step-by-step solution."""

    prompt: str
    answer: str
    solution: str


# Public API


def make_problem(rng: random.Random, config: TaskConfig | None = None) -> Problem:
    """Draw one problem; a subtraction that would go below zero becomes an addition."""
    config = config or TaskConfig()
    total = rng.randint(config.min_start, config.max_start)
    expression, lines = str(total), []
    for _ in range(rng.randint(config.min_ops, config.max_ops)):
        operand = rng.randint(config.min_operand, config.max_operand)
        if rng.random() < 0.5 and operand <= total:
            expression += f"-{operand}"
            lines.append(f"{total}-{operand}={total - operand}")
            total -= operand
        else:
            expression += f"+{operand}"
            lines.append(f"{total}+{operand}={total + operand}")
            total += operand
    prompt = f"{expression}=?\n"
    solution = "\n".join([*lines, f"{_BOX}{total}}}"])
    return Problem(prompt=prompt, answer=str(total), solution=solution)


def split_of(problem: Problem) -> Split:
    """The split a problem belongs to, from a stable hash of its prompt."""
    bucket = int.from_bytes(hashlib.sha256(problem.prompt.encode()).digest()[:8], "big") % 100
    return next(name for name, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def iter_problems(split: Split, seed: int = 0, config: TaskConfig | None = None) -> Iterator[Problem]:
    """An endless, seeded stream of problems of one split (deterministic for a given seed)."""
    if split not in _SPLIT_BUCKETS:
        raise ValueError(f"Unknown split {split!r}; expected one of {', '.join(SPLITS)}.")
    rng = random.Random(seed * 7_919 + _SPLIT_SALT[split])
    while True:
        problem = make_problem(rng, config)
        if split_of(problem) == split:
            yield problem


def generate_problems(
    split: Split, num_problems: int, seed: int = 0, config: TaskConfig | None = None
) -> list[Problem]:
    """The first `num_problems` problems of a split's seeded stream."""
    if num_problems < 0:
        raise ValueError(f"num_problems must be >= 0, got {num_problems}.")
    stream = iter_problems(split, seed, config)
    return [next(stream) for _ in range(num_problems)]


def extract_boxed(text: str) -> str | None:
    """Content of the LAST `\\boxed{...}`; None when there is none or its braces never close.

    A malformed last box does not fall back to an earlier one: the final answer is what counts.
    """
    start = text.rfind(_BOX)
    return None if start == -1 else _balanced_content(text, start + len(_BOX))


def check(response_text: str, reference: str) -> bool:
    """Exact check: the last boxed answer is an integer equal to the reference."""
    boxed = extract_boxed(response_text)
    if boxed is None:
        return False
    boxed, reference = boxed.strip(), reference.strip()
    if not _INTEGER.fullmatch(boxed) or not _INTEGER.fullmatch(reference):
        return False
    return int(boxed) == int(reference)


def score(response_text: str, reference: str) -> float:
    """Reward for RL: +1.0 when `check` passes, -1.0 otherwise."""
    return 1.0 if check(response_text, reference) else -1.0


# Internal helpers


def _balanced_content(text: str, begin: int) -> str | None:
    """Text from `begin` up to the brace that closes an already-open one; None if unbalanced."""
    depth = 1
    for index in range(begin, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:index]
    return None
