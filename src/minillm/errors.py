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
