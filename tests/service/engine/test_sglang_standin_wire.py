"""The stand-in answers every exchange recorded from the real SGLang server the way the real one did."""

from __future__ import annotations

import socket

import pytest
import sglang_wire
from sglang_standin import ModelTokens, StandinState, serve

from treepo.service.tinymodel import default_model_path


@pytest.fixture(scope="module")
def standin_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    state = StandinState(
        tokens=ModelTokens(str(default_model_path())),
        eos_token_ids=(0,),
        context_len=512,
        token_delay_s=0.001,
    )
    with serve(state, port) as url:
        yield url


@pytest.mark.parametrize("name", sorted(sglang_wire.SCENARIOS))
def test_standin_answers_as_the_real_server(standin_url, name) -> None:
    recorded = sglang_wire.load(name)
    replayed = sglang_wire.run(standin_url, name, default_model_path())
    assert sglang_wire.summary(replayed) == sglang_wire.summary(recorded)
