"""One normaliser: every common JSON/JSONL schema → one internal form per kind of data.

The internal forms (used by every later stage):
- `Conversation`: a list of `Message(role, content)` with roles "system", "user", "assistant";
- `PreferencePair`: a shared `prompt` conversation (ending with a user turn) and the `chosen` and
  `rejected` assistant replies;
- `LabelledSequence`: whitespace-separated word tokens and an integer label;
- `PromptRecord`: a prompt conversation (ending with a user turn) for RL, with the record's other
  fields (e.g. the `answer` a reward function checks) kept in `columns`.

Reading: `load_records` / `iter_records` take a JSONL file, a JSON array file (detected by content, not
by suffix) or a directory of them, detect the schema of every record (`SCHEMAS`, `detect_schema`),
convert it, and report which schemas they saw. Bad records raise `DataError` naming `file:line` (or
`file: item N`, 0-based, for a JSON array) and the reason, or, with `skip_bad=True`, are skipped and
counted. `to_conversation` / `to_preference` convert single objects for other modules.

`iter_json_objects` is the one reader of JSON records (JSONL, a JSON array, or one pretty-printed object;
a UTF-8 byte order mark dropped; errors naming `file:line`) and `read_text` the one reader of text files:
corpora, evaluation sets and vocabularies are read through them.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minillm.errors import DataError

logger = logging.getLogger("minillm.data")

ROLES = ("system", "user", "assistant")
KINDS = ("conversation", "preference", "labelled", "prompt", "text")
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user",
                "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
RECORD_SUFFIXES = (".jsonl", ".json")


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


# ---------------------------------------------------------------------------------- field helpers
# Converters raise `DataError(reason)` without a location; the loader prefixes `file:line`.
@dataclass(frozen=True)
class PromptRecord:
    prompt: tuple[Message, ...]
    columns: dict[str, Any] = field(default_factory=dict)  # the record's other fields, for reward functions


def _type(value: Any) -> str:
    return type(value).__name__


def _string(obj: dict, name: str, optional: bool = False) -> str:
    """A string field: required and non-blank, or optional (missing/null → "")."""
    value = obj.get(name)
    if value is None:
        if optional:
            return ""
        raise DataError(f"missing field {name!r}")
    if not isinstance(value, str):
        raise DataError(f"field {name!r} must be a string, got {_type(value)}")
    if not optional and not value.strip():
        raise DataError(f"empty content in field {name!r}")
    return value


def _message(item: Any, where: str) -> Message:
    """`{"role", "content"}` or `{"from", "value"}`, with role aliases (human → user, gpt → assistant…)."""
    if not isinstance(item, dict):
        raise DataError(f"{where}: a message must be an object, got {_type(item)}")
    if "role" in item:
        role, content = item["role"], item.get("content")
    elif "from" in item:
        role, content = item["from"], item.get("value")
    else:
        raise DataError(f"{where}: message has no 'role' or 'from' (fields: {', '.join(map(str, item)) or 'none'})")
    canonical = ROLE_ALIASES.get(role.strip().lower()) if isinstance(role, str) else None
    if canonical is None:
        raise DataError(f"{where}: unknown role {role!r} (known: {', '.join(ROLE_ALIASES)})")
    if not isinstance(content, str):
        raise DataError(f"{where}: message content must be a string, got {_type(content)}")
    if not content.strip():
        raise DataError(f"{where}: empty content")
    return Message(canonical, content)


def _messages(value: Any, name: str) -> list[Message]:
    if not isinstance(value, list):
        raise DataError(f"field {name!r} must be a list of messages, got {_type(value)}")
    if not value:
        raise DataError(f"field {name!r} is an empty list of messages")
    return [_message(item, f"{name}[{i}]") for i, item in enumerate(value)]


def _turns(obj: dict, name: str, role: str) -> list[Message]:
    """A field holding either a string (one message of `role`) or a list of messages."""
    if isinstance(obj.get(name), list):
        return _messages(obj[name], name)
    return [Message(role, _string(obj, name))]


def _with_system(obj: dict, messages: list[Message]) -> list[Message]:
    """Prepend an optional top-level `"system"` string unless the messages already start with one."""
    system = _string(obj, "system", optional=True)
    if system.strip() and not (messages and messages[0].role == "system"):
        return [Message("system", system), *messages]
    return messages


def _conversation(messages: list[Message]) -> Conversation:
    if not any(m.role == "assistant" for m in messages):
        raise DataError("conversation has no assistant turn (nothing to train on)")
    return Conversation(tuple(messages))


def _reply(value: Any, prompt: list[Message], name: str) -> str:
    """A preference reply: a string, one assistant message, a list holding one, or a full
    conversation that starts with `prompt` (the shared prefix is stripped)."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"empty content in field {name!r}")
        return value
    if isinstance(value, dict):
        messages = [_message(value, name)]
    elif isinstance(value, list):
        messages = _messages(value, name)
        if len(messages) > len(prompt) and messages[: len(prompt)] == prompt:
            messages = messages[len(prompt):]
    else:
        raise DataError(f"field {name!r} must be a string or assistant message(s), got {_type(value)}")
    if len(messages) != 1 or messages[0].role != "assistant":
        roles = ", ".join(m.role for m in messages)
        raise DataError(f"field {name!r} must hold one assistant reply after the prompt, got roles: {roles}")
    return messages[0].content


def _pair(prompt: list[Message], chosen: str, rejected: str) -> PreferencePair:
    if not prompt or prompt[-1].role != "user":
        raise DataError("the preference prompt must end with a user turn")
    return PreferencePair(tuple(prompt), chosen, rejected)


# ------------------------------------------------------------------------------ schema converters
def _from_messages(obj: dict) -> Conversation:
    return _conversation(_messages(obj["messages"], "messages"))


def _from_minimind(obj: dict) -> Conversation:
    return _conversation(_messages(obj["conversations"], "conversations"))


def _from_sharegpt(obj: dict) -> Conversation:
    return _conversation(_with_system(obj, _messages(obj["conversations"], "conversations")))


def _from_alpaca(obj: dict) -> Conversation:
    """Alpaca, with LLaMA-Factory's optional `"history": [[instruction, response], ...]`."""
    history = obj.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
        raise DataError("field 'history' must be a list of [instruction, response] pairs")
    messages = [_message({"role": role, "content": text}, f"history[{i}]")
                for i, pair in enumerate(history) for role, text in zip(("user", "assistant"), pair)]
    user = _string(obj, "instruction")
    extra = _string(obj, "input", optional=True)
    if extra.strip():
        user += "\n\n" + extra
    messages += [Message("user", user), Message("assistant", _string(obj, "output"))]
    return _conversation(_with_system(obj, messages))


def _from_qa(obj: dict) -> Conversation:
    return _conversation([Message("user", _string(obj, "question")), Message("assistant", _string(obj, "answer"))])


def _from_prompt_completion(obj: dict) -> Conversation:
    return _conversation(_turns(obj, "prompt", "user") + _turns(obj, "completion", "assistant"))


def _from_trl(obj: dict) -> PreferencePair:
    prompt = _turns(obj, "prompt", "user")
    return _pair(prompt, _reply(obj["chosen"], prompt, "chosen"), _reply(obj["rejected"], prompt, "rejected"))


def _from_trl_implicit(obj: dict) -> PreferencePair:
    chosen, rejected = _messages(obj["chosen"], "chosen"), _messages(obj["rejected"], "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise DataError("'chosen' and 'rejected' must share every message but their final assistant reply")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1].role != "assistant":
            raise DataError(f"the last message of {name!r} must be an assistant reply, got {messages[-1].role}")
    return _pair(chosen[:-1], chosen[-1].content, rejected[-1].content)


def _from_sharegpt_pref(obj: dict) -> PreferencePair:
    prompt = _with_system(obj, _messages(obj["conversations"], "conversations"))
    return _pair(prompt, _reply(obj["chosen"], prompt, "chosen"), _reply(obj["rejected"], prompt, "rejected"))


def _from_prompt(obj: dict) -> PromptRecord:
    prompt = _with_system(obj, _turns(obj, "prompt", "user"))
    if prompt[-1].role != "user":
        raise DataError("field 'prompt' must end with a user turn (the reply is what RL samples)")
    return PromptRecord(tuple(prompt), {k: v for k, v in obj.items() if k not in ("prompt", "system")})


def _label(value: Any) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataError(f"label must be an integer (or an integer string), got {_type(value)} {value!r}")
    if value < 0:
        raise DataError(f"label must be >= 0, got {value}")
    return value


def _from_labelled(obj: dict) -> LabelledSequence:
    tokens = obj["tokens"]
    if isinstance(tokens, str):
        tokens = tokens.split()
    elif not isinstance(tokens, list) or not all(isinstance(t, str) and t.split() == [t] for t in tokens):
        raise DataError("field 'tokens' must be a space-separated string or a list of non-empty, "
                        "whitespace-free strings")
    if not tokens:
        raise DataError("empty content in field 'tokens'")
    return LabelledSequence(tuple(tokens), _label(obj["label"]))


def _from_text(obj: dict) -> str:
    return _string(obj, "text")


# ---------------------------------------------------------------------------------- schema table
def _has(*names: str) -> Callable[[dict], bool]:
    return lambda obj: all(n in obj for n in names)


def _sharegpt_style(obj: dict) -> bool:
    turns = obj.get("conversations")
    return isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict) and "from" in turns[0]


@dataclass(frozen=True)
class Schema:
    name: str
    kind: str
    shape: str  # what it looks like, for error messages
    match: Callable[[dict], bool]
    convert: Callable[[dict], Any]
    required: tuple[str, ...] = ()  # its top-level fields, for naming the ones a near miss lacks


# First match wins: the more specific schemas come first.
SCHEMAS: tuple[Schema, ...] = (
    Schema("sharegpt_pref", "preference", '{"conversations": [{"from", "value"}], "chosen", "rejected"}',
           _has("conversations", "chosen", "rejected"), _from_sharegpt_pref, ("conversations", "chosen", "rejected")),
    Schema("trl", "preference", '{"prompt", "chosen", "rejected"}', _has("prompt", "chosen", "rejected"), _from_trl,
           ("prompt", "chosen", "rejected")),
    Schema("trl_implicit", "preference", '{"chosen": [messages], "rejected": [messages]}',
           lambda o: isinstance(o.get("chosen"), list) and isinstance(o.get("rejected"), list), _from_trl_implicit,
           ("chosen", "rejected")),
    Schema("messages", "conversation", '{"messages": [{"role", "content"}]}', _has("messages"), _from_messages, ("messages",)),
    Schema("sharegpt", "conversation", '{"conversations": [{"from", "value"}]}', _sharegpt_style, _from_sharegpt,
           ("conversations",)),
    Schema("minimind", "conversation", '{"conversations": [{"role", "content"}]}',
           _has("conversations"), _from_minimind, ("conversations",)),
    Schema("alpaca", "conversation", '{"instruction", "input"?, "output"}', _has("instruction", "output"),
           _from_alpaca, ("instruction", "output")),
    Schema("qa", "conversation", '{"question", "answer"}', _has("question", "answer"), _from_qa,
           ("question", "answer")),
    Schema("prompt_completion", "conversation", '{"prompt", "completion"}', _has("prompt", "completion"),
           _from_prompt_completion, ("prompt", "completion")),
    Schema("prompt", "prompt", '{"prompt": text or [messages], …other fields}', _has("prompt"), _from_prompt,
           ("prompt",)),
    Schema("labelled", "labelled", '{"tokens", "label"}', _has("tokens", "label"), _from_labelled,
           ("tokens", "label")),
    Schema("text", "text", '{"text"}', _has("text"), _from_text, ("text",)),
)


def _find_schema(obj: Any, kind: str | None = None) -> Schema:
    """The schema `obj` matches, or a `DataError` saying which fields it has and what was expected."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {_type(obj)}")
    for schema in SCHEMAS:
        if schema.match(obj):
            return schema
    expected = "; ".join(f"{s.name} {s.shape}" for s in SCHEMAS if kind in (None, s.kind))
    raise DataError(f"record matches no known {kind + ' ' if kind else ''}schema "
                    f"(fields: {', '.join(map(str, obj)) or 'none'}){_missing_hint(obj, kind)}; "
                    f"expected one of: {expected}")


def _missing_hint(obj: dict, kind: str | None) -> str:
    """`"; missing field 'rejected' of schema trl"` for the schema (of `kind`, if given) that `obj` has
    the most fields of, when it has some but not all of them; else ""."""
    best, present = None, 0
    for schema in SCHEMAS:
        have = sum(name in obj for name in schema.required)
        if kind in (None, schema.kind) and have > present and have < len(schema.required):
            best, present = schema, have
    if best is None:
        return ""
    missing = [name for name in best.required if name not in obj]
    return f"; missing field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} of schema {best.name}"


def detect_schema(obj: Any) -> tuple[str, str] | None:
    """`(kind, schema name)` of a record, e.g. `("conversation", "sharegpt")`, or None."""
    try:
        schema = _find_schema(obj)
    except DataError:
        return None
    return schema.kind, schema.name


def _convert(obj: Any, kind: str) -> Any:
    schema = _find_schema(obj, kind)
    if schema.kind != kind:
        raise DataError(f"expected a {kind} record, got a {schema.kind} record (schema {schema.name!r})")
    return schema.convert(obj)


def to_conversation(obj: Any) -> Conversation:
    """Any conversation schema → `Conversation` (raises `DataError`)."""
    return _convert(obj, "conversation")


def to_preference(obj: Any) -> PreferencePair:
    """Any preference schema → `PreferencePair` (raises `DataError`)."""
    return _convert(obj, "preference")


def to_prompt(obj: Any) -> PromptRecord:
    """An RL prompt record `{"prompt": text or [messages], …}` → `PromptRecord` (raises `DataError`)."""
    return _convert(obj, "prompt")


# ---------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class BadRecord:
    path: Path
    line: int  # 1-based line of a JSONL file, or 0-based item index of a JSON array (unit "item")
    reason: str
    unit: str = "line"

    def __str__(self) -> str:
        return f"{_where(self.path, self.line, self.unit)}: {self.reason}"


def _where(path: Path, line: int, unit: str) -> str:
    return f"{path}:{line}" if unit == "line" else f"{path}: item {line}"


@dataclass
class LoadResult:
    records: list
    kind: str
    schemas: dict[str, int]  # schema name → number of records
    path: Path
    skipped: list[BadRecord] = field(default_factory=list)


@dataclass(frozen=True)
class _Malformed:
    reason: str


def _record_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in RECORD_SUFFIXES)
    if not files:
        raise DataError(f"{path}: directory contains no {' or '.join(RECORD_SUFFIXES)} files")
    return files


class NotUTF8Error(DataError):
    """A file that is not UTF-8 text; `line` and `reason` name its first bad byte (offset in the file)."""

    def __init__(self, file: Path, line: int, reason: str) -> None:
        super().__init__(f"{file}:{line}: {reason}")
        self.file, self.line, self.reason = file, line, reason


def not_utf8_error(file: Path) -> NotUTF8Error:
    """The error for a file that is not UTF-8, naming the line and byte offset of the first bad byte
    (found by reading the file again, line by line, only on this error path)."""
    offset = 0
    with open(file, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return NotUTF8Error(file, line_no, f"not UTF-8 text ({e.reason} at byte {offset + e.start})")
            offset += len(raw)
    return NotUTF8Error(file, 1, "not UTF-8 text")


def read_text(file: str | Path, max_chars: int | None = None) -> str:
    """A UTF-8 text file (its first `max_chars` characters, if given), without a leading byte order mark;
    a file that is not UTF-8 raises `NotUTF8Error` naming `file:line` and the byte offset."""
    file = Path(file)
    try:
        with open(file, encoding="utf-8-sig") as f:
            return f.read() if max_chars is None else f.read(max_chars)
    except UnicodeDecodeError:
        raise not_utf8_error(file) from None


def _parse_json(file: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None


def is_json_array(file: str | Path) -> bool:
    """Whether a JSON(L) file holds one JSON array (its first character after a byte order mark and
    whitespace is '['), whatever its suffix."""
    with open(file, "rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    return head.startswith("[")


def _iter_file(file: Path) -> Iterator[tuple[int, str, Any]]:
    """`(line or item index, unit, object or _Malformed)`: a JSON array if the file starts with '[',
    else JSONL (a pretty-printed single object also works). A byte order mark is dropped; each JSONL line
    is decoded on its own, so a bad byte is reported at its own line (with its offset in the file), and
    released before its object is yielded (a huge line is held once)."""
    if is_json_array(file):
        for i, obj in enumerate(_parse_json(file, read_text(file))):
            yield i, "item", obj
        return
    first = True
    offset = 0
    with open(file, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield line_no, "line", _Malformed(f"not UTF-8 ({e.reason} at byte {start + e.start})")
                continue
            del raw
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                if first and text.strip() == "{":  # one pretty-printed object, not JSONL
                    try:
                        obj = json.loads(read_text(file))
                    except (json.JSONDecodeError, DataError):
                        pass
                    else:
                        yield line_no, "line", obj
                        return
                obj = _Malformed(f"malformed JSON ({e.msg} at column {e.colno})")
            first = False
            del text
            yield line_no, "line", obj
            del obj


def iter_json_objects(file: str | Path) -> Iterator[tuple[int, str, Any]]:
    """`(line or item index, where, object)` for each record of a JSON(L) file: the one reader of JSON
    records, for `load_records` and for readers of other record layouts (corpora, questions). A JSON
    array or JSONL (or one pretty-printed object), whatever the suffix; a UTF-8 byte order mark is
    dropped. `where` is `file:line` (or `file: item i`, 0-based), and a malformed line is a `DataError`
    there."""
    file = Path(file)
    for line, unit, obj in _iter_file(file):
        where = _where(file, line, unit)
        if isinstance(obj, _Malformed):
            raise DataError(f"{where}: {obj.reason}")
        yield line, where, obj


def _scan(path: Path, result: LoadResult, skip_bad: bool) -> Iterator[tuple[int, Any]]:
    if result.kind and result.kind not in KINDS:
        raise ValueError(f"unknown kind {result.kind!r}; choose one of {', '.join(KINDS)} or None (auto)")
    given, first = bool(result.kind), ""
    for file in _record_files(path):
        for line, unit, obj in _iter_file(file):
            try:
                if isinstance(obj, _Malformed):
                    raise DataError(obj.reason)
                schema = _find_schema(obj, result.kind or None)
                if result.kind and schema.kind != result.kind:
                    seen = f"a {schema.kind} record (schema {schema.name!r})"
                    raise DataError(f"expected {result.kind} records, got {seen}{_missing_hint(obj, result.kind)}"
                                    if given else
                                    f"mixing schemas: {seen} in {result.kind} data (first record: {first})")
                record = schema.convert(obj)
            except DataError as e:
                bad = BadRecord(file, line, str(e), unit)
                if not skip_bad:
                    raise DataError(str(bad)) from None
                logger.warning("skipping bad record %s", bad)
                result.skipped.append(bad)
                continue
            if not result.kind:
                result.kind = schema.kind
                first = f"{_where(file, line, unit)}, schema {schema.name!r}"
            result.schemas[schema.name] = result.schemas.get(schema.name, 0) + 1
            yield line, record
    if not result.schemas:
        if result.skipped:
            raise DataError(f"{path}: every record is bad ({len(result.skipped)} skipped; first: {result.skipped[0]})")
        raise DataError(f"{path}: no records")
    seen = ", ".join(f"{name}: {n}" for name, n in result.schemas.items())
    logger.info("%s: %d %s records (%s)%s", path, sum(result.schemas.values()), result.kind, seen,
                f"; skipped {len(result.skipped)} bad" if result.skipped else "")


def iter_records(path: str | Path, kind: str | None = None, skip_bad: bool = False,
                 result: LoadResult | None = None) -> Iterator[tuple[int, Any]]:
    """Stream `(line, record)` from a JSONL/JSON file or a directory of them (see `load_records`).

    Pass a `LoadResult` as `result` to watch the stream: its `schemas` counts and `skipped` list grow as
    records are read (its `kind`, if set, is the kind expected)."""
    path = Path(path)
    yield from _scan(path, result if result is not None else LoadResult([], kind or "", {}, path), skip_bad)


def load_records(path: str | Path, kind: str | None = None, skip_bad: bool = False) -> LoadResult:
    """Read every record of a file or directory into its internal form.

    `kind` is "conversation", "preference", "labelled", "prompt", "text" or None (from the first valid record);
    every record must be of that kind, though schemas of one kind may mix. A bad record raises
    `DataError("{file}:{line}: {reason}")`, or with `skip_bad` is skipped and listed in `skipped`;
    if every record is bad, `DataError` is raised regardless."""
    path = Path(path)
    result = LoadResult([], kind or "", {}, path)
    result.records = [record for _, record in _scan(path, result, skip_bad)]
    return result


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    counts = Counter(k for k, _ in pairs)
    duplicates = [k for k, n in counts.items() if n > 1]
    if duplicates:
        raise DataError(f"duplicate token {duplicates[0]!r}")
    return dict(pairs)


def load_word_vocab(path: str | Path) -> dict[str, int]:
    """A word-level `vocab.json`: a JSON object token → id, or a list of tokens (id = position)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such vocabulary file")
    try:
        data = json.loads(read_text(path), object_pairs_hook=_unique_keys)
    except NotUTF8Error:
        raise
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    if isinstance(data, list):
        for i, token in enumerate(data):
            if not isinstance(token, str):
                raise DataError(f"{path}: item {i}: a token must be a string, got {_type(token)}")
        duplicates = [t for t, n in Counter(data).items() if n > 1]
        if duplicates:
            ids = [i for i, t in enumerate(data) if t == duplicates[0]]
            raise DataError(f"{path}: duplicate token {duplicates[0]!r} at ids {ids}")
        vocab = {token: i for i, token in enumerate(data)}
    elif isinstance(data, dict):
        owner: dict[int, str] = {}
        for token, idx in data.items():
            if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
                raise DataError(f"{path}: the id of token {token!r} must be a non-negative integer, got {idx!r}")
            if idx in owner:
                raise DataError(f"{path}: duplicate id {idx} (tokens {owner[idx]!r} and {token!r})")
            owner[idx] = token
        vocab = data
    else:
        raise DataError(f"{path}: expected a JSON object token → id or a list of tokens, got {_type(data)}")
    if not vocab:
        raise DataError(f"{path}: empty vocabulary")
    for token in vocab:
        if token.split() != [token]:
            raise DataError(f"{path}: token {token!r} is empty or contains whitespace (tokens are space-separated)")
    return vocab
