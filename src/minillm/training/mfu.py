"""Model FLOPs utilisation: achieved matmul FLOP/s over the device's peak.

    from minillm.training.mfu import mfu, peak_flops
    peak = peak_flops("cuda", torch.bfloat16)                  # datasheet value for known GPUs
    mfu(tokens_per_s, model.flops_per_token(seq_len), peak)    # 0.42 means 42 %

`peak_flops` uses the dense (no sparsity) tensor-core datasheet figure for GPUs in `GPU_PEAK_FLOPS`;
for anything else (CPUs, other GPUs, fp32) it measures: `measure_peak_flops` times a few square matmuls
in the given dtype once per machine and caches the best FLOP/s in `$MINILLM_CACHE_DIR/peak_flops.json`
(default `~/.cache/minillm`), keyed by device name, dtype, torch version and CPU thread count.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from minillm.io import cache_root, read_json_cache

log = logging.getLogger("minillm.training")

_HALF = (torch.bfloat16, torch.float16)
_FP16 = (torch.float16,)

# (pattern on the upper-cased `torch.cuda.get_device_name`, dtypes, dense peak FLOP/s); first match wins,
# so the specific names come before the general ones.
GPU_PEAK_FLOPS: list[tuple[str, tuple[torch.dtype, ...], float]] = [
    (r"B200", _HALF, 2250e12),
    (r"H100.*PCIE", _HALF, 756e12),
    (r"H100.*NVL", _HALF, 835e12),
    (r"H100|H800", _HALF, 989e12),          # SXM
    (r"H200", _HALF, 989e12),               # H200 and GH200: H100 SXM compute with more memory
    (r"A100|A800", _HALF, 312e12),
    (r"\bA10\b", _HALF, 125e12),
    (r"L40S", _HALF, 362e12),
    (r"\bL4\b", _HALF, 121e12),
    (r"RTX 4090", _HALF, 165e12),
    (r"RTX 3090", _HALF, 71e12),
    (r"V100", _FP16, 125e12),               # no bf16 tensor cores
    (r"\bT4\b", _FP16, 65e12),
]


def datasheet_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """The datasheet peak FLOP/s of a GPU by name (e.g. "NVIDIA A100-SXM4-80GB") in `dtype`, or None."""
    name = device_name.upper()
    for pattern, dtypes, peak in GPU_PEAK_FLOPS:
        if re.search(pattern, name):
            return peak if dtype in dtypes else None
    return None


def device_name(device: str | torch.device) -> str:
    """A readable name for the machine's device: the GPU model, or the CPU model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "cpu"
    return device.type


def peak_flops(device: str | torch.device, dtype: torch.dtype | None = None) -> float:
    """Peak matmul FLOP/s of `device` in `dtype` (None: fp32): the datasheet value for known GPUs,
    otherwise measured once and cached (see `measure_peak_flops`)."""
    dtype = dtype or torch.float32
    if torch.device(device).type == "cuda":
        peak = datasheet_peak_flops(device_name(device), dtype)
        if peak is not None:
            return peak
    return measure_peak_flops(device, dtype)


def measure_peak_flops(device: str | torch.device, dtype: torch.dtype | None = None) -> float:
    """The best FLOP/s of a few square matmuls (2048², 1024² on CPU) in `dtype`, cached per machine."""
    device, dtype = torch.device(device), dtype or torch.float32
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = f"{device_name(device)} | {dtype} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    cache = _cache_path()
    entries = read_json_cache(cache)
    if isinstance(entries.get(key), (int, float)) and entries[key] > 0:
        return float(entries[key])
    n = 1024 if device.type == "cpu" else 2048
    seconds = time_matmul(device, dtype, n)
    flops = 2 * n**3 / seconds
    log.info("measured peak matmul throughput of %s: %.3g FLOP/s (cached in %s)", key, flops, cache)
    entries = read_json_cache(cache)  # another process may have written meanwhile
    entries[key] = flops
    _write_cache(cache, entries)
    return flops


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation as a fraction: tokens/s × FLOPs per token / peak FLOP/s."""
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return tokens_per_s * flops_per_token / peak


def mfu_estimator(model: Any, device: str | torch.device,
                  dtype: torch.dtype | None = None) -> Callable[[float, int | None], float] | None:
    """`estimate(tokens_per_s, seq_len=None) -> MFU` for a model with `flops_per_token(seq_len)`, or None
    (no such method, or the peak could not be found). Where this returns None, training goes on without MFU."""
    flops_per_token = getattr(model, "flops_per_token", None)
    if flops_per_token is None:
        return None
    try:
        peak = peak_flops(device, dtype)
    except Exception as e:  # MFU is a nicety; never stop training for it
        log.warning("MFU is not logged: the device's peak FLOP/s could not be found (%s)", e)
        return None

    def estimate(tokens_per_s: float, seq_len: int | None = None) -> float:
        return mfu(tokens_per_s, flops_per_token(seq_len), peak)

    return estimate


# ---------------------------------------------------------------------------------------- internals
def time_matmul(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Best wall time in seconds of one n×n @ n×n matmul on `device` in `dtype`."""
    # A private generator: measuring must not move the global RNG (that would break exact resume).
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=generator).to(dtype)
    b = torch.randn(n, n, device=device, generator=generator).to(dtype)
    per_timing = 1 if device.type == "cpu" else 10  # GPU: amortise launch and sync
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        c = a @ b  # warm-up (kernel selection, allocation)
        sync()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(per_timing):
                c = a @ b
            sync()
            best = min(best, (time.perf_counter() - start) / per_timing)
        del c
    return max(best, 1e-9)


def _cache_path() -> Path:
    return cache_root() / "peak_flops.json"


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop training
        log.warning("could not cache the measured peak FLOP/s in %s: %s", path, e)
