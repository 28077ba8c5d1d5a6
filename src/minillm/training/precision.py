"""Training precision and torch.compile: what `precision` and `compile` (including `auto`) mean on a device.

`resolve_precision` is the rule where no model is measured (a dry run, a benchmark's comparison); the
`Trainer` measures `auto` on its own model (`choose_autocast_dtype`, `choose_compiled`, which time a few
steps through `minillm.training.autotune`) and falls back on the rule where it cannot.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from minillm.device import mps_supports_bf16
from minillm.training.autotune import DTYPES, ProbeRun, choose_compile, choose_precision, cpu_has_native_bf16
from minillm.training.mfu import time_matmul

__all__ = ["PRECISIONS", "autocast", "choose_autocast_dtype", "choose_compiled", "cpu_bf16_is_fast",
           "precision_name", "resolve_precision"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@lru_cache(maxsize=1)
def cpu_bf16_is_fast() -> bool:
    """Whether bf16 matrix products beat fp32 on this CPU (the rule where no model is measured).

    CPUs without bf16 instructions (AVX512-BF16, AMX) emulate it and run ~100× slower than fp32, so the
    flags are checked first; where they are present, a short timing confirms the speed-up.
    """
    if not cpu_has_native_bf16():
        return False
    cpu = torch.device("cpu")
    return time_matmul(cpu, torch.bfloat16, 384) * 1.5 < time_matmul(cpu, torch.float32, 384)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None: plain fp32).

    `auto` without a model to measure (a dry run's memory estimate, a short run): bf16 on GPUs that support
    it, fp16 (with a gradient scaler) on older GPUs, bf16 on Apple GPUs (MPS) that compute in it and fp32
    on those that do not, and on CPUs bf16 only where it is native and its matrix products are faster,
    otherwise fp32. The `Trainer` measures `auto` on its model instead (`choose_autocast_dtype`), except on
    MPS, where the rule decides.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_bf16_is_fast() else None
    if device.type == "mps":
        return torch.bfloat16 if mps_supports_bf16() else None
    return None


def precision_name(precision: str, device: torch.device) -> str:
    """`resolve_precision` as a name: fp32, bf16 or fp16 (`auto` resolved by the rule)."""
    dtype = resolve_precision(precision, device)
    return next(name for name, d in DTYPES.items() if d == dtype)


def choose_autocast_dtype(precision: str, model: nn.Module, device: torch.device, run: ProbeRun | None, *,
                          distributed: bool) -> tuple[torch.dtype | None, dict[str, Any] | None]:
    """The trainer's autocast dtype and, for `auto`, the decision behind it (None otherwise): `auto` is
    measured on `model` for `run` (see autotune.py); where it is not measured, the rule decides."""
    if precision != "auto":
        return resolve_precision(precision, device), None
    if device.type == "mps":  # no timing on Apple GPUs: the rule (bf16 where MPS computes in it)
        return resolve_precision("auto", device), {"choice": precision_name("auto", device), "reason": "rule (MPS)"}
    decision = choose_precision(model, device, run, distributed=distributed)
    if decision.choice is None:
        decision.choice = precision_name("auto", device)
    return DTYPES[decision.choice], decision.as_dict()


def choose_compiled(compile: bool | str, model: nn.Module, device: torch.device, run: ProbeRun | None,
                    autocast_dtype: torch.dtype | None, *, distributed: bool) -> tuple[bool, dict[str, Any] | None]:
    """Whether to torch.compile `model` and, for `auto`, the decision behind it (None otherwise): `auto`
    compiles where it measured faster at the chosen autocast dtype (see autotune.py)."""
    if compile != "auto":
        return bool(compile), None
    if device.type == "mps":  # torch.compile's MPS backend is still experimental: eager
        return False, {"choice": "eager", "reason": "rule (MPS: no torch.compile)"}
    decision = choose_compile(model, device, run, autocast_dtype, distributed=distributed)
    return decision.choice == "compiled", decision.as_dict()


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """The forward passes' autocast context: none for fp32."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)
