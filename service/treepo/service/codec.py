"""Text <-> token ids for the service: the model's own tokenizer, or a byte codec for the scripted engine."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from treepo.client.schema import ChatMessage


class Codec(Protocol):
    """What the rollout glue needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


class HFCodec:
    """A Hugging Face tokenizer loaded from a local directory; chat prompts use its chat template."""

    def __init__(self, model_path: str) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._vocab_size = len(self._tokenizer)
        self._decode = decoder(self._tokenizer, skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        if not getattr(self._tokenizer, "chat_template", None):
            raise ValueError(
                "this model's tokenizer has no chat template; send 'text' or 'input_ids' instead"
            )
        rendered = self._tokenizer.apply_chat_template(
            [message.model_dump() for message in messages], tokenize=False, add_generation_prompt=True
        )
        return list(self._tokenizer.encode(rendered, add_special_tokens=False))

    def decode(self, token_ids: list[int]) -> str:
        return self._decode(token_ids)


def decoder(tokenizer: Any, *, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """`tokenizer.decode` for lists of ids, straight to the Rust tokenizer where that gives the same text
    (a fast tokenizer without clean-up of spaces): the sampler decodes every segment, and transformers'
    wrapper costs ~5x the decode itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)


class ByteCodec:
    """UTF-8 bytes shifted by one (id 0 = EOS): a reversible codec for the model-free scripted engine."""

    def __init__(self, vocab_size: int = 257) -> None:
        assert vocab_size >= 257, f"{vocab_size=}"
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        return [byte + 1 for byte in text.encode()]

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        rendered = "".join(f"<{m.role}>{m.content}\n" for m in messages) + "<assistant>"
        return self.encode(rendered)

    def decode(self, token_ids: list[int]) -> str:
        data = bytes(t - 1 for t in token_ids if 1 <= t <= 256)
        return data.decode(errors="replace")
