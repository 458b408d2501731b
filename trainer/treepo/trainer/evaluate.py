"""Held-out accuracy, sampled through the service with the weights it is serving right now.

Each problem is sampled `samples_per_problem` times independently (a tree with `init_branch = width` and
`branch = 1` is plain independent sampling) at the training temperature, with fixed seeds, so the same
weights always give the same estimate. Going through the service also proves that pushed weights arrived.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from treepo.client.client import TreePOClient
from treepo.client.schema import Prompt, RolloutTreeResponse, SamplingParams, TreeParams
from treepo.service.task import Problem, check

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EvalResult:
    accuracy: float  # share of correct samples
    num_problems: int
    num_samples: int
    stderr: float  # binomial standard error of the accuracy
    policy_version: int
    wall_s: float


def independent_tree(width: int, max_new_tokens: int) -> TreeParams:
    """`width` independent samples of up to `max_new_tokens`, in one segment each."""
    return TreeParams(width=width, init_branch=width, branch=1, segment_tokens=max_new_tokens, max_depth=1)


def evaluate(
    client: TreePOClient,
    problems: Sequence[Problem],
    *,
    samples_per_problem: int = 4,
    max_new_tokens: int = 160,
    temperature: float = 1.0,
    seed: int = 0,
    prompts_per_request: int = 64,
) -> EvalResult:
    """Sampled accuracy on `problems` under the service's current weights."""
    if not problems:
        raise ValueError("evaluate needs at least one problem")
    started = time.perf_counter()
    tree = independent_tree(samples_per_problem, max_new_tokens)
    correct = total = 0
    versions: set[int] = set()
    for start in range(0, len(problems), prompts_per_request):
        chunk = problems[start : start + prompts_per_request]
        prompts = [Prompt(id=f"eval-{start + i}", text=p.prompt) for i, p in enumerate(chunk)]
        sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + start)
        response = client.rollout_tree(prompts, tree=tree, sampling=sampling, return_logprobs=False)
        assert isinstance(response, RolloutTreeResponse), (
            f"inline delivery answers trees, got {type(response)}"
        )
        for problem, result in zip(chunk, response.trees, strict=True):
            versions.add(result.policy_version)
            for leaf in result.leaves:
                text = "".join(node.text for node in result.path(leaf))
                correct += check(text, problem.answer)
                total += 1
    accuracy = correct / total
    return EvalResult(
        accuracy=accuracy,
        num_problems=len(problems),
        num_samples=total,
        stderr=math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / total),
        policy_version=max(versions),
        wall_s=time.perf_counter() - started,
    )
