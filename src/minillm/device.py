"""Which torch device to run on: the one rule behind every `--device auto` and `device=None`."""

from __future__ import annotations

import torch

from minillm.errors import MiniLLMError

AUTO = "auto"


class DeviceError(MiniLLMError, ValueError):
    """A device name torch does not know, or an accelerator this machine lacks; the message names it."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device | None = AUTO) -> torch.device:
    """The device `name` stands for. `"auto"` or None: CUDA when torch sees a GPU, else Apple's MPS when
    available, else the CPU. Anything else is a torch device name (`cpu`, `cuda`, `cuda:1`, `mps`) or a
    `torch.device`, returned as it is; a name torch does not know, or a CUDA or MPS device this machine
    lacks, raises a `DeviceError` (a ValueError) that names it."""
    if name is None or (isinstance(name, str) and name.strip().lower() == AUTO):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if isinstance(name, torch.device):
        device = name
    else:
        try:
            device = torch.device(name.strip())
        except (RuntimeError, TypeError, AttributeError) as e:
            raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {str(name)!r} was asked for but torch sees no CUDA GPU")
    if device.type == "mps" and not _mps_available():
        raise DeviceError(f"device {str(name)!r} was asked for but MPS is not available on this machine")
    return device


def mps_supports_bf16() -> bool:
    """Whether this Apple GPU computes in bfloat16 (macOS 14 and later with a recent torch): tried once
    with a small tensor rather than guessed from version numbers."""
    if not _mps_available():
        return False
    try:
        return bool((torch.ones(2, dtype=torch.bfloat16, device="mps") * 2).sum().item() == 4)
    except (RuntimeError, TypeError):
        return False
