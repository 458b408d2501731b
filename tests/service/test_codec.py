"""The fast segment decoder gives transformers' text, or falls back to transformers' decode."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from treepo.service.codec import HFCodec, decoder
from treepo.service.tinymodel import default_model_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_fast_decoder_matches_transformers(tokenizer, skip_special_tokens):
    decode = decoder(tokenizer, skip_special_tokens=skip_special_tokens)
    rng = random.Random(0)
    for _ in range(500):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(0, 24))]
        assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_clean_up_of_spaces_keeps_transformers_decode(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "clean_up_tokenization_spaces", True)
    calls = []
    original = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: calls.append(ids) or original(ids, **kw))
    decoder(tokenizer, skip_special_tokens=False)([5, 6])
    assert calls == [[5, 6]]


def test_codec_round_trips_text():
    codec = HFCodec(str(default_model_path()))
    assert codec.decode(codec.encode("12+34=46")) == "12+34=46"
