"""The demo end to end (real Redis, a real `treepo serve` subprocess, the shipped tiny model), and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from treepo.service.cli import app
from treepo.trainer.demo import DemoOptions, run_demo
from treepo.trainer.services import LOCAL_REDIS, ensure_redis

# A +-1 coin reward keeps the leaves of every tree mixed, whatever the shipped model's accuracy.
FAST = dict(
    width=4,
    prompts_per_step=4,
    mini_batch_prompts=4,
    segment_tokens=16,
    max_depth=4,
    reward="test_checkpoint:coin_reward",
)


@pytest.mark.slow
def test_demo_runs_end_to_end_in_fast_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    events: list[tuple[str, dict]] = []
    options = DemoOptions(steps=2, seed=3, output_dir=tmp_path, name="fast", eval_problems=4, eval_samples=2,
                          overrides=FAST, eval_every=1)  # fmt: skip
    result = run_demo(options, on_event=lambda kind, payload: events.append((kind, payload)))

    run_dir = tmp_path / "fast"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == result.summary
    assert summary["steps"] == 2 and summary["eval"]["samples"] == 8
    assert 0 <= summary["accuracy_before"] <= 1 and 0 <= summary["accuracy_after"] <= 1
    assert summary["eval"]["policy_version_after"] == 2, "the after-eval samples the pushed weights"
    assert 0 < summary["tokens_decoded_tree"] < summary["tokens_independent"], "the tree shares prefixes"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert {
        "loss",
        "clip_frac",
        "reward_mean",
        "accuracy",
        "response_length_mean",
        "advantage_std",
        "filtered_prompts",
        "staleness_mean",
        "decoded_tokens",
        "independent_tokens",
    } <= records[0].keys()
    assert (run_dir / "training.png").stat().st_size > 10_000
    assert [kind for kind, _ in events].count("step") == 2
    curve = summary["curve"]  # before, after step 1 (eval_every=1), after step 2 (the after-evaluation)
    assert [p["step"] for p in curve] == [0, 1, 2] and [kind for kind, _ in events].count("eval") == 3
    assert [p["policy_version"] for p in curve] == [0, 1, 2], "each evaluation samples its step's weights"
    assert curve[0]["train_s"] == 0 and curve[0]["decoded_tokens"] == 0
    assert curve[0]["train_s"] < curve[1]["train_s"] < curve[2]["train_s"] == summary["train_wall_s"]
    assert curve[1]["decoded_tokens"] == records[0]["decoded_tokens"]
    assert curve[2]["decoded_tokens"] == summary["tokens_decoded_tree"]
    assert (curve[0]["accuracy"], curve[2]["accuracy"]) == (
        summary["accuracy_before"],
        summary["accuracy_after"],
    )
    assert dict(events)["redis"]["origin"] == "local"
    leftover = redis.Redis.from_url(LOCAL_REDIS).keys("treepo-demo-*")
    assert not [k for k in leftover if k.decode().endswith(":trees")], "the demo's keys are cleaned up"


@pytest.mark.slow
def test_demo_with_the_same_seed_reproduces_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    runs = []
    for name in ("a", "b"):
        options = DemoOptions(steps=3, seed=5, output_dir=tmp_path, name=name, eval_problems=4, eval_samples=2,
                              overrides=FAST)  # fmt: skip
        summary = run_demo(options).summary
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        keys = ("reward_mean", "accuracy", "loss", "trees_consumed", "decoded_tokens", "staleness_mean")
        runs.append(([[r[k] for k in keys] for r in records], summary["accuracy_after"]))
    assert len(runs[0][0]) == 3
    assert all(r[-1] <= 1 for r in runs[0][0]), "fresh trees are on-policy, carried ones one step old"
    assert runs[0] == runs[1], "the same seed must give the same per-step metrics and held-out accuracy"


def test_ensure_redis_prefers_redis_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REDIS_URL", LOCAL_REDIS)
    assert ensure_redis(tmp_path).origin == "REDIS_URL"
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(RuntimeError, match="does not answer"):
        ensure_redis(tmp_path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--steps", "0"], "must be >= 1"),
        (["train", "--advantage", "ppo"], "expected one of treepo, grpo"),
        (["train", "--lr", "0"], "lr must be > 0"),
        (["train", "--push-every", "3"], "push_every (3) > max_staleness + 1 (2)"),
        (["train", "--max-staleness", "-1"], "max_staleness must be >= 0"),
        (["bench", "train", "--variants", "ppo"], "unknown variants"),
        (["bench", "train", "--eval-every", "-1"], "eval_every must be >= 0"),
        (["demo", "--eval-every", "-1"], "eval_every must be >= 0"),
    ],
)
def test_cli_rejects_bad_options(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    flat = " ".join(result.output.replace("│", " ").split())  # rich wraps the message in a box
    assert message in flat


@pytest.mark.slow
def test_a_demo_stopped_with_sigterm_stops_its_service_and_deletes_its_keys(tmp_path: Path) -> None:
    """`kill PID` (not only Ctrl-C) runs the demo's cleanup: nothing of the run stays in a shared Redis."""
    import os
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-c", "from treepo.service.cli import app; app()", "demo", "--steps", "500",
               "--output-dir", str(tmp_path), "--name", "killed", "--eval-problems", "4", "--eval-samples", "1"]  # fmt: skip
    process = subprocess.Popen(command, env={**os.environ, "REDIS_URL": LOCAL_REDIS}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    config = tmp_path / "killed" / "config.json"
    deadline = time.monotonic() + 120
    client = redis.Redis.from_url(LOCAL_REDIS)
    try:
        while not config.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert config.exists(), "the demo did not start"
        prefix = json.loads(config.read_text())["key_prefix"]
        while not client.keys(f"{prefix}:*") and time.monotonic() < deadline:
            time.sleep(0.2)  # training has written trees
        assert client.keys(f"{prefix}:*")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        process.kill()
    assert client.keys(f"{prefix}:*") == []
