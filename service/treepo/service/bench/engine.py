"""`treepo bench engine`: the embedded engine against transformers `generate`, measured in one run.

Both decode the same prompts on the same model object with the same sampling settings and the same
number of new tokens (EOS ignored on both sides, so every row runs to full length). The prefix part
sends requests that share a long common prefix and reports how many prefill tokens were computed.
"""

from __future__ import annotations

import json
import logging
import random
import resource
import statistics
import time
from pathlib import Path
from typing import Annotated, Any

import typer

logger = logging.getLogger(__name__)


def bench_engine(
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
    model: Annotated[
        Path | None, typer.Option(help="Local HF model dir (default: the shipped tiny model).")
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Requests per batch.")] = 16,
    new_tokens: Annotated[int, typer.Option(min=1, help="New tokens per request.")] = 64,
    prompt_tokens: Annotated[
        int, typer.Option(min=2, help="Longest prompt; prompts span half to all of it.")
    ] = 32,
    prefix_tokens: Annotated[
        int, typer.Option(min=1, help="Common prefix of the prefix-sharing part.")
    ] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 1.0,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs of each; the median is reported.")] = 3,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    threads: Annotated[int, typer.Option(min=0, help="torch CPU threads (0: torch's default).")] = 1,
    seed: int = 0,
) -> None:
    """Embedded engine tokens/s vs transformers generate, prefix-cache savings and peak memory."""
    import torch

    from treepo.service.engine.embedded import EmbeddedEngine

    if threads:
        torch.set_num_threads(threads)

    path = _model_path(model)
    engine = EmbeddedEngine(path, device=device, max_running_rows=batch, eos_token_ids=())
    longest = max(prompt_tokens, prefix_tokens + 8, prefix_tokens + new_tokens) + new_tokens
    if longest > engine.max_context:
        raise typer.BadParameter(
            f"prefix/prompt tokens + new tokens reach {longest} > the model context {engine.max_context}; "
            "lower --prefix-tokens, --prompt-tokens or --new-tokens"
        )
    rng = random.Random(seed)
    prompts = [
        _random_ids(rng, rng.randint(max(1, prompt_tokens // 2), prompt_tokens), engine) for _ in range(batch)
    ]
    embedded, hf = _throughput(engine, prompts, new_tokens, temperature, repeats)
    result = {
        "device": _device_name(device),
        "model": _model_info(engine, path),
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "temperature": temperature,
        "embedded": embedded,
        "hf_generate": hf,
        "speedup": round(embedded["tokens_per_s"] / hf["tokens_per_s"], 3),
        "speedup_cpu": round(embedded["tokens_per_cpu_s"] / hf["tokens_per_cpu_s"], 3),
        "prefix": _prefix_sharing(engine, rng, batch, prefix_tokens),
        "segment": _next_segment(engine, rng, batch, prefix_tokens, new_tokens, temperature, repeats),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if json_output:
        typer.echo(json.dumps(result))
    else:
        _print_table(result)


def _model_path(model: Path | None) -> Path:
    if model is None:
        from treepo.service.tinymodel import default_model_path

        model = default_model_path()
    if not (model / "config.json").is_file():
        raise typer.BadParameter(
            f"no Hugging Face model at {model} (config.json missing); "
            "pass --model DIR or run `treepo init-model`",
            param_hint="--model",
        )
    return model


def _random_ids(rng: random.Random, n: int, engine: Any) -> list[int]:
    return [rng.randrange(3, engine.vocab_size) for _ in range(n)]


def _throughput(engine: Any, prompts: list[list[int]], new_tokens: int, temperature: float, repeats: int):
    """Median tokens/s of the embedded engine (cold cache each run) and of `generate`, interleaved."""
    from treepo.service.engine.protocol import GenerateRequest

    requests = [
        GenerateRequest(input_ids=p, max_new_tokens=new_tokens, temperature=temperature, seed=i)
        for i, p in enumerate(prompts)
    ]
    hf_inputs = _left_padded(prompts, engine.device)
    run_embedded = lambda: (engine.flush_cache(), engine.generate_sync(requests))[1]  # noqa: E731
    run_hf = lambda: _hf_generate(engine.model, hf_inputs, new_tokens, temperature)  # noqa: E731
    run_embedded(), run_hf()  # warm-up: allocator, kernels, lazy pool
    times: dict[str, list[float]] = {"embedded": [], "hf": []}
    cpu: dict[str, list[float]] = {"embedded": [], "hf": []}  # process CPU time: steadier on a shared host
    for _ in range(repeats):
        for name, fn in (("embedded", run_embedded), ("hf", run_hf)):
            start, cpu_start = time.perf_counter(), time.process_time()
            out = fn()
            _sync(engine.device)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
            tokens = sum(len(o.output_ids) for o in out) if name == "embedded" else out
            assert tokens == len(prompts) * new_tokens, f"{name} decoded {tokens} tokens"
    total = len(prompts) * new_tokens
    return tuple(
        {
            "tokens_per_s": round(total / statistics.median(times[name]), 1),
            "seconds": round(statistics.median(times[name]), 4),
            "tokens_per_cpu_s": round(total / statistics.median(cpu[name]), 1),
        }
        for name in ("embedded", "hf")
    )


def _left_padded(prompts: list[list[int]], device: Any) -> dict[str, Any]:
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _hf_generate(model: Any, inputs: dict[str, Any], new_tokens: int, temperature: float) -> int:
    """transformers generate with EOS off; returns the number of new tokens."""
    import torch
    from transformers import GenerationConfig

    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature else {}
    )
    config = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None, **sampling
    )
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=config)
    return int(out[:, inputs["input_ids"].shape[1] :].numel())


def _prefix_sharing(engine: Any, rng: random.Random, n: int, prefix_tokens: int) -> dict[str, Any]:
    """`n` requests = one common prefix + 8 own tokens, cold cache, one call."""
    from treepo.service.engine.protocol import GenerateRequest

    engine.flush_cache()
    prefix = _random_ids(rng, prefix_tokens, engine)
    inputs = [prefix + _random_ids(rng, 8, engine) for _ in range(n)]
    start = time.perf_counter()
    outs = engine.generate_sync(
        [GenerateRequest(input_ids=ids, max_new_tokens=1, temperature=0) for ids in inputs]
    )
    seconds = time.perf_counter() - start
    return {
        "requests": n,
        "prefill_tokens_total": sum(len(ids) for ids in inputs),
        "prefill_tokens_computed": sum(o.prefill_tokens for o in outs),
        "unique_tokens": len(prefix) + 8 * n,
        "cached_tokens": sum(o.cached_tokens for o in outs),
        "seconds": round(seconds, 4),
    }


def _next_segment(
    engine: Any,
    rng: random.Random,
    n: int,
    prefix_tokens: int,
    new_tokens: int,
    temperature: float,
    repeats: int,
) -> dict[str, Any]:
    """TreePO's next segment: `n` paths (common prefix + own last segment) already in the cache, continued.

    `generate` has no cache across calls, so it prefills every path again; the engine computes 1 token each.
    """
    from treepo.service.engine.protocol import GenerateRequest

    prefix = _random_ids(rng, prefix_tokens, engine)
    paths = [prefix + _random_ids(rng, new_tokens, engine) for _ in range(n)]
    requests = [
        GenerateRequest(input_ids=p, max_new_tokens=new_tokens, temperature=temperature, seed=i)
        for i, p in enumerate(paths)
    ]
    hf_inputs = _left_padded(paths, engine.device)
    times: dict[str, list[float]] = {"embedded": [], "hf": []}
    for _ in range(repeats):
        engine.flush_cache()
        engine.generate_sync(
            [GenerateRequest(input_ids=p, max_new_tokens=1) for p in paths]
        )  # the tree so far
        start = time.perf_counter()
        outs = engine.generate_sync(requests)
        _sync(engine.device)
        times["embedded"].append(time.perf_counter() - start)
        start = time.perf_counter()
        _hf_generate(engine.model, hf_inputs, new_tokens, temperature)
        _sync(engine.device)
        times["hf"].append(time.perf_counter() - start)
    total = n * new_tokens
    return {
        "requests": n,
        "input_tokens": sum(len(p) for p in paths),
        "prefill_tokens_computed": sum(o.prefill_tokens for o in outs),
        "embedded_tokens_per_s": round(total / statistics.median(times["embedded"]), 1),
        "hf_generate_tokens_per_s": round(total / statistics.median(times["hf"]), 1),
    }


def _model_info(engine: Any, path: Path) -> dict[str, Any]:
    config = engine.model.config
    return {
        "path": str(path),
        "architecture": type(engine.model).__name__,
        "parameters": sum(p.numel() for p in engine.model.parameters()),
        "hidden_size": getattr(config, "hidden_size", None),
        "layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": engine.vocab_size,
        "dtype": str(next(engine.model.parameters()).dtype).removeprefix("torch."),
    }


def _device_name(device: str) -> str:
    import os

    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"treepo bench engine: {result['model']['path']} on {result['device']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    prefix = result["prefix"]
    rows = [
        (
            f"embedded tokens/s (batch {result['batch']}, {result['new_tokens']} new)",
            result["embedded"]["tokens_per_s"],
        ),
        ("transformers generate tokens/s", result["hf_generate"]["tokens_per_s"]),
        ("speedup", result["speedup"]),
        ("speedup in tokens per CPU second", result["speedup_cpu"]),
        (f"prefix: {prefix['requests']} requests, prefill tokens total", prefix["prefill_tokens_total"]),
        ("prefix: prefill tokens computed", prefix["prefill_tokens_computed"]),
        ("prefix: unique tokens", prefix["unique_tokens"]),
        ("next segment (cached paths): embedded tokens/s", result["segment"]["embedded_tokens_per_s"]),
        ("next segment: transformers generate tokens/s", result["segment"]["hf_generate_tokens_per_s"]),
        ("peak RSS (MiB)", round(result["peak_rss_bytes"] / 2**20, 1)),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    Console().print(table)
