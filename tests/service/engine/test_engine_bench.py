"""`treepo bench engine --json` on a tiny model: one JSON object with the agreed keys."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from treepo.service.cli import app


def test_bench_engine_prints_one_json_object(tiny_model_path):
    args = ["bench", "engine", "--json", "--model", str(tiny_model_path), "--batch", "3", "--new-tokens", "4"]
    args += ["--prompt-tokens", "6", "--prefix-tokens", "20", "--repeats", "1", "--threads", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["embedded"]["tokens_per_s"] > 0 and report["hf_generate"]["tokens_per_s"] > 0
    assert report["model"]["layers"] == 2 and report["peak_rss_bytes"] > 0
    prefix = report["prefix"]
    assert prefix["requests"] == 3 and prefix["prefill_tokens_total"] == 3 * 28
    assert prefix["prefill_tokens_computed"] == prefix["unique_tokens"] == 20 + 3 * 8
    assert report["segment"]["prefill_tokens_computed"] == 3  # cached paths: one token each


def test_bench_engine_rejects_a_missing_model(tmp_path):
    result = CliRunner().invoke(app, ["bench", "engine", "--model", str(tmp_path)], env={"COLUMNS": "400"})
    assert result.exit_code == 2  # a usage error, not a crash
    assert "config.json missing" in result.output
