"""Tokenizers behind one interface: PretrainedFromHF, SentencePieceTokenizer, TiktokenTokenizer."""

from engine.arguments import TOKENIZER_TYPES, TokenizerConfig
from engine.tokenizer.tokenizer import Tokenizer, add_tokenizer_args, build_tokenizer, vocab_size_of

__all__ = ["TOKENIZER_TYPES", "Tokenizer", "TokenizerConfig", "add_tokenizer_args", "build_tokenizer",
           "vocab_size_of"]
