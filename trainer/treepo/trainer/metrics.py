"""Trainer metrics: Prometheus series (optional `--metrics-port`) and the per-step metrics.jsonl log."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

# Steps of a tiny model take seconds; of a 7B model, minutes: explicit buckets up to 10 minutes.
_STEP_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_PUSH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class TrainerMetrics:
    """The agreed `treepo_trainer_*` series, on a registry of their own (tests get a fresh one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.steps = Counter("treepo_trainer_steps", "Optimizer steps taken.", registry=r)
        self.reward_mean = Gauge("treepo_trainer_reward_mean", "Mean leaf reward, last batch.", registry=r)
        self.accuracy = Gauge("treepo_trainer_accuracy", "Correct leaves, last batch.", registry=r)
        self.loss = Gauge("treepo_trainer_loss", "Policy loss of the last step.", registry=r)
        self.filtered_prompts = Counter(
            "treepo_trainer_filtered_prompts", "Prompts dropped by dynamic sampling.", registry=r
        )
        self.stale_trees = Counter("treepo_trainer_stale_trees", "Trees skipped as too stale.", registry=r)
        self.trees_consumed = Counter("treepo_trainer_trees_consumed", "Trees read.", registry=r)
        self.step_duration = Histogram(
            "treepo_trainer_step_duration_seconds",
            "Wall time of one training step.",
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.weight_push_duration = Histogram(
            "treepo_trainer_weight_push_duration_seconds",
            "Save + POST /weights + acknowledgement.",
            buckets=_PUSH_BUCKETS,
            registry=r,
        )

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
        logger.info("trainer metrics on :%d/metrics", port)

    def observe_step(self, record: dict[str, Any]) -> None:
        """Update the series from one metrics.jsonl record."""
        self.steps.inc()
        self.reward_mean.set(record.get("reward_mean", 0.0))
        self.accuracy.set(record.get("accuracy", 0.0))
        self.loss.set(record.get("loss", 0.0))
        self.filtered_prompts.inc(record.get("filtered_prompts", 0))
        self.stale_trees.inc(record.get("stale_trees", 0))
        self.trees_consumed.inc(record.get("trees_consumed", 0))
        self.step_duration.observe(record.get("step_s", 0.0))
        if record.get("weight_push_s") is not None:
            self.weight_push_duration.observe(record["weight_push_s"])


class MetricsLog:
    """Appends one JSON object per step; a resumed run appends to the same file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
