"""Tiny tokenizers shared by the data tests, built once per session (about a second)."""

import pytest

from engine.tokenizer import TokenizerConfig, build_tokenizer
from tests.assets import build_family_tokenizer_dir, build_sentencepiece_model


@pytest.fixture(scope="session")
def family_tokenizer_dir(tmp_path_factory):
    """family name -> directory of a tiny HF tokenizer carrying that family's chat template."""
    root = tmp_path_factory.mktemp("tokenizers")
    cache = {}

    def get(family: str) -> str:
        if family not in cache:
            cache[family] = build_family_tokenizer_dir(root / family, family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def llama3_dir(family_tokenizer_dir):
    return family_tokenizer_dir("llama3")


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_dir):
    return build_tokenizer(TokenizerConfig(tokenizer_name_or_path=llama3_dir))


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    return build_sentencepiece_model(tmp_path_factory.mktemp("sp") / "tiny.model")
