"""`treepo bench sampling --engine sglang` against the real server: tree vs sequential on SGLang's radix cache."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from treepo.service.cli import app


def test_bench_sampling_on_sglang_measures_both_modes_on_its_radix_cache(sglang) -> None:
    args = [
        "bench", "sampling", "--engine", "sglang", "--sglang-url", sglang.url, "--regime", "latency",
        "--prompts", "2", "--width", "4", "--repeats", "1", "--shapes", "", "--json",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["engine"] == "sglang" and report["config"]["sglang_version"] == "0.5.23"
    tree, sequential = report["tree"], report["sequential"]
    assert tree["trajectories"] == sequential["trajectories"] == 2 * 4
    # the tree's later segments continue cached paths: SGLang serves their prefixes from its radix cache
    assert tree["cached_tokens"] > sequential["cached_tokens"]
    assert 0 < tree["decoded_tokens"] < tree["independent_tokens"]  # siblings share their prefixes
    assert tree["engine_calls"] > sequential["engine_calls"] == 2 * 4  # one request per segment vs per path
