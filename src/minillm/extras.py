"""Optional dependencies: what `pip install mini-llm` leaves out (plots, BLEU, trackers, ONNX, GGUF) is
imported only where it is used, and its absence is one clear error naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from minillm.errors import MiniLLMError


class MissingExtraError(MiniLLMError, ImportError):
    """A feature whose optional package is not installed; the message names the pip extra."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """`import module`, or a `MissingExtraError` saying that `feature` needs it and which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.split(".")[0]
        raise MissingExtraError(f"{feature} needs the {package} package, which is not installed: "
                                f"pip install 'mini-llm[{extra}]'") from e
