"""One tokenizer interface over HF, SentencePiece and tiktoken, plus its config.

Templates render chat turns as text that may contain special-token strings
(``<|eot_id|>``, ``</s>``); every backend's ``encode`` turns those strings into
their single ids and never adds BOS/EOS on its own, so the template alone
decides where BOS goes and it is never doubled.
"""

from __future__ import annotations

import abc
import argparse
import os
import re
from dataclasses import dataclass
from typing import Iterable

TOKENIZER_TYPES = ("PretrainedFromHF", "SentencePieceTokenizer", "TiktokenTokenizer")


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


def special_token_splitter(tokens: Iterable[str]) -> re.Pattern | None:
    """Regex that splits text around the given special-token strings (longest first)."""
    tokens = sorted({t for t in tokens if t}, key=len, reverse=True)
    if not tokens:
        return None
    return re.compile("(" + "|".join(re.escape(t) for t in tokens) + ")")


@dataclass
class TokenizerConfig:
    """Which tokenizer to load; built once from the ``tokenizer`` argparse group."""

    tokenizer_type: str = "PretrainedFromHF"
    """--tokenizer-type: backend, one of TOKENIZER_TYPES."""
    tokenizer_name_or_path: str | None = None
    """--tokenizer-name-or-path: HF tokenizer directory (PretrainedFromHF)."""
    tokenizer_model: str | None = None
    """--tokenizer-model: SentencePiece .model or tiktoken rank file."""
    tokenizer_not_use_fast: bool = False
    """--tokenizer-not-use-fast: load the slow (Python) HF tokenizer."""

    def __post_init__(self) -> None:
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ValueError(f"--tokenizer-type must be one of {TOKENIZER_TYPES}, got {self.tokenizer_type!r}")
        if self.tokenizer_type == "PretrainedFromHF":
            if not self.tokenizer_name_or_path:
                raise ValueError("--tokenizer-name-or-path is required with --tokenizer-type PretrainedFromHF")
            if not os.path.isdir(self.tokenizer_name_or_path):
                raise ValueError(
                    f"--tokenizer-name-or-path {self.tokenizer_name_or_path!r} is not a directory "
                    "(hub names are not resolved: download the tokenizer first)"
                )
        else:
            if not self.tokenizer_model:
                raise ValueError(f"--tokenizer-model is required with --tokenizer-type {self.tokenizer_type}")
            if not os.path.isfile(self.tokenizer_model):
                raise ValueError(f"--tokenizer-model {self.tokenizer_model!r} is not a file")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TokenizerConfig":
        return cls(
            tokenizer_type=args.tokenizer_type or "PretrainedFromHF",
            tokenizer_name_or_path=args.tokenizer_name_or_path,
            tokenizer_model=args.tokenizer_model,
            tokenizer_not_use_fast=bool(args.tokenizer_not_use_fast),
        )


def add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``tokenizer`` group; defaults are None so a parser may leave it unset."""
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None)
    group.add_argument("--tokenizer-name-or-path", default=None, help="HF tokenizer directory")
    group.add_argument("--tokenizer-model", default=None, help="SentencePiece .model or tiktoken rank file")
    group.add_argument("--tokenizer-not-use-fast", action="store_true", default=None,
                       help="use the slow HF tokenizer")
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
