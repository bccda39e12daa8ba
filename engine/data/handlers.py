"""Handlers: turn one input record (a dict) into a prompt and two answers.

Each handler knows the logical fields of one data shape and reads them from
the columns named by ``--map-keys``. Errors are ``RecordError``s naming the
logical field and its column; the caller adds the file and line.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from engine.data.records import Conversation, PairwiseSample, RecordError

__all__ = ["HANDLERS", "PairwiseSample", "RecordError", "build_handler"]


OPTIONAL_FIELDS = {"margin": ""}
"""Logical fields every handler reads when --map-keys names their column (off by default): `margin`, a number per
pair that --stage rm subtracts from the reward difference."""


class PairwiseHandler:
    """Base: column mapping (``--map-keys``) and typed field access."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, str]]
    """Logical field -> default column (or tag value for ``*_tag`` entries)."""
    tag_keys: ClassVar[frozenset[str]] = frozenset()
    """Logical entries that are tag values, not columns."""

    def __init__(self, map_keys: dict[str, str] | None = None) -> None:
        map_keys = dict(map_keys or {})
        defaults = {**self.defaults, **OPTIONAL_FIELDS}
        unknown = sorted(set(map_keys) - set(defaults))
        if unknown:
            raise ValueError(
                f"--map-keys: {unknown} are not fields of {self.name}; known fields: {sorted(defaults)}"
            )
        self.keys = {**defaults, **map_keys}
        self.explicit_columns = {
            k: v for k, v in map_keys.items() if k not in self.tag_keys and v and v != defaults[k]
        }
        """Columns the user renamed: each must exist in the data, checked before any work. (Mapping a
        field to its default name, as in ``{"system": "system"}``, renames nothing and may be absent.)"""

    def _get(self, record: dict, logical: str, required: bool = False) -> Any:
        column = self.keys[logical]
        value = record.get(column) if column else None
        if value is None and required:
            raise RecordError("missing required key", column or logical, "missing_field")
        return value

    def _text(self, record: dict, logical: str, required: bool = False, allow_empty: bool = False) -> str | None:
        value = self._get(record, logical, required)
        if value is None:
            return None
        column = self.keys[logical]
        if not isinstance(value, str):
            raise RecordError(f"must be a string, got {type(value).__name__}", column)
        if required and not allow_empty and not value.strip():
            raise RecordError("is empty", column, "empty_field")
        return value

    def _history(self, record: dict) -> list[tuple[str, str]]:
        value = self._get(record, "history")
        if value is None:
            return []
        column = self.keys["history"]
        if not isinstance(value, list) or not all(
            isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(s, str) for s in turn)
            for turn in value
        ):
            raise RecordError("must be a list of [query, answer] string pairs", column)
        return [tuple(turn) for turn in value]

    def __call__(self, record: dict) -> PairwiseSample:
        raise NotImplementedError

    @property
    def has_margin(self) -> bool:
        return bool(self.keys["margin"])

    def margin(self, record: dict) -> float | None:
        """The pair's margin when --map-keys names a margin column (then every record needs a finite number)."""
        if not self.has_margin:
            return None
        value = self._get(record, "margin", required=True)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RecordError(f"must be a finite number, got {value!r}", self.keys["margin"])
        return float(value)


class AlpacaStylePairwiseHandler(PairwiseHandler):
    """``{"instruction", "input", "system", "history": [[q, a], ...], "chosen", "rejected"}``.

    The prompt is the instruction and the input joined by a newline, either alone when the other is
    empty (LLaMA-Factory's rule). The answers are ``chosen``/``rejected`` or, in LLaMA-Factory's and
    MindSpeed-LLM's older pairwise files, ``output: [chosen, rejected]``.
    """

    name = "AlpacaStylePairwiseHandler"
    defaults = {"prompt": "instruction", "query": "input", "system": "system", "history": "history",
                "chosen": "chosen", "rejected": "rejected", "output": "output"}

    def _answers(self, record: dict) -> tuple[str, str]:
        output = self._get(record, "output")
        if output is None or self._get(record, "chosen") is not None or self._get(record, "rejected") is not None:
            return self._text(record, "chosen", required=True), self._text(record, "rejected", required=True)
        column = self.keys["output"]
        if not (isinstance(output, list) and len(output) == 2 and all(isinstance(a, str) for a in output)):
            raise RecordError("must be a list of two strings, [chosen, rejected]", column)
        for answer in output:
            if not answer.strip():
                raise RecordError("holds an empty answer", column, "empty_field")
        return output[0], output[1]

    def __call__(self, record: dict) -> PairwiseSample:
        instruction, query = self._text(record, "prompt"), self._text(record, "query")
        prompt = "\n".join(part for part in (instruction, query) if part)
        if not prompt.strip():
            if instruction is None and query is None:
                raise RecordError("missing required key", self.keys["prompt"] or "prompt", "missing_field")
            raise RecordError("is empty, and so is the input", self.keys["prompt"] or "prompt", "empty_field")
        conv = Conversation(prompt=prompt, system=self._text(record, "system"), history=self._history(record))
        return PairwiseSample(conv, *self._answers(record))


class MessagesMixin:
    """Splits a role/content message list into system, history and final user turn."""

    def _conversation(self, messages: Any, column: str, role_key: str, content_key: str,
                      user: str, assistant: str, system_role: str, system: str | None) -> Conversation:
        if not isinstance(messages, list) or not messages:
            raise RecordError("must be a non-empty list of messages", column)
        turns = []
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get(role_key), str) and isinstance(m.get(content_key), str)):
                raise RecordError(f"message {i} must be an object with string {role_key!r} and {content_key!r}",
                                  column)
            turns.append((m[role_key], m[content_key]))
        if turns[0][0] == system_role:
            system = turns.pop(0)[1]
        roles = [r for r, _ in turns]
        expected = [user if i % 2 == 0 else assistant for i in range(len(turns))]
        if roles != expected or len(turns) % 2 == 0:
            raise RecordError(f"roles must alternate {user!r}/{assistant!r} and end with {user!r}, got {roles}",
                              column)
        history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
        return Conversation(prompt=turns[-1][1], system=system, history=history)


class SharegptStylePairwiseHandler(PairwiseHandler, MessagesMixin):
    """``{"conversations": [{"from", "value"}, ...], "chosen": {...}, "rejected": {...}}``; tags via --map-keys."""

    name = "SharegptStylePairwiseHandler"
    defaults = {"messages": "conversations", "system": "system", "chosen": "chosen", "rejected": "rejected",
                "role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "system_tag": "system"}
    tag_keys = frozenset({"role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag"})

    def _answer(self, record: dict, logical: str) -> str:
        value = self._get(record, logical, required=True)
        column = self.keys[logical]
        if isinstance(value, dict):
            role, content = value.get(self.keys["role_tag"]), value.get(self.keys["content_tag"])
            if role is not None and role != self.keys["assistant_tag"]:
                raise RecordError(f"must be an {self.keys['assistant_tag']!r} message, got {role!r}", column)
            value = content
        if not isinstance(value, str):
            raise RecordError(f"must be a message with string {self.keys['content_tag']!r} or a string, "
                              f"got {type(value).__name__}", column)
        if not value.strip():
            raise RecordError("is empty", column, "empty_field")
        return value

    def __call__(self, record: dict) -> PairwiseSample:
        k = self.keys
        conv = self._conversation(self._get(record, "messages", required=True), k["messages"], k["role_tag"],
                                  k["content_tag"], k["user_tag"], k["assistant_tag"], k["system_tag"],
                                  self._text(record, "system"))
        return PairwiseSample(conv, self._answer(record, "chosen"), self._answer(record, "rejected"))


class TrlStylePairwiseHandler(PairwiseHandler, MessagesMixin):
    """TRL and ms-swift preference shapes, recognised per record.

    - TRL: ``prompt``/``chosen``/``rejected`` as strings or message lists; without ``prompt``
      (TRL's conversational format with an implicit prompt), chosen and rejected are whole
      conversations and the prompt is their longest common message prefix.
    - ms-swift: ``messages`` (ending with the chosen assistant turn) + ``rejected_response``, or
      ``system``/``history``/``query``/``response``/``rejected_response``.
    Messages use ``role``/``content`` with roles system/user/assistant.
    """

    name = "TrlStylePairwiseHandler"
    defaults = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "messages": "messages",
                "query": "query", "response": "response", "rejected_response": "rejected_response",
                "history": "history", "system": "system"}

    def _conv(self, messages: Any, logical: str, system: str | None) -> Conversation:
        return self._conversation(messages, self.keys[logical], "role", "content", "user", "assistant", "system",
                                  system)

    def _answer(self, value: Any, logical: str) -> str:
        column = self.keys[logical]
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
            if value[0].get("role") != "assistant":
                raise RecordError("must hold one assistant message", column)
            value = value[0].get("content")
        if not isinstance(value, str):
            raise RecordError(f"must be a string or one assistant message, got {type(value).__name__}", column)
        if not value.strip():
            raise RecordError("is empty", column, "empty_field")
        return value

    def _implicit_prompt(self, chosen: Any, rejected: Any) -> tuple[list, list, list]:
        """TRL's implicit prompt (``trl.data_utils.extract_prompt``): the longest common message prefix of
        chosen and rejected; what follows it must be one assistant message on each side."""
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise RecordError("missing: chosen and rejected must then be message lists sharing the prompt",
                              self.keys["prompt"], "missing_field")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == len(chosen) == len(rejected):  # identical: TRL then keeps the last message as the answer
            shared -= 1
        for logical, messages in (("chosen", chosen), ("rejected", rejected)):
            if len(messages) - shared != 1:
                raise RecordError(f"must be the shared prompt (the longest common message prefix with the other "
                                  f"answer: {shared} messages) followed by one assistant message, got "
                                  f"{len(messages) - shared} after it", self.keys[logical])
        return chosen[:shared], chosen[shared:], rejected[shared:]

    def __call__(self, record: dict) -> PairwiseSample:
        system = self._text(record, "system")
        if self._get(record, "rejected_response") is not None:
            rejected = self._answer(self._get(record, "rejected_response"), "rejected_response")
            messages = self._get(record, "messages")
            if messages is not None:
                if not isinstance(messages, list) or len(messages) < 2:
                    raise RecordError("must end with the chosen assistant message", self.keys["messages"])
                return PairwiseSample(self._conv(messages[:-1], "messages", system),
                                      self._answer(messages[-1:], "messages"), rejected)
            conv = Conversation(prompt=self._text(record, "query", required=True), system=system,
                                history=self._history(record))
            return PairwiseSample(conv, self._answer(self._get(record, "response", required=True), "response"),
                                  rejected)
        chosen = self._get(record, "chosen", required=True)
        rejected = self._get(record, "rejected", required=True)
        prompt = self._get(record, "prompt")
        if prompt is None:
            prompt, chosen, rejected = self._implicit_prompt(chosen, rejected)
        if isinstance(prompt, str):
            if not prompt.strip():
                raise RecordError("is empty", self.keys["prompt"], "empty_field")
            conv = Conversation(prompt=prompt, system=system, history=self._history(record))
        else:
            conv = self._conv(prompt, "prompt", system)
        return PairwiseSample(conv, self._answer(chosen, "chosen"), self._answer(rejected, "rejected"))


HANDLERS = {h.name: h for h in (AlpacaStylePairwiseHandler, SharegptStylePairwiseHandler, TrlStylePairwiseHandler)}


def build_handler(name: str, map_keys: dict[str, str] | None = None) -> PairwiseHandler:
    if name not in HANDLERS:
        raise ValueError(f"--handler-name {name!r} is not known; known: {sorted(HANDLERS)}")
    return HANDLERS[name](map_keys)
