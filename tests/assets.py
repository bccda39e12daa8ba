"""Tiny tokenizers built offline in about a second, for tests anywhere in the suite.

Byte-level BPE tokenizers carry a model family's special tokens and its real
Jinja chat template, so HF ``apply_chat_template`` is the ground truth a test
can compare against. (Tool-calling branches of the Qwen templates are left out:
no test conversation reaches them.) The models' own templates are llama3, Qwen2.5,
Qwen3, Mistral v0.1 and Llama 2; the others (Mistral v3 as mistral-common renders
it, ChatML, and the registry's alpaca, default and empty) are Jinja transcriptions.
The Qwen tokenizers split text with Qwen2's regex, which keeps ``"\n\n"`` one
piece, so they have the ``"\n\n"`` merge of the real vocabulary.
"""

from __future__ import annotations

import base64
import os

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "You are a helpful assistant. Answer the question briefly and politely.",
    "Write a short poem about the sea, the wind and the stars at night.",
    "Two plus two equals four; three times three equals nine.",
    "I am not sure about that, but here is my best answer to your question.",
    "system user assistant human gpt instruction input response question answer",
    "Hello! How are you today? I am fine, thank you. Tell me a story, please.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "Les chats aiment dormir au soleil. Der Hund schläft im Garten. 猫は寝ている。",
]

LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 "
    "== 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt "
    "%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN2_5_CHAT_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3_CHAT_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

MISTRAL_CHAT_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

MISTRAL_V3_CHAT_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- if loop.index0 == ns.last_user and system_message is defined %}
            {{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}
"""

CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ALPACA_CHAT_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system = 'Below is an instruction that describes a task. Write a response that appropriately completes the request.' %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- system + '\n\n' }}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {{- '### Instruction:\n' + message['content'] + '\n\n### Response:\n' }}
    {%- else %}
        {{- message['content'] + eos_token + '\n\n' }}
    {%- endif %}
{%- endfor %}"""

DEFAULT_CHAT_TEMPLATE = """{%- set loop_messages = messages %}
{%- if messages[0]['role'] == 'system' %}
    {{- 'System: ' + messages[0]['content'] + '\n' }}
    {%- set loop_messages = messages[1:] %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {{- 'Human: ' + message['content'] + '\nAssistant:' }}
    {%- else %}
        {{- message['content'] + eos_token + '\n' }}
    {%- endif %}
{%- endfor %}"""

EMPTY_CHAT_TEMPLATE = "{%- for message in messages %}{{- message['content'] }}{%- endfor %}"

LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
MISTRAL_SPECIAL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PLAIN_SPECIAL = ["<s>", "</s>"]

# family -> keyword arguments of build_bpe_tokenizer_dir
TOKENIZER_FAMILIES = {
    "llama3": dict(special_tokens=LLAMA3_SPECIAL, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                   chat_template=LLAMA3_CHAT_TEMPLATE, pattern=LLAMA3_PATTERN),
    "qwen": dict(special_tokens=QWEN_SPECIAL, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                 chat_template=QWEN2_5_CHAT_TEMPLATE, pattern=QWEN2_PATTERN),
    "qwen3": dict(special_tokens=QWEN_SPECIAL, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                  chat_template=QWEN3_CHAT_TEMPLATE, pattern=QWEN2_PATTERN),
    "mistral": dict(special_tokens=MISTRAL_SPECIAL, bos_token="<s>", eos_token="</s>",
                    chat_template=MISTRAL_CHAT_TEMPLATE),
    "mistral_v3": dict(special_tokens=MISTRAL_SPECIAL, bos_token="<s>", eos_token="</s>",
                       chat_template=MISTRAL_V3_CHAT_TEMPLATE),
    "llama2": dict(special_tokens=MISTRAL_SPECIAL[:3], bos_token="<s>", eos_token="</s>",
                   chat_template=LLAMA2_CHAT_TEMPLATE),
    "chatml": dict(special_tokens=QWEN_SPECIAL[:3], bos_token=None, eos_token="<|im_end|>",
                   chat_template=CHATML_CHAT_TEMPLATE, pattern=QWEN2_PATTERN),
    "alpaca": dict(special_tokens=PLAIN_SPECIAL, bos_token="<s>", eos_token="</s>", chat_template=ALPACA_CHAT_TEMPLATE),
    "default": dict(special_tokens=PLAIN_SPECIAL, bos_token="<s>", eos_token="</s>",
                    chat_template=DEFAULT_CHAT_TEMPLATE),
    "empty": dict(special_tokens=PLAIN_SPECIAL, bos_token="<s>", eos_token="</s>", chat_template=EMPTY_CHAT_TEMPLATE),
}
"""One per registry template (engine/data/templates.json): a tokenizer carrying the matching chat template."""


def build_bpe_tokenizer_dir(path, *, special_tokens, eos_token, bos_token=None, pad_token=None,
                            chat_template=None, pattern=None, vocab_size=600, corpus=CORPUS) -> str:
    """Train a byte-level BPE on ``corpus`` and save it as a HF tokenizer directory."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos_token, eos_token=eos_token,
                                 pad_token=pad_token, unk_token=None)
    if chat_template is not None:
        hf.chat_template = chat_template
    os.makedirs(path, exist_ok=True)
    hf.save_pretrained(path)
    return str(path)


def build_family_tokenizer_dir(path, family: str) -> str:
    """A tiny BPE tokenizer with ``family``'s special tokens and chat template (see TOKENIZER_FAMILIES)."""
    return build_bpe_tokenizer_dir(path, **TOKENIZER_FAMILIES[family])


def build_sentencepiece_model(path, vocab_size=400, corpus=CORPUS) -> str:
    """Train a tiny SentencePiece BPE model (<unk>=0, <s>=1, </s>=2, like Llama 2) and write it to ``path``."""
    import sentencepiece

    with open(path, "wb") as f:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus * 4), model_writer=f, vocab_size=vocab_size, model_type="bpe",
            character_coverage=1.0, byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
            minloglevel=2, hard_vocab_limit=False,
        )
    return str(path)


def write_tiktoken_file(path, ranks: dict[bytes, int]) -> str:
    """Write a tiktoken rank file (base64 token, space, rank per line)."""
    with open(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    return str(path)
