"""The real server still answers every recorded scenario as recorded (TREEPO_RECORD_SGLANG=1 re-records)."""

from __future__ import annotations

import os

import pytest
import sglang_wire


@pytest.mark.parametrize("name", sorted(sglang_wire.SCENARIOS))
def test_real_server_answers_as_recorded(sglang, model_path, name) -> None:
    exchange = sglang_wire.run(sglang.url, name, model_path)
    if os.environ.get("TREEPO_RECORD_SGLANG") == "1":
        sglang_wire.save(name, exchange)
    recorded = sglang_wire.load(name)
    assert exchange["request"] == recorded["request"], "the scenario changed: re-record its fixture"
    assert sglang_wire.summary(exchange) == sglang_wire.summary(recorded)
