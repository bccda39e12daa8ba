"""What a handler makes of one input record, and how it says that it cannot."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

REJECT_REASONS = ("not_utf8", "malformed_json", "not_an_object", "missing_field", "empty_field", "invalid_field",
                  "template_error")
"""Why a record is rejected; the preprocessor's summary counts skipped records per reason."""


class RecordError(ValueError):
    """A record that cannot be turned into a pair; ``field`` is the column at fault, if any."""

    def __init__(self, message: str, field: str | None = None, reason: str = "invalid_field") -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Conversation:
    """One prompt in the form every handler produces; the answers are kept apart."""

    prompt: str
    """Final user message."""
    system: str | None = None
    """System prompt; None or empty means none (the template's default system applies)."""
    history: Sequence[tuple[str, str]] = field(default_factory=tuple)
    """Earlier (user, assistant) turns; they belong to the masked prompt."""

    def messages(self) -> list[dict[str, str]]:
        """The conversation as role/content messages (an empty system prompt is no system message)."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for user, assistant in self.history:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        out.append({"role": "user", "content": self.prompt})
        return out


@dataclass(frozen=True)
class PairwiseSample:
    """A prompt with its preferred and dispreferred answers."""

    conversation: Conversation
    chosen: str
    rejected: str
