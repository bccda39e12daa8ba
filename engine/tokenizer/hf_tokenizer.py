"""PretrainedFromHF: a transformers AutoTokenizer (fast or slow) from a local directory."""

from __future__ import annotations

import json
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
        self._exact_offsets = self.hf.is_fast and not _trims_offsets(self.hf)
        try:
            self._chat_template = self.hf.get_chat_template()  # the default one of a named set, too
        except ValueError:
            self._chat_template = None
        self._template_tokens = dict(self.hf.special_tokens_map)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def encode_pair(self, prompt: str, answer: str) -> tuple[list[int], int]:
        """Counts the prompt's tokens from the fast tokenizer's character offsets: exact."""
        if not self._exact_offsets:
            return super().encode_pair(prompt, answer)
        # the backend's own encode: what encode() runs, without transformers' per-call wrapping
        out = self.hf.backend_tokenizer.encode(prompt + answer, add_special_tokens=False)
        ids, offsets, limit = out.ids, out.offsets, len(prompt)
        n = 0
        while n < len(ids) and offsets[n][1] <= limit:
            n += 1
        return ids, n

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

    @property
    def chat_template(self) -> str | None:
        template = self._chat_template
        return template if isinstance(template, str) and template.strip() else None

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """What ``apply_chat_template(messages, tokenize=False)`` renders, through the function it calls
        (its per-call argument handling costs as much as the rendering)."""
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(conversations=[messages], chat_template=self._chat_template,
                                            **self._template_tokens)
        return rendered[0]


def _trims_offsets(hf) -> bool:
    """Whether a ByteLevel post-processor trims whitespace off the offsets (GPT-2 style): a trimmed
    token end no longer says where the token's text ends, so the prompt count falls back to decoding."""
    processor = hf.backend_tokenizer.post_processor
    if processor is None:
        return False
    processor = json.loads(processor.__getstate__())  # its JSON, without serializing the whole vocabulary
    processors = processor.get("processors", [processor])
    return any(p.get("type") == "ByteLevel" and p.get("trim_offsets") for p in processors)
