"""TiktokenTokenizer: a tiktoken rank file plus the special tokens of its model family.

A rank file holds only the mergeable byte sequences; the split regex and the
special tokens come from the family, recognised by the number of ranks
(Llama 3: 128000, Qwen: 151643, cl100k_base: 100256).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from engine.tokenizer.tokenizer import Tokenizer

_LLAMA3_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN_PAT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_CL100K_PAT = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"
)


@dataclass(frozen=True)
class TiktokenFamily:
    """Split regex and special tokens (string -> id) of one family's rank file."""

    name: str
    n_ranks: int
    pat_str: str
    special_tokens: dict[str, int]
    bos_token: str | None
    eos_token: str
    pad_token: str | None


def _llama3() -> TiktokenFamily:
    named = {
        "<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|reserved_special_token_0|>": 2,
        "<|reserved_special_token_1|>": 3, "<|finetune_right_pad_id|>": 4, "<|reserved_special_token_2|>": 5,
        "<|start_header_id|>": 6, "<|end_header_id|>": 7, "<|eom_id|>": 8, "<|eot_id|>": 9, "<|python_tag|>": 10,
    }
    special = {tok: 128000 + i for tok, i in named.items()}
    special.update({f"<|reserved_special_token_{i - 8}|>": 128000 + i for i in range(11, 256)})
    return TiktokenFamily("llama3", 128000, _LLAMA3_PAT, special, "<|begin_of_text|>", "<|end_of_text|>",
                          "<|finetune_right_pad_id|>")


def _qwen() -> TiktokenFamily:
    names = [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
        "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
        "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
        "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
        "</tool_response>", "<think>", "</think>",
    ]
    special = {tok: 151643 + i for i, tok in enumerate(names)}
    return TiktokenFamily("qwen", 151643, _QWEN_PAT, special, None, "<|endoftext|>", "<|endoftext|>")


def _cl100k() -> TiktokenFamily:
    special = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
               "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}
    return TiktokenFamily("cl100k_base", 100256, _CL100K_PAT, special, None, "<|endoftext|>", None)


FAMILIES = {f.n_ranks: f for f in (_llama3(), _qwen(), _cl100k())}


class TiktokenTokenizer(Tokenizer):
    """Special-token strings in text are encoded as their ids (``allowed_special='all'``)."""

    def __init__(self, rank_file: str) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(rank_file)
        family = FAMILIES.get(len(ranks))
        if family is None:
            known = ", ".join(f"{f.name}: {n}" for n, f in FAMILIES.items())
            raise ValueError(
                f"--tokenizer-model {rank_file!r}: {len(ranks)} ranks matches no known tiktoken family ({known})"
            )
        self.family = family
        self.enc = tiktoken.Encoding(family.name, pat_str=family.pat_str, mergeable_ranks=ranks,
                                     special_tokens=family.special_tokens)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special="all")

    def encode_pair(self, prompt: str, answer: str) -> tuple[list[int], int]:
        """Counts the prompt's tokens from their bytes (a token is a byte string): exact."""
        ids = self.encode(prompt + answer)
        limit, end, n = len(prompt.encode("utf-8")), 0, 0
        for token in ids:
            end += len(self.enc.decode_single_token_bytes(token))
            if end > limit:
                break
            n += 1
        return ids, n

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def token_to_id(self, token: str) -> int | None:
        special = self.family.special_tokens.get(token)
        if special is not None:
            return special
        try:
            return self.enc.encode_single_token(token)
        except KeyError:
            return None

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def bos_token(self) -> str | None:
        return self.family.bos_token

    @property
    def eos_token(self) -> str:
        return self.family.eos_token

    @property
    def pad_id(self) -> int:
        return self.token_to_id(self.family.pad_token) if self.family.pad_token else self.eos_id
