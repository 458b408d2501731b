"""The project's own tiny model: a character-level tokenizer and a ~1M-parameter Qwen2 causal LM.

`treepo init-model` trains both on the built-in arithmetic task and saves standard Hugging Face files,
so every consumer loads it with `AutoModelForCausalLM.from_pretrained(path)`, the same code that loads
a real model. The shipped checkpoint lives inside the package (`default_model_path()`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from treepo.service.task import TaskConfig, generate_problems

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from treepo.service.tinymodel_train import TrainEvent

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
# Messages are rendered as their contents back to back: a one-message chat equals the raw task prompt.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
SUMMARY_FILE = "training_summary.json"
# Narrower than the 128-wide sketch in DESIGN.md: on 2 shared CPU cores this 0.3M-parameter shape
# reaches the target accuracy in ~900 steps, about 4x cheaper per step.
MODEL_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
}


# Public API


def default_model_path() -> Path:
    """Directory of the checkpoint shipped with treepo-service."""
    return Path(__file__).resolve().parent / "assets" / "tiny-arith"


def load_model(path: str | Path | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) from a local Hugging Face directory, the shipped checkpoint by default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else default_model_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"No model at {path} (config.json missing); run `treepo init-model --output {path}`."
        )
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def build_tokenizer(corpus: Iterable[str]) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE tokenizer with no merges: one token per character of ASCII text.

    Qwen2 checkpoints load through `Qwen2Tokenizer`, which rebuilds a byte-level pipeline from the
    vocabulary; a merge-free byte-level vocabulary is exactly what that pipeline expects, so the
    tokenizer behaves the same whether it is built here or loaded with `AutoTokenizer`.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # all 256 bytes: nothing is ever unknown
    trainer = trainers.BpeTrainer(
        vocab_size=len(SPECIAL_TOKENS) + len(alphabet),  # room for the alphabet only: no merges
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(
    tokenizer: PreTrainedTokenizerBase, seed: int, shape: dict[str, int] | None = None
) -> PreTrainedModel:
    """A randomly initialised Qwen2ForCausalLM with tied embeddings sized for `tokenizer`."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    special = {
        "bos_token_id": tokenizer.eos_token_id,  # like Qwen: no BOS is prepended, EOS doubles as BOS
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    shape = {**MODEL_SHAPE, **(shape or {})}
    config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True, **shape, **special)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(**special, max_new_tokens=96)
    return model


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output: Path, summary: dict
) -> None:
    """Standard HF files (config, safetensors, tokenizer, generation config) plus a training summary."""
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def init_model(
    output: Annotated[Path | None, typer.Option(help="Directory to write the checkpoint to.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of data, initialisation and evaluation.")] = 0,
    steps: Annotated[int, typer.Option(help="Cap on optimizer steps (early stopping ends sooner).")] = 4000,
    batch_size: Annotated[int, typer.Option(help="Problems per optimizer step.")] = 32,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 3e-3,
    eval_every: Annotated[int, typer.Option(help="Steps between sampled validation evaluations.")] = 50,
    eval_problems: Annotated[int, typer.Option(help="Validation problems per evaluation.")] = 128,
    target_accuracy: Annotated[
        float, typer.Option(help="Stop once sampled validation accuracy (temperature 1) reaches this.")
    ] = 0.3,
    test_problems: Annotated[int, typer.Option(help="Test problems for the final accuracy report.")] = 256,
    min_ops: Annotated[int, typer.Option(help="Difficulty: fewest operations per problem.")] = 3,
    max_ops: Annotated[int, typer.Option(help="Difficulty: most operations per problem.")] = 5,
    max_operand: Annotated[int, typer.Option(help="Difficulty: largest operand (smallest is 1).")] = 9,
    hidden_size: Annotated[int, typer.Option(help="Model width.")] = MODEL_SHAPE["hidden_size"],
    num_layers: Annotated[int, typer.Option(help="Transformer layers.")] = MODEL_SHAPE["num_hidden_layers"],
    intermediate_size: Annotated[int, typer.Option(help="MLP width.")] = MODEL_SHAPE["intermediate_size"],
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 keeps torch's default).")] = 0,
) -> None:
    """Train the tiny character-level Qwen2 model on the arithmetic task and save it in HF format."""
    import torch

    from treepo.service.tinymodel_train import TrainConfig

    output = output if output is not None else default_model_path()
    try:
        task = TaskConfig(min_ops=min_ops, max_ops=max_ops, max_operand=max_operand)
        config = TrainConfig(
            seed=seed,
            max_steps=steps,
            batch_size=batch_size,
            learning_rate=lr,
            eval_every=eval_every,
            num_eval_problems=eval_problems,
            target_accuracy=target_accuracy,
            task=task,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    if test_problems < 1:
        raise typer.BadParameter(f"--test-problems must be >= 1, got {test_problems}.")
    if threads > 0:
        torch.set_num_threads(threads)
    shape = {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": intermediate_size,
    }
    if min(shape.values()) < 1 or hidden_size % MODEL_SHAPE["num_attention_heads"]:
        raise typer.BadParameter(f"Model sizes must be >= 1 and hidden_size a multiple of 4, got {shape}.")
    summary = _train_and_report(config, test_problems, shape)
    save_model(*summary.pop("_artifacts"), output, summary)
    _console().print(f"[green]Saved[/green] {output}  ({json.dumps(summary)})")


# Internal helpers


def _console():
    from rich.console import Console

    return Console()


def _train_and_report(config, num_test_problems: int, shape: dict[str, int]) -> dict:
    """Build tokenizer and model, train with a rich progress bar, then measure test accuracy."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from treepo.service.tinymodel_train import sampled_accuracy, train

    started = time.perf_counter()
    corpus = generate_problems("train", 2000, config.seed, config.task)
    tokenizer = build_tokenizer(p.prompt + p.solution for p in corpus)
    model = build_model(tokenizer, config.seed, shape)
    num_params = sum(p.numel() for p in model.parameters())
    _console().print(f"Qwen2 with {num_params:,} parameters, vocabulary {len(tokenizer)}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=_console()) as progress:
        bar = progress.add_task("training", total=config.max_steps)
        state = {"accuracy": "n/a"}

        def on_event(event: TrainEvent) -> None:
            if event.accuracy is not None:
                state["accuracy"] = f"{event.accuracy:.2f}"
                line = f"step {event.step}: loss {event.loss:.4f}, accuracy {event.accuracy:.3f}"
                progress.console.print(line)
            description = f"loss {event.loss:.3f} · sampled val acc {state['accuracy']}"
            progress.update(bar, completed=event.step, description=description)

        result = train(model, tokenizer, config, on_event)
    test_set = generate_problems("test", num_test_problems, config.seed, config.task)
    test_accuracy = sampled_accuracy(model, tokenizer, test_set, seed=config.seed)
    return {
        "seed": config.seed,
        "steps": result.steps,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "num_parameters": num_params,
        "model_shape": shape,
        "task": {
            "min_ops": config.task.min_ops,
            "max_ops": config.task.max_ops,
            "max_operand": config.task.max_operand,
        },
        "final_loss": round(result.final_loss, 4),
        "validation_accuracy": result.validation_accuracy,
        "reached_target": result.reached_target,
        "test_sampled_accuracy": test_accuracy,
        "num_test_problems": num_test_problems,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "history": result.history,
        "_artifacts": (model, tokenizer),
    }
