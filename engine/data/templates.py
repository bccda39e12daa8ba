"""Prompt types (``--prompt-type``): a data-driven registry of chat templates.

A template is a handful of format strings with ``{content}``, ``{bos_token}``
and ``{eos_token}`` placeholders (``templates.json`` holds the built-in ones;
``--prompt-type-path`` adds a user's file with the same schema). A pair is
encoded one message at a time: the prompt (prefix, system, history, final user
turn, assistant header) and then the response. Encoding per message is what
keeps the prompt/response boundary exact, and for the built-in templates the
concatenation equals HF ``apply_chat_template`` on the same conversation
(tests/unit/data/test_templates.py proves it for llama3, qwen and mistral).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Sequence

from engine.tokenizer import Tokenizer

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
    default_system: str = ""
    """System prompt used when a sample has none."""
    stop_words: tuple[str, ...] = ()
    """End-of-turn strings; the first one is the EOS when ``replace_eos`` is set."""
    efficient_eos: bool = False
    """Append EOS only after the final answer (not after history turns) instead of in the format."""
    replace_eos: bool = False
    """Use ``stop_words[0]`` as ``{eos_token}`` and as the appended EOS (chat models' end-of-turn)."""
    trim_content: bool = False
    """Strip whitespace around every message, as Llama 2/3 chat templates do."""

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


def get_template(name: str, path: str | None = None) -> Template:
    """Template ``name`` from ``path`` (--prompt-type-path) if given, else the built-ins."""
    registry = load_templates(BUILTIN_TEMPLATES_FILE)
    if path is not None:
        registry.update(load_templates(path))
    if name not in registry:
        raise ValueError(f"--prompt-type {name!r} is not a known template; known: {sorted(registry)}")
    return registry[name]


@dataclass(frozen=True)
class Conversation:
    """One prompt in the form every handler produces; the answers are kept apart."""

    prompt: str
    """Final user message."""
    system: str | None = None
    history: Sequence[tuple[str, str]] = field(default_factory=tuple)
    """Earlier (user, assistant) turns; they belong to the masked prompt."""


class ChatEncoder:
    """A template bound to a tokenizer: turns a conversation into prompt and response ids."""

    def __init__(self, template: Template, tokenizer: Tokenizer) -> None:
        self.template = template
        self.tokenizer = tokenizer
        eos = template.stop_words[0] if template.replace_eos else tokenizer.eos_token
        self.eos_id = tokenizer.token_to_id(eos)
        if self.eos_id is None:
            raise ValueError(f"--prompt-type {template.name}: EOS {eos!r} is not a token of this tokenizer")
        bos = tokenizer.bos_token
        uses_bos = any("{bos_token}" in s for s in (template.prefix, template.user_format, template.system_format))
        if uses_bos and bos is None:
            raise ValueError(f"--prompt-type {template.name} writes {{bos_token}} but the tokenizer has no BOS")

        def resolve(fmt: str) -> str:
            return fmt.replace("{bos_token}", bos or "").replace("{eos_token}", eos)

        self._system = resolve(template.system_format)
        self._user = resolve(template.user_format)
        self._assistant = resolve(template.assistant_format)
        self._prefix_ids = tokenizer.encode(resolve(template.prefix)) if template.prefix else []
        self._response_prefix_ids = tokenizer.encode(template.response_prefix) if template.response_prefix else []

    def _text(self, text: str) -> str:
        return text.strip() if self.template.trim_content else text

    def encode_prompt(self, conv: Conversation) -> list[int]:
        """Ids of everything before the answer: all of it gets label -100."""
        tok, t = self.tokenizer, self.template
        ids = list(self._prefix_ids)
        system = conv.system or t.default_system
        system_text = self._system.replace("{content}", self._text(system)) if system else ""
        if system_text and t.system_style == "separate":
            ids += tok.encode(system_text)
            system_text = ""
        turns = [*conv.history, (conv.prompt, None)]
        for user, assistant in turns:
            if system_text and (t.system_style == "first_user" or assistant is None):
                user, system_text = system_text + self._text(user), ""
            ids += tok.encode(self._user.replace("{content}", self._text(user)))
            if assistant is not None:
                ids += tok.encode(self._assistant.replace("{content}", self._text(assistant)))
        return ids + self._response_prefix_ids

    def encode_response(self, text: str) -> list[int]:
        """Ids of the trained answer: its text, end-of-turn marker and (efficient_eos) EOS."""
        ids = self.tokenizer.encode(self._assistant.replace("{content}", self._text(text)))
        if self.template.efficient_eos:
            ids.append(self.eos_id)
        return ids
