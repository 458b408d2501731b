"""Checkpoints: model (safetensors), optimizer + LR schedule, step, policy version and consumer state.

A checkpoint directory is written under a temporary name and renamed into place, so a crash leaves either
the previous checkpoint or the new one, never half of one. The consumer state records which stream
entries the checkpointed steps consumed: they are XACKed only after the rename, and a resumed trainer
re-commits them (ledger add + XACK are idempotent), so a crash between checkpoint and XACK loses nothing
and trains nothing twice.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"


@dataclass(slots=True)
class TrainerState:
    """What besides tensors a resumed run needs."""

    step: int = 0
    policy_version: int = 0
    entry_ids: list[str] = field(default_factory=list)  # consumed by checkpointed steps, to XACK
    tree_ids: list[str] = field(default_factory=list)  # their trees, to add to the ledger
    consumer: str = ""  # the consumer name that claimed them (commit checks the claim)
    version_gaps: list[tuple[int, int]] = field(default_factory=list)  # see TreeConsumer.staleness
    extra: dict = field(default_factory=dict)


def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:07d}"


def save_checkpoint(
    root: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    state: TrainerState,
    *,
    keep: int = 2,
) -> Path:
    """Write one checkpoint atomically and prune old ones (keeping `keep`)."""
    final = checkpoint_dir(root, state.step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / MODEL_FILE))
    optim = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None}
    torch.save(optim, tmp / OPTIMIZER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state)))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _prune(Path(root), keep)
    logger.info("checkpoint step %d -> %s", state.step, final)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = _complete(root)
    return done[-1] if done else None


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
) -> TrainerState:
    """Restore tensors in place and return the saved state."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{path} is not a checkpoint directory (no {STATE_FILE}); pass a step-* directory")
    missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=True)
    assert not missing and not unexpected, f"{missing=} {unexpected=}"
    optim = torch.load(path / OPTIMIZER_FILE, weights_only=True)
    optimizer.load_state_dict(optim["optimizer"])
    if scheduler is not None and optim["scheduler"] is not None:
        scheduler.load_state_dict(optim["scheduler"])
    state = read_state(path)
    logger.info("resumed from %s at step %d", path, state.step)
    return state


def read_state(path: str | Path) -> TrainerState:
    """The non-tensor state of a checkpoint directory (step, version, consumer, uncommitted entries)."""
    state = TrainerState(**json.loads((Path(path) / STATE_FILE).read_text()))
    state.version_gaps = [(int(first), int(last)) for first, last in state.version_gaps]
    return state


def _complete(root: Path) -> list[Path]:
    return sorted(
        p for p in root.glob("step-*") if p.suffix != ".tmp" and p.is_dir() and (p / STATE_FILE).is_file()
    )


def _prune(root: Path, keep: int) -> None:
    for old in _complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
