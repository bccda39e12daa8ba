"""Templates: token ids equal HF apply_chat_template on the same tokenizer and conversation.

(tests/unit/data/test_template_sweep.py sweeps every registry template over adversarial records.)
"""

import json

import pytest
from transformers import AutoTokenizer

from engine.data.records import Conversation
from engine.data.templates import Template, TemplateFormat, build_chat_encoder, get_template, load_templates
from engine.tokenizer import TokenizerConfig, build_tokenizer

HISTORY = [("Hello! ", "Hi, how can I help?\n"), ("Tell me a story", "Once upon a time, a fox.")]
SYSTEM = "You are a helpful assistant. Answer briefly."
PROMPT = "What is the capital of France?"
ANSWER = "The capital of France is Paris."


def messages(conv: Conversation, answer: str | None = None) -> list[dict]:
    return conv.messages() + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def encode(prompt_type, tokenizer, conv, answer, path=None):
    """(prompt ids, answer ids) of one answer."""
    [(ids, n)] = build_chat_encoder(prompt_type, tokenizer, path).encode(conv, answer)
    return ids[:n], ids[n:]


CASES = [(system, history) for system in (None, SYSTEM) for history in ((), HISTORY)]


@pytest.mark.parametrize("family", ["llama3", "qwen", "qwen3", "mistral"])
@pytest.mark.parametrize("system,history", CASES, ids=["plain", "history", "system", "system+history"])
def test_pair_ids_equal_hf_apply_chat_template(family, system, history, family_tokenizer_dir):
    path = family_tokenizer_dir(family)
    hf = AutoTokenizer.from_pretrained(path)
    conv = Conversation(prompt=PROMPT, system=system, history=history)

    prompt, response = encode(family, build_tokenizer(TokenizerConfig(tokenizer_name_or_path=path)), conv, ANSWER)

    assert prompt + response == hf.apply_chat_template(messages(conv, ANSWER), tokenize=True, return_dict=False)
    # the masked part is exactly what HF renders before the answer
    if family == "mistral":  # no generation prompt: the prompt ends with [/INST] and the answer's " " opener
        expected_prompt = hf.apply_chat_template(messages(conv), tokenize=True, return_dict=False)
        assert response[0] == hf.convert_tokens_to_ids("ĠThe")  # that space merges into the answer's first word
    else:
        expected_prompt = hf.apply_chat_template(messages(conv), tokenize=True, return_dict=False,
                                                 add_generation_prompt=True, enable_thinking=False)
    assert prompt == expected_prompt


def test_llama3_bos_is_written_once(llama3_tokenizer):
    ids, _ = encode("llama3", llama3_tokenizer, Conversation(prompt="hi", system="sys"), "a")
    assert ids.count(llama3_tokenizer.bos_id) == 1 and ids[0] == llama3_tokenizer.bos_id


def test_qwen_default_system_used_only_without_system(family_tokenizer_dir):
    tok = build_tokenizer(TokenizerConfig(tokenizer_name_or_path=family_tokenizer_dir("qwen")))
    assert "You are Qwen" in tok.decode(encode("qwen", tok, Conversation(prompt="hi"), "a")[0])
    assert "You are Qwen" not in tok.decode(encode("qwen", tok, Conversation(prompt="hi", system="Be terse."), "a")[0])


def test_builtin_registry_has_required_prompt_types():
    for name in ("llama3", "llama2", "mistral", "qwen", "qwen3", "chatml", "alpaca", "default", "empty"):
        assert get_template(name).name == name


def test_llama2_puts_system_in_first_user_turn_and_bos_per_turn(llama3_tokenizer):
    # llama2's format only needs <s>/</s> strings; reuse the llama3 tokenizer's text to read the rendering
    text = TemplateFormat(get_template("llama2"), llama3_tokenizer).prompt_text(
        Conversation(prompt="q2", system="S", history=[("q1", "a1")]))
    bos, eos = llama3_tokenizer.bos_token, llama3_tokenizer.eos_token
    assert text == f"{bos}[INST] <<SYS>>\nS\n<</SYS>>\n\nq1 [/INST] a1 {eos}{bos}[INST] q2 [/INST] "


def test_efficient_eos_appends_eos_only_to_the_answer(llama3_tokenizer, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"mine": {"user_format": "U:{content}\n", "assistant_format": "A:{content}\n",
                                         "efficient_eos": True}}))
    prompt, response = encode("mine", llama3_tokenizer, Conversation(prompt="q", history=[("a", "b")]), "r",
                              str(path))
    assert llama3_tokenizer.eos_id not in prompt
    assert response[-1] == llama3_tokenizer.eos_id and response.count(llama3_tokenizer.eos_id) == 1


def test_replace_eos_uses_first_stop_word(llama3_tokenizer):
    assert TemplateFormat(get_template("llama3"), llama3_tokenizer).answer_text("a") == "a<|eot_id|>"


def test_user_template_file_overrides_and_extends(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"llama3": {"user_format": "<u>{content}"}, "new": {}}))
    assert get_template("llama3", str(path)).user_format == "<u>{content}"
    assert get_template("new", str(path)) == Template(name="new")


def test_bad_templates_are_reported(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"x": {"user_fmt": "{content}"}}))
    with pytest.raises(ValueError, match="unknown fields \\['user_fmt'\\]"):
        load_templates(str(path))
    with pytest.raises(ValueError, match="--prompt-type 'nope' is not a known template"):
        get_template("nope")
    with pytest.raises(ValueError, match="user_format must contain"):
        Template(name="x", user_format="no placeholder")


def test_bos_template_needs_a_tokenizer_with_bos(family_tokenizer_dir):
    tok = build_tokenizer(TokenizerConfig(tokenizer_name_or_path=family_tokenizer_dir("qwen")))
    with pytest.raises(ValueError, match="--prompt-type llama3"):
        build_chat_encoder("llama3", tok)


# -- --prompt-type auto ----------------------------------------------------------------------------------


def test_auto_without_a_chat_template_names_the_registry(sp_model):
    tok = build_tokenizer(TokenizerConfig("SentencePieceTokenizer", tokenizer_model=sp_model))
    with pytest.raises(ValueError) as info:
        build_chat_encoder("auto", tok)
    message = str(info.value)
    assert message.startswith("--prompt-type auto: the tokenizer has no chat template") and "\n" not in message
    assert "'llama3'" in message and "'qwen'" in message


def with_chat_template(source_dir, target, template):
    """The tokenizer of ``source_dir`` saved to ``target`` with another chat template."""
    hf = AutoTokenizer.from_pretrained(source_dir)
    hf.chat_template = template
    hf.save_pretrained(target)
    return build_tokenizer(TokenizerConfig(tokenizer_name_or_path=str(target)))


def test_auto_reports_a_template_that_refuses_a_record_or_drops_the_answer(llama3_dir, tmp_path):
    from engine.data.records import RecordError

    tok = with_chat_template(llama3_dir, tmp_path / "strict", (
        "{% for m in messages %}{% if 'forbidden' in m['content'] %}{{ raise_exception('no forbidden words') }}"
        "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"))
    chat = build_chat_encoder("auto", tok)
    assert chat.format.texts(Conversation("q"), ["a"]) == [("user: q\nassistant: ", "a\n")]
    with pytest.raises(RecordError, match="chat template refused this conversation: no forbidden words") as info:
        chat.encode(Conversation("a forbidden question"), "a")
    assert info.value.reason == "template_error"
    tok = with_chat_template(llama3_dir, tmp_path / "users_only",
                             "{% for m in messages if m['role'] == 'user' %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match="--prompt-type auto: .* does not render the final assistant message"):
        build_chat_encoder("auto", tok)


def test_auto_trains_what_the_answer_changes_before_it(family_tokenizer_dir):
    """Qwen3's template moves an answer's <think> part into its think block: the prompt ends where the
    rendering with the answer parts from the rendering with a placeholder, so the reasoning is trained."""
    tok = build_tokenizer(TokenizerConfig(tokenizer_name_or_path=family_tokenizer_dir("qwen3")))
    chat = build_chat_encoder("auto", tok)
    [(prompt, answer), (plain_prompt, plain_answer)] = chat.format.texts(
        Conversation("2+2?"), ["<think>\nadd\n</think>\n\nFour.", "\nFour."])
    assert prompt == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert answer == "add\n</think>\n\nFour.<|im_end|>\n"
    assert plain_prompt == prompt + "\n</think>\n\n" and plain_answer == "Four.<|im_end|>\n"
