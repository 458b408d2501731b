"""`treepo demo`: Redis + the service (embedded engine, shipped tiny model) + the trainer, on one machine.

It measures held-out sampled accuracy through the service before training, trains with TreePO trees
for a few minutes (with `eval_every`, measuring again every that many steps), measures again, and writes
`metrics.jsonl`, `summary.json` and `training.png` under `<output-dir>/<name>/`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from treepo.client.client import TreePOClient
from treepo.service.task import generate_problems
from treepo.trainer.config import TrainConfig
from treepo.trainer.evaluate import EvalResult, evaluate
from treepo.trainer.loop import build_run
from treepo.trainer.plots import plot_run
from treepo.trainer.services import ensure_redis, start_service

logger = logging.getLogger(__name__)

DEMO_STEPS = 120  # ~8.5 minutes of lockstep training on 2 CPU cores, plus two held-out evaluations


def demo_config(**changes: Any) -> TrainConfig:
    """Settings tuned for the tiny model on 2 CPU cores (the release values are for 7B)."""
    fields: dict[str, Any] = dict(
        lr=3e-4,  # measured: 1e-3 random-walks, 2e-3 with two updates per batch collapses the policy
        warmup_steps=2,
        prompts_per_step=16,
        mini_batch_prompts=8,  # two optimizer steps per batch
        micro_batch_rows=128,
        width=8,
        branch=2,
        segment_tokens=16,
        max_depth=4,
        inflight_batches=2,
        max_staleness=1,
        deterministic=True,  # lockstep: the same --seed gives the same metrics.jsonl (no overlap)
        checkpoint_every=10,
        push_every=1,
        torch_threads=1,  # the service has the other core; 2 threads here oversubscribe (8x slower)
        steps=DEMO_STEPS,
        group="demo",
        consumer="demo-trainer",
    )
    return TrainConfig(**{**fields, **changes})


@dataclass(slots=True)
class DemoOptions:
    steps: int = DEMO_STEPS
    seed: int = 0
    output_dir: Path = Path("runs")
    name: str | None = None
    eval_problems: int = 128
    eval_samples: int = 4
    model_path: str | None = None  # default: the shipped tiny model
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    eval_every: int = 0  # also measure held-out accuracy every N steps (0: only before and after)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.eval_problems < 1 or self.eval_samples < 1:
            raise ValueError(
                f"steps, eval_problems and eval_samples must be >= 1 (got {self.steps}, "
                f"{self.eval_problems}, {self.eval_samples})"
            )
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (got {self.eval_every})")


@dataclass(slots=True)
class DemoResult:
    run_dir: Path
    summary: dict[str, Any]


class HeldOutCurve:
    """Held-out accuracy against what training spent: seconds and decoded tokens. Evaluations pause the
    train clock, so a run measured more often is not charged for it (`treepo bench train` compares
    variants at equal wall time). The first point is the before-training one, at 0 s and 0 tokens."""

    def __init__(self, before: EvalResult, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._started = clock()
        self._paused = 0.0
        self.decoded_tokens = 0
        self.points = [_point(0, 0.0, 0, before)]

    def train_s(self) -> float:
        return self._clock() - self._started - self._paused

    def add_step(self, record: dict[str, Any]) -> None:
        self.decoded_tokens += record["decoded_tokens"]

    def measure(self, step: int, run_eval: Callable[[], EvalResult]) -> EvalResult:
        train_s = self.train_s()
        paused = self._clock()
        result = run_eval()
        self._paused += self._clock() - paused
        self.points.append(_point(step, train_s, self.decoded_tokens, result))
        return result


def _point(step: int, train_s: float, decoded_tokens: int, result: EvalResult) -> dict[str, Any]:
    return {
        "step": step,
        "train_s": train_s,
        "decoded_tokens": decoded_tokens,
        "accuracy": result.accuracy,
        "stderr": result.stderr,
        "policy_version": result.policy_version,
    }


def run_demo(options: DemoOptions, *, on_event=None) -> DemoResult:
    """Start everything, evaluate, train, evaluate, write the run directory; always cleans up."""
    emit = on_event or (lambda kind, payload: None)
    name = options.name or f"demo-seed{options.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(options.output_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    redis_handle = ensure_redis(run_dir)
    emit("redis", {"url": redis_handle.url, "origin": redis_handle.origin})
    prefix = f"treepo-demo-{uuid.uuid4().hex[:8]}"
    service = None
    try:
        service = start_service(
            redis_url=redis_handle.url,
            key_prefix=prefix,
            weights_dir=run_dir / "weights",
            log_path=run_dir / "service.log",
            model_path=options.model_path,
        )
        emit("service", {"url": service.url, "log": str(service.log_path)})
        summary = _train_and_measure(options, run_dir, service.url, redis_handle.url, prefix, emit)
        summary.update(wall_s=time.perf_counter() - started, redis=redis_handle.origin, name=name)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        return DemoResult(run_dir, summary)
    finally:
        if service is not None:
            service.stop()
        _delete_prefix(redis_handle.url, prefix)
        redis_handle.stop()


def _train_and_measure(
    options: DemoOptions, run_dir: Path, service_url: str, redis_url: str, prefix: str, emit
) -> dict[str, Any]:
    config = demo_config(
        steps=options.steps,
        seed=options.seed,
        service_url=service_url,
        redis_url=redis_url,
        key_prefix=prefix,
        output_dir=str(run_dir),
        weights_dir=str(run_dir / "weights"),
        model_path=options.model_path or "",
        **options.overrides,
    )
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    problems = generate_problems("test", options.eval_problems, seed=options.seed)
    client = TreePOClient(service_url)
    eval_args = dict(
        samples_per_problem=options.eval_samples,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        seed=options.seed,
    )
    if options.eval_every and (config.push_every == 0 or options.eval_every % config.push_every):
        raise ValueError(
            f"eval_every ({options.eval_every}) must be a multiple of push_every ({config.push_every}): "
            "an evaluation between pushes would measure older weights than its step's"
        )

    def held_out() -> EvalResult:
        return evaluate(client, problems, **eval_args)

    before = held_out()
    emit("eval", {"when": "before", "accuracy": before.accuracy, "wall_s": before.wall_s})
    run = build_run(config)
    curve = HeldOutCurve(before)

    def on_step(record: dict[str, Any]) -> None:
        # The step has pushed its weights (POST /weights answers once they are loaded): the service
        # samples them now. The last step is measured by the after-evaluation below.
        emit("step", record)
        curve.add_step(record)
        step = record["step"]
        if options.eval_every and step % options.eval_every == 0 and step < config.steps:
            result = curve.measure(step, held_out)
            emit("eval", {"when": f"at step {step} of", "accuracy": result.accuracy, "wall_s": result.wall_s})

    run.run(on_step=on_step)
    after = curve.measure(run.state.step, held_out)
    train_wall = curve.points[-1]["train_s"]
    emit("eval", {"when": "after", "accuracy": after.accuracy, "wall_s": after.wall_s})
    records = run.log.read()
    plot_run(
        records,
        run_dir / "training.png",
        evals=[(p["step"], p["accuracy"]) for p in curve.points],
        title=f"TreePO demo (seed {options.seed})",
    )
    summary = _summary(config, records, before, after, train_wall)
    summary["curve"] = curve.points
    return summary


def _summary(
    config: TrainConfig, records: list[dict], before: EvalResult, after: EvalResult, train_wall: float
) -> dict[str, Any]:
    decoded = sum(r["decoded_tokens"] for r in records)
    independent = sum(r["independent_tokens"] for r in records)
    return {
        "accuracy_before": before.accuracy,
        "accuracy_after": after.accuracy,
        "accuracy_gain": after.accuracy - before.accuracy,
        "eval": {
            "problems": before.num_problems,
            "samples": before.num_samples,
            "stderr_before": before.stderr,
            "stderr_after": after.stderr,
            "policy_version_after": after.policy_version,
        },
        "steps": len(records),
        "seed": config.seed,
        "tokens_decoded_tree": decoded,
        "tokens_independent": independent,
        "tokens_saved_fraction": 1 - decoded / independent if independent else 0.0,
        "trees_consumed": sum(r["trees_consumed"] for r in records),
        "filtered_prompts": sum(r["filtered_prompts"] for r in records),
        "train_wall_s": train_wall,
        "step_s_mean": train_wall / max(1, len(records)),
        "wait_s_mean": sum(r["wait_s"] for r in records) / max(1, len(records)),
        "update_s_mean": sum(r["update_s"] for r in records) / max(1, len(records)),
        "tree": {
            "width": config.width,
            "branch": config.branch,
            "segment_tokens": config.segment_tokens,
            "max_depth": config.max_depth,
        },
        "lr": config.lr,
        "prompts_per_step": config.prompts_per_step,
    }


def _delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    except redis.RedisError as error:  # cleanup must not hide the real outcome
        logger.warning("could not delete demo keys under %s: %s", prefix, error)
    finally:
        client.close()
