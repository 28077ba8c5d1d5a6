"""Training memory: what a run will need (`estimate_memory`), what it uses (`MemoryMonitor`), and the
knobs that trade speed for memory (`MemoryConfig`).

    from minillm.training.memory import estimate_memory
    print(estimate_memory(MiniGPTConfig.from_preset("micro"), batch_size=16, seq_len=256).format())

The estimate needs only a `MiniGPTConfig` (no model is built), so `minillm train --dry-run` can print it
before allocating anything. It counts, in bytes:

- weights: the fp32 parameters and buffers (mixed precision autocasts; the master weights stay fp32);
- gradients: one fp32 tensor per trainable parameter;
- optimizer: AdamW's two fp32 moments per trainable parameter;
- activations: the tensors autograd saves for backward in *this* implementation (see
  `activation_bytes`), plus the logits and the fp32 log-softmax of the loss, plus, under autocast, the
  half-precision copies of the weights autocast caches for the forward pass.

It was calibrated on the CPU against `measure_peak_training_memory` (the peak of all tensor memory over
a steady-state forward + backward + AdamW step, including weights and optimizer state) and agrees within
30 % there; `tests/test_memory.py` prints the comparison. Allocator overhead (the CUDA caching
allocator's reserve, glibc arenas) and the CUDA context (~300-500 MB) are not included.
"""

from __future__ import annotations

import copy
import os
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from minillm.model.config import MiniGPTConfig

__all__ = ["MemoryConfig", "MemoryEstimate", "MemoryMonitor", "activation_bytes", "count_parameters",
           "estimate_memory", "measure_peak_training_memory", "resident_bytes", "step_peak_bytes"]

MB = 1024 ** 2
GB = 1024 ** 3
PRECISIONS = ("fp32", "bf16", "fp16")
# fp32 state tensors per trainable parameter (muon: one, its momentum, on the hidden matrices; AdamW's
# two on the rest, see `hidden_matrix_parameters`)
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "muon": 1, "lion": 1, "sgd_momentum": 1, "sgd": 0}


# ---------------------------------------------------------------------------------------- config
@dataclass
class MemoryConfig:
    """Memory-saving options of a run.

    - `gradient_checkpointing`: keep only each layer's input and recompute the layer in backward
      (about 30 % slower, activations shrink to ~1/num_layers).
    - `micro_batch_size` / `grad_accum_steps`: the batch that is in memory at once, and how many are
      accumulated per optimizer step (None: the training config decides).
    - `optimizer_offload`: keep AdamW's state on the CPU while the model trains on a GPU (saves 8 bytes
      per parameter of GPU memory, costs a host round trip per step). A no-op when training on the CPU.
    """

    gradient_checkpointing: bool = False
    micro_batch_size: int | None = None
    grad_accum_steps: int | None = None
    optimizer_offload: bool = False

    def __post_init__(self) -> None:
        for name in ("gradient_checkpointing", "optimizer_offload"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("micro_batch_size", "grad_accum_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer (or null), got {value!r}")

    def effective_batch_size(self, default_micro_batch: int, default_accum: int = 1) -> int:
        """Sequences per optimizer step: micro-batch × accumulation steps."""
        return (self.micro_batch_size or default_micro_batch) * (self.grad_accum_steps or default_accum)


def device_capacity(device: str | torch.device) -> int | None:
    """The memory a training step on `device` can use at most, in bytes: the GPU's, or the machine's
    physical memory for the CPU; None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


# ---------------------------------------------------------------------------------------- monitor
class MemoryMonitor:
    """Process and accelerator memory, cheap enough to read at every log step (two small /proc reads
    and, on CUDA, three counter queries; no synchronisation).

    `snapshot()` gives `rss_mb` (resident set now), `peak_rss_mb` (the high-water mark: VmHWM from
    /proc, resettable with `reset_peak()`; elsewhere `ru_maxrss`, which cannot be reset) and, on a CUDA
    device, `cuda_allocated_mb`, `cuda_reserved_mb` and `cuda_peak_mb` (peak allocated since the last reset).
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss_bytes(self) -> int | None:
        try:
            with open("/proc/self/statm", "rb") as f:
                return int(f.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def _hwm_bytes() -> int | None:
        try:
            with open("/proc/self/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmHWM:"):
                        return int(line.split()[1]) * 1024  # kB
        except (OSError, ValueError, IndexError):
            pass
        return None

    @staticmethod
    def _maxrss_bytes() -> int:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, kB elsewhere

    def snapshot(self) -> dict[str, float]:
        peak = self._hwm_bytes() or self._maxrss_bytes()
        rss = self._rss_bytes() or peak
        stats = {"rss_mb": round(rss / MB, 1), "peak_rss_mb": round(max(peak, rss) / MB, 1)}
        if self.cuda:
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            stats.update(cuda_allocated_mb=round(torch.cuda.memory_allocated(index) / MB, 1),
                         cuda_reserved_mb=round(torch.cuda.memory_reserved(index) / MB, 1),
                         cuda_peak_mb=round(torch.cuda.max_memory_allocated(index) / MB, 1))
        return stats

    def reset_peak(self) -> None:
        """Restart the peak counters: CUDA's peak allocated, and on Linux the process' VmHWM."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        try:  # Linux >= 4.0: writing 5 to clear_refs resets the peak RSS (VmHWM)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


# ---------------------------------------------------------------------------------------- estimate
@dataclass
class MemoryEstimate:
    """Estimated training memory in bytes; `total` is the sum of the four parts."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    num_parameters: int = 0
    trainable_parameters: int = 0
    batch_size: int = 0
    seq_len: int = 0
    precision: str = "fp32"
    gradient_checkpointing: bool = False

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "total": self.total}

    def format(self) -> str:
        """A readable table, e.g. for `minillm train --dry-run`."""
        def size(n: int) -> str:
            return f"{n / GB:.2f} GB" if n >= GB else f"{n / MB:.1f} MB"

        header = (f"training memory estimate: {self.num_parameters / 1e6:.2f}M parameters "
                  f"({self.trainable_parameters / 1e6:.2f}M trainable), batch {self.batch_size} × "
                  f"{self.seq_len} tokens, {self.precision}"
                  + (", gradient checkpointing" if self.gradient_checkpointing else ""))
        rows = [("weights", self.weights), ("gradients", self.gradients), ("optimizer", self.optimizer),
                ("activations", self.activations)]
        total = max(self.total, 1)
        lines = [header, f"  {'part':<12}{'size':>12}{'share':>8}"]
        lines += [f"  {name:<12}{size(n):>12}{100 * n / total:>7.0f}%" for name, n in rows]
        lines.append(f"  {'total':<12}{size(self.total):>12}{100:>7}%")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _mlp_parameters(config: MiniGPTConfig, intermediate: int) -> int:
    c, i = config.hidden_size, intermediate
    if config.mlp_type == "swiglu":
        return 3 * c * i + (2 * i + c if config.mlp_bias else 0)
    return 2 * c * i + (i + c if config.mlp_bias else 0)


def count_parameters(config: MiniGPTConfig) -> int:
    """Distinct parameters of `MiniGPT(config)` (a tied LM head counts once), without building it."""
    c, v, d = config.hidden_size, config.vocab_size, config.attention_head_dim
    q_dim, kv_dim = config.num_attention_heads * d, config.num_key_value_heads * d
    norm = c if config.norm_type == "rmsnorm" else 2 * c
    attention = c * q_dim + 2 * c * kv_dim + q_dim * c
    if config.qkv_bias:
        attention += q_dim + 2 * kv_dim
    if config.out_bias:
        attention += c
    if config.qk_norm:
        attention += 2 * d
    if config.is_moe:
        mlp = c * config.num_experts + config.num_experts * _mlp_parameters(config, config.moe_intermediate_size)
        if config.shared_expert_intermediate_size > 0:
            mlp += _mlp_parameters(config, config.shared_expert_intermediate_size)
    else:
        mlp = _mlp_parameters(config, config.intermediate_size)
    total = v * c + config.num_hidden_layers * (2 * norm + attention + mlp) + norm
    if config.position_embedding == "learned":
        total += config.max_position_embeddings * c
    if not config.tie_word_embeddings:
        total += v * c
    return total


def hidden_matrix_parameters(config: MiniGPTConfig) -> int:
    """Parameters of the 2-D matrices inside the blocks (attention and MLP projections, routers,
    experts): the ones Muon updates (`minillm.training.optim.is_hidden_matrix`)."""
    c, d = config.hidden_size, config.attention_head_dim
    q_dim, kv_dim = config.num_attention_heads * d, config.num_key_value_heads * d
    per_matrix = 3 if config.mlp_type == "swiglu" else 2
    if config.is_moe:
        mlp = c * config.num_experts + config.num_experts * per_matrix * c * config.moe_intermediate_size
        mlp += per_matrix * c * config.shared_expert_intermediate_size
    else:
        mlp = per_matrix * c * config.intermediate_size
    return config.num_hidden_layers * (2 * c * q_dim + 2 * c * kv_dim + mlp)


def _buffer_bytes(config: MiniGPTConfig) -> int:
    """The RoPE cos/sin tables (fp32, max_positions × head_dim each)."""
    if config.position_embedding != "rope":
        return 0
    return 2 * config.max_position_embeddings * config.attention_head_dim * 4


def _layer_activation_elements(config: MiniGPTConfig, tokens: int) -> tuple[float, float]:
    """(elements saved in the activation dtype, elements saved in fp32) by one decoder layer for
    `tokens` = batch × seq_len, counted from layers.py:

    - each norm saves its input (the residual stream) and its output; RMSNorm also saves the
      normalised x before the weight multiply (for the weight's gradient); in mixed precision its fp32
      working copies (x.float(), the normalised x) are what is saved;
    - q/k/v projections; RoPE saves rotate_half(q|k) and produces rotated q/k (SDPA's inputs);
    - SDPA (flash kernel on CPU and CUDA) saves q, k, v, its output and the log-sum-exp; the output is
      then copied into the (B, T, H·D) layout the o_proj saves;
    - SwiGLU saves gate, silu(gate), up and their product; GELU saves up and gelu(up);
    - the residual after attention (input of the second norm).
    """
    c, d = config.hidden_size, config.attention_head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    rms = config.norm_type == "rmsnorm"
    half: float = 0.0
    full: float = 0.0
    # input_layernorm: the layer input is counted once by the caller (it is also the residual)
    # attention
    half += q + 2 * kv                           # q, k, v projection outputs
    if config.qk_norm:
        full += 2 * (q + kv)                     # per-head RMSNorm: normalised x and output
    if config.position_embedding == "rope":
        half += 2 * (q + kv)                     # rotate_half(q|k) and the rotated q|k
    half += 2 * q                                # SDPA output (B, H, T, D) and its (B, T, H·D) copy
    half += c                                    # h = x + attn (second norm's input)
    # the two norms' saved tensors beyond their input
    per_norm = 2 * c if rms else c
    half += 2 * per_norm
    # MLP
    if config.is_moe:
        k = config.num_experts_per_tok
        i_moe = config.moe_intermediate_size
        per_token = (4 * i_moe if config.mlp_type == "swiglu" else 2 * i_moe) + 2 * c  # gathered x, out
        half += k * per_token
        full += config.num_experts + 2 * k       # router probs, weights
        if config.shared_expert_intermediate_size:
            s = config.shared_expert_intermediate_size
            half += 4 * s if config.mlp_type == "swiglu" else 2 * s
        half += c                                # the combined output
    else:
        i = config.intermediate_size
        half += 4 * i if config.mlp_type == "swiglu" else 2 * i
    if config.dropout > 0:
        half += 3 * c                            # masks and outputs of the dropouts
    return half * tokens, full * tokens


def activation_bytes(config: MiniGPTConfig, batch_size: int, seq_len: int, precision: str = "fp32",
                     gradient_checkpointing: bool = False) -> int:
    """Peak bytes of the forward pass' saved tensors, the logits and the loss (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
    act = 4 if precision == "fp32" else 2
    tokens = batch_size * seq_len
    c, v, n_layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    half, full = _layer_activation_elements(config, tokens)
    layer = half * act + full * 4
    layer_input = tokens * c * act               # the residual stream entering each layer
    if precision != "fp32":                      # norms compute in fp32: x.float() and x·rsqrt
        layer += 2 * 2 * tokens * c * 4
    # embeddings (learned positions add a sum), final norm and the LM head's input
    head = tokens * c * act * (3 if config.norm_type == "rmsnorm" else 2)
    # logits (activation dtype) + the shifted fp32 copy and fp32 log-softmax of causal_lm_loss; at the
    # start of backward the log-softmax's gradient and the logits' gradient take their place
    logits = tokens * v * (act + 4 + 4)
    autocast_cache = 0 if precision == "fp32" else count_parameters(config) * 2
    if gradient_checkpointing:
        # Each layer keeps only its input. The peak is either the end of the forward pass (the loss'
        # tensors) or the recomputation of one layer in backward, after the loss' tensors are freed.
        return int(n_layers * layer_input + head + max(logits, layer) + autocast_cache)
    return int(n_layers * (layer_input + layer) + head + logits + autocast_cache)


def estimate_memory(model_config: MiniGPTConfig, batch_size: int, seq_len: int, precision: str = "fp32",
                    gradient_checkpointing: bool = False, optimizer: str = "adamw",
                    trainable_fraction: float = 1.0) -> MemoryEstimate:
    """Estimate the memory of training `model_config` on micro-batches of `batch_size` × `seq_len`
    tokens (see the module docstring for what is counted).

    `precision` is the autocast dtype ("fp32", "bf16", "fp16"; weights, gradients and optimizer state
    stay fp32). `trainable_fraction` < 1 (LoRA, frozen layers) shrinks gradients and optimizer state.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer={optimizer!r} is not supported; allowed: {', '.join(OPTIMIZER_STATES)}")
    if not 0.0 <= trainable_fraction <= 1.0:
        raise ValueError(f"trainable_fraction must be in [0, 1], got {trainable_fraction}")
    if precision == "auto":
        precision = "fp32"
    n = count_parameters(model_config)
    trainable = int(round(n * trainable_fraction))
    states = trainable * OPTIMIZER_STATES[optimizer]
    if optimizer == "muon":  # the hidden matrices keep one state, the AdamW parameters two
        hidden = int(round(hidden_matrix_parameters(model_config) * trainable_fraction))
        states = hidden + 2 * (trainable - hidden)
    return MemoryEstimate(
        weights=n * 4 + _buffer_bytes(model_config),
        gradients=trainable * 4,
        optimizer=states * 4,
        activations=activation_bytes(model_config, batch_size, seq_len, precision, gradient_checkpointing),
        num_parameters=n, trainable_parameters=trainable, batch_size=batch_size, seq_len=seq_len,
        precision=precision, gradient_checkpointing=gradient_checkpointing)


# ---------------------------------------------------------------------------------------- measurement
def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the weights, buffers and (with `optimizer`) optimizer state: what lives across training
    steps. A tensor shared by two names (a tied head) counts once."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for state in (optimizer.state.values() if optimizer is not None else ()):
        tensors.update({id(t): t for t in state.values() if torch.is_tensor(t) and t.dim() > 0})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def step_peak_bytes(step: Callable[[], Any], device: str | torch.device) -> int | None:
    """Peak tensor bytes allocated while `step()` runs, above what was allocated before it (None where
    it cannot be measured: devices other than the CPU and CUDA).

    On the CPU, torch's allocator keeps no statistics and RSS is a poor measure (glibc keeps freed
    blocks, oneDNN has scratch pads, `ru_maxrss` cannot be reset and includes the interpreter and
    libraries), so the step runs under `torch.profiler` with `profile_memory=True`: every CPU tensor
    allocation is reported with the allocator's running total since profiling began, and the largest
    total is the peak. On CUDA, `torch.cuda.max_memory_allocated` is used instead.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    if device.type != "cpu":
        step()
        return None
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    peak = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.typed[0] == _EventType.Allocation and event.typed[1].device.type == "cpu":
            peak = max(peak, event.typed[1].total_allocated)
    return peak


def measure_peak_training_memory(model: nn.Module, batch_size: int, seq_len: int,
                                 device: str | torch.device = "cpu", precision: str = "fp32",
                                 seed: int = 0) -> int:
    """Peak tensor bytes of one steady-state training step of `model` (a `MiniGPT`): forward, loss,
    backward and AdamW step, as `Trainer` does it. Includes the weights and the optimizer state, so it
    is comparable with `estimate_memory(...).total`. The caller's model is not changed (a copy trains).
    `precision` "bf16"/"fp16" runs the forward pass under autocast, as the trainer does. The step's own
    peak comes from `step_peak_bytes`; one unmeasured step first creates the optimizer state, so the
    measured step is a steady-state one.
    """
    from contextlib import nullcontext

    from minillm.training.objectives import LanguageModelingObjective

    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
    device = torch.device(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    batch = {"input_ids": torch.randint(0, vocab, (batch_size, seq_len), generator=generator)}
    batch["labels"] = batch["input_ids"].clone()
    batch = {k: t.to(device) for k, t in batch.items()}
    model = copy.deepcopy(model).to(device).train()
    objective = LanguageModelingObjective()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
            out = objective(model, batch)
        out.loss_sum.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # creates the optimizer state
    return resident_bytes(model, optimizer) + step_peak_bytes(step, device)
