"""Tokenizers behind one interface: PretrainedFromHF, SentencePieceTokenizer, TiktokenTokenizer."""

from engine.tokenizer.tokenizer import (
    TOKENIZER_TYPES,
    Tokenizer,
    TokenizerConfig,
    add_tokenizer_args,
    build_tokenizer,
)

__all__ = ["TOKENIZER_TYPES", "Tokenizer", "TokenizerConfig", "add_tokenizer_args", "build_tokenizer"]
