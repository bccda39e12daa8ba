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
        return self.encode_pair(text, "")[0]

    def encode_pair(self, prompt: str, answer: str) -> tuple[list[int], int]:
        """Counts the prompt's tokens exactly: chunks between control pieces lie on one side of the
        boundary or, for the one chunk that straddles it, SentencePiece's byte offsets of each piece tell."""
        ids: list[int] = []
        n, start, limit = None, 0, len(prompt)
        for chunk in self._splitter.split(prompt + answer):
            end = start + len(chunk)
            if n is None and start >= limit:
                n = len(ids)
            special = self._special.get(chunk)
            if special is not None:
                if n is None and end > limit:  # a control piece's text cut by the boundary: an answer token
                    n = len(ids)
                ids.append(special)
            elif chunk:
                stripped = chunk.startswith(" ")
                text = chunk[1:] if stripped else chunk
                if n is None and end > limit:  # the boundary falls inside this chunk
                    pieces = _pieces(self.sp, text)
                    inside = len(prompt[start + stripped:].encode("utf-8"))
                    n = len(ids) + sum(1 for p in pieces if p.end <= inside)
                    ids.extend(p.id for p in pieces)
                else:
                    ids.extend(self.sp.encode(text))
            start = end
        return ids, len(ids) if n is None else n

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


def _pieces(sp, text: str):
    """The pieces of ``text`` with their byte offsets in it (sentencepiece >= 0.2.1 calls that output
    ``proto``; 0.2.0 only had ``immutable_proto``)."""
    try:
        return sp.encode(text, out_type="proto").pieces
    except ValueError:
        return sp.encode(text, out_type="immutable_proto").pieces
