"""Prompt types (``--prompt-type``): how a conversation becomes text, and that text token ids.

A format renders a conversation and one answer as two texts, the prompt and the
answer, whose concatenation is the whole conversation's text. The rule, the same
for every format: the whole text is tokenized at once, exactly as HF
``apply_chat_template`` tokenizes a rendered chat, and the prompt (label -100) is
the tokens lying wholly inside the prompt's text; a token that straddles the
boundary (Qwen's ``"\n\n"`` when an answer starts with a newline) is an answer token.

Two kinds of format:

- the registry: a handful of format strings per model family with ``{content}``,
  ``{bos_token}`` and ``{eos_token}`` placeholders (``templates.json`` holds the
  built-in ones; ``--prompt-type-path`` adds a user's file with the same schema);
- ``auto``: the tokenizer's own Jinja chat template, rendered by transformers. The
  prompt's text is what the template renders before the answer: found by rendering
  the conversation once with a placeholder answer.

tests/unit/data/test_template_sweep.py proves that every registry template gives
the same ids and masks as ``auto`` on a tokenizer carrying the matching chat template.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Protocol, Sequence

from engine.data.records import Conversation, RecordError
from engine.tokenizer import Tokenizer

AUTO = "auto"
"""--prompt-type value that uses the tokenizer's own chat template."""

BUILTIN_TEMPLATES_FILE = os.path.join(os.path.dirname(__file__), "templates.json")
SYSTEM_STYLES = ("separate", "first_user", "last_user")


@dataclass(frozen=True)
class Template:
    """How one model family writes a conversation."""

    name: str
    """Registry key, the value of --prompt-type."""
    prefix: str = ""
    """Text before everything, usually ``{bos_token}``."""
    system_format: str = "{content}"
    """Format of the system prompt."""
    system_style: str = "separate"
    """``separate``: system is its own block after the prefix; ``first_user`` / ``last_user``: it
    is prepended to the first (Llama 2, Mistral v1) or final (Mistral v2+) user message's content."""
    user_format: str = "{content}"
    """Format of a user turn, including the header that opens the assistant's answer."""
    assistant_format: str = "{content}"
    """Format of an assistant turn, including its end-of-turn marker."""
    response_prefix: str = ""
    """Text that opens only the final (trained) answer, e.g. Qwen3's empty think block; masked."""
    response_lstrip: str = ""
    """Characters stripped from the start of the final answer (Qwen3's template strips newlines there)."""
    default_system: str = ""
    """System prompt used when a sample has none."""
    stop_words: tuple[str, ...] = ()
    """End-of-turn strings; the first one is the EOS when ``replace_eos`` is set."""
    efficient_eos: bool = False
    """Append EOS only after the final answer (not after history turns) instead of in the format."""
    replace_eos: bool = False
    """Use ``stop_words[0]`` as ``{eos_token}`` and as the appended EOS (chat models' end-of-turn)."""
    trim_content: bool = False
    """Strip whitespace around every message, as Llama 2/3 chat templates do (a system prompt merged into
    a user message is part of that message: the two are stripped as one, as Llama 2's template does)."""

    def __post_init__(self) -> None:
        if self.system_style not in SYSTEM_STYLES:
            raise ValueError(f"--prompt-type {self.name}: system_style must be one of {SYSTEM_STYLES}")
        for name in ("system_format", "user_format", "assistant_format"):
            if "{content}" not in getattr(self, name):
                raise ValueError(f"--prompt-type {self.name}: {name} must contain {{content}}")
        if self.replace_eos and not self.stop_words:
            raise ValueError(f"--prompt-type {self.name}: replace_eos needs at least one stop word")

    @classmethod
    def from_dict(cls, name: str, fields: dict, source: str) -> "Template":
        known = {f.name for f in dataclasses.fields(cls)} - {"name"}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"{source}: template {name!r} has unknown fields {unknown}; known: {sorted(known)}")
        fields = dict(fields)
        if "stop_words" in fields:
            fields["stop_words"] = tuple(fields["stop_words"])
        return cls(name=name, **fields)


def load_templates(path: str) -> dict[str, Template]:
    """Read a ``{name: {field: value}}`` JSON file of templates."""
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ValueError(f"{path}: expected a JSON object mapping template names to objects")
    return {name: Template.from_dict(name, fields, path) for name, fields in raw.items()}


def _registry(path: str | None = None) -> dict[str, Template]:
    """The built-in templates, overridden and extended by those of ``path`` (--prompt-type-path)."""
    registry = load_templates(BUILTIN_TEMPLATES_FILE)
    if path is not None:
        registry.update(load_templates(path))
    return registry


def get_template(name: str, path: str | None = None) -> Template:
    """Template ``name`` from ``path`` (--prompt-type-path) if given, else the built-ins."""
    registry = _registry(path)
    if name not in registry:
        raise ValueError(f"--prompt-type {name!r} is not a known template; known: {sorted(registry) + [AUTO]}")
    return registry[name]


class ChatFormat(Protocol):
    """Renders a conversation with each of its answers as (prompt text, answer text)."""

    def texts(self, conv: Conversation, answers: Sequence[str]) -> list[tuple[str, str]]:
        """One (prompt, answer) per answer; prompt + answer is the whole conversation's text."""


class TemplateFormat:
    """A registry template with the tokenizer's BOS and EOS strings filled in."""

    def __init__(self, template: Template, tokenizer: Tokenizer) -> None:
        self.template = template
        eos = template.stop_words[0] if template.replace_eos else tokenizer.eos_token
        if tokenizer.token_to_id(eos) is None:
            raise ValueError(f"--prompt-type {template.name}: EOS {eos!r} is not a token of this tokenizer")
        bos = tokenizer.bos_token
        uses_bos = any("{bos_token}" in s for s in (template.prefix, template.user_format, template.system_format))
        if uses_bos and bos is None:
            raise ValueError(f"--prompt-type {template.name} writes {{bos_token}} but the tokenizer has no BOS")

        def resolve(fmt: str) -> str:
            return fmt.replace("{bos_token}", bos or "").replace("{eos_token}", eos)

        self._prefix = resolve(template.prefix)
        self._system = resolve(template.system_format)
        self._user = resolve(template.user_format)
        self._assistant = resolve(template.assistant_format)
        # what the assistant format writes before the final answer belongs to the prompt, as in ``auto``
        self._answer_head, self._answer_tail = self._assistant.split("{content}", 1)
        self._eos = eos

    def _text(self, text: str) -> str:
        return text.strip() if self.template.trim_content else text

    def prompt_text(self, conv: Conversation) -> str:
        """Everything before the answer: prefix, system, history, final user turn, the assistant format's
        text before ``{content}``, response prefix."""
        t = self.template
        out = [self._prefix]
        system = conv.system or t.default_system
        if system and t.system_style == "separate":
            out.append(self._system.replace("{content}", self._text(system)))
            system = ""
        for user, assistant in [*conv.history, (conv.prompt, None)]:
            if system and (t.system_style == "first_user" or assistant is None):
                user, system = self._system.replace("{content}", system) + user, ""
            out.append(self._user.replace("{content}", self._text(user)))
            if assistant is not None:
                out.append(self._assistant.replace("{content}", self._text(assistant)))
        out += [self._answer_head, t.response_prefix]
        return "".join(out)

    def answer_text(self, answer: str) -> str:
        """The trained answer: its text, end-of-turn marker and (efficient_eos) EOS."""
        text = self._text(answer)
        if self.template.response_lstrip:
            text = text.lstrip(self.template.response_lstrip)
        return text + self._answer_tail + (self._eos if self.template.efficient_eos else "")

    def texts(self, conv: Conversation, answers: Sequence[str]) -> list[tuple[str, str]]:
        prompt = self.prompt_text(conv)
        return [(prompt, self.answer_text(a)) for a in answers]


PLACEHOLDER = "\U000f0000answer\U000f0001"
"""Stands for the answer when rendering a chat template to find where the answer starts (private-use
characters around a word, so no template trims, splits or escapes it)."""


class TokenizerChatTemplate:
    """``--prompt-type auto``: the tokenizer's own chat template, rendered by transformers.

    The prompt's text is what the template renders before a placeholder answer. A template that
    changes that text with the answer (Qwen3 moves a ``<think>`` part of it into its think block)
    ends the prompt where the two renderings part: what depends on the answer is trained.
    """

    def __init__(self, tokenizer: Tokenizer, registry: Sequence[str] = ()) -> None:
        if tokenizer.chat_template is None:
            raise ValueError(f"--prompt-type auto: the tokenizer has no chat template (chat_template in its "
                             f"tokenizer_config.json or chat_template.jinja); choose one of {sorted(registry)}")
        from jinja2 import TemplateError  # what templates raise (raise_exception) and fail with

        self.tokenizer = tokenizer
        self._errors = (TemplateError, TypeError, ValueError)
        try:
            self.texts(Conversation(prompt="Hi"), ["Hello"])
        except RecordError as e:
            raise ValueError(f"--prompt-type auto: {e}") from None

    def _render(self, messages: list[dict[str, str]]) -> str:
        try:
            return self.tokenizer.render_chat(messages)
        except self._errors as e:
            raise RecordError(f"the tokenizer's chat template refused this conversation: {e}",
                              reason="template_error") from None

    def texts(self, conv: Conversation, answers: Sequence[str]) -> list[tuple[str, str]]:
        messages = conv.messages()
        probe = self._render(messages + [{"role": "assistant", "content": PLACEHOLDER}])
        at = probe.rfind(PLACEHOLDER)
        if at < 0:
            raise RecordError("the tokenizer's chat template does not render the final assistant message",
                              reason="template_error")
        head = probe[:at]
        out = []
        for answer in answers:
            text = self._render(messages + [{"role": "assistant", "content": answer}])
            cut = len(head) if text.startswith(head) else len(os.path.commonprefix([text, head]))
            out.append((text[:cut], text[cut:]))
        return out


class ChatEncoder:
    """A format bound to a tokenizer: a conversation and its answers become ids and prompt lengths."""

    def __init__(self, chat_format: ChatFormat, tokenizer: Tokenizer) -> None:
        self.format = chat_format
        self.tokenizer = tokenizer

    def encode(self, conv: Conversation, *answers: str) -> list[tuple[list[int], int]]:
        """Per answer: the ids of the whole conversation, and how many of them are the prompt."""
        return [self.tokenizer.encode_pair(prompt, answer) for prompt, answer in self.format.texts(conv, answers)]


def build_chat_encoder(prompt_type: str, tokenizer: Tokenizer, path: str | None = None) -> ChatEncoder:
    """The --prompt-type format (``auto`` or a registry template) bound to ``tokenizer``."""
    if prompt_type == AUTO:
        return ChatEncoder(TokenizerChatTemplate(tokenizer, sorted(_registry(path))), tokenizer)
    return ChatEncoder(TemplateFormat(get_template(prompt_type, path), tokenizer), tokenizer)
