"""Checkpoints and the XACK-after-checkpoint rule, against the real Redis and a real service (uvicorn)."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from test_trainer import binary_tree  # tests/trainer is on sys.path (pytest rootdir imports)
from tiny_models import byte_model  # tests/ too

from treepo.client.constants import trained_ledger, trees_stream
from treepo.service.app import create_app
from treepo.service.config import Settings
from treepo.service.server import BackgroundServer
from treepo.trainer.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from treepo.trainer.config import TrainConfig
from treepo.trainer.loop import build_run
from treepo.trainer.policy import Policy
from treepo.trainer.trainer import Trainer, rows_from_tree


def coin_reward(response_text: str, metadata: dict) -> float:
    """A deterministic +-1 reward for the scripted engine's random text (so groups are mixed)."""
    return 1.0 if zlib.crc32(response_text.encode()) % 2 else -1.0


def test_resume_restores_step_optimizer_and_schedule(tmp_path: Path) -> None:
    config = TrainConfig(lr=1e-2, warmup_steps=5, prompts_per_step=1, mini_batch_prompts=1)
    model_dir = byte_model(tmp_path / "model")
    trainer = Trainer(Policy.from_pretrained(model_dir), config)
    trainer.step(rows_from_tree(binary_tree(), [1.0, -1.0, -1.0, 1.0]))
    state = TrainerState(step=1, policy_version=1, entry_ids=["1-0"], tree_ids=["t0"])
    path = save_checkpoint(
        tmp_path / "ckpt", trainer.policy.model, trainer.optimizer, trainer.scheduler, state
    )
    assert latest_checkpoint(tmp_path / "ckpt") == path

    fresh = Trainer(Policy.from_pretrained(model_dir), config)
    restored = load_checkpoint(path, fresh.policy.model, fresh.optimizer, fresh.scheduler)
    assert restored == state
    for old, new in zip(trainer.policy.model.parameters(), fresh.policy.model.parameters(), strict=True):
        torch.testing.assert_close(old, new)
    old_state, new_state = trainer.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert old_state.keys() == new_state.keys()
    for key in old_state:
        torch.testing.assert_close(old_state[key]["exp_avg_sq"], new_state[key]["exp_avg_sq"])
    assert fresh.scheduler.get_last_lr() == trainer.scheduler.get_last_lr()
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path, fresh.policy.model, fresh.optimizer, fresh.scheduler)


def test_checkpoints_are_pruned_and_tmp_dirs_ignored(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model, optimizer, None, TrainerState(step=step), keep=2)
    (tmp_path / "step-0000009.tmp").mkdir()  # a crash while writing step 9
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [
        "step-0000002",
        "step-0000003",
        "step-0000009.tmp",
    ]
    assert latest_checkpoint(tmp_path).name == "step-0000003"


@pytest.fixture
def scripted_service(redis_url: str, key_prefix: str, free_port: int, tmp_path: Path) -> Iterator[Settings]:
    settings = Settings(engine="scripted", redis_url=redis_url, key_prefix=key_prefix, port=free_port,
                        weights_dir=tmp_path / "weights")  # fmt: skip
    settings.weights_dir.mkdir()
    with BackgroundServer(create_app(settings), port=free_port):
        yield settings


def loop_config(settings: Settings, tmp_path: Path, **changes) -> TrainConfig:
    fields = dict(
        model_path=str(byte_model(tmp_path / "model")), service_url=f"http://127.0.0.1:{settings.port}",
        redis_url=settings.redis_url, key_prefix=settings.key_prefix, group="job", consumer="trainer-0",
        output_dir=str(tmp_path / "run"), weights_dir=str(settings.weights_dir), steps=4, lr=1e-3,
        warmup_steps=0, prompts_per_step=2, mini_batch_prompts=2, width=4, branch=2, segment_tokens=6,
        max_depth=3, reward="test_checkpoint:coin_reward", checkpoint_every=2, max_staleness=100,
        inflight_batches=1,
    )  # fmt: skip
    return TrainConfig(**{**fields, **changes})


def test_xack_only_after_checkpoint_and_a_crash_redelivers_once(
    scripted_service: Settings, tmp_path: Path, redis_url: str
) -> None:
    config = loop_config(scripted_service, tmp_path)
    db = redis.Redis.from_url(redis_url, decode_responses=True)
    stream, ledger = trees_stream(config.key_prefix), trained_ledger(config.group, config.key_prefix)

    def trained() -> set[str]:
        return {tree_id for tree_id, state in db.hgetall(ledger).items() if state == "done"}

    run = build_run(config)
    run.feeder.start()
    run.step()  # step 1: trained, not checkpointed -> nothing acked, nothing in the ledger
    first = set(run.state.tree_ids)
    assert len(first) == 2 and not trained()
    assert db.xpending(stream, config.group)["pending"] >= 2
    run.step()  # step 2: checkpoint, then ack + ledger
    assert len(trained()) == 4 and first <= trained() and run.state.tree_ids == []
    run.step()  # step 3: trained, then the process dies before its checkpoint
    lost = set(run.state.tree_ids)
    run.feeder.stop()
    assert len(lost) == 2 and not lost & trained()

    resumed = build_run(config, resume=True)  # same consumer name: it re-reads what it held
    assert resumed.state.step == 2 and resumed.state.policy_version > 3
    resumed.feeder.start()
    resumed.step()
    assert set(resumed.state.tree_ids) == lost, "the lost step's trees come back, and only they"
    resumed.step()  # step 4: checkpoint + ack
    resumed.feeder.stop()
    assert len(trained()) == 8, "4 surviving steps x 2 trees, none twice"
    assert lost <= trained()
    assert db.xpending(stream, config.group)["pending"] == 0
    records = resumed.log.read()
    assert [r["step"] for r in records] == [1, 2, 3, 3, 4]
    assert sum(r["duplicate_trees"] for r in records) == 0


def test_a_reward_that_cannot_tell_leaves_apart_stops_the_run(
    scripted_service: Settings, tmp_path: Path
) -> None:
    # The scripted engine writes random characters: the toy checker marks every leaf wrong.
    config = loop_config(scripted_service, tmp_path, reward="toy", max_gen_batches=2)
    run = build_run(config)
    run.feeder.start()
    try:
        with pytest.raises(RuntimeError, match=r"kept none.*all wrong \d+.*cannot tell the leaves apart"):
            run.step()
    finally:
        run.feeder.stop()
