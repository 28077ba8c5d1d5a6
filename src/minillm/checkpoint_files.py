"""Reading the files of a model directory (config.json, the tokenizer's files, weight indexes).

Every way such a file can be missing or malformed becomes one `CheckpointError` whose message starts
with the file's path and says what is wrong, in one line. This module needs neither torch nor the
tokenizers library, so the tokenizer package uses it too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from minillm.errors import CheckpointError

CONFIG_FILE = "config.json"
# A checkpoint being replaced is moved to NAME.old until the new one is in place (see training.checkpoint).
OLD_SUFFIX = ".old"


class MissingCheckpointFileError(CheckpointError, FileNotFoundError):
    """A file or directory a checkpoint needs does not exist (also a `FileNotFoundError`, for callers that
    catch that)."""


def check_directory(directory: str | Path, what: str = "checkpoint directory") -> Path:
    """`directory` as a Path; `CheckpointError` when it does not exist or is a file."""
    directory = Path(directory)
    if not directory.exists():
        raise MissingCheckpointFileError(f"{directory}: not a {what} (no such directory)")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a {what} (it is a file)")
    return directory


def require_file(path: str | Path, hint: str = "") -> Path:
    """`path` when it is a file; else a `CheckpointError` naming it (`hint` is appended to the message)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a file{hint}")
    raise MissingCheckpointFileError(f"{path}: missing{hint}")


def config_file(directory: str | Path) -> Path:
    """The `config.json` of the model directory `directory`, which must exist."""
    directory = check_directory(directory)
    return require_file(directory / CONFIG_FILE, f" ({directory} is not a checkpoint directory)")


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's content."""
    path = require_file(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from e


def json_kind(value: Any) -> str:
    """How JSON spells the type of `value` (for messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file holding an object: its content as a dict."""
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise CheckpointError(f"{path}: empty file, expected a JSON object")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except RecursionError as e:
        raise CheckpointError(f"{path}: not valid JSON: nested too deeply") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {json_kind(data)}")
    return data


__all__ = ["CONFIG_FILE", "MissingCheckpointFileError", "check_directory", "config_file", "json_kind",
           "read_json_object", "read_text", "require_file"]


def load_torch_file(path: str | Path, what: str = "PyTorch file", map_location: Any = "cpu") -> Any:
    """A file written by `torch.save`, loaded with `weights_only=True` (no pickled code runs);
    `CheckpointError` naming it when it is missing, truncated or not such a file."""
    import torch  # here only: the rest of this module is read by code that does not need torch

    path = require_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # a corrupt file raises anything from struct.error to UnpicklingError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise CheckpointError(f"{path}: not a readable {what}, truncated or corrupt ({first[:120]})") from e


def resolve_checkpoint(directory: str | Path) -> Path:
    """The checkpoint to load for `directory`: itself, or its `.old` copy if a save was interrupted.
    `CheckpointError` (the message `MiniGPT.from_pretrained` gives) when it is neither: no such directory,
    a file, or a directory without config.json."""
    directory = Path(directory)
    if (directory / CONFIG_FILE).is_file():
        return directory
    old = directory.with_name(directory.name + OLD_SUFFIX)
    if (old / CONFIG_FILE).is_file():
        return old
    return config_file(directory).parent  # raises, naming what is missing
