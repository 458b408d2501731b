"""The sampling benchmark's bookkeeping (the timed runs themselves are not tests)."""

from __future__ import annotations

import pytest
import typer
from sampler_helpers import EOS, PROMPT, decode, eos_at, no_eos

from treepo.client.schema import SamplingParams, TreeParams
from treepo.service.bench.sampling import RANDOM_25M_SHAPE, parse_shapes
from treepo.service.bench.sampling_run import RunStats, ratios, run_mode
from treepo.service.engine.scripted import ScriptedEngine


def test_parse_shapes() -> None:
    assert parse_shapes("4x16, 8X8,") == [(4, 16), (8, 8)]
    assert parse_shapes("") == []
    for bad in ("4by16", "0x8", "4x"):
        with pytest.raises(typer.BadParameter):
            parse_shapes(bad)


@pytest.mark.parametrize("script", [no_eos(), eos_at(6)])
async def test_tree_vs_sequential_on_a_scripted_engine(script) -> None:
    engine = ScriptedEngine(script, eos_token_id=EOS, latency_s=0.001)  # requests overlap in flight
    tree = TreeParams(width=8, segment_tokens=4, max_depth=4)
    sampling = SamplingParams()
    prompts = [PROMPT, [9, *PROMPT]]
    kwargs = {"seed": 0, "kv_bytes_per_token": 10}
    seq = await run_mode(engine, decode, prompts, tree, sampling, sequential=True, **kwargs)
    sync = await run_mode(engine, decode, prompts, tree, sampling, sequential=False, **kwargs)
    assert seq.trajectories == sync.trajectories == 16
    assert seq.decoded_tokens == seq.independent_tokens
    assert sync.decoded_tokens < seq.decoded_tokens  # shared prefixes are decoded once
    assert seq.peak_concurrent_sequences == 16 and seq.engine_calls == 16  # one request per trajectory
    assert sync.engine_calls > sync.trajectories / 2  # one request per segment
    result = ratios(sync, seq)
    assert result["decoded_tokens"] == sync.decoded_tokens / seq.decoded_tokens
    assert result["efficiency"] == pytest.approx(result["traj_per_s"] * result["decoded_tokens"])


def test_ratios_report_forward_passes_and_kv() -> None:
    def stats(passes: int, peak: int) -> RunStats:
        return RunStats(
            trajectories=4, decoded_tokens=10, independent_tokens=10, prefill_tokens=0, cached_tokens=0,
            engine_calls=4, forward_passes=passes, wall_s=1.0, cpu_s=1.0, peak_concurrent_sequences=4,
            peak_running_rows=4,
            peak_kv_tokens=peak, peak_kv_bytes=8 * peak, kv_token_steps=passes * peak,
        )  # fmt: skip

    result = ratios(stats(passes=30, peak=50), stats(passes=60, peak=200))
    assert result["forward_passes"] == 0.5 and result["peak_kv_bytes"] == 0.25
    assert result["kv_token_steps"] == 0.125


def test_random_25m_stand_in_has_about_25m_parameters() -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from treepo.service.tinymodel import default_model_path

    vocab = len(AutoTokenizer.from_pretrained(default_model_path()))  # the shipped tokenizer
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, **RANDOM_25M_SHAPE))
    assert 24e6 <= sum(p.numel() for p in model.parameters()) <= 26e6


def test_bench_sampling_rejects_an_unknown_regime() -> None:
    from typer.testing import CliRunner

    from treepo.service.cli import app

    result = CliRunner().invoke(app, ["bench", "sampling", "--regime", "fast"], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "throughput, latency" in result.output


def test_bench_sampling_rejects_a_kv_budget_smaller_than_one_trajectory() -> None:
    from typer.testing import CliRunner

    from treepo.service.cli import app

    args = ["bench", "sampling", "--max-kv-tokens", "64", "--repeats", "1", "--shapes", ""]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "cannot hold one trajectory" in result.output
    assert "raise it to at least" in result.output


def test_bench_sampling_draws_the_kv_trace(tmp_path) -> None:
    from typer.testing import CliRunner

    from treepo.service.cli import app

    png = tmp_path / "kv.png"
    args = [
        "bench",
        "sampling",
        "--prompts",
        "2",
        "--width",
        "4",
        "--max-running-rows",
        "4",
        "--repeats",
        "1",
    ]
    result = CliRunner().invoke(app, [*args, "--shapes", "", "--json", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "kv_trace" not in result.output  # drawn, not printed


@pytest.mark.parametrize(
    ("plot", "extra", "message"),
    [
        ("kv.png", ["--engine", "sglang"], "SGLang does not report it"),
        ("missing/kv.png", [], "give a file in an existing directory"),
        (".", [], "give a file in an existing directory"),
        ("kv.txt", [], "name it .png"),
    ],
)
def test_bench_sampling_plot_errors_come_before_the_runs(tmp_path, plot, extra, message) -> None:
    from typer.testing import CliRunner

    from treepo.service.cli import app

    args = ["bench", "sampling", "--plot", str(tmp_path / plot), *extra]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 2 and message in result.output
