"""SentencePieceTokenizer: a raw ``.model`` file (Llama 2, Mistral v1-v3 style)."""

from __future__ import annotations

from typing import Iterable

from engine.tokenizer.tokenizer import Tokenizer, special_token_splitter


class SentencePieceTokenizer(Tokenizer):
    """Control pieces written in text (``<s>``, ``[INST]`` in Mistral v3) map to their ids.

    SentencePiece puts a word-boundary marker before every span it encodes; a
    single leading space in a span is taken to be that marker rather than an
    extra one (what HF's Metaspace pre-tokenizer does), so the template text
    ``" [INST] q [/INST]"`` encodes like mistral-common's ``encode("[INST] q [/INST]")``.
    """

    def __init__(self, model_file: str) -> None:
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        n = self.sp.get_piece_size()
        self._special = {
            self.sp.id_to_piece(i): i for i in range(n) if self.sp.is_control(i) and self.sp.id_to_piece(i)
        }
        for name, i in (("bos", self.sp.bos_id()), ("eos", self.sp.eos_id())):
            if i < 0:
                raise ValueError(f"--tokenizer-model {model_file!r}: SentencePiece model has no {name} piece")
            self._special.setdefault(self.sp.id_to_piece(i), i)
        self._splitter = special_token_splitter(self._special)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for chunk in self._splitter.split(text):
            if not chunk:
                continue
            special = self._special.get(chunk)
            if special is not None:
                ids.append(special)
            else:
                ids.extend(self.sp.encode(chunk[1:] if chunk.startswith(" ") else chunk))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        out, run = [], []
        for i in ids:
            if self.sp.is_control(i):
                out.append(self.sp.decode(run))
                out.append(self.sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_token(self) -> str:
        return self.sp.id_to_piece(self.sp.bos_id())

    @property
    def eos_token(self) -> str:
        return self.sp.id_to_piece(self.sp.eos_id())

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
