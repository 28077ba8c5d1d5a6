"""Multi-turn chat in the terminal (`minillm chat CHECKPOINT`), on top of `TextGenerator.chat_stream`.

A `ChatSession` keeps the conversation and, before each reply, drops the oldest turns until the prompt
plus the reply budget fits the model's context, so a long conversation never fails with a length
error: the model simply stops seeing its oldest turns (the system prompt is always kept).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TextIO

from minillm.inference.generator import GenerationConfig, TextGenerator

_KEEP = object()  # reset(): keep the current system prompt

COMMANDS = {
    "/reset": "forget the conversation (the system prompt stays)",
    "/system TEXT": "set the system prompt (empty: none) and start over",
    "/exit": "leave (Ctrl-D or Ctrl-C too)",
    "/help": "show this list",
}


class ChatSession:
    """A conversation with a model: `reply(text)` streams the assistant's answer and records both turns."""

    def __init__(self, generator: TextGenerator, system: str | None = None,
                 config: GenerationConfig | None = None) -> None:
        self.generator = generator
        self.system = system or None
        self.config = config or GenerationConfig(max_new_tokens=256, temperature=0.7, top_p=0.9)
        self.turns: list[dict[str, str]] = []  # user and assistant messages, oldest first
        self.trimmed = 0  # turns dropped so far to fit the context

    @property
    def context(self) -> int:
        return self.generator.model.config.max_position_embeddings

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns

    def reset(self, system: str | None | object = _KEEP) -> None:
        """Start over; with `system`, also replace the system prompt."""
        if system is not _KEEP:
            self.system = system or None
        self.turns = []

    def _fit(self) -> int:
        """Drop the oldest turns until the prompt leaves room for a reply; returns the reply budget."""
        want = self.config.max_new_tokens
        while True:
            prompt = len(self.generator.chat_prompt_ids(self.messages()))
            room = self.context - prompt
            if room >= min(want, self.context // 4) or len(self.turns) <= 1:
                break
            # drop the oldest user turn and the assistant reply after it
            drop = 2 if len(self.turns) > 2 and self.turns[1]["role"] == "assistant" else 1
            del self.turns[:drop]
            self.trimmed += drop
        if room < 1:
            raise ValueError(f"the message is too long: with the system prompt it takes {prompt} tokens, "
                             f"the model's context is {self.context}")
        return min(want, room)

    def reply(self, text: str) -> Iterator[str]:
        """Stream the assistant's answer to `text`; the turn is recorded once the answer is complete."""
        self.turns.append({"role": "user", "content": text})
        try:
            budget = self._fit()
        except ValueError:
            self.turns.pop()
            raise
        pieces: list[str] = []
        try:
            for chunk in self.generator.chat_stream(self.messages(), replace(self.config, max_new_tokens=budget)):
                pieces.append(chunk.text)
                yield chunk.text
        except BaseException:
            self.turns.pop()  # an interrupted answer is not part of the conversation
            raise
        self.turns.append({"role": "assistant", "content": "".join(pieces)})


def run_chat(session: ChatSession, read: Callable[[str], str] | None = None, out: TextIO | None = None) -> None:
    """The terminal loop: read a line, run a command or stream the reply, until /exit or end of input."""
    read = read or input
    out = out or sys.stdout
    out.write("Chat with the model. Commands: " + ", ".join(c.split()[0] for c in COMMANDS) + "\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            if command == "/exit":
                return
            if command == "/reset":
                session.reset()
                out.write("(conversation cleared)\n")
            elif command == "/system":
                session.reset(argument.strip())
                out.write(f"(system prompt {'set' if session.system else 'removed'}; conversation cleared)\n")
            elif command == "/help":
                out.writelines(f"  {name:<14} {meaning}\n" for name, meaning in COMMANDS.items())
            else:
                out.write(f"unknown command {command}; /help lists them\n")
            continue
        trimmed_before = session.trimmed
        out.write("assistant> ")
        try:
            for piece in session.reply(text):
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write("\n(interrupted)\n")
            continue
        except ValueError as e:
            out.write(f"\n{e}\n")
            continue
        out.write("\n")
        if session.trimmed > trimmed_before:
            out.write(f"(the {session.trimmed - trimmed_before} oldest turns no longer fit the "
                      f"{session.context}-token context and were dropped)\n")
