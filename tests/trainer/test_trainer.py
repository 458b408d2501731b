"""The training step: rows from trees, advantages, and a DAPO update that follows the advantage's sign."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from treepo.client.schema import Node, Tree
from treepo.trainer.config import TrainConfig, default_consumer
from treepo.trainer.policy import Policy
from treepo.trainer.trainer import Trainer, batch_metrics, compute_advantages, rows_from_tree


def tiny_policy(seed: int = 0) -> Policy:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    return Policy(Qwen2ForCausalLM(config), pad_token_id=0)


def binary_tree(tree_id: str = "t0") -> Tree:
    """Prompt [1, 2, 3]; two depth-1 nodes, each with two leaves (4 trajectories, 2 segments of 3)."""
    nodes = [Node(id="1-0", parent=None, depth=1, token_ids=[5, 6, 7], logprobs=[-1.0] * 3),
             Node(id="1-1", parent=None, depth=1, token_ids=[8, 9, 10], logprobs=[-1.0] * 3)]  # fmt: skip
    for k, (parent, tokens) in enumerate(
        [("1-0", [11, 12]), ("1-0", [13]), ("1-1", [14, 15]), ("1-1", [16])]
    ):
        nodes.append(
            Node(id=f"2-{k}", parent=parent, depth=2, token_ids=tokens, logprobs=[-2.0] * len(tokens))
        )
    return Tree(tree_id=tree_id, prompt_id="p", policy_version=0, prompt_token_ids=[1, 2, 3], nodes=nodes,
                leaves=["2-0", "2-1", "2-2", "2-3"])  # fmt: skip


def summed_logprobs(policy: Policy, rows) -> torch.Tensor:
    with torch.no_grad():
        logprobs, mask = policy.per_token_logprobs(
            [r.prompt_ids for r in rows], [r.response_ids for r in rows]
        )
    return (logprobs * mask).sum(dim=1)


def test_rows_follow_tree_paths() -> None:
    rows = rows_from_tree(binary_tree(), [1.0, -1.0, -1.0, -1.0])
    assert [r.response_ids for r in rows] == [
        [5, 6, 7, 11, 12],
        [5, 6, 7, 13],
        [8, 9, 10, 14, 15],
        [8, 9, 10, 16],
    ]
    assert rows[0].path == ["t0", "1-0", "2-0"]
    assert rows[3].sampler_logprobs == [-1.0, -1.0, -1.0, -2.0]
    assert [r.is_correct for r in rows] == [True, False, False, False]
    with pytest.raises(ValueError, match="4 leaves but 3 rewards"):
        rows_from_tree(binary_tree(), [1.0, 1.0, -1.0])


@pytest.mark.parametrize("advantage", ["treepo", "grpo"])
def test_advantage_signs(advantage: str) -> None:
    rows = rows_from_tree(binary_tree(), [1.0, -1.0, -1.0, -1.0])
    compute_advantages(rows, TrainConfig(advantage=advantage, prompts_per_step=32))
    assert rows[0].advantage > 0 and all(r.advantage < 0 for r in rows[1:])
    if advantage == "treepo":  # leaf 1 shares its subtree with the correct leaf: blamed more than 2 and 3
        assert rows[1].advantage < rows[2].advantage


@pytest.mark.parametrize(("old_logprobs", "mode"), [("recompute", "token-mean"), ("sampler", "token-mean"),
                                                    ("recompute", "seq-mean-token-mean")])  # fmt: skip
def test_step_moves_logprobs_in_advantage_direction(old_logprobs: str, mode: str) -> None:
    policy = tiny_policy()
    config = TrainConfig(lr=3e-3, warmup_steps=0, prompts_per_step=2, mini_batch_prompts=2,
                         micro_batch_rows=3, old_logprobs=old_logprobs, loss_agg_mode=mode)  # fmt: skip
    trainer = Trainer(policy, config)
    rows = rows_from_tree(binary_tree("a"), [1.0, -1.0, -1.0, 1.0])
    rows += rows_from_tree(binary_tree("b"), [-1.0, 1.0, -1.0, -1.0])
    before = summed_logprobs(policy, rows)
    metrics = trainer.step(rows)
    after = summed_logprobs(policy, rows)
    change = after - before  # (N,) summed log-prob change per trajectory
    advantages = torch.tensor([r.advantage for r in rows])
    # The surrogate objective rose, and rewarded trajectories gained on penalised ones (shared prefixes
    # make single rows move together, so compare the groups).
    assert (advantages * change).sum() > 0
    assert change[advantages > 0].mean() > change[advantages < 0].mean()
    assert metrics["optimizer_steps"] == 1 and metrics["grad_norm"] > 0
    assert {"loss", "clip_frac", "approx_kl", "lr", "update_s"} <= metrics.keys()


def test_repeated_steps_reduce_loss_and_clip() -> None:
    policy = tiny_policy(2)
    config = TrainConfig(lr=1e-2, warmup_steps=0, prompts_per_step=1, mini_batch_prompts=1, ppo_epochs=4,
                         old_logprobs="sampler", seed=0)  # fmt: skip
    rows = rows_from_tree(binary_tree(), [1.0, -1.0, -1.0, 1.0])
    trainer = Trainer(policy, config)
    first = trainer.step(rows)
    second = trainer.step(rows)
    assert second["loss"] < first["loss"]
    assert metrics_ok(batch_metrics(rows))


def metrics_ok(metrics: dict[str, float]) -> bool:
    return metrics["accuracy"] == 0.5 and metrics["num_prompts"] == 1 and metrics["response_length_max"] == 5


def test_warmup_then_constant_lr() -> None:
    config = TrainConfig(lr=1e-3, warmup_steps=3, prompts_per_step=1, mini_batch_prompts=1)
    trainer = Trainer(tiny_policy(), config)
    rates = []
    for _ in range(5):
        rates.append(trainer.scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert rates == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_sampler_logprobs_missing_is_a_clear_error() -> None:
    tree = binary_tree()
    for node in tree.nodes:
        node.logprobs = None
    trainer = Trainer(
        tiny_policy(), TrainConfig(old_logprobs="sampler", prompts_per_step=1, mini_batch_prompts=1)
    )
    with pytest.raises(ValueError, match="return_logprobs"):
        trainer.step(rows_from_tree(tree, [1.0, -1.0, -1.0, -1.0]))


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"lr": 0}, "lr must be > 0"), ({"advantage": "ppo"}, "expected one of treepo, grpo"),
     ({"mini_batch_prompts": 64, "prompts_per_step": 8}, "cannot exceed"), ({"max_staleness": -1}, ">= 0"),
     ({"push_every": 3, "max_staleness": 1}, r"push_every \(3\) > max_staleness \+ 1 \(2\)"),
     ({"push_every": 0, "steps": 3, "max_staleness": 1}, "push_every=0 never updates"),
     ({"lost_after_s": 0}, "lost_after_s must be > 0")],
)  # fmt: skip
def test_config_rejects_bad_values(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_push_every_fits_the_staleness_bound() -> None:
    TrainConfig(push_every=2, max_staleness=1)  # trees at most one version old when they arrive
    TrainConfig(push_every=0, steps=2, max_staleness=1)  # never pushing is fine for a run this short


def test_the_default_consumer_name_survives_a_restart(tmp_path) -> None:
    """No pid in it: a restarted trainer (same host, same run directory) reads what its predecessor held."""
    assert default_consumer(str(tmp_path / "a")) == default_consumer(str(tmp_path / "a"))
    assert default_consumer(str(tmp_path / "a")) != default_consumer(str(tmp_path / "b"))
    assert str(os.getpid()) not in default_consumer(str(tmp_path / "a")).split("-")


def test_micro_batches_accumulate_to_the_full_batch_gradient() -> None:
    results = []
    for micro in (1, 3, 16):
        policy = tiny_policy(3)
        config = TrainConfig(lr=1e-2, warmup_steps=0, prompts_per_step=2, mini_batch_prompts=2,
                             micro_batch_rows=micro, grad_clip=0.0)  # fmt: skip
        rows = rows_from_tree(binary_tree("a"), [1.0, -1.0, -1.0, 1.0])
        rows += rows_from_tree(binary_tree("b"), [-1.0, 1.0, -1.0, -1.0])
        Trainer(policy, config).step(rows)
        results.append(torch.cat([p.detach().flatten() for p in policy.model.parameters()]))
    torch.testing.assert_close(results[0], results[2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[1], results[2], atol=1e-5, rtol=1e-4)


def test_single_update_shortcut_equals_an_explicit_recompute(monkeypatch: pytest.MonkeyPatch) -> None:
    results = []
    for shortcut in (True, False):
        policy = tiny_policy(4)
        config = TrainConfig(
            lr=1e-2, warmup_steps=0, prompts_per_step=2, mini_batch_prompts=2, micro_batch_rows=3
        )
        trainer = Trainer(policy, config)
        monkeypatch.setattr(trainer, "_is_single_update", lambda rows, value=shortcut: value)
        rows = rows_from_tree(binary_tree("a"), [1.0, -1.0, -1.0, 1.0])
        rows += rows_from_tree(binary_tree("b"), [-1.0, 1.0, -1.0, -1.0])
        trainer.step(rows)
        assert (rows[0].old_logprobs is None) == shortcut
        results.append(torch.cat([p.detach().flatten() for p in policy.model.parameters()]))
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)


def test_prometheus_series_follow_the_step_records(tmp_path) -> None:
    from prometheus_client import generate_latest

    from treepo.trainer.metrics import MetricsLog, TrainerMetrics

    metrics, log = TrainerMetrics(), MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2):
        record = {"step": step, "reward_mean": 0.5, "accuracy": 0.75, "loss": -0.1, "filtered_prompts": 3,
                  "stale_trees": 1, "trees_consumed": 20, "step_s": 4.0, "weight_push_s": 0.2}  # fmt: skip
        metrics.observe_step(record)
        log.append(record)
    text = generate_latest(metrics.registry).decode()
    for line in ("treepo_trainer_steps_total 2.0", "treepo_trainer_accuracy 0.75",
                 "treepo_trainer_filtered_prompts_total 6.0", "treepo_trainer_stale_trees_total 2.0",
                 "treepo_trainer_trees_consumed_total 40.0", "treepo_trainer_step_duration_seconds_count 2.0",
                 "treepo_trainer_weight_push_duration_seconds_count 2.0"):  # fmt: skip
        assert line in text
    assert [r["step"] for r in log.read()] == [1, 2]
