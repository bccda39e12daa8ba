"""PretrainedFromHF: a transformers AutoTokenizer (fast or slow) from a local directory."""

from __future__ import annotations

from typing import Iterable

from engine.tokenizer.tokenizer import Tokenizer


class HFTokenizer(Tokenizer):
    """Encodes like ``apply_chat_template(tokenize=True)``: added tokens parsed, no auto BOS/EOS."""

    def __init__(self, path: str, use_fast: bool = True) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(path, use_fast=use_fast)
        if self.hf.eos_token is None:
            raise ValueError(f"--tokenizer-name-or-path {path!r}: tokenizer defines no eos_token")
        self._vocab = self.hf.get_vocab()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def bos_token(self) -> str | None:
        return self.hf.bos_token

    @property
    def eos_token(self) -> str:
        return self.hf.eos_token

    @property
    def pad_id(self) -> int:
        return self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_id
