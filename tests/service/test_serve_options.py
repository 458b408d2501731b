"""`treepo serve` engine options: valid values reach the settings, bad ones exit 2 saying how to fix them."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from treepo.service import app as app_module
from treepo.service.cli import app

runner = CliRunner(env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})


class _Captured(Exception):
    pass


def test_engine_options_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_create_app(settings):
        seen["settings"] = settings
        raise _Captured

    monkeypatch.setattr(app_module, "create_app", fake_create_app)
    args = ["serve", "--engine", "scripted", "--max-kv-tokens", "4096", "--max-running-rows", "32"]
    result = runner.invoke(app, [*args, "--dtype", "bfloat16"])
    assert isinstance(result.exception, _Captured), result.output
    settings = seen["settings"]
    assert (settings.max_kv_tokens, settings.max_running_rows, settings.dtype) == (4096, 32, "bfloat16")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-kv-tokens", "10", "greater than or equal to 64"),
        ("--max-running-rows", "0", "greater than or equal to 1"),
        ("--dtype", "fp8", "auto, float32, bfloat16, float16"),
    ],
)
def test_bad_engine_options_exit_2_with_the_fix(option: str, value: str, message: str) -> None:
    result = runner.invoke(app, ["serve", "--engine", "scripted", option, value])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
