"""The sweep: every registry template against the HF chat template of a tokenizer carrying it.

For each registry template (engine/data/templates.json) a tiny byte-level BPE tokenizer carries the
matching Jinja chat template (tests/assets.py: the models' own for llama3, llama2, mistral, qwen,
qwen3; transcriptions for mistral_v3, chatml, alpaca, default, empty). On adversarial records it
asserts, for both answers of each pair:

- the ids equal ``apply_chat_template(messages + [answer], tokenize=True)``;
- ``--prompt-type auto`` (the same chat template rendered by transformers) gives the same ids and
  the same prompt length;
- the prompt length is the number of tokens whose bytes lie wholly inside the prompt text, counted
  from the tokens' own bytes (not from offsets), the prompt text being what HF renders with
  ``add_generation_prompt=True`` plus the assistant turn's opening text.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from engine.data.records import Conversation
from engine.data.templates import BUILTIN_TEMPLATES_FILE, build_chat_encoder, load_templates
from engine.tokenizer import Tokenizer, TokenizerConfig, build_tokenizer
from tests.assets import TOKENIZER_FAMILIES

REGISTRY = sorted(load_templates(BUILTIN_TEMPLATES_FILE))
ANSWER_HEAD = {"llama2": " ", "mistral": " ", "mistral_v3": " "}
"""What the template writes between the generation prompt and the answer's content."""

LONG_HISTORY = [(f" question {i}\n", f"\nanswer {i} " * (i % 3 + 1)) for i in range(6)]
CASES = {
    "plain": (Conversation("What is 2+2?"), "Four.", "Five."),
    "whitespace": (Conversation("\n\n What is 2+2?\n", "\n Be brief.\t\n", [(" \nHi\n", "\n Hello \n")]),
                   "\nFour.\n\n", "  Five. "),
    "newline_answer": (Conversation("Tell me a story", "You are terse."), "\n\nOnce upon a time.", "No."),
    "empty_system": (Conversation("Hi", ""), " Hello!", "\tHey"),
    "blank_system": (Conversation("Hi", " \n "), "Hello", "Hey\n"),
    "long_history": (Conversation("And now?", "Be kind.", LONG_HISTORY), "Done.\n", "\n\nNot done."),
    "unicode": (Conversation("Ünïcödé: 猫は寝ている 🦊 — «ok»? ", "Réponds en français 🇫🇷"),
                "Le chat dort. 😺\r\n", "Der Hund schläft…"),
}


@pytest.fixture(scope="module")
def family(family_tokenizer_dir):
    """template name -> (HF tokenizer, engine tokenizer), built once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            path = family_tokenizer_dir(name)
            cache[name] = (AutoTokenizer.from_pretrained(path),
                           build_tokenizer(TokenizerConfig(tokenizer_name_or_path=path)))
        return cache[name]

    return get


def token_bytes(hf, ids: list[int]) -> list[bytes]:
    """Each token's bytes, from the byte-level vocabulary (added tokens are their text)."""
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    added = {i: t.content for i, t in hf.added_tokens_decoder.items()}
    return [added[i].encode() if i in added else bytes(byte_of[c] for c in hf.convert_ids_to_tokens(i))
            for i in ids]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tokens_inside(hf, ids: list[int], prompt: str) -> int:
    limit, end = len(prompt.encode()), 0
    for n, piece in enumerate(token_bytes(hf, ids)):
        end += len(piece)
        if end > limit:
            return n
    return len(ids)


def test_every_registry_template_has_a_tokenizer_with_its_chat_template():
    assert set(REGISTRY) == set(TOKENIZER_FAMILIES)


@pytest.mark.parametrize("name", REGISTRY)
def test_registry_template_equals_its_hf_chat_template(name, family):
    hf, tok = family(name)
    registry, auto = build_chat_encoder(name, tok), build_chat_encoder("auto", tok)
    for case, (conv, chosen, rejected) in CASES.items():
        got = registry.encode(conv, chosen, rejected)
        assert auto.encode(conv, chosen, rejected) == got, case
        prompt = hf.apply_chat_template(conv.messages(), tokenize=False, add_generation_prompt=True,
                                        enable_thinking=False) + ANSWER_HEAD.get(name, "")
        for answer, (ids, n) in zip((chosen, rejected), got):
            messages = conv.messages() + [{"role": "assistant", "content": answer}]
            full = hf.apply_chat_template(messages, tokenize=False)
            assert full.startswith(prompt), (case, full, prompt)
            assert ids == hf.apply_chat_template(messages, tokenize=True, return_dict=False), (case, answer)
            assert n == tokens_inside(hf, ids, prompt), (case, answer)


@pytest.mark.parametrize("name", ["qwen", "llama3", "mistral"])
def test_generic_prompt_count_agrees_with_offsets(name, family):
    """The offset-free fallback (Tokenizer.encode_pair) gives what the fast tokenizer's offsets give."""
    _, tok = family(name)
    registry = build_chat_encoder(name, tok)
    for conv, chosen, rejected in CASES.values():
        for prompt, answer in registry.format.texts(conv, [chosen, rejected]):
            assert Tokenizer.encode_pair(tok, prompt, answer) == tok.encode_pair(prompt, answer)


def test_qwen_newline_merge_straddles_the_boundary_and_is_reported(family):
    """An answer starting with "\\n" after "assistant\\n": the tokenizer merges the two newlines (one
    token, as apply_chat_template has it); that token straddles the boundary, so it is an answer token,
    and the rejected answer's prompt keeps its own "\\n" token: the two prompts differ."""
    hf, tok = family("qwen")
    chat = build_chat_encoder("qwen", tok)
    (chosen, n_chosen), (rejected, n_rejected) = chat.encode(Conversation("Hi"), "\nHello", "Hello")
    newline, merged = tok.token_to_id("Ċ"), tok.token_to_id("ĊĊ")
    assert merged is not None and chosen[n_chosen] == merged  # first trained token: "\n" + "\n"
    assert rejected[n_rejected - 1] == newline and n_rejected == n_chosen + 1
    assert chosen == hf.apply_chat_template([{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "\nHello"}], return_dict=False)
