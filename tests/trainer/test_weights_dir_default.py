"""`treepo serve` and `treepo train` agree on the weights directory by default (the first push finds the file)."""

from __future__ import annotations

from pathlib import Path

from treepo.service.config import Settings
from treepo.trainer.config import TrainConfig


def test_serve_and_train_share_the_default_weights_dir(monkeypatch) -> None:
    monkeypatch.delenv("TREEPO_WEIGHTS_DIR", raising=False)
    assert Path(TrainConfig().weights_dir) == Settings().weights_dir
