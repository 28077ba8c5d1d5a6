"""The project's exception types. Every error a user's input can cause (a bad config value, a corrupt
file, a checkpoint that cannot continue a run) is a `MiniLLMError` whose message names the culprit (file,
line, key or flag) in one line; the CLI prints that line and exits with status 2."""

from __future__ import annotations


class MiniLLMError(Exception):
    """Base class of the errors bad input causes; the message is one line that names the culprit."""


class CheckpointError(MiniLLMError, ValueError):
    """A model directory that cannot be read: missing, truncated or malformed files."""


class OutputExistsError(MiniLLMError, FileExistsError):
    """A command would write into a non-empty directory; it refuses unless asked to `--overwrite`."""


class DataError(MiniLLMError, ValueError):
    """Bad input data; the message names the file (and line) and the reason."""


class ExportError(MiniLLMError, ValueError):
    """A model that cannot be exported (or converted) as asked; the message names the field and the reason."""


class UnsupportedCheckpointError(ExportError, CheckpointError):
    """A Hugging Face model directory whose config.json describes a model `MiniGPT` cannot compute exactly
    (or no model at all); the message names the file and the field."""
