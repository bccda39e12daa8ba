"""One tokenizer interface over HF, SentencePiece and tiktoken, plus its config.

Templates render chat turns as text that may contain special-token strings
(``<|eot_id|>``, ``</s>``); every backend's ``encode`` turns those strings into
their single ids and never adds BOS/EOS on its own, so the template alone
decides where BOS goes and it is never doubled.
"""

from __future__ import annotations

import abc
import argparse
import re
from typing import Iterable

from engine.arguments import TokenizerConfig
from engine.options import add_options


class Tokenizer(abc.ABC):
    """What preprocessing and training need from a tokenizer."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; special-token strings become their ids; no BOS/EOS added."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, special tokens included."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of a single (usually special) token string, or None if unknown."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocab + added tokens)."""

    @property
    @abc.abstractmethod
    def bos_token(self) -> str | None:
        """BOS string as templates write it, or None (e.g. Qwen has no BOS)."""

    @property
    @abc.abstractmethod
    def eos_token(self) -> str:
        """EOS string as templates write it."""

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        """Padding id; EOS when the tokenizer defines none (padding is masked anyway)."""
        return self.eos_id

    def encode_pair(self, prompt: str, answer: str) -> tuple[list[int], int]:
        """Ids of ``prompt + answer`` tokenized as one text, and how many of them lie wholly inside ``prompt``.

        One text, because that is how a chat template's output is tokenized: a token may straddle
        the boundary (Qwen's ``"\n\n"`` when an answer starts with a newline), and it is then an
        answer token. This generic version needs no offsets: the tokens shared with ``encode(prompt)``
        lie inside the prompt, and so do the following ones while their decoded text stays a prefix of
        it (a pre-tokenizer may split trailing whitespace differently at the end of a text). That is
        exact when decoding a run of tokens gives back their text; a token that does not (part of a
        UTF-8 character) ends the prompt early, training a prompt token. Backends with offsets
        override it with an exact count.
        """
        ids = self.encode(prompt + answer)
        alone = self.encode(prompt)
        n = 0
        while n < min(len(ids), len(alone)) and ids[n] == alone[n]:
            n += 1
        while n < len(ids) and prompt.startswith(self.decode(ids[:n + 1])):
            n += 1
        return ids, n

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's own Jinja chat template (``--prompt-type auto``), if it carries one."""
        return None

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """``messages`` rendered by the chat template as text (what ``apply_chat_template`` tokenizes)."""
        raise NotImplementedError(f"{type(self).__name__} has no chat template")


def special_token_splitter(tokens: Iterable[str]) -> re.Pattern | None:
    """Regex that splits text around the given special-token strings (longest first)."""
    tokens = sorted({t for t in tokens if t}, key=len, reverse=True)
    if not tokens:
        return None
    return re.compile("(" + "|".join(re.escape(t) for t in tokens) + ")")


def add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``tokenizer`` group (declared in engine.arguments.TokenizerConfig)."""
    add_options(parser, TokenizerConfig, "tokenizer")
    return parser


def build_tokenizer(config: TokenizerConfig) -> Tokenizer:
    """Load the configured backend (imports are lazy: transformers is slow to import)."""
    if config.tokenizer_type == "PretrainedFromHF":
        from engine.tokenizer.hf_tokenizer import HFTokenizer

        return HFTokenizer(config.tokenizer_name_or_path, use_fast=not config.tokenizer_not_use_fast)
    if config.tokenizer_type == "SentencePieceTokenizer":
        from engine.tokenizer.sp_tokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer(config.tokenizer_model)
    from engine.tokenizer.tiktoken_tokenizer import TiktokenTokenizer

    return TiktokenTokenizer(config.tokenizer_model)


def vocab_size_of(config: TokenizerConfig) -> int:
    """The tokenizer's vocabulary size: what training uses when --vocab-size is not given."""
    return build_tokenizer(config).vocab_size
