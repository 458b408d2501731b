"""Supervised training and sampled evaluation of the tiny model on the built-in arithmetic task.

Training stops early once sampled held-out accuracy (temperature 1.0) reaches a middling target, so the
shipped checkpoint leaves RL room to improve.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from treepo.service.task import Problem, TaskConfig, check, generate_problems, iter_problems

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that cross-entropy skips (prompt and padding positions)


@dataclass(slots=True)
class TrainConfig:
    """Supervised fine-tuning settings; `max_steps` is a cap, early stopping usually ends sooner."""

    seed: int = 0
    max_steps: int = 4000
    batch_size: int = 32
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    eval_every: int = 50
    # Accuracy jumps within a few dozen steps: once it shows, evaluate densely to stop inside the band.
    dense_eval_every: int = 5
    dense_eval_from: float = 0.05
    num_eval_problems: int = 128
    target_accuracy: float = 0.3
    max_new_tokens: int = 96
    task: TaskConfig = field(default_factory=TaskConfig)

    def __post_init__(self) -> None:
        names = (
            "max_steps",
            "batch_size",
            "eval_every",
            "dense_eval_every",
            "num_eval_problems",
            "max_new_tokens",
        )
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not 0.0 < self.target_accuracy <= 1.0:
            raise ValueError(f"target_accuracy must be in (0, 1], got {self.target_accuracy}.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")


@dataclass(slots=True)
class TrainEvent:
    """One progress report: every step carries the loss, evaluation steps also the accuracy."""

    step: int
    loss: float
    accuracy: float | None = None


@dataclass(slots=True)
class TrainResult:
    steps: int
    final_loss: float
    validation_accuracy: float
    reached_target: bool
    wall_seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, validation accuracy)


# Public API


def encode_batch(tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem]) -> dict[str, torch.Tensor]:
    """Right-padded prompt+solution+EOS ids; labels only on the solution and EOS."""
    rows, label_rows = [], []
    for problem in problems:
        prompt_ids = tokenizer.encode(problem.prompt, add_special_tokens=False)
        solution_ids = tokenizer.encode(problem.solution, add_special_tokens=False)
        solution_ids.append(tokenizer.eos_token_id)
        rows.append(prompt_ids + solution_ids)
        label_rows.append([IGNORE_INDEX] * len(prompt_ids) + solution_ids)
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for index, (row, label_row) in enumerate(zip(rows, label_rows, strict=True)):
        input_ids[index, : len(row)] = torch.tensor(row)
        labels[index, : len(row)] = torch.tensor(label_row)
        attention_mask[index, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 96,
    seed: int | None = None,
) -> list[str]:
    """Decode one response per prompt with `generate` (temperature 0 means greedy)."""
    if seed is not None:
        torch.manual_seed(seed)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generate needs left padding
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = padding_side
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    was_training = model.training
    model.eval()
    output = model.generate(
        **batch,
        **(sampling if temperature > 0 else {"do_sample": False}),
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.train(was_training)
    new_ids = output[:, batch["input_ids"].shape[1] :]  # (B, T_new)
    return tokenizer.batch_decode(new_ids, skip_special_tokens=True)


def sampled_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 96,
    seed: int | None = None,
) -> float:
    """Share of problems whose sampled response passes the exact checker."""
    responses = sample_responses(
        model,
        tokenizer,
        [p.prompt for p in problems],
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    solved = sum(check(text, p.answer) for text, p in zip(responses, problems, strict=True))
    return solved / len(problems)


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: TrainConfig,
    on_event: Callable[[TrainEvent], None] | None = None,
) -> TrainResult:
    """AdamW on prompt+solution batches, evaluating sampled validation accuracy every `eval_every`."""
    torch.manual_seed(config.seed)
    stream = iter_problems("train", seed=config.seed, config=config.task)
    eval_problems = generate_problems("validation", config.num_eval_problems, config.seed, config.task)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, betas=(0.9, 0.98)
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, config.warmup_steps))
    )
    started, history, accuracy, loss = time.perf_counter(), [], 0.0, float("nan")
    is_dense = False
    model.train()
    for step in range(1, config.max_steps + 1):
        batch = encode_batch(tokenizer, [next(stream) for _ in range(config.batch_size)])
        loss = _optimizer_step(model, optimizer, batch)
        schedule.step()
        event = TrainEvent(step=step, loss=loss)
        is_dense = is_dense or accuracy >= config.dense_eval_from  # sticky: the jump is near
        every = config.dense_eval_every if is_dense else config.eval_every
        if step % every == 0 or step == config.max_steps:
            accuracy = sampled_accuracy(
                model, tokenizer, eval_problems, max_new_tokens=config.max_new_tokens, seed=config.seed + step
            )
            history.append((step, accuracy))
            event.accuracy = accuracy
            logger.info("step %d loss %.4f sampled validation accuracy %.3f", step, loss, accuracy)
        if on_event is not None:
            on_event(event)
        if event.accuracy is not None and accuracy >= config.target_accuracy:
            break
    model.eval()
    return TrainResult(
        steps=step,
        final_loss=loss,
        validation_accuracy=accuracy,
        reached_target=accuracy >= config.target_accuracy,
        wall_seconds=time.perf_counter() - started,
        history=history,
    )


# Internal helpers


def _optimizer_step(
    model: PreTrainedModel, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]
) -> float:
    """One AdamW step on the mean token cross-entropy of the solution tokens."""
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())
