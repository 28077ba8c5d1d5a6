"""One normaliser: every common JSON/JSONL schema → one internal form per kind of data.

The internal forms (used by every later stage):
- `Conversation`: a list of `Message(role, content)` with roles "system", "user", "assistant";
- `PreferencePair`: a shared `prompt` conversation (ending with a user turn) and the `chosen` and
  `rejected` assistant replies;
- `LabelledSequence`: whitespace-separated word tokens and an integer label.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and the reason."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; allowed roles: {', '.join(ROLES)}")
        if not isinstance(self.content, str):
            raise ValueError(f"message content must be a string, got {type(self.content).__name__}")

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]

    def to_dicts(self) -> list[dict[str, str]]:
        return [m.to_dict() for m in self.messages]


@dataclass(frozen=True)
class PreferencePair:
    prompt: tuple[Message, ...]  # ends with a user message
    chosen: str  # the preferred assistant reply
    rejected: str  # the dispreferred assistant reply


@dataclass(frozen=True)
class LabelledSequence:
    tokens: tuple[str, ...]  # word-level tokens, e.g. ("<IMG>", "<Z_001>", …, "<CLS>", "<CLS_3>", "<EOS>")
    label: int
