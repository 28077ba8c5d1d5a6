"""`precision: auto` and `compile: auto`: decided by timing the model that will be trained, on this machine.

Precision. On a GPU nothing needs measuring: bf16 autocast where the GPU supports it, else fp16 with a
gradient scaler; other accelerators train in fp32. On a CPU the candidates are fp32 and, only where the CPU
reports native bf16 (`avx512_bf16` or `amx_bf16` in /proc/cpuinfo; elsewhere bf16 is emulated and about 100×
slower), bf16. Which of the two wins depends on the model more than on the CPU: with AMX a wide model's
matrix products run several times faster in bf16, while a narrow model spends its step in casts, norms,
attention and the optimizer, where autocast only adds work. So each candidate takes a few optimizer steps
(forward, next-token loss, backward, gradient clipping, AdamW) on its own copy of the model, on random
tokens of the run's micro-batch shape, interleaved (fp32, bf16, fp32, bf16, ...) so that a neighbour's load
hits both alike; the lower median wins.

Compile. `torch.compile` pays off when compile_s + steps × t_compiled < steps × t_eager, `steps` being the
run's optimizer steps. Compiling takes tens of seconds on a CPU, so the bound comes first: when even a
`COMPILE_MAX_SPEEDUP`-fold faster step could not win back the quickest compile measured on this device
(`COMPILE_S_PRIOR` before any), the run trains eager without trying. Otherwise a compiled copy is timed
against an eager one; its first steps, less its later ones, give compile_s. A `torch.compile` that fails
is logged and the run trains eager.

Not measured, where the rule applies instead (precision as `resolve_precision`, compile off):
`MINILLM_AUTOTUNE=0`; runs under torchrun (every rank must train alike); runs whose micro-batch shape is
not known before training (batches handed to `train_epoch` later) or whose model the probe cannot step;
runs of fewer than `MIN_STEPS` steps or shorter than `MIN_RUN_S` seconds by one measured fp32 step. Those
have little to win, and the measurement would be a noticeable part of them.

Cache. The timings go to `autotune.json` in the cache directory (`$MINILLM_CACHE_DIR`, else
`~/.cache/minillm`), one entry per device name, thread count, torch version, model config, micro-batch
shape and candidate set (for compile also the precision), so the next run of that shape on this machine
decides at once; the compile rule is applied to the stored timings with each run's own step count. Delete
the file to measure again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from minillm.io import atomic_write_json, cache_root, read_json_cache
from minillm.training.mfu import device_name

logger = logging.getLogger("minillm.training")

CACHE_FILE = "autotune.json"
SWITCH_ENV = "MINILLM_AUTOTUNE"  # "0", "false" or "off": never measure, use the rule
MIN_STEPS = 100  # shorter runs are not measured
MIN_RUN_S = 20.0  # nor runs estimated (steps × one fp32 step) to take less than this
ROUNDS = 3  # interleaved timing rounds of one step per candidate ...
MAX_ROUNDS = 7  # ... up to this many while the medians are within CLOSE of each other
CLOSE = 0.1
COMPILE_WARMUP_STEPS = 2  # the first compiled steps compile (forward and backward, then any recompile)
COMPILE_MAX_SPEEDUP = 1.5  # the bound before compiling: a compiled step is assumed at most this much faster
COMPILE_S_PRIOR = {"cpu": 20.0, "cuda": 20.0}  # seconds of compiling assumed before one was measured here
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass
class ProbeRun:
    """What the measurement needs to know of the run: its micro-batch shape and its length in steps."""

    batch_size: int
    seq_len: int
    total_steps: int


@dataclass
class Decision:
    """The outcome of an `auto` setting: the choice, how it was made and the timings behind it."""

    choice: str | None  # fp32 | bf16 | fp16, or compiled | eager; None: not measured, the rule decides
    source: str  # measured | cached | rule | bound | skipped
    ms_per_step: dict[str, float] = field(default_factory=dict)
    compile_s: float | None = None
    reason: str = ""
    cache_file: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, "", {})}


# ---------------------------------------------------------------------------------------- the machine
def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU reports bf16 instructions (AVX512-BF16 or AMX); `cpuinfo`: /proc/cpuinfo's text."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split()}
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def adamw_fused_ok(device: str | torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for `device` (CUDA; the CPU since torch 2.4): one pass over
    each parameter instead of a dozen elementwise kernels, a large share of a small model's step."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return torch.device(device).type == "cuda"
    return torch.device(device).type in _get_fused_kernels_supported_devices()


def autotune_enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


# ---------------------------------------------------------------------------------------- the run
def probe_run(data: Any, batch_size: int, grad_accum_steps: int = 1, max_steps: int | None = None,
              epochs: float = 1.0) -> ProbeRun | None:
    """The run's micro-batch shape and step count, read from its training data without drawing a batch
    (that would move the loader's position or the global RNG): a map-style dataset of token windows or of
    items with `lengths` (their median), a loader over one (`.dataset`, `.batch_size`), or a list of
    batches. None where they cannot be known."""
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], dict) \
            and torch.is_tensor(data[0].get("input_ids")):
        batch_size, seq_len = data[0]["input_ids"].shape
        batches = len(data)
    else:
        dataset = data if isinstance(data, Dataset) else getattr(data, "dataset", None)
        if not isinstance(dataset, Dataset):
            return None
        if dataset is not data:
            batch_size = getattr(data, "batch_size", None) or batch_size
        try:
            items = len(dataset)  # type: ignore[arg-type]
            lengths = getattr(dataset, "lengths", None)
            if lengths is not None:
                seq_len = int(statistics.median([int(n) for n in lengths]))
            else:
                item = dataset[0]
                seq_len = int(torch.as_tensor(item["input_ids"]).shape[-1])
        except (TypeError, KeyError, IndexError, ValueError):
            return None
        batches = math.ceil(items / batch_size)
    steps = max_steps or max(1, math.ceil(epochs * batches / grad_accum_steps))
    if batch_size < 1 or seq_len < 2:
        return None
    return ProbeRun(int(batch_size), int(seq_len), int(steps))


# ---------------------------------------------------------------------------------------- measuring
class StepProbe:
    """Times optimizer steps of copies of `model`, each with its own precision and compile setting, on one
    batch of random tokens. The global RNG is left as it was (dropout draws from it)."""

    def __init__(self, model: nn.Module, device: torch.device, batch_size: int, seq_len: int) -> None:
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        if not vocab_size:
            raise TypeError(f"{type(model).__name__} has no config.vocab_size to draw tokens from")
        self.model, self.device = model, device
        generator = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)
        self._steps: dict[str, Callable[[], None]] = {}

    def add(self, name: str, autocast_dtype: torch.dtype | None, compiled: bool = False) -> None:
        model = copy.deepcopy(self.model).train()
        if compiled:
            model.compile()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-6, fused=adamw_fused_ok(self.device) or None)
        ids = self.input_ids

        def step() -> None:
            with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = model(ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        self._steps[name] = step

    def time(self, name: str) -> float:
        """Seconds of one optimizer step of the copy `name`."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self._synchronize()
            start = time.perf_counter()
            self._steps[name]()
            self._synchronize()
            return time.perf_counter() - start

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


ProbeFactory = Callable[[nn.Module, torch.device, int, int], StepProbe]


def interleaved_medians(probe: StepProbe, names: Sequence[str]) -> dict[str, float]:
    """Median seconds per step of each copy, timed in turn for `ROUNDS` rounds, more (up to `MAX_ROUNDS`)
    while the two fastest are within `CLOSE` of each other."""
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(MAX_ROUNDS):
        for name in names:
            times[name].append(probe.time(name))
        if round_ + 1 >= ROUNDS:
            medians = sorted(statistics.median(t) for t in times.values())
            if len(medians) < 2 or medians[1] > medians[0] * (1 + CLOSE):
                break
    return {name: statistics.median(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------- the cache
def cache_path() -> Path:
    return cache_root() / CACHE_FILE


def cache_key(kind: str, model: nn.Module, device: torch.device, run: ProbeRun, candidates: Sequence[str],
              **extra: Any) -> dict[str, Any]:
    """What a measurement depends on: the machine, torch, the model and the micro-batch shape."""
    config = getattr(model, "config", None)
    model_key = config.to_dict() if hasattr(config, "to_dict") else None
    return {"kind": kind, "device": device_name(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "model_class": type(model).__name__, "model": model_key,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "batch": [run.batch_size, run.seq_len], "candidates": list(candidates), **extra}


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _cache_lookup(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    entry = read_json_cache(path).get(_digest(key))
    return entry if isinstance(entry, dict) and entry.get("key") == json.loads(json.dumps(key, default=str)) \
        else None


def _cache_store(path: Path, key: dict[str, Any], values: dict[str, Any]) -> None:
    entries = read_json_cache(path)  # read again: another run may have written meanwhile
    entries[_digest(key)] = {"key": key, **values, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        atomic_write_json(path, entries)
    except OSError as e:  # a read-only home must not stop training
        logger.warning("could not cache the autotune timings in %s: %s", path, e)


def _quickest_compile_s(path: Path, device: torch.device) -> float:
    name = device_name(device)
    seen = [entry["compile_s"] for entry in read_json_cache(path).values()
            if isinstance(entry, dict) and entry.get("key", {}).get("device") == name
            and isinstance(entry.get("compile_s"), (int, float))]
    return min(seen) if seen else COMPILE_S_PRIOR.get(device.type, 20.0)


# ---------------------------------------------------------------------------------------- the choices
def _skip_reason(run: ProbeRun | None, distributed: bool) -> str | None:
    if not autotune_enabled():
        return f"{SWITCH_ENV}=0"
    if distributed:
        return "under torchrun every rank trains alike"
    if run is None:
        return "the micro-batch shape is not known before training"
    if run.total_steps < MIN_STEPS:
        return f"a run of {run.total_steps} steps (< {MIN_STEPS})"
    return None


def _short_run(run: ProbeRun, step_s: float) -> str | None:
    if run.total_steps * step_s < MIN_RUN_S:
        return (f"the run takes about {run.total_steps * step_s:.0f} s ({run.total_steps} steps of "
                f"{step_s * 1e3:.0f} ms), too short to gain from measuring")
    return None


def _ms(timings: dict[str, float]) -> dict[str, float]:
    return {name: round(seconds * 1e3, 3) for name, seconds in timings.items()}


def _timings_text(ms_per_step: dict[str, float], choice: str) -> str:
    others = [f"{name} ({ms:.1f} ms/step)" for name, ms in ms_per_step.items() if name != choice]
    return f"{choice} ({ms_per_step[choice]:.1f} ms/step) vs {', '.join(others)}"


def choose_precision(model: nn.Module, device: str | torch.device, run: ProbeRun | None, *,
                     distributed: bool = False, probe_factory: ProbeFactory = StepProbe,
                     cache_file: Path | None = None, cpuinfo: str | None = None) -> Decision:
    """`precision: auto` for training `model` on `device` (see the module docstring). A choice of None
    means nothing was measured and `resolve_precision`'s rule applies."""
    device = torch.device(device)
    if device.type == "cuda":
        choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return Decision(choice, "rule", reason="bf16 where the GPU supports it, else fp16")
    if device.type != "cpu":
        return Decision("fp32", "rule", reason=f"no autocast on {device.type}")
    if not cpu_has_native_bf16(cpuinfo):
        return Decision("fp32", "rule", reason="this CPU has no native bf16 (avx512_bf16, amx_bf16)")
    candidates = ("fp32", "bf16")
    skip = _skip_reason(run, distributed)
    if skip is not None:
        return _log(Decision(None, "skipped", reason=skip), "precision")
    assert run is not None
    path = cache_file or cache_path()
    key = cache_key("precision", model, device, run, candidates)
    cached = _cache_lookup(path, key)
    if cached is not None:
        ms = cached["ms_per_step"]
        return _log(Decision(min(ms, key=ms.get), "cached", ms, cache_file=str(path)), "precision")
    try:
        probe = probe_factory(model, device, run.batch_size, run.seq_len)
        probe.add("fp32", None)
        probe.time("fp32")  # warm-up: allocations, kernel selection
        skip = _short_run(run, probe.time("fp32"))
        if skip is not None:
            return _log(Decision(None, "skipped", reason=skip), "precision")
        probe.add("bf16", torch.bfloat16)
        probe.time("bf16")
        timings = interleaved_medians(probe, candidates)
    except Exception as e:  # a model the probe cannot step (another forward signature): the rule decides
        return _log(Decision(None, "skipped", reason=f"could not time this model ({type(e).__name__}: {e})"),
                    "precision")
    ms = _ms(timings)
    _cache_store(path, key, {"ms_per_step": ms})
    return _log(Decision(min(ms, key=ms.get), "measured", ms, cache_file=str(path)), "precision")


def choose_compile(model: nn.Module, device: str | torch.device, run: ProbeRun | None,
                   autocast_dtype: torch.dtype | None, *, distributed: bool = False,
                   probe_factory: ProbeFactory = StepProbe, cache_file: Path | None = None) -> Decision:
    """`compile: auto` for training `model` on `device` in `autocast_dtype` (see the module docstring):
    "compiled" when compile_s + steps × t_compiled < steps × t_eager, else "eager"."""
    device = torch.device(device)
    precision = next(name for name, dtype in DTYPES.items() if dtype == autocast_dtype)
    skip = _skip_reason(run, distributed)
    if skip is None and not hasattr(torch, "compile"):
        skip = "this torch has no torch.compile"
    if skip is not None:
        return _log(Decision("eager", "skipped", reason=skip), "compile")
    assert run is not None
    path = cache_file or cache_path()
    candidates = ("eager", "compiled")
    key = cache_key("compile", model, device, run, candidates, precision=precision)
    cached = _cache_lookup(path, key)
    if cached is not None:
        if cached.get("failed"):
            return _log(Decision("eager", "cached", cached.get("ms_per_step", {}), reason=cached["failed"],
                                 cache_file=str(path)), "compile")
        return _log(_amortised(cached["ms_per_step"], cached["compile_s"], run.total_steps, "cached", path),
                    "compile")
    try:
        probe = probe_factory(model, device, run.batch_size, run.seq_len)
        probe.add("eager", autocast_dtype)
        probe.time("eager")
        eager_s = probe.time("eager")
    except Exception as e:
        return _log(Decision("eager", "skipped", reason=f"could not time this model ({type(e).__name__}: {e})"),
                    "compile")
    skip = _short_run(run, eager_s)
    if skip is not None:
        return _log(Decision("eager", "skipped", reason=skip), "compile")
    quickest = _quickest_compile_s(path, device)
    best_gain = run.total_steps * eager_s * (1 - 1 / COMPILE_MAX_SPEEDUP)
    if best_gain < quickest:
        return _log(Decision("eager", "bound", {"eager": round(eager_s * 1e3, 3)}, reason=(
            f"even {COMPILE_MAX_SPEEDUP:g}x faster steps would save at most {best_gain:.0f} s over "
            f"{run.total_steps} steps, compiling takes about {quickest:.0f} s here")), "compile")
    try:
        probe.add("compiled", autocast_dtype, compiled=True)
        warmup_s = sum(probe.time("compiled") for _ in range(COMPILE_WARMUP_STEPS))
    except Exception as e:  # torch.compile unavailable or broken here (no compiler, unsupported Python, ...)
        reason = f"torch.compile failed here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        _cache_store(path, key, {"failed": reason, "ms_per_step": {"eager": round(eager_s * 1e3, 3)}})
        logger.warning("compile auto: %s; training eager", reason)
        return Decision("eager", "measured", {"eager": round(eager_s * 1e3, 3)}, reason=reason,
                        cache_file=str(path))
    timings = interleaved_medians(probe, candidates)
    compile_s = round(max(warmup_s - COMPILE_WARMUP_STEPS * timings["compiled"], 0.0), 2)
    ms = _ms(timings)
    _cache_store(path, key, {"ms_per_step": ms, "compile_s": compile_s})
    return _log(_amortised(ms, compile_s, run.total_steps, "measured", path), "compile")


def _amortised(ms: dict[str, float], compile_s: float, steps: int, source: str, path: Path) -> Decision:
    saved_s = steps * (ms["eager"] - ms["compiled"]) / 1e3
    choice = "compiled" if compile_s < saved_s else "eager"
    reason = f"{steps} steps save {saved_s:.1f} s {'>' if choice == 'compiled' else '<='} {compile_s:.1f} s compiling"
    return Decision(choice, source, ms, compile_s, reason, str(path))


def _log(decision: Decision, setting: str) -> Decision:
    if decision.choice is None or len(decision.ms_per_step) < 2:
        logger.info("%s auto: %s (%s)", setting, decision.choice or "by rule, not measured", decision.reason)
        return decision
    where = ("measured on this model" if decision.source == "measured"
             else "measured earlier on this machine for this model and shape")
    extra = f", {decision.compile_s:.1f} s to compile; {decision.reason}" if decision.compile_s is not None else ""
    logger.info("%s auto: %s, %s%s; cached in %s", setting, _timings_text(decision.ms_per_step, decision.choice),
                where, extra, decision.cache_file)
    return decision


__all__ = ["CACHE_FILE", "DTYPES", "MIN_RUN_S", "MIN_STEPS", "SWITCH_ENV", "Decision", "ProbeRun", "StepProbe",
           "adamw_fused_ok", "autotune_enabled", "cache_key", "cache_path", "choose_compile", "choose_precision",
           "cpu_has_native_bf16", "interleaved_medians", "probe_run"]
